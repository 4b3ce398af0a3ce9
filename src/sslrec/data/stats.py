"""Corpus statistics: D_train item frequencies, logQ, head/tail split, feature mutual information.

The mutual information (MI) matrix is what Correlated Feature Masking (CFM) reads: it is computed
once over the item catalogue D_item (every item counts once, whatever its popularity).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np

from sslrec import features as features_lib
from sslrec.data import table

DENSE_BINS = 16  # quantile buckets of a dense feature's first component, for MI.
MAX_BINCOUNT_SIZE = 2**24  # largest joint value space counted with a dense np.bincount.
_CHUNK_ENTRIES = 2**22  # (item, value_i, value_j) entries processed at once, bounds memory.


def item_frequencies(train_item: np.ndarray, num_items: int) -> np.ndarray:
  """Number of D_train pairs of each item.

  Args:
    train_item: ``int [P]`` item row of each training pair, in ``[0, num_items)``.
    num_items: catalogue size.

  Returns:
    ``int64 [num_items]``.
  """
  train_item = np.asarray(train_item)
  if train_item.ndim != 1 or not (
    np.issubdtype(train_item.dtype, np.integer) or train_item.size == 0
  ):
    raise table.DataError(
      f"item_frequencies: train_item must be a 1-D integer array, got shape "
      f"{train_item.shape} dtype {train_item.dtype}"
    )
  if train_item.size and (train_item.min() < 0 or train_item.max() >= num_items):
    raise table.DataError(
      f"item_frequencies: item indices in [{train_item.min()}, {train_item.max()}], "
      f"allowed [0, {num_items})"
    )
  return np.bincount(train_item.astype(np.int64), minlength=num_items).astype(np.int64)


def log_q(freq: np.ndarray) -> np.ndarray:
  """Log of each item's sampling probability in D_train (for the logQ correction).

  ``q_i = max(freq_i, 1) / sum(freq)``: an item never seen in D_train gets the probability of a
  single occurrence, so every value is finite (the q's then sum to slightly more than 1). If
  ``freq`` is all zeros, q is uniform (``1 / num_items``).

  Args:
    freq: ``int [num_items]`` counts, e.g. from ``item_frequencies``.

  Returns:
    ``float32 [num_items]``.
  """
  freq = _check_freq(freq, "log_q")
  total = float(freq.sum())
  if total <= 0:
    return np.full(freq.shape, -math.log(max(freq.size, 1)), np.float32)
  return (np.log(np.maximum(freq, 1).astype(np.float64)) - math.log(total)).astype(np.float32)


def head_items(freq: np.ndarray, head_fraction: float) -> np.ndarray:
  """Marks the ``ceil(head_fraction * num_items)`` most frequent items as head.

  Ties are broken by item index (the lower index is more frequent), so the result is
  deterministic.

  Args:
    freq: ``[num_items]`` counts.
    head_fraction: in [0, 1].

  Returns:
    ``bool [num_items]``, True for head items.
  """
  freq = _check_freq(freq, "head_items")
  if not 0.0 <= head_fraction <= 1.0:
    raise ValueError(f"head_items: head_fraction={head_fraction}; must be in [0, 1]")
  n = freq.size
  # Guard against float round-up, e.g. 0.1 * 30 = 3.0000000000000004.
  num_head = min(n, int(math.ceil(head_fraction * n - 1e-9)))
  order = np.argsort(-freq.astype(np.float64), kind="stable")
  head = np.zeros(n, bool)
  head[order[:num_head]] = True
  return head


def _check_freq(freq: np.ndarray, where: str) -> np.ndarray:
  freq = np.asarray(freq)
  if freq.ndim != 1:
    raise ValueError(f"{where}: freq must be 1-D [num_items], got shape {freq.shape}")
  if freq.size and freq.min() < 0:
    raise ValueError(f"{where}: freq has negative counts")
  return freq


def _encode(
  x: np.ndarray, f: features_lib.FeatureSpec, dense_bins: int
) -> tuple[np.ndarray, np.ndarray, int]:
  """A feature as weighted values per item, for MI.

  Returns:
    ``(values int64 [N, L], weights float64 [N, L], cardinality)``; each row's weights sum to 1.
    Missing ids and empty bags are the extra value ``vocab_size``. A hashed feature's 31-bit
    fingerprints count as the bucket the model looks up first, ``value % vocab_size``, so MI
    sees the values the model can tell apart (and its value space is the buckets, not 2^31).
  """
  n = x.shape[0]
  if f.hashed and f.kind in ("id", "multi"):
    x = np.where(x >= 0, x.astype(np.int64) % f.vocab_size, -1)
  if f.kind == "id":
    x = x.astype(np.int64)
    values = np.where(x < 0, f.vocab_size, x)[:, None]
    return values, np.ones((n, 1)), f.vocab_size + 1
  if f.kind == "dense":
    col = x[:, 0].astype(np.float64)
    edges = np.quantile(col, np.linspace(0.0, 1.0, dense_bins + 1)[1:-1]) if n else []
    values = np.searchsorted(edges, col, side="right").astype(np.int64)[:, None]
    return values, np.ones((n, 1)), dense_bins
  present = x >= 0
  # Drop trailing columns that are padding everywhere (keep one for the 'empty' value).
  used = np.flatnonzero(present.any(axis=0))
  width = int(used[-1]) + 1 if used.size else 1
  x, present = x[:, :width], present[:, :width]
  count = present.sum(axis=1)
  values = np.where(present, x, f.vocab_size).astype(np.int64)
  weights = present / np.maximum(count, 1)[:, None]
  weights[count == 0, 0] = 1.0  # empty bag: one 'missing' value (values[:, 0] == vocab_size)
  return values, weights, f.vocab_size + 1


def _entropy_of_masses(mass: np.ndarray, total: float) -> float:
  p = mass[mass > 0] / total
  return float(-(p * np.log(p)).sum())


def _joint_entropy(
  vi: np.ndarray,
  wi: np.ndarray,
  vj: np.ndarray,
  wj: np.ndarray,
  card_j: int,
  joint_size: int,
  max_bincount_size: int,
) -> float:
  """Entropy of the weighted joint of two encoded features (see ``mutual_information``)."""
  n, li = vi.shape
  lj = vj.shape[1]
  rows = max(1, _CHUNK_ENTRIES // (li * lj))
  # A dense count array pays off when the joint space is not much larger than the entries.
  use_bincount = joint_size <= min(max_bincount_size, 8 * n * li * lj + 2**16)
  acc = np.zeros(joint_size) if use_bincount else None
  part_keys, part_mass = [], []
  for s in range(0, n, rows):
    e = min(n, s + rows)
    if li == 1 and lj == 1:
      keys = vi[s:e, 0] * card_j + vj[s:e, 0]
      w = wi[s:e, 0] * wj[s:e, 0]
    else:
      keys = (vi[s:e, :, None] * card_j + vj[s:e, None, :]).ravel()
      w = (wi[s:e, :, None] * wj[s:e, None, :]).ravel()
    if use_bincount:
      acc += np.bincount(keys, w, minlength=joint_size)
    else:
      nz = w > 0
      uniq, inverse = np.unique(keys[nz], return_inverse=True)
      part_keys.append(uniq)
      part_mass.append(np.bincount(inverse.ravel(), w[nz], minlength=uniq.size))
  if use_bincount:
    return _entropy_of_masses(acc, n)
  if len(part_keys) == 1:
    return _entropy_of_masses(part_mass[0], n)
  uniq, inverse = np.unique(np.concatenate(part_keys), return_inverse=True)
  mass = np.bincount(inverse.ravel(), np.concatenate(part_mass), minlength=uniq.size)
  return _entropy_of_masses(mass, n)


MI_ESTIMATORS = ("permutation", "plugin")  # ssl.mi_estimator
ID_LIKE_DISTINCT = 0.9  # an 'id' feature with distinct values on >= this share of items is an id


def mutual_information(
  items: Mapping[str, np.ndarray],
  spec: features_lib.TowerSpec,
  *,
  estimator: str = "plugin",
  seed: int = 0,
  dense_bins: int = DENSE_BINS,
  max_bincount_size: int = MAX_BINCOUNT_SIZE,
) -> np.ndarray:
  """Pairwise mutual information (natural log) between the item features of ``spec``.

      MI(V_i, V_j) = sum_{v_i, v_j} P(v_i, v_j) log( P(v_i, v_j) / (P(v_i) P(v_j)) )

  estimated from value co-occurrence over the catalogue (every item counts once), computed as
  ``H(V_i) + H(V_j) - H(V_i, V_j)``, which is the same quantity since the joint's marginals are
  exactly ``P(v_i)`` and ``P(v_j)``.

  How values count:

  * Each item contributes total probability mass 1 to every joint (and every marginal). An item
    with ``n_i`` present values of feature i and ``n_j`` of feature j contributes
    ``1 / (n_i * n_j)`` to each ``(v_i, v_j)`` pair of its values, and ``1 / n_i`` to each
    ``P(v_i)``, so the marginals are consistent with the joint. A value repeated in a bag counts
    once per occurrence. Single-valued features have ``n = 1``.
  * A missing id (-1) and an empty bag count as one special 'missing' value of that feature.
  * A dense feature is bucketised by its first component into ``dense_bins`` quantile bins over
    the catalogue (other components are ignored).

  Joint counts use ``np.bincount`` over combined keys when the joint value space is at most
  ``max_bincount_size`` (and not much larger than the number of entries), and ``np.unique`` over
  int64 keys otherwise (e.g. for ``item_id`` with ``vocab_size = num_items``); rows are processed
  in chunks to bound memory.

  **Estimators.** ``'plugin'``: the formula above on the empirical distribution. It is biased
  upwards by roughly ``(|V_i| - 1)(|V_j| - 1) / 2N`` (Miller-Madow), so on a catalogue of N items
  it ranks pairs by vocabulary size as much as by dependence: a unique id has MI ``H(V_j)`` with
  every feature ``j``, and two large vocabularies look dependent when they are independent.
  ``'permutation'`` (the default of ``ssl.mi_estimator``) subtracts the MI of the same pair with
  ``V_j``'s column shuffled over the items (a seeded permutation: the same marginals, the
  dependence destroyed, so the same bias), clipped at 0: ``max(MI(V_i, V_j) - MI(V_i,
  pi(V_j)), 0)``. A unique id scores ~0 with everything (its plug-in MI is ``H(V_j)`` for any
  shuffle), independent features ~0, and a dependent pair the excess over chance. The diagonal
  keeps the plug-in entropies either way.

  Args:
    items: the catalogue ``{name: [N, ...]}`` in ``spec``'s layout.
    spec: the item tower schema; its feature order is the matrix order.
    estimator: 'plugin' or 'permutation' (``MI_ESTIMATORS``).
    seed: the permutation's seed ('permutation').
    dense_bins: quantile buckets of a dense feature.
    max_bincount_size: the largest joint value space counted densely.

  Returns:
    ``float64 [k, k]``, symmetric, >= 0; the diagonal is each feature's entropy ``H(V_i)`` (the MI
    of a single-valued feature with itself).
  """
  if estimator not in MI_ESTIMATORS:
    raise ValueError(f"mutual_information: estimator={estimator!r}; allowed: {MI_ESTIMATORS}")
  try:
    n = spec.validate(items, source="mutual_information")
  except features_lib.SchemaError as e:
    raise table.DataError(str(e)) from None
  k = spec.num_features
  mi = np.zeros((k, k))
  if n == 0:
    return mi
  encoded = [_encode(np.asarray(items[f.name]), f, dense_bins) for f in spec.features]
  entropy = [
    _joint_entropy(v, w, np.zeros((n, 1), np.int64), np.ones((n, 1)), 1, c, max_bincount_size)
    for v, w, c in encoded
  ]
  perm = np.random.default_rng(np.random.SeedSequence([seed, 0x4D49])).permutation(n)
  for i in range(k):
    mi[i, i] = entropy[i]
    vi, wi, ci = encoded[i]
    for j in range(i + 1, k):
      vj, wj, cj = encoded[j]
      h_ij = _joint_entropy(vi, wi, vj, wj, cj, ci * cj, max_bincount_size)
      value = entropy[i] + entropy[j] - h_ij
      if estimator == "permutation":
        h_perm = _joint_entropy(vi, wi, vj[perm], wj[perm], cj, ci * cj, max_bincount_size)
        value -= entropy[i] + entropy[j] - h_perm
      mi[i, j] = mi[j, i] = max(value, 0.0)
  return mi


def id_like(items: Mapping[str, np.ndarray], spec: features_lib.TowerSpec) -> np.ndarray:
  """``bool [k]``: single-valued 'id' features with a distinct present value on at least
  ``ID_LIKE_DISTINCT`` of the items (a per-item id: it identifies the item, so it is correlated
  with nothing in particular and everything at once)."""
  out = np.zeros(spec.num_features, bool)
  for i, f in enumerate(spec.features):
    x = np.asarray(items[f.name])
    if f.kind == "id" and x.size:
      out[i] = np.unique(x[x >= 0]).size >= ID_LIKE_DISTINCT * x.shape[0]
  return out


def ranking_mi(mi: np.ndarray, unranked: np.ndarray) -> np.ndarray:
  """The matrix the MI-reading masks rank by: ``mi`` with the off-diagonal rows and columns of
  the ``unranked`` features set to NaN (``augment.unranked_features``: never a CFM seed nor a
  partner; put on a random side)."""
  out = np.array(mi, np.float64)
  off = ~np.eye(out.shape[0], dtype=bool)
  mark = (unranked[:, None] | unranked[None, :]) & off
  out[mark] = np.nan
  return out


@dataclasses.dataclass(frozen=True)
class Stats:
  """Corpus statistics of a dataset.

  Attributes:
    item_freq: ``int64 [num_items]`` D_train pair count of each item.
    log_q: ``float32 [num_items]`` log sampling probability of each item in D_train.
    head: ``bool [num_items]`` the ``head_fraction`` most frequent items.
    mi: ``float64 [k, k]`` item-feature mutual information, in ``item_spec`` order, as the
      masks read it (``ranking_mi``: NaN off the diagonal for unranked per-item ids).
    id_like: ``bool [k]`` the per-item id features (``id_like``).
    feature_names: the item feature names, the order of ``mi``'s rows/columns.
    head_fraction: the fraction used for ``head``.
  """

  item_freq: np.ndarray
  log_q: np.ndarray
  head: np.ndarray
  mi: np.ndarray
  feature_names: tuple[str, ...]
  head_fraction: float
  id_like: np.ndarray | None = None


def corpus_stats(
  dataset: table.Dataset,
  *,
  head_fraction: float = 0.2,
  mi_estimator: str = "plugin",
  rank_ids: bool = True,
) -> Stats:
  """Frequencies, logQ and head split from D_train; feature MI from the catalogue
  (``mi_estimator``; ``rank_ids=False`` keeps per-item ids out of the masks' ranking)."""
  freq = item_frequencies(dataset.train_item, dataset.num_items)
  ids = id_like(dataset.items, dataset.item_spec)
  mi = mutual_information(dataset.items, dataset.item_spec, estimator=mi_estimator)
  return Stats(
    item_freq=freq,
    log_q=log_q(freq),
    head=head_items(freq, head_fraction),
    mi=mi if rank_ids else ranking_mi(mi, ids),
    feature_names=dataset.item_spec.names,
    head_fraction=float(head_fraction),
    id_like=ids,
  )
