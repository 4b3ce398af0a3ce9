"""Full-corpus retrieval evaluation per query: Recall, NDCG, MAP, coverage at K; references.

**Queries.** The eval pairs ``(eval_query [E], eval_item [E])`` (the first ``max_pairs`` when > 0)
are grouped by distinct query row; each distinct query is embedded and scored against *every*
catalogue item once (exact dot product, on device, in chunks of ``batch_size`` queries; the
catalogue's embeddings row-sharded over all devices, in blocks of ``item_chunk`` rows per
device, a running top-K per block, the per-device candidates merged), giving its top-K list
(K = max(ks); ties: the lower item index first, as ``jax.lax.top_k``). All of its held-out items are
its positives; they are never removed from its ranking.

**Seen items.** With ``exclude_train_items`` each eval query's seen items (``Dataset.eval_seen_*``,
or the D_train pairs of its query row), its positives excepted, are removed from its ranking, for
the model and the references alike. No ``[queries, catalogue]`` score matrix is ever built: inside
a device's score block ``[chunk, block rows]`` the chunk's removed ``(query in chunk, item)`` pairs
are set to -inf before the block's top-K (K, no extra), the pairs padded to a power of two (at
least ``MIN_EXCLUDED``) so that the scoring function compiles once per size, all of them in the
first call. The padded pairs are computed once, in ``Evaluator.__init__``.

**Metrics** (``ks``; every value a float; ``rank`` = 0-based position in the query's top-K list):
  * ``recall@K``: the mean over *pairs* of [target in its query's top K] (a query with several
    positives contributes one term per pair); ``/head`` and ``/tail`` restrict the pairs by their
    target (``head``: ``bool [num_items]``, the most popular ``eval.head_fraction``), ``/cold`` to
    targets never in D_train (``item_freq == 0``; only when there are some);
  * ``ndcg@K``: per query, ``sum_{positives p, rank_p < K} 1 / log2(rank_p + 2)`` over the ideal
    ``sum_{i < min(#positives, K)} 1 / log2(i + 2)``; the mean over queries. ``/head``, ``/tail``:
    the same over each query's head (tail) positives only, queries without any skipped;
  * ``map@K``: per query, the sum over its hits at rank r < K of precision@(r+1), over
    ``min(#positives, K)``; the mean over queries;
  * ``coverage@K``: the fraction of the catalogue in at least one query's top K;
  * ``recall@K/decile_d`` (d = 0..9, the largest K only): recall of the pairs whose target is in
    popularity decile d (items sorted by D_train frequency, most popular first, ties by index,
    cut into 10 groups of equal size; d = 0 the most popular); NaN for an empty group;
  * the same keys for each reference, prefixed ``popularity/``, ``itemknn/`` (``als/``): see
    ``references.py``; they do not depend on the parameters and are computed once per Evaluator;
  * ``eval/pairs``, ``eval/queries``, and ``eval/cold_pairs`` when there are cold targets.
Duplicate pairs count twice in recall and once (one positive) in the per-query metrics.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from sslrec import parallel, prior
from sslrec import references as references_lib
from sslrec.data import table as table_lib

EVAL_ITEM_CHUNK = 131072  # most catalogue rows scored per block on a device (running top-k)
EVAL_SCORE_BLOCK = 1 << 27  # most scores of one block on a device: 512 MiB of float32


def item_chunk(num_items: int, mesh, batch_size: int = 1024) -> int | None:
  """Catalogue rows scored per block on a device for ``batch_size`` queries, or None (each
  device's rows in one block) when they fit one block. A block holds at most ``EVAL_ITEM_CHUNK``
  rows and ``EVAL_SCORE_BLOCK`` scores (``batch_size`` x rows, a power of two of at least 4096
  rows); a device's rows are split into the fewest such blocks of equal length (a multiple of
  4096), so the padding stays under 4096 rows a block. Long blocks pay: fewer running top-k
  merges, and ``parallel.block_top_k``'s two-stage selection saves more on a long block
  (docs/performance.md, issue 16 third part)."""
  fit = 1 << max(12, int(math.log2(max(1, EVAL_SCORE_BLOCK // max(1, batch_size)))))
  cap = min(EVAL_ITEM_CHUNK, fit)
  per_device = math.ceil(num_items / mesh.size)
  if per_device <= cap:
    return None
  blocks = math.ceil(per_device / cap)
  step = min(4096, cap)
  rows = math.ceil(per_device / blocks)
  return math.ceil(rows / step) * step


MIN_EXCLUDED = 256  # smallest padded count of a query chunk's removed (query, item) pairs
NUM_DECILES = 10


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


def _host(x) -> np.ndarray:
  """This process's copy of a replicated array, as numpy."""
  if isinstance(x, jax.Array):
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


