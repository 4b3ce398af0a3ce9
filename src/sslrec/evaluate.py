"""Full-corpus retrieval evaluation: Recall@K overall and on head / tail items.

For every held-out pair (query, target item) the query is embedded, scored against the embedding of
*every* catalogue item (exact dot product, on device, in query chunks), and the pair is a hit at K
when the target is among the K highest scores. Recall@K is the mean hit rate over pairs;
``/head`` and ``/tail`` restrict the mean to pairs whose target is a head item (the most popular
``eval.head_fraction`` of the catalogue by D_train frequency) or a tail item (the rest).
The popularity recommender (the K most frequent D_train items for everyone) is scored the same way
as ``popularity/recall@K...``, a reference any useful model must beat.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

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


@functools.partial(jax.jit, static_argnames=("ks",))
def _hits(query_emb: jax.Array, item_emb: jax.Array, targets: jax.Array, ks: tuple[int, ...]
          ) -> jax.Array:
  """``bool [B, len(ks)]``: target within the top-k of ``query_emb @ item_emb.T``."""
  scores = query_emb @ item_emb.T  # [B, N]
  _, top = jax.lax.top_k(scores, max(ks))  # [B, Kmax]
  found = top == targets[:, None]
  return jnp.stack([found[:, :k].any(axis=1) for k in ks], axis=1)


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


def evaluate(params, model, dataset: table_lib.Dataset, item_freq: np.ndarray, head: np.ndarray,
             *, ks, batch_size: int = 1024, max_pairs: int = 0) -> dict[str, float]:
  """Recall@K (overall / head / tail) of the model and of the popularity recommender."""
  ks = tuple(int(k) for k in ks)
  item_fn = jax.jit(lambda b: model.apply(params, b, method=model.item_tower))
  query_fn = jax.jit(lambda b: model.apply(params, b, method=model.query_tower))
  item_emb = embed_table(item_fn, dataset.items, dataset.num_items, batch_size)  # [N, D]

  n = dataset.num_eval if max_pairs <= 0 else min(max_pairs, dataset.num_eval)
  targets = dataset.eval_item[:n].astype(np.int32)
  queries = table_lib.take(dataset.queries, dataset.eval_query[:n])
  hits = []
  for start, end in _chunks(n, batch_size):
    rows = np.arange(start, end)
    size = min(batch_size, n)
    q = query_fn(_pad_rows(table_lib.take(queries, rows), size))
    t = np.concatenate([targets[start:end], np.full(size - (end - start), -1, np.int32)])
    hits.append(np.asarray(_hits(q, item_emb, jnp.asarray(t), ks))[: end - start])
  hits = np.concatenate(hits, axis=0)

  out = recall_table(hits, targets, head, ks)
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
