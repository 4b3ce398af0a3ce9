"""Classical reference recommenders scored next to the model: popularity, ItemKNN, optional ALS.

None of them depends on the model's parameters, so evaluation scores each once per evaluator.
Each one answers, for a chunk of eval queries, *candidates*: ``(row, col, score)`` triples, the
items it scores for each query row of the chunk, at most ``k + len(history)`` per row (enough for a
top-k after removing the query's seen items, which are a subset of its history). ``top_k`` turns
them into ranked lists: scored items first (score descending, lower item index first on ties), then
every unscored item in popularity order (D_train frequency descending, lower index first), the
excluded items never. So the popularity recommender is the one that scores nothing, and a
recommender falls back to popularity for a query it has nothing to say about (no history).

**Users.** ItemKNN and ALS learn from a binary user x item matrix. Its rows are query *keys*:
every distinct D_train query row (``dataset.train_query``, its ``train_item`` s) and every distinct
eval query row with its seen items (``eval_seen_*``, or the D_train pairs of that row), merged when
the rows coincide. In this code base a D_train pair's query row may be a per-pair context (the
interaction readers' 'user' mode with a history feature gives every training pair its own row),
which contributes a single item and so no co-occurrence; the eval queries' seen items (their
whole training-period histories) then carry the item-item signal. With the embedded synthetic
dataset the eval queries are new rows without history: ItemKNN and ALS equal popularity there.
With ``data.train_fraction`` < 1 the fit keeps that fraction of the seen items (seeded), so the
references learn from as much of the training period as the model; the whole histories still
serve as each query's history when it is scored.

**ItemKNN** (Deshpande & Karypis 2004; Sarwar et al. 2001): the cosine similarity of two items'
user columns, ``sim(i, j) = |U_i & U_j| / sqrt(|U_i| |U_j|)`` (``i != j``), keeping each item's
``neighbors`` most similar items (CSR ``[N, N]``, ``O(N * neighbors)`` memory, computed in item
blocks of bounded work). A query's score of item j is ``sum_{i in history} sim(i, j)``.

**ALS** (Hu, Koren & Volinsky 2008) via the optional ``implicit`` package (``pip install
'sslrec[refs]'``); imported lazily, only when the reference is asked for.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

WORK_PER_BLOCK = 1 << 24  # co-occurrence entries computed per item block of the similarity
SCORE_ENTRIES_PER_BLOCK = 1 << 23  # (row, item) score entries per query block of ItemKNN / ALS


def popularity_scores(item_freq: np.ndarray) -> np.ndarray:
  """``float64 [N]``: the popularity recommender's score of every item (its D_train frequency)."""
  return np.asarray(item_freq, np.float64)


