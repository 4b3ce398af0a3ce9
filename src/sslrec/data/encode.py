"""Raw feature columns -> the integer / float arrays of ``features.py``, with vocabularies.

The readers (``movielens.py``, ``files.py``) describe each feature of a table by a ``Decl`` and its
raw values by one of:

* ``Single(values [N], present bool [N])``  one raw value per row (ids, strings, numbers);
* ``Bag(values [T], rows int [T], num_rows)``  a multi-valued column, flattened: value t belongs to
  row ``rows[t]``; values of a row keep their order (the first ``max_len`` are kept);
* ``Dense(values float [N, d], present bool [N])``  numeric columns.

Ids come from a **vocabulary built from the training rows** (``fit`` mask): the sorted distinct raw
values seen there get ids ``1..V`` and every other value the **OOV id 0** (vocabulary entry
``None``), or, when ``buckets > 0``, from **hash buckets**: the feature then holds the 31-bit
fingerprint ``crc32(str(value)) & 0x7fffffff`` (no vocabulary) and its spec says ``hashed``: the
model takes bucket ``fingerprint % buckets`` (and, with ``second_hash``, a second bucket). A
missing value is ``-1`` (the model's default embedding). Dense columns are
standardised with the training rows' mean and standard deviation; missing values become 0 (the
mean).
Everything is vectorised over rows; Python loops only run over distinct values when hashing.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from sslrec import features as features_lib

PAD = features_lib.PAD
OOV = 0  # id of every value absent from a feature's vocabulary
KINDS = (
  "id",
  "multi",
  "dense",
  "history",
)  # 'history': the query's recent items (built from the log)


@dataclasses.dataclass(frozen=True)
class Decl:
  """How one feature is built.

  Attributes:
    name: feature name (unique within its tower).
    kind: 'id' | 'multi' | 'dense' | 'history'.
    buckets: 0 = vocabulary from the training rows plus the OOV id; > 0 = that many hash buckets.
    max_len: values kept per row ('multi', 'history').
    second_hash: hashed features: add a second hash bucket's embedding (features.py).
  """

  name: str
  kind: str
  buckets: int = 0
  max_len: int = 1
  second_hash: bool = False


@dataclasses.dataclass(frozen=True)
class Single:
  values: np.ndarray  # [N] raw values (any dtype numpy can sort)
  present: np.ndarray  # bool [N]


@dataclasses.dataclass(frozen=True)
class Bag:
  values: np.ndarray  # [T] raw values
  rows: np.ndarray  # int [T] row of each value, non-decreasing
  num_rows: int


@dataclasses.dataclass(frozen=True)
class Dense:
  values: np.ndarray  # float [N, d]
  present: np.ndarray  # bool [N]


def fingerprint(value) -> int:
  """The 31-bit fingerprint of a raw value, as stored for hashed features (serving uses it too)."""
  return zlib.crc32(str(value).encode("utf-8")) & 0x7FFFFFFF


def hash_ids(values: np.ndarray, buckets: int = 0) -> np.ndarray:
  """``fingerprint(value)`` of every value: ``int32 [len(values)]`` (``buckets`` is unused: the
  model reduces fingerprints to buckets, see ``features.FeatureSpec.hashed``)."""
  del buckets
  values = np.asarray(values)
  if values.size == 0:
    return np.zeros(0, np.int32)
  uniq, inverse = np.unique(values, return_inverse=True)
  codes = np.array([fingerprint(v) for v in uniq.tolist()], np.int64)
  return codes[inverse.ravel()].astype(np.int32)


class Vocabulary:
  """The sorted distinct raw values of the training rows; id = 1 + position, OOV = 0."""

  def __init__(self, fit_values: np.ndarray):
    self.values = np.unique(np.asarray(fit_values))

  @property
  def size(self) -> int:
    return int(self.values.size) + 1

  def lookup(self, values: np.ndarray) -> np.ndarray:
    """``int32 [len(values)]`` ids; values outside the vocabulary get ``OOV``."""
    values = np.asarray(values)
    if self.values.size == 0 or values.size == 0:
      return np.full(values.shape, OOV, np.int32)
    pos = np.clip(np.searchsorted(self.values, values), 0, self.values.size - 1)
    found = self.values[pos] == values
    return np.where(found, pos + 1, OOV).astype(np.int32)

  def to_list(self) -> list:
    """Raw value of each id: ``[None, v1, v2, ...]`` (None = OOV), as plain Python values."""
    return [None] + self.values.tolist()


def _ids(
  values: np.ndarray, fit_values: np.ndarray, buckets: int
) -> tuple[np.ndarray, int, list | None]:
  if buckets > 0:
    return hash_ids(values, buckets), int(buckets), None
  vocab = Vocabulary(fit_values)
  return vocab.lookup(values), vocab.size, vocab.to_list()


def pad_bag(ids: np.ndarray, rows: np.ndarray, num_rows: int, max_len: int) -> np.ndarray:
  """Flat values ``[T]`` of rows ``[T]`` (non-decreasing) -> ``int32 [num_rows, max_len]``, the
  first ``max_len`` values of each row, right-padded with -1."""
  out = np.full((num_rows, max_len), PAD, np.int32)
  if ids.size == 0:
    return out
  rows = np.asarray(rows, np.int64)
  first = np.searchsorted(rows, rows, side="left")  # index of the row's first value
  pos = np.arange(rows.size) - first
  keep = pos < max_len
  out[rows[keep], pos[keep]] = ids[keep]
  return out


def encode(
  decl: Decl, raw, fit: np.ndarray, embed_dim: int
) -> tuple[np.ndarray, features_lib.FeatureSpec, list | None]:
  """One feature's array, spec and vocabulary (None for hashed and dense features).

  Args:
    decl: the declaration ('id', 'multi' or 'dense'; 'history' is built by ``interactions``).
    raw: ``Single`` / ``Bag`` / ``Dense`` values over the table's N rows.
    fit: ``bool [N]``, the training rows the vocabulary (or the standardisation) is built from.
    embed_dim: the feature's embedding width.
  """
  f = features_lib.FeatureSpec
  if decl.kind == "dense":
    x = np.asarray(raw.values, np.float64)
    ok = raw.present & fit
    mean = x[ok].mean(axis=0) if ok.any() else np.zeros(x.shape[1])
    std = x[ok].std(axis=0) if ok.any() else np.ones(x.shape[1])
    z = (x - mean) / np.maximum(std, 1e-6)
    z = np.where(raw.present[:, None] & np.isfinite(z), z, 0.0).astype(np.float32)
    return z, f(decl.name, "dense", dense_dim=x.shape[1], embed_dim=embed_dim), None
  if decl.kind == "id":
    values = raw.values
    ids, size, vocab = _ids(values, values[raw.present & fit], decl.buckets)
    ids = np.where(raw.present, ids, PAD).astype(np.int32)
    return (
      ids,
      f(
        decl.name,
        "id",
        vocab_size=size,
        embed_dim=embed_dim,
        hashed=decl.buckets > 0,
        second_hash=decl.second_hash,
      ),
      vocab,
    )
  if decl.kind == "multi":
    fit_values = raw.values[fit[raw.rows]] if raw.values.size else raw.values
    ids, size, vocab = _ids(raw.values, fit_values, decl.buckets)
    arr = pad_bag(ids, raw.rows, raw.num_rows, decl.max_len)
    return (
      arr,
      f(
        decl.name,
        "multi",
        vocab_size=size,
        max_len=decl.max_len,
        embed_dim=embed_dim,
        hashed=decl.buckets > 0,
        second_hash=decl.second_hash,
      ),
      vocab,
    )
  raise ValueError(f"encode: feature {decl.name!r} of kind {decl.kind!r}")


def split_strings(values: np.ndarray, present: np.ndarray, separator: str) -> Bag:
  """A string column whose cells hold ``separator``-joined values -> ``Bag`` (empty parts
  dropped, surrounding spaces stripped). Each distinct cell is split once."""
  values = np.asarray(values)
  n = values.shape[0]
  cells, inverse = np.unique(np.where(present, values, ""), return_inverse=True)
  inverse = inverse.ravel()
  parts = [
    [p.strip() for p in str(c).split(separator)] if separator else [str(c).strip()]
    for c in cells.tolist()
  ]
  parts = [[p for p in ps if p] for ps in parts]
  counts = np.array([len(p) for p in parts], np.int64)
  flat = np.array([p for ps in parts for p in ps] or [""], dtype=str)[: counts.sum()]
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  row_counts = counts[inverse]
  rows = np.repeat(np.arange(n), row_counts)
  offset = np.arange(rows.size) - np.repeat(np.cumsum(row_counts) - row_counts, row_counts)
  return Bag(flat[np.repeat(starts[inverse], row_counts) + offset], rows, n)