def _replicate(x: np.ndarray, mesh) -> jax.Array:
  """A host array (the same on every process) replicated on every device of ``mesh``."""
  return jax.make_array_from_callback(x.shape, parallel.replicated(mesh), lambda idx: x[idx])


def embed_table(fn, table: dict, n: int, batch_size: int) -> np.ndarray:
  """Applies a jitted ``fn(batch) -> [b, D]`` (replicated out) over ``n`` rows in fixed-size
  chunks: ``[n, D]`` on the host."""
  outs = []
  for start, end in _chunks(n, batch_size):
    rows = np.arange(start, end)
    batch = _pad_rows(table_lib.take(table, rows), min(batch_size, n))
    outs.append(_host(fn(batch))[: end - start])
  return np.concatenate(outs, axis=0)


def item_embeddings(params, model, dataset: table_lib.Dataset, mesh, batch_size: int) -> np.ndarray:
  """``float32 [num_items, D]`` item-tower embeddings of the whole catalogue (on every process)."""
  rep = parallel.replicated(mesh)
  fn = jax.jit(lambda p, b: model.apply(p, b, method=model.item_tower), out_shardings=rep)
  return embed_table(lambda b: fn(params, b), dataset.items, dataset.num_items, batch_size)


def retrieve(
  params,
  model,
  queries: dict,
  num_queries: int,
  item_emb: np.ndarray,
  mesh,
  *,
  k: int,
  batch_size: int,
) -> np.ndarray:
  """Top-``k`` catalogue rows for each query row: ``int32 [num_queries, k]``.

  The catalogue's embeddings are row-sharded over every device; each device scores its rows
  against a replicated query chunk, keeps its local top-k, and the candidates are merged
  (``parallel.make_sharded_top_k``).
  """
  rep = parallel.replicated(mesh)
  query_fn = jax.jit(lambda p, b: model.apply(p, b, method=model.query_tower), out_shardings=rep)
  chunk = item_chunk(item_emb.shape[0], mesh, min(batch_size, num_queries))
  items, n_items = parallel.shard_rows(item_emb.astype(np.float32), mesh, chunk or 1)
  top_k = parallel.make_sharded_top_k(mesh, min(k, n_items), n_items, chunk)
  out = []
  for start, end in _chunks(num_queries, batch_size):
    size = min(batch_size, num_queries)
    q = query_fn(params, _pad_rows(table_lib.take(queries, np.arange(start, end)), size))
    _, ids = top_k(q, items)
    out.append(_host(ids)[: end - start])
  return np.concatenate(out, axis=0).astype(np.int32)


class SeenItems:
  """The items each eval query row has seen, grouped by query row (sorted by row, then item)."""

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

  def of_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(index [M], item [M])``: the seen items of each of ``rows [B]`` (``index`` into rows)."""
    start = np.searchsorted(self.query, rows, side="left")
    count = np.searchsorted(self.query, rows, side="right") - start
    index = np.repeat(np.arange(rows.size), count)
    offset = np.arange(index.size) - np.repeat(np.cumsum(count) - count, count)
    return index, self.item[np.repeat(start, count) + offset]


def make_excluding_top_k(mesh, k: int, num_valid: int, chunk: int | None = None):
  """``fn(q [B, D], items [N_pad, D], ex_query [M], ex_item [M]) -> (scores, ids) [B, k]``.

  ``q``, ``ex_*`` replicated; ``items`` row-sharded over every device (``parallel.shard_rows``).
  Each device scores its rows (in blocks of ``chunk`` rows when given, a running top-k), sets the
  scores of the removed pairs ``(ex_query[m], ex_item[m])`` that fall in the block to -inf
  (``ex_query >= B`` is padding), keeps its local top-k, and the per-device candidates are
  all-gathered and merged. Padding rows (id >= num_valid) and removed items score -inf: a caller
  reads an id whose score is -inf as "no item". Ties: the lower item id first. The dot products
  run at full float32 precision (no TF32), so rankings match a float32 reference.
  """
  return parallel.make_sharded_top_k(
    mesh, k, num_valid, chunk, exclude=True, precision=jax.lax.Precision.HIGHEST
  )


def popularity_deciles(item_freq: np.ndarray) -> np.ndarray:
  """``int [N]``: each item's popularity decile (0 = most frequent in D_train; ties by index)."""
  order, rank = references_lib.popularity_order(item_freq)
  del order
  return rank * NUM_DECILES // max(rank.size, 1)


