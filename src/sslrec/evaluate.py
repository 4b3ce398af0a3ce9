"""Full-corpus retrieval evaluation: Recall@K overall and on head / tail items.

For every held-out pair (query, target item) the query is embedded, scored against the embedding of
*every* catalogue item (exact dot product, on device, in query chunks; the catalogue's embeddings
row-sharded over all devices, top-K per shard, merged), and the pair is a hit at K
when the target is among the K highest scores. Recall@K is the mean hit rate over pairs;
``/head`` and ``/tail`` restrict the mean to pairs whose target is a head item (the most popular
``eval.head_fraction`` of the catalogue by D_train frequency) or a tail item (the rest).
The popularity recommender (the K most frequent D_train items for everyone) is scored the same way
as ``popularity/recall@K...``, a reference any useful model must beat.

When some eval target never occurs in D_train (a *cold* item: in the catalogue, never trained on),
``/cold`` restricts the mean to those pairs as well. With ``exclude_train_items`` (the default;
``eval.exclude_train_items``) each eval query's training-period items
(``Dataset.eval_seen_query / eval_seen_item``, or the D_train pairs of its query row) are removed
from its ranking, for the model and for the popularity recommender alike; a pair's own target is
never removed. The model's pairs are then scored by the target's rank among the remaining items
(the number of items scored above it, ties broken by the lower index as top-K does), computed on
device per query chunk. The embedded dataset's eval queries are new, so nothing is removed there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sslrec import parallel
from sslrec.data import table as table_lib


EVAL_ITEM_CHUNK = 32768  # catalogue rows scored per block on a device (running top-k)


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


def recall_table(hits: np.ndarray, targets: np.ndarray, head: np.ndarray, ks, prefix: str = "",
                 cold: np.ndarray | None = None) -> dict[str, float]:
  """Recall@K overall / head / tail from per-pair hits ``bool [E, len(ks)]``; also ``/cold`` when
  ``cold`` (``bool [num_items]``) marks some target."""
  is_head = head[targets]
  is_cold = cold[targets] if cold is not None else np.zeros(targets.shape, bool)
  out = {}
  for j, k in enumerate(ks):
    out[f"{prefix}recall@{k}"] = float(hits[:, j].mean())
    out[f"{prefix}recall@{k}/head"] = float(hits[is_head, j].mean()) if is_head.any() else float("nan")
    out[f"{prefix}recall@{k}/tail"] = float(hits[~is_head, j].mean()) if (~is_head).any() else float("nan")
    if is_cold.any():
      out[f"{prefix}recall@{k}/cold"] = float(hits[is_cold, j].mean())
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
  chunk = EVAL_ITEM_CHUNK if item_emb.shape[0] > EVAL_ITEM_CHUNK * mesh.size else None
  items, n_items = parallel.shard_rows(item_emb.astype(np.float32), mesh, chunk or 1)
  top_k = parallel.make_sharded_top_k(mesh, min(k, n_items), n_items, chunk)
  out = []
  for start, end in _chunks(num_queries, batch_size):
    size = min(batch_size, num_queries)
    q = query_fn(params, _pad_rows(table_lib.take(queries, np.arange(start, end)), size))
    _, ids = top_k(q, items)
    out.append(np.asarray(ids)[: end - start])
  return np.concatenate(out, axis=0).astype(np.int32)


class SeenItems:
  """The items to remove from each eval query's ranking, grouped by query row (CSR)."""

  def __init__(self, query: np.ndarray, item: np.ndarray):
    order = np.lexsort((item, query))
    self.query = np.asarray(query)[order]
    self.item = np.asarray(item)[order]

  @classmethod
  def of(cls, dataset: table_lib.Dataset) -> "SeenItems":
    """The dataset's ``eval_seen_*`` pairs, or the D_train pairs of its eval query rows."""
    if dataset.eval_seen_query is not None:
      return cls(dataset.eval_seen_query, dataset.eval_seen_item)
    derived = np.isin(dataset.train_query, np.unique(dataset.eval_query))
    return cls(dataset.train_query[derived], dataset.train_item[derived])

  def pairs(self, query_rows: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(pair [M], item [M])``: the items removed for each of the pairs ``(query_rows [B],
    targets [B])`` (a pair's own target excepted)."""
    start = np.searchsorted(self.query, query_rows, side="left")
    count = np.searchsorted(self.query, query_rows, side="right") - start
    pair = np.repeat(np.arange(query_rows.size), count)
    offset = np.arange(pair.size) - np.repeat(np.cumsum(count) - count, count)
    item = self.item[np.repeat(start, count) + offset]
    keep = item != targets[pair]
    return pair[keep], item[keep]


def _target_ranks(query_emb: jax.Array, item_emb: jax.Array, targets: jax.Array,
                  ex_pair: jax.Array, ex_item: jax.Array) -> jax.Array:
  """``int32 [B]``: items ranked above each target (score higher, or equal at a lower index),
  not counting the removed ``(ex_pair, ex_item)`` entries (out-of-range pairs are padding)."""
  scores = query_emb @ item_emb.T  # [B, N]
  t = jnp.take_along_axis(scores, targets[:, None], axis=1)  # [B, 1]
  ids = jnp.arange(item_emb.shape[0])[None, :]
  above = (scores > t) | ((scores == t) & (ids < targets[:, None]))
  above = above.at[ex_pair, ex_item].set(False, mode="drop")
  return above.sum(axis=1).astype(jnp.int32)


_target_ranks_jit = jax.jit(_target_ranks)


def _hits_excluding(params, model, queries: dict, query_rows: np.ndarray, targets: np.ndarray,
                    item_emb: np.ndarray, seen: SeenItems, item_freq: np.ndarray, mesh, *, ks,
                    batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Hits ``bool [E, len(ks)]`` of the model and of popularity with the seen items removed."""
  rep = parallel.replicated(mesh)
  query_fn = jax.jit(lambda p, b: model.apply(p, b, method=model.query_tower), out_shardings=rep)
  pop_rank = np.empty(item_freq.size, np.int64)
  pop_rank[np.argsort(-item_freq, kind="stable")] = np.arange(item_freq.size)
  items = jnp.asarray(item_emb, jnp.float32)
  n = targets.size
  ranks, pop_ranks = [], []
  for start, end in _chunks(n, batch_size):
    size = min(batch_size, n)
    t = targets[start:end]
    pair, item = seen.pairs(query_rows[start:end], t)
    # Popularity: the target's rank among the items not removed.
    lower = np.bincount(pair[pop_rank[item] < pop_rank[t[pair]]], minlength=t.size)
    pop_ranks.append(pop_rank[t] - lower)
    # Model: pad to static shapes (entries padded to a power of two, pointing at row `size`).
    m = max(1024, 1 << int(max(pair.size - 1, 1)).bit_length())
    ex_pair = np.full(m, size, np.int32)
    ex_item = np.zeros(m, np.int32)
    ex_pair[:pair.size], ex_item[:pair.size] = pair, item
    q = query_fn(params, _pad_rows(table_lib.take(queries, np.arange(start, end)), size))
    tt = np.concatenate([t, np.zeros(size - t.size, np.int32)])
    q = np.asarray(q.addressable_data(0))  # replicated: this process's copy
    r = _target_ranks_jit(q, items, tt, ex_pair, ex_item)
    ranks.append(np.asarray(r)[: end - start])
  rank, pop = np.concatenate(ranks), np.concatenate(pop_ranks)
  return (np.stack([rank < k for k in ks], axis=1), np.stack([pop < k for k in ks], axis=1))


def evaluate(params, model, dataset: table_lib.Dataset, item_freq: np.ndarray, head: np.ndarray,
             *, mesh, ks, batch_size: int = 1024, max_pairs: int = 0,
             exclude_train_items: bool = True) -> dict[str, float]:
  """Recall@K (overall / head / tail, and cold when eval has cold targets) of the model and of
  the popularity recommender; ``exclude_train_items``: see the module docstring."""
  ks = tuple(int(k) for k in ks)
  item_emb = item_embeddings(params, model, dataset, mesh, batch_size)  # [N, D]
  n = dataset.num_eval if max_pairs <= 0 else min(max_pairs, dataset.num_eval)
  targets = dataset.eval_item[:n].astype(np.int32)
  query_rows = dataset.eval_query[:n]
  queries = table_lib.take(dataset.queries, query_rows)
  seen = SeenItems.of(dataset) if exclude_train_items else None
  if seen is not None and not np.isin(query_rows, seen.query).any():
    seen = None  # nothing to remove (the embedded dataset): the sharded top-K path
  if seen is None:
    top = retrieve(params, model, queries, n, item_emb, mesh, k=max(ks), batch_size=batch_size)
    hits, pop_hits = hits_at(top, targets, ks), popularity_hits(item_freq, targets, ks)
  else:
    hits, pop_hits = _hits_excluding(params, model, queries, query_rows, targets, item_emb, seen,
                                     item_freq, mesh, ks=ks, batch_size=batch_size)
  cold = np.asarray(item_freq) == 0
  out = recall_table(hits, targets, head, ks, cold=cold)
  out.update(recall_table(pop_hits, targets, head, ks, prefix="popularity/", cold=cold))
  out["eval/pairs"] = float(n)
  if cold[targets].any():
    out["eval/cold_pairs"] = float(cold[targets].sum())
  return out


def format_table(metrics: dict[str, float], ks) -> str:
  """A small text table: rows model / popularity, columns Recall@K overall, head, tail (, cold)."""
  parts = ("", "/head", "/tail") + (("/cold",) if any(k.endswith("/cold") for k in metrics) else ())
  cols = [f"R@{k}{s}" for k in ks for s in parts]
  lines = ["| " + " | ".join(["recommender"] + cols) + " |",
           "|" + "---|" * (len(cols) + 1)]
  for name, prefix in (("model", ""), ("popularity", "popularity/")):
    vals = [metrics.get(f"{prefix}recall@{k}{s}", float("nan")) for k in ks
            for s in parts]
    lines.append("| " + " | ".join([name] + [f"{v:.4f}" for v in vals]) + " |")
  return "\n".join(lines)