def popularity_order(item_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``(order [N], rank [N])``: items most frequent first (ties: lower index first) and each
  item's position in that order."""
  order = np.argsort(-popularity_scores(item_freq), kind="stable")
  rank = np.empty(order.size, np.int64)
  rank[order] = np.arange(order.size)
  return order, rank


def interaction_matrix(
  query: np.ndarray, item: np.ndarray, num_items: int
) -> tuple[np.ndarray, sp.csr_matrix]:
  """Binary user x item matrix of ``(query row [P], item [P])`` pairs.

  Returns ``(keys [U], R)``: the distinct query rows (sorted; row u of ``R`` is ``keys[u]``) and
  ``R`` ``float32 CSR [U, num_items]`` with 1 where the key interacted with the item (duplicates
  counted once).
  """
  keys, user = np.unique(np.asarray(query), return_inverse=True)
  r = sp.csr_matrix(
    (np.ones(user.size, np.float32), (user, np.asarray(item))), shape=(keys.size, num_items)
  )
  r.sum_duplicates()
  r.data[:] = 1.0
  return keys, r


def top_per_row(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, limit) -> np.ndarray:
  """Indices of the entries to keep: at most ``limit`` (scalar or ``[num_rows]``) per row, the
  highest ``vals`` (ties: lower ``cols``), ordered by row, then value descending, then column."""
  order = np.lexsort((cols, -vals, rows))
  r = rows[order]
  counts = np.bincount(r, minlength=int(r.max()) + 1 if r.size else 0)
  start = np.cumsum(counts) - counts
  pos = np.arange(r.size) - start[r]
  limit = np.asarray(limit)
  return order[pos < (limit[r] if limit.ndim else limit)]


def select_per_row(rows: np.ndarray, vals: np.ndarray, limit, num_rows: int) -> np.ndarray:
  """Indices (ascending) of at most ``limit`` (scalar or ``[num_rows]``) entries per row, the
  highest positive ``vals``, for entries in CSR order (``rows`` ascending, columns ascending
  within a row: ties go to the lower column).

  The fast set selection behind the similarity and the ItemKNN candidates: rows within their
  limit are kept whole, unsorted; the others are cut by one stable sort of the float64 key
  ``row + (1 - val / max) / 2`` (mostly sorted already), so values closer than about
  ``1e-9 * max(vals)`` count as tied at the cut (float32 similarities resolve ``1e-7``).
  """
  counts = np.bincount(rows, minlength=num_rows)
  limit = np.broadcast_to(np.asarray(limit), (num_rows,))
  heavy = counts > limit
  keep = ~heavy[rows]
  idx = np.flatnonzero(~keep)
  if idx.size:
    hrow = (np.cumsum(heavy) - 1)[rows[idx]]  # 0..H-1: small keys keep the resolution
    scale = float(vals[idx].max())
    order = np.argsort(hrow + 0.5 * (1.0 - vals[idx] / scale), kind="stable")
    hcount = counts[heavy]
    pos = np.arange(idx.size) - (np.cumsum(hcount) - hcount)[hrow[order]]
    keep[idx[order[pos < limit[heavy][hrow[order]]]]] = True
  return np.flatnonzero(keep)


def cosine_neighbors(r: sp.csr_matrix, neighbors: int = 100) -> sp.csr_matrix:
  """Item-item cosine similarity of a binary ``R [U, N]``, top ``neighbors`` per item.

  Returns ``float32 CSR [N, N]``: row i holds item i's ``neighbors`` most similar other items
  (ties: lower index), no diagonal, no zeros. The co-occurrence counts ``R^T R`` are computed in
  blocks of item rows whose work (sum over the block's users of their item counts) is bounded by
  ``WORK_PER_BLOCK``, so memory stays ``O(block work + N * neighbors)``.
  """
  r = sp.csr_matrix(r, dtype=np.float32)
  n = r.shape[1]
  rt = r.T.tocsr()  # [N, U]
  norm = np.sqrt(np.diff(rt.indptr).astype(np.float64))  # sqrt(users per item)
  work = rt @ np.diff(r.indptr).astype(np.float64)  # [N]: co-occurrence entries per item row
  bounds, start, acc = [], 0, 0.0
  for i, w in enumerate(work):
    if acc and acc + w > WORK_PER_BLOCK:
      bounds.append((start, i))
      start, acc = i, 0.0
    acc += w
  bounds.append((start, n))
  rows_out, cols_out, vals_out = [], [], []
  for lo, hi in bounds:
    if lo == hi:
      continue
    c = (rt[lo:hi] @ r).tocsr()  # [b, N] co-occurrence counts
    c.sort_indices()
    rows = np.repeat(np.arange(hi - lo), np.diff(c.indptr)) + lo
    cols = c.indices.astype(np.int64)
    off = cols != rows
    rows, cols = rows[off], cols[off]
    sim = c.data[off] / (norm[rows] * norm[cols])
    keep = select_per_row(rows - lo, sim, neighbors, hi - lo)
    rows_out.append(rows[keep])
    cols_out.append(cols[keep])
    vals_out.append(sim[keep].astype(np.float32))
  cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)
  return sp.csr_matrix(
    (cat(vals_out, np.float32), (cat(rows_out, np.int64), cat(cols_out, np.int64))), shape=(n, n)
  )