def target_ranks(top: np.ndarray, query: np.ndarray, target: np.ndarray) -> np.ndarray:
  """``int32 [P]``: position of ``target[p]`` in ``top[query[p]]`` (``top [B, K]``; K if absent)."""
  match = top[query] == target[:, None]
  return np.where(match.any(axis=1), match.argmax(axis=1), top.shape[1]).astype(np.int32)


def _discounts(k: int) -> np.ndarray:
  """``[k + 1]``: ``d[m] = sum_{i < m} 1 / log2(i + 2)``, the ideal DCG of m hits."""
  return np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(k) + 2.0))])


def _ndcg(query: np.ndarray, rank: np.ndarray, k: int, num_queries: int) -> float:
  """Mean NDCG@k over the queries with positives; ``(query, rank)`` one entry per positive."""
  npos = np.bincount(query, minlength=num_queries)
  if not (npos > 0).any():
    return float("nan")
  gain = np.where(rank < k, 1.0 / np.log2(np.minimum(rank, k) + 2.0), 0.0)
  dcg = np.bincount(query, weights=gain, minlength=num_queries)
  present = npos > 0
  return float(np.mean(dcg[present] / _discounts(k)[np.minimum(npos[present], k)]))


def _map(query: np.ndarray, rank: np.ndarray, k: int, num_queries: int) -> float:
  """Mean MAP@k over the queries with positives; ``(query, rank)`` one entry per positive."""
  npos = np.bincount(query, minlength=num_queries)
  order = np.lexsort((rank, query))
  q, r = query[order], rank[order]
  hit = r < k
  csum = np.cumsum(hit)
  start = np.cumsum(npos) - npos  # first entry of each query in the sorted order
  before = np.concatenate([[0], csum])[start][q]
  prec = np.where(hit, (csum - before) / (r + 1.0), 0.0)
  ap = np.bincount(q, weights=prec, minlength=num_queries)
  present = npos > 0
  return float(np.mean(ap[present] / np.minimum(npos[present], k)))


def rank_metrics(
  rank: np.ndarray,
  query: np.ndarray,
  target: np.ndarray,
  first: np.ndarray,
  *,
  num_queries: int,
  ks,
  head: np.ndarray,
  cold: np.ndarray,
  decile: np.ndarray,
  prefix: str = "",
) -> dict[str, float]:
  """The metrics of the module docstring from per-pair ranks.

  Args:
    rank: ``int [E]`` each pair's target position in its query's top-max(ks) list (max(ks) if
      absent); query: ``int [E]`` the pair's query (0..num_queries-1); target: ``int [E]`` item.
    first: ``int [N]`` each item's best position in any query's list (max(ks) if in none).
    head / cold: ``bool [N]``; decile: ``int [N]`` popularity deciles.
  """
  ks = tuple(int(k) for k in ks)
  rank, query, target = (np.asarray(a) for a in (rank, query, target))
  is_head, is_cold = head[target], cold[target]
  n = first.size
  _, uniq = np.unique(query.astype(np.int64) * n + target, return_index=True)
  dq, dr, dh = query[uniq], rank[uniq], is_head[uniq]  # distinct (query, positive) pairs
  mean = lambda x: float(x.mean()) if x.size else float("nan")
  out = {}
  for k in ks:
    hit = rank < k
    out[f"{prefix}recall@{k}"] = mean(hit)
    out[f"{prefix}recall@{k}/head"] = mean(hit[is_head])
    out[f"{prefix}recall@{k}/tail"] = mean(hit[~is_head])
    if is_cold.any():
      out[f"{prefix}recall@{k}/cold"] = mean(hit[is_cold])
    out[f"{prefix}ndcg@{k}"] = _ndcg(dq, dr, k, num_queries)
    out[f"{prefix}ndcg@{k}/head"] = _ndcg(dq[dh], dr[dh], k, num_queries)
    out[f"{prefix}ndcg@{k}/tail"] = _ndcg(dq[~dh], dr[~dh], k, num_queries)
    out[f"{prefix}map@{k}"] = _map(dq, dr, k, num_queries)
    out[f"{prefix}coverage@{k}"] = float(np.mean(first < k))
  k = max(ks)
  d = decile[target]
  for g in range(NUM_DECILES):
    out[f"{prefix}recall@{k}/decile_{g}"] = mean(rank[d == g] < k)
  return out


