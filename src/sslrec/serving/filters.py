"""Query-time filters: items a query must not return (``exclude``, e.g. the user's seen items) and
the only items it may return (``allow``).

Either filter is given as item keys, in one of two forms:

* a flat list of keys: the same filter for every query of the batch;
* a list of lists, one per query (``[[seen items of user 0], [of user 1], ...]``).

A key not in the catalogue is a ``QueryError`` naming it (never silently ignored: a typo in an
allow-list would otherwise return nothing, in an exclude-list the very items it meant to hide).

How they are applied (``top_k``): with an allow-list, each query scores exactly its allowed rows
(minus its excluded ones) -- exact whatever the search method, and cheap for the small sets
allow-lists usually are. With an exclude-list only, the search asks for ``k + |excluded|`` items and
drops the excluded ones, so ``k`` items always remain.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from sslrec.serving.format import QueryError

Rows = list[np.ndarray]  # one int64 array of catalogue rows per query


def _is_list(x) -> bool:
  return isinstance(x, (list, tuple, np.ndarray))


def rows_per_query(name: str, value, batch: int, item_row: Callable[[object], int]) -> Rows | None:
  """The catalogue rows of filter ``name`` for each of ``batch`` queries (None: no filter)."""
  if value is None:
    return None
  if not _is_list(value):
    raise QueryError(f"{name} must be a list of item keys, or one such list per query")
  value = list(value)
  nested = [_is_list(v) for v in value]
  if value and all(nested):
    if len(value) != batch:
      raise QueryError(
        f"{name} has {len(value)} lists of item keys for {batch} queries; give one list per "
        "query, or one flat list for all"
      )
    lists = value
  elif any(nested):
    raise QueryError(f"{name} mixes item keys and lists of keys; give one or the other")
  else:
    lists = [value] * batch

  def rows(keys):
    try:
      return np.unique(np.asarray([item_row(key) for key in keys], np.int64))
    except QueryError as e:
      raise QueryError(f"{name}: {e}") from None

  if lists and all(lst is lists[0] for lst in lists):
    shared = rows(lists[0])
    return [shared] * batch
  return [rows(lst) for lst in lists]


def merge(a: Rows | None, b: Rows | None) -> Rows | None:
  """The union of two per-query exclusions."""
  if a is None or b is None:
    return a if b is None else b
  return [np.union1d(x, y) for x, y in zip(a, b)]


def allowed(allow: Rows, exclude: Rows | None) -> Rows:
  """Each query's candidate rows: its allowed ones minus its excluded ones."""
  if exclude is None:
    return allow
  return [np.setdiff1d(a, e, assume_unique=True) for a, e in zip(allow, exclude)]


def top_k_of_candidates(
  emb: np.ndarray, items: np.ndarray, candidates: Rows, k: int
) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-``k`` of each query ``emb[i]`` among its ``candidates[i]`` (``k <=`` every
  candidate set's size): ``(scores float32 [B, k], rows int64 [B, k])``, best first."""
  scores = np.empty((emb.shape[0], k), np.float32)
  rows = np.empty((emb.shape[0], k), np.int64)
  for i, cand in enumerate(candidates):
    s = items[cand] @ emb[i]
    top = np.argsort(-s, kind="stable")[:k]
    scores[i], rows[i] = s[top], cand[top]
  return scores, rows


def drop_excluded(
  scores: np.ndarray, rows: np.ndarray, exclude: Rows, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The first ``k`` found rows per query that are not excluded (nor -1, not found):
  ``(scores [B, k], rows [B, k], short)``, ``short`` the queries with fewer than ``k`` left
  (their rows are padded with -1)."""
  out_s = np.full((rows.shape[0], k), -np.inf, np.float32)
  out_r = np.full((rows.shape[0], k), -1, np.int64)
  short = []
  for i, ex in enumerate(exclude):
    keep = (rows[i] >= 0) & ~np.isin(rows[i], ex)
    r, s = rows[i][keep][:k], scores[i][keep][:k]
    out_r[i, : r.size], out_s[i, : s.size] = r, s
    if r.size < k:
      short.append(i)
  return out_s, out_r, np.asarray(short, np.int64)


def sizes(rows: Sequence[np.ndarray]) -> np.ndarray:
  return np.asarray([r.size for r in rows], np.int64)