def top_k(
  rows: np.ndarray,
  cols: np.ndarray,
  scores: np.ndarray,
  num_rows: int,
  excluded_rows: np.ndarray,
  excluded_items: np.ndarray,
  pop_order: np.ndarray,
  pop_rank: np.ndarray,
  k: int,
) -> np.ndarray:
  """Top-``k`` lists of a chunk of ``num_rows`` queries: ``int32 [num_rows, k]`` (-1 past the end
  when fewer than ``k`` items remain).

  Scored items (``(rows, cols, scores)``, one entry per (row, item)) come first, by score
  descending (ties: lower index first); then unscored items in popularity order (``pop_order``,
  ``pop_rank`` from ``popularity_order``); the ``(excluded_rows, excluded_items)`` pairs never
  appear. Vectorised over the chunk: ``O(entries + num_rows * k + excluded)``.
  """
  n = pop_order.size
  out = np.full((num_rows, k), -1, np.int64)
  ex_key = np.unique(np.asarray(excluded_rows, np.int64) * n + excluded_items)
  ex_row = ex_key // n
  rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
  keep = ~np.isin(rows * n + cols, ex_key)
  rows, cols, scores = rows[keep], cols[keep], np.asarray(scores)[keep]
  idx = top_per_row(rows, cols, scores, k)
  r, c = rows[idx], cols[idx]
  counts = np.bincount(r, minlength=num_rows)
  pos = np.arange(r.size) - (np.cumsum(counts) - counts)[r]
  out[r, pos] = c
  # Fill the rest from the popularity order, skipping the chosen and the excluded items: the
  # first k - count unskipped items lie within the first k + |excluded| of the order.
  n_ex = np.bincount(ex_row, minlength=num_rows)
  need = k - counts
  length = np.where(need > 0, np.minimum(k + n_ex, n), 0)
  total = int(length.sum())
  if total:
    offset = np.cumsum(length) - length
    frow = np.repeat(np.arange(num_rows), length)
    fpos = np.arange(total) - offset[frow]
    free = np.ones(total, bool)
    for sr, si in ((r, c), (ex_row, ex_key % n)):
      pr = pop_rank[si]
      hit = pr < length[sr]
      free[offset[sr[hit]] + pr[hit]] = False
    csum = np.cumsum(free)
    before = np.concatenate([[0], csum])[offset][frow]  # free entries before the row's start
    rank = csum - before - 1  # 0-based rank among the row's free entries
    take = free & (rank < need[frow])
    out[frow[take], counts[frow[take]] + rank[take]] = pop_order[fpos[take]]
  return out.astype(np.int32)


def history_matrix(
  rows: np.ndarray, items: np.ndarray, num_rows: int, num_items: int
) -> sp.csr_matrix:
  """Binary ``float32 CSR [num_rows, num_items]`` of ``(row, item)`` history pairs."""
  h = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, items)), shape=(num_rows, num_items))
  h.sum_duplicates()
  h.data[:] = 1.0
  return h


def _row_blocks(history: sp.csr_matrix, per_row_cost: np.ndarray, budget: int):
  """Consecutive row ranges of ``history`` whose summed cost stays within ``budget``."""
  start, acc = 0, 0
  for i, c in enumerate(per_row_cost):
    if acc and acc + c > budget:
      yield start, i
      start, acc = i, 0
    acc += int(c)
  if start < history.shape[0]:
    yield start, history.shape[0]


class Popularity:
  """The most-popular recommender: scores nothing, so ``top_k`` ranks by popularity."""

  name = "popularity"

  def candidates(self, keys: np.ndarray, history: sp.csr_matrix, k: int):
    """No scored items: ``(rows, cols, scores)`` empty."""
    del keys, history, k
    z = np.zeros(0, np.int64)
    return z, z, np.zeros(0, np.float32)


