"""Full-corpus retrieval evaluation: Recall@K overall and on head / tail items.

For every held-out pair (query, target item) the query is embedded, scored against the embedding of
*every* catalogue item (exact dot product, on device, in query chunks; the catalogue's embeddings
row-sharded over all devices, top-K per shard, merged), and the pair is a hit at K
when the target is among the K highest scores. Recall@K is the mean hit rate over pairs;
``/head`` and ``/tail`` restrict the mean to pairs whose target is a head item (the most popular
``eval.head_fraction`` of the catalogue by D_train frequency) or a tail item (the rest).
The popularity recommender (the K most frequent D_train items for everyone) is scored the same way
as ``popularity/recall@K...``, a reference any useful model must beat.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sslrec import parallel
from sslrec.data import table as table_lib


def _chunks(n: int, size: int):
  for start in range(0, n, size):
    yield start, min(start + size, n)


def _pad_rows(batch: dict, size: int) -> dict:
  """Pads every array's leading dim up to ``size`` by repeating row 0 (static shapes)."""
  def pad(x):
    if x.shape[0] == size:
      return x
    extra = np.repeat(x[:1], size - x.shape[0], axis=0)
    return np.concatenate([x, extra], axis=0)
  return {k: pad(v) for k, v in batch.items()}


def embed_table(fn, table: dict, n: int, batch_size: int) -> jax.Array:
  """Applies a jitted ``fn(batch) -> [b, D]`` over ``n`` rows in fixed-size chunks: ``[n, D]``."""
  outs = []
  for start, end in _chunks(n, batch_size):
    rows = np.arange(start, end)
    batch = _pad_rows(table_lib.take(table, rows), min(batch_size, n))
    outs.append(fn(batch)[: end - start])
  return jnp.concatenate(outs, axis=0)


def hits_at(top: np.ndarray, targets: np.ndarray, ks) -> np.ndarray:
  """``bool [E, len(ks)]``: target within the first k of each row of ``top [E, >= max(ks)]``."""
  found = top == targets[:, None]
  return np.stack([found[:, :k].any(axis=1) for k in ks], axis=1)


def recall_table(hits: np.ndarray, targets: np.ndarray, head: np.ndarray, ks, prefix: str = ""
                 ) -> dict[str, float]:
  """Recall@K overall / head / tail from per-pair hits ``bool [E, len(ks)]``."""
  is_head = head[targets]
  out = {}
  for j, k in enumerate(ks):
    out[f"{prefix}recall@{k}"] = float(hits[:, j].mean())
    out[f"{prefix}recall@{k}/head"] = float(hits[is_head, j].mean()) if is_head.any() else float("nan")
    out[f"{prefix}recall@{k}/tail"] = float(hits[~is_head, j].mean()) if (~is_head).any() else float("nan")
  return out


def popularity_hits(item_freq: np.ndarray, targets: np.ndarray, ks) -> np.ndarray:
  """Hits of the most-popular recommender: ``bool [E, len(ks)]``."""
  order = np.argsort(-item_freq, kind="stable")
  rank = np.empty_like(order)
  rank[order] = np.arange(len(order))
  return np.stack([rank[targets] < k for k in ks], axis=1)


def item_embeddings(params, model, dataset: table_lib.Dataset, mesh, batch_size: int) -> np.ndarray:
  """``float32 [num_items, D]`` item-tower embeddings of the whole catalogue (on every process)."""
  rep = parallel.replicated(mesh)
  fn = jax.jit(lambda p, b: model.apply(p, b, method=model.item_tower), out_shardings=rep)
  return np.asarray(embed_table(lambda b: fn(params, b), dataset.items, dataset.num_items,
                                batch_size))


def retrieve(params, model, queries: dict, num_queries: int, item_emb: np.ndarray, mesh, *,
             k: int, batch_size: int) -> np.ndarray:
  """Top-``k`` catalogue rows for each query row: ``int32 [num_queries, k]``.

  The catalogue's embeddings are row-sharded over every device; each device scores its rows
  against a replicated query chunk, keeps its local top-k, and the candidates are merged
  (``parallel.make_sharded_top_k``).
  """
  rep = parallel.replicated(mesh)
  query_fn = jax.jit(lambda p, b: model.apply(p, b, method=model.query_tower), out_shardings=rep)
  items, n_items = parallel.shard_rows(item_emb.astype(np.float32), mesh)
  top_k = parallel.make_sharded_top_k(mesh, min(k, n_items), n_items)
  out = []
  for start, end in _chunks(num_queries, batch_size):
    size = min(batch_size, num_queries)
    q = query_fn(params, _pad_rows(table_lib.take(queries, np.arange(start, end)), size))
    _, ids = top_k(q, items)
    out.append(np.asarray(ids)[: end - start])
  return np.concatenate(out, axis=0).astype(np.int32)


def evaluate(params, model, dataset: table_lib.Dataset, item_freq: np.ndarray, head: np.ndarray,
             *, mesh, ks, batch_size: int = 1024, max_pairs: int = 0) -> dict[str, float]:
  """Recall@K (overall / head / tail) of the model and of the popularity recommender."""
  ks = tuple(int(k) for k in ks)
  item_emb = item_embeddings(params, model, dataset, mesh, batch_size)  # [N, D]
  n = dataset.num_eval if max_pairs <= 0 else min(max_pairs, dataset.num_eval)
  targets = dataset.eval_item[:n].astype(np.int32)
  queries = table_lib.take(dataset.queries, dataset.eval_query[:n])
  top = retrieve(params, model, queries, n, item_emb, mesh, k=max(ks), batch_size=batch_size)
  out = recall_table(hits_at(top, targets, ks), targets, head, ks)
  out.update(recall_table(popularity_hits(item_freq, targets, ks), targets, head, ks,
                          prefix="popularity/"))
  out["eval/pairs"] = float(n)
  return out


def format_table(metrics: dict[str, float], ks) -> str:
  """A small text table: rows model / popularity, columns Recall@K overall, head, tail."""
  cols = [f"R@{k}{s}" for k in ks for s in ("", "/head", "/tail")]
  lines = ["| " + " | ".join(["recommender"] + cols) + " |",
           "|" + "---|" * (len(cols) + 1)]
  for name, prefix in (("model", ""), ("popularity", "popularity/")):
    vals = [metrics.get(f"{prefix}recall@{k}{s}", float("nan")) for k in ks
            for s in ("", "/head", "/tail")]
    lines.append("| " + " | ".join([name] + [f"{v:.4f}" for v in vals]) + " |")
  return "\n".join(lines)