class Evaluator:
  """Evaluates one dataset's eval pairs, many times (built once per run and split).

  ``Evaluator(model, dataset, item_freq, head, mesh=..., ks=...)(params) -> dict[str, float]``.
  ``__init__`` groups the pairs by query, precomputes each query chunk's removed items (padded)
  and creates the jitted item tower, query tower and excluding top-K; a second call compiles
  nothing. References are computed on the first call and cached.

  Args:
    model: the two-tower flax module (``item_tower`` / ``query_tower`` methods).
    dataset: its ``eval_*`` pairs and seen items are evaluated (see the module docstring).
    item_freq: ``[N]`` D_train item frequencies; head: ``bool [N]`` head items.
    mesh: the device mesh; ks: the cut-offs K.
    batch_size: queries (and catalogue rows for the item tower) per chunk.
    max_pairs: > 0: only the first ``max_pairs`` eval pairs.
    exclude_train_items: remove each query's seen items (its positives excepted). The seen
      items stay the references' query histories either way (a dataset loaded with
      ``eval.exclude_train_items=False`` has none, and ItemKNN / ALS are popularity there).
    references: names from ``references.REFERENCES``; neighbors: ItemKNN's per-item neighbours.
    popularity_prior, temperature: the model ranks by ``prior.py``'s score (0: the towers' dot
      product alone); ``temperature`` is the main loss's.
  """

  def __init__(
    self,
    model,
    dataset: table_lib.Dataset,
    item_freq: np.ndarray,
    head: np.ndarray,
    *,
    mesh,
    ks,
    batch_size: int = 1024,
    max_pairs: int = 0,
    exclude_train_items: bool = True,
    references: tuple[str, ...] = ("popularity", "itemknn"),
    neighbors: int = 100,
    popularity_prior: float = 0.0,
    temperature: float = 1.0,
  ):
    self.ks = tuple(int(k) for k in ks)
    if not self.ks or min(self.ks) < 1:
      raise ValueError(f"ks={ks}: need at least one K >= 1")
    self.references = tuple(references)
    for name in self.references:
      if name not in references_lib.REFERENCES:
        raise ValueError(f"reference {name!r}; allowed: {references_lib.REFERENCES}")
    self.k = max(self.ks)
    self.model, self.dataset, self.mesh = model, dataset, mesh
    self.batch_size, self.neighbors = int(batch_size), int(neighbors)
    n_items = self.num_items = dataset.num_items
    self.item_freq = np.asarray(item_freq)
    self.prior_weight, self.temperature = float(popularity_prior), float(temperature)
    self.head = np.asarray(head, bool)
    self.cold = self.item_freq == 0
    self.decile = popularity_deciles(self.item_freq)
    self.pop_order, self.pop_rank = references_lib.popularity_order(self.item_freq)

    n = dataset.num_eval if max_pairs <= 0 else min(max_pairs, dataset.num_eval)
    rows, items = np.asarray(dataset.eval_query[:n]), np.asarray(dataset.eval_item[:n])
    self.query_rows, inverse = np.unique(rows, return_inverse=True)  # [Q] distinct query rows
    order = np.argsort(inverse, kind="stable")  # pairs grouped by query
    self.pair_query = inverse[order].astype(np.int64)  # [E] index into query_rows
    self.target = items[order].astype(np.int64)  # [E]
    self.num_pairs, self.num_queries = int(n), int(self.query_rows.size)
    self.queries = table_lib.take(dataset.queries, self.query_rows)

    # History (seen items) of each distinct query, and the removed ones (positives excepted).
    hq, hi = SeenItems.of(dataset).of_rows(self.query_rows)
    key = np.unique(hq.astype(np.int64) * n_items + hi)
    self.history = (key // n_items, key % n_items)  # sorted by query
    if exclude_train_items:
      key = key[~np.isin(key, self.pair_query * n_items + self.target)]
    else:
      key = key[:0]
    self.excluded = (key // n_items, key % n_items)  # sorted by query

    self.chunk = min(self.batch_size, self.num_queries)
    self.bounds = list(_chunks(self.num_queries, self.chunk))
    self._padded_excluded = [self._pad_excluded(s, e) for s, e in self.bounds]

    rep = parallel.replicated(mesh)
    self._item_fn = jax.jit(
      lambda p, b: model.apply(p, b, method=model.item_tower), out_shardings=rep
    )
    self._query_fn = jax.jit(
      lambda p, b: model.apply(p, b, method=model.query_tower), out_shardings=rep
    )
    self._item_chunk = item_chunk(n_items, mesh, self.chunk)
    self._top_k = make_excluding_top_k(mesh, min(self.k, n_items), n_items, self._item_chunk)
    self._reference_metrics = None

  def _rows_of(self, pairs: tuple[np.ndarray, np.ndarray], start: int, end: int):
    """The ``(query - start, item)`` entries of ``pairs`` (sorted by query) for queries
    ``start..end-1``."""
    lo, hi = np.searchsorted(pairs[0], [start, end])
    return pairs[0][lo:hi] - start, pairs[1][lo:hi]

  def _pad_excluded(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
    """A chunk's removed pairs, padded to a power of two (``MIN_EXCLUDED`` at least); padding
    entries point at query ``self.chunk`` (out of range: dropped on device)."""
    q, i = self._rows_of(self.excluded, start, end)
    size = max(MIN_EXCLUDED, 1 << max(int(q.size) - 1, 0).bit_length())
    ex_q = np.full(size, self.chunk, np.int32)
    ex_i = np.zeros(size, np.int32)
    ex_q[: q.size], ex_i[: q.size] = q, i
    return ex_q, ex_i

  # -- the model ------------------------------------------------------------------------------

  def _model_tops(self, params, prior_weight: float | None = None):
    """Yields ``(start, end, top int32 [end - start, K])`` per query chunk (-1: no item);
    ``prior_weight``: the popularity prior's weight (None: the Evaluator's)."""
    w = self.prior_weight if prior_weight is None else float(prior_weight)
    item_emb = embed_table(
      lambda b: self._item_fn(params, b), self.dataset.items, self.num_items, self.batch_size
    )
    item_emb = prior.with_items(item_emb, self.item_freq, w, self.temperature)
    items, _ = parallel.shard_rows(item_emb.astype(np.float32), self.mesh, self._item_chunk or 1)
    for (start, end), (ex_q, ex_i) in zip(self.bounds, self._padded_excluded, strict=True):
      batch = _pad_rows(table_lib.take(self.queries, np.arange(start, end)), self.chunk)
      q = prior.with_queries(self._query_fn(params, batch), w)
      v, ids = self._top_k(q, items, _replicate(ex_q, self.mesh), _replicate(ex_i, self.mesh))
      v, ids = _host(v)[: end - start], _host(ids)[: end - start].astype(np.int32)
      ids[np.isneginf(v)] = -1
      if ids.shape[1] < self.k:  # a catalogue smaller than K
        ids = np.pad(ids, ((0, 0), (0, self.k - ids.shape[1])), constant_values=-1)
      yield start, end, ids

  def model_top_k(self, params, prior_weight: float | None = None) -> np.ndarray:
    """``int32 [Q, K]``: the model's top-K list of every distinct query (``query_rows``), seen
    items removed; -1 past the end of a list."""
    return np.concatenate([top for _, _, top in self._model_tops(params, prior_weight)], axis=0)

  # -- references -----------------------------------------------------------------------------

  def interactions(self):
    """``(keys [U], R CSR [U, N])``: the references' user x item matrix (D_train pairs by query
    row, plus each eval query's seen items; see ``references.py``).

    With ``data.train_fraction`` < 1 the seen items stay whole for exclusion and as the
    references' query-time history (the model's query features hold them too), but the fit keeps
    a seeded random ``train_fraction`` of them: the references learn from as much of the training
    period as the model does, not from the whole of it.
    """
    hq, hi = self.history
    fraction = self.dataset.train_fraction
    if fraction < 1.0 and hq.size:
      keep = table_lib.seeded_subset(hq.size, fraction, self.dataset.train_fraction_seed, 0x5EE7)
      hq, hi = hq[keep], hi[keep]
    query = np.concatenate([self.dataset.train_query, self.query_rows[hq]])
    item = np.concatenate([self.dataset.train_item, hi])
    return references_lib.interaction_matrix(query, item, self.num_items)

  def _reference_tops(self, ref):
    """Yields ``(start, end, top int32 [end - start, K])`` of a reference per query chunk."""
    for start, end in self.bounds:
      hq, hi = self._rows_of(self.history, start, end)
      history = references_lib.history_matrix(hq, hi, end - start, self.num_items)
      rows, cols, scores = ref.candidates(self.query_rows[start:end], history, self.k)
      eq, ei = self._rows_of(self.excluded, start, end)
      yield (
        start,
        end,
        references_lib.top_k(
          rows, cols, scores, end - start, eq, ei, self.pop_order, self.pop_rank, self.k
        ),
      )

  def reference_top_k(self, name: str) -> np.ndarray:
    """``int32 [Q, K]``: reference ``name``'s top-K lists (fits it again; for inspection)."""
    ref = self._build_reference(name)
    return np.concatenate([top for _, _, top in self._reference_tops(ref)], axis=0)

  def _build_reference(self, name: str):
    if name == "popularity":
      return references_lib.Popularity()
    keys, r = self.interactions()
    return references_lib.build(name, keys, r, neighbors=self.neighbors)

  def reference_metrics(self) -> dict[str, float]:
    """The references' metrics (prefixed by their names), computed on the first call."""
    if self._reference_metrics is None:
      out = {}
      for name in self.references:
        out.update(self._metrics(self._reference_tops(self._build_reference(name)), f"{name}/"))
      self._reference_metrics = out
    return dict(self._reference_metrics)

  # -- metrics ------------------------------------------------------------------------------

  def _metrics(self, tops, prefix: str) -> dict[str, float]:
    """Metrics from the ``(start, end, top)`` chunks of one recommender."""
    rank = np.empty(self.num_pairs, np.int32)
    first = np.full(self.num_items, self.k, np.int64)
    for start, end, top in tops:
      lo, hi = np.searchsorted(self.pair_query, [start, end])
      rank[lo:hi] = target_ranks(top, self.pair_query[lo:hi] - start, self.target[lo:hi])
      valid = top >= 0
      pos = np.broadcast_to(np.arange(top.shape[1]), top.shape)[valid]
      np.minimum.at(first, top[valid], pos)
    return rank_metrics(
      rank,
      self.pair_query,
      self.target,
      first,
      num_queries=self.num_queries,
      ks=self.ks,
      head=self.head,
      cold=self.cold,
      decile=self.decile,
      prefix=prefix,
    )

  def __call__(self, params, prior_weight: float | None = None) -> dict[str, float]:
    """The model's metrics, the references' (cached) and the eval counts; ``prior_weight``: the
    popularity prior's weight (``prior.py``; None: the one the Evaluator was built with)."""
    out = self._metrics(self._model_tops(params, prior_weight), "")
    out.update(self.reference_metrics())
    out["eval/pairs"] = float(self.num_pairs)
    out["eval/queries"] = float(self.num_queries)
    cold_pairs = int(self.cold[self.target].sum())
    if cold_pairs:
      out["eval/cold_pairs"] = float(cold_pairs)
    return out


def evaluate(
  params, model, dataset: table_lib.Dataset, item_freq: np.ndarray, head: np.ndarray, **options
) -> dict[str, float]:
  """One-off evaluation: ``Evaluator(model, dataset, item_freq, head, **options)(params)``."""
  return Evaluator(model, dataset, item_freq, head, **options)(params)


def format_table(metrics: dict[str, float], ks) -> str:
  """A small text table: rows model / popularity / itemknn (/ als, those present), columns
  Recall@K overall, head, tail (, cold) and NDCG@K."""
  cold = ("/cold",) if any(k.endswith("/cold") for k in metrics) else ()
  parts = [(f"R@{k}{s}", f"recall@{k}{s}") for k in ks for s in ("", "/head", "/tail") + cold]
  parts += [(f"N@{k}", f"ndcg@{k}") for k in ks]
  lines = [
    "| " + " | ".join(["recommender"] + [c for c, _ in parts]) + " |",
    "|" + "---|" * (len(parts) + 1),
  ]
  rows = [("model", "")] + [
    (r, f"{r}/") for r in references_lib.REFERENCES if any(k.startswith(f"{r}/") for k in metrics)
  ]
  for name, prefix in rows:
    vals = [metrics.get(prefix + key, float("nan")) for _, key in parts]
    lines.append("| " + " | ".join([name] + [f"{v:.4f}" for v in vals]) + " |")
  return "\n".join(lines)