class ItemKNN:
  """Item-based nearest neighbours on cosine similarity (see the module docstring).

  Attributes:
    similarity: ``float32 CSR [N, N]``, each row its item's ``neighbors`` nearest other items.
  """

  name = "itemknn"

  def __init__(self, r: sp.csr_matrix, *, neighbors: int = 100):
    """``r``: binary user x item ``CSR [U, N]`` (``interaction_matrix``)."""
    self.neighbors = int(neighbors)
    self.similarity = cosine_neighbors(r, self.neighbors)

  def scores(self, history: sp.csr_matrix) -> sp.csr_matrix:
    """``float32 CSR [B, N]``: ``history [B, N] @ similarity``, the summed similarities."""
    return (history @ self.similarity).tocsr()

  def candidates(self, keys: np.ndarray, history: sp.csr_matrix, k: int):
    """``(rows, cols, scores)``: per history row, its ``k + len(history)`` highest positive
    scores (query blocks of bounded size)."""
    out_r, out_c, out_v = [], [], []
    lengths = np.diff(history.indptr)
    for lo, hi in _row_blocks(history, lengths * self.neighbors + 1, SCORE_ENTRIES_PER_BLOCK):
      s = self.scores(history[lo:hi])
      s.sort_indices()
      rows = np.repeat(np.arange(hi - lo), np.diff(s.indptr))
      pos = s.data > 0
      rows, cols, vals = rows[pos], s.indices[pos].astype(np.int64), s.data[pos]
      keep = select_per_row(rows, vals, k + lengths[lo:hi], hi - lo)
      out_r.append(rows[keep] + lo)
      out_c.append(cols[keep])
      out_v.append(vals[keep])
    if not out_r:
      return Popularity().candidates(keys, history, k)
    return np.concatenate(out_r), np.concatenate(out_c), np.concatenate(out_v)


class ALS:
  """Implicit-feedback matrix factorisation (``implicit``'s CPU ALS) on the same user x item
  matrix. A query whose key is a user of the matrix scores every item with its user factors
  (``u . v_j``); one without a row falls back to popularity. The per-row candidates are chosen by
  ``np.argpartition``, so among exactly tied float scores at the cut the choice is arbitrary."""

  name = "als"

  def __init__(
    self,
    keys: np.ndarray,
    r: sp.csr_matrix,
    *,
    factors: int = 64,
    iterations: int = 15,
    regularization: float = 1.0,
    seed: int = 0,
  ):
    # Lazy: `implicit` (and its dependency threadpoolctl) is an optional extra (sslrec[refs]);
    # only this reference needs it.
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, "blas"):  # implicit parallelises itself; BLAS threads fight it
      model = AlternatingLeastSquares(
        factors=factors, iterations=iterations, regularization=regularization, random_state=seed
      )
      model.fit(sp.csr_matrix(r, dtype=np.float32), show_progress=False)
    self.keys = np.asarray(keys)
    self.user_factors = np.asarray(model.user_factors, np.float32)  # [U, F]
    self.item_factors = np.asarray(model.item_factors, np.float32)  # [N, F]

  def candidates(self, keys: np.ndarray, history: sp.csr_matrix, k: int):
    """``(rows, cols, scores)``: per query row with a user, its ``k + len(history)`` best items."""
    n = self.item_factors.shape[0]
    pos = np.searchsorted(self.keys, keys)
    pos = np.minimum(pos, self.keys.size - 1)
    rows = np.flatnonzero(self.keys[pos] == keys)  # the chunk's queries that are users
    limit = k + np.diff(history.indptr)
    out_r, out_c, out_v = [], [], []
    step = max(1, SCORE_ENTRIES_PER_BLOCK // n)
    for lo in range(0, rows.size, step):
      sel = rows[lo : lo + step]
      s = self.user_factors[pos[sel]] @ self.item_factors.T  # [b, N]
      m = int(min(n, limit[sel].max()))
      part = (
        np.argpartition(-s, m - 1, axis=1)[:, :m]
        if m < n
        else np.broadcast_to(np.arange(n), s.shape)
      )
      rr, cc = np.repeat(sel, m), part.reshape(-1).astype(np.int64)
      vv = s[np.repeat(np.arange(sel.size), m), cc]
      keep = top_per_row(rr, cc, vv, limit)
      out_r.append(rr[keep])
      out_c.append(cc[keep])
      out_v.append(vv[keep])
    if not out_r:
      return Popularity().candidates(keys, history, k)
    return np.concatenate(out_r), np.concatenate(out_c), np.concatenate(out_v)


REFERENCES = ("popularity", "itemknn", "als")  # the names Evaluator(references=...) accepts


def build(name: str, keys: np.ndarray, r: sp.csr_matrix, *, neighbors: int = 100):
  """The reference ``name`` fitted on the user x item matrix ``(keys [U], r [U, N])``."""
  if name == "popularity":
    return Popularity()
  if name == "itemknn":
    return ItemKNN(r, neighbors=neighbors)
  if name == "als":
    return ALS(keys, r)
  raise ValueError(f"reference {name!r}; allowed: {REFERENCES}")
