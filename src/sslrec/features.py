"""The feature schema: the single source of shapes for data, pipelines and the input layer.

A tower reads a fixed, ordered tuple of features. Each feature is one of three kinds:

* ``id``    single-valued categorical.   Array ``int32 [N]``; value in ``[0, vocab_size)``,
            ``-1`` = missing (the model then uses the feature's learned default embedding).
* ``multi`` multi-valued bag.           Array ``int32 [N, max_len]``; values in
            ``[0, vocab_size)``, right-padded with ``-1``. Pooled over present values only.
* ``dense`` dense float vector.          Array ``float32 [N, dense_dim]``; expected standardised
            by the data source (the generator and readers do it).

A *batch* of a tower's inputs is a ``dict[str, array]`` keyed by feature name, with those shapes
(a leading batch dimension ``B`` instead of ``N``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

KINDS = ("id", "multi", "dense")
PAD = -1  # padding / missing value for id and multi features
HASH_SPACE = 2**31  # hashed features hold fingerprints in [0, 2^31)


class SchemaError(ValueError):
  """A feature schema or a table that does not match it."""


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
  """One input feature.

  Attributes:
    name: unique within its tower.
    kind: 'id' | 'multi' | 'dense'.
    vocab_size: number of distinct ids (id / multi); ids live in [0, vocab_size). The table has
      one more row, the OOV row, where any id >= vocab_size goes (never clamped into another
      id's row). With ``hashed``: the number of hash buckets.
    max_len: values per row for 'multi' (padded with -1); 1 otherwise.
    dense_dim: width of a 'dense' feature; 0 otherwise.
    embed_dim: width of this feature's embedding in the input layer.
    hashed: the values are non-negative 31-bit fingerprints of unbounded raw values (e.g.
      ``crc32(value) & 0x7fffffff``); the model takes bucket ``value % vocab_size``.
    second_hash: (hashed only) also look up bucket ``(value // vocab_size) % vocab_size`` in a
      second table and add its embedding, so two values rarely collide in both.
  """

  name: str
  kind: str
  vocab_size: int = 0
  max_len: int = 1
  dense_dim: int = 0
  embed_dim: int = 32
  hashed: bool = False
  second_hash: bool = False

  def __post_init__(self):
    if self.kind not in KINDS:
      raise SchemaError(f"feature {self.name!r}: kind={self.kind!r}; allowed: {KINDS}")
    if self.kind in ("id", "multi") and self.vocab_size < 1:
      raise SchemaError(f"feature {self.name!r}: vocab_size={self.vocab_size}; must be >= 1")
    if self.kind == "multi" and self.max_len < 1:
      raise SchemaError(f"feature {self.name!r}: max_len={self.max_len}; must be >= 1")
    if self.kind == "dense" and self.dense_dim < 1:
      raise SchemaError(f"feature {self.name!r}: dense_dim={self.dense_dim}; must be >= 1")
    if self.embed_dim < 1:
      raise SchemaError(f"feature {self.name!r}: embed_dim={self.embed_dim}; must be >= 1")
    if self.hashed and self.kind == "dense":
      raise SchemaError(f"feature {self.name!r}: a dense feature cannot be hashed")
    if self.second_hash and not self.hashed:
      raise SchemaError(f"feature {self.name!r}: second_hash needs hashed=True")
    if self.hashed and self.vocab_size >= HASH_SPACE:
      raise SchemaError(f"feature {self.name!r}: {self.vocab_size} hash buckets; must be < 2^31")

  @property
  def max_value(self) -> int:
    """Largest valid value (exclusive) of the data: vocab_size, or 2^31 for hashed features."""
    return HASH_SPACE if self.hashed else self.vocab_size

  @property
  def tables(self) -> tuple[tuple[str, int], ...]:
    """``(table suffix, rows before padding)`` of each embedding table of this feature."""
    if self.kind == "dense":
      return ()
    if self.hashed:
      return (("", self.vocab_size),) + ((("_hash2", self.vocab_size),) if self.second_hash else ())
    return (("", self.vocab_size + 1),)  # + the OOV row

  @property
  def shape(self) -> tuple[int, ...]:
    """Per-row array shape (without the leading batch dimension)."""
    if self.kind == "id":
      return ()
    if self.kind == "multi":
      return (self.max_len,)
    return (self.dense_dim,)

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(np.float32) if self.kind == "dense" else np.dtype(np.int32)


@dataclasses.dataclass(frozen=True)
class TowerSpec:
  """The ordered features one tower reads.

  ``share_tables_with`` names another tower whose input layer (embedding tables and default
  embeddings) this tower reads instead of owning its own; both towers must then have the same
  features (item-to-item retrieval, ``model.share_item_tables``). ``''``: own tables.

  ``groups``: the correlated feature groups the data *declares* (the embedded datasets plant
  them), as tuples of feature names, disjoint; ``()`` when unknown (real data). Read by
  ``ssl.masking='oracle'`` and by the mask statistics.
  """

  name: str
  features: tuple[FeatureSpec, ...]
  share_tables_with: str = ""
  groups: tuple[tuple[str, ...], ...] = ()

  def __post_init__(self):
    if self.share_tables_with == self.name:
      raise SchemaError(f"tower {self.name!r} cannot share tables with itself")
    names = [f.name for f in self.features]
    if not names:
      raise SchemaError(f"tower {self.name!r} has no features")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
      raise SchemaError(f"tower {self.name!r}: duplicate feature names {dup}")
    grouped = [n for g in self.groups for n in g]
    unknown = sorted(set(grouped) - set(names))
    if unknown or len(grouped) != len(set(grouped)) or any(not g for g in self.groups):
      raise SchemaError(
        f"tower {self.name!r}: groups {self.groups} must be non-empty, disjoint tuples of its "
        f"features {list(names)}" + (f" (unknown: {unknown})" if unknown else "")
      )

  @property
  def group_indices(self) -> tuple[tuple[int, ...], ...]:
    """``groups`` as feature indices (the masks' order)."""
    return tuple(tuple(self.index(n) for n in g) for g in self.groups)

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(f.name for f in self.features)

  @property
  def num_features(self) -> int:
    return len(self.features)

  def __getitem__(self, name: str) -> FeatureSpec:
    for f in self.features:
      if f.name == name:
        return f
    raise KeyError(f"tower {self.name!r} has no feature {name!r}; features: {list(self.names)}")

  def index(self, name: str) -> int:
    return self.names.index(name)

  def validate(self, table: Mapping[str, np.ndarray], *, source: str = "table") -> int:
    """Checks that ``table`` holds every feature with the right shape, dtype and range.

    Returns the number of rows. Raises SchemaError naming the feature and what is allowed.
    """
    missing = [n for n in self.names if n not in table]
    if missing:
      raise SchemaError(
        f"{source}: missing features {missing} for tower {self.name!r}; found {sorted(table)}"
      )
    num_rows = None
    for f in self.features:
      a = np.asarray(table[f.name])
      if a.shape[1:] != f.shape:
        raise SchemaError(
          f"{source}: feature {f.name!r} has per-row shape {a.shape[1:]}, expected {f.shape}"
        )
      if num_rows is None:
        num_rows = a.shape[0]
      elif a.shape[0] != num_rows:
        raise SchemaError(
          f"{source}: feature {f.name!r} has {a.shape[0]} rows, other features {num_rows}"
        )
      if f.kind == "dense":
        if not np.all(np.isfinite(a)):
          raise SchemaError(f"{source}: dense feature {f.name!r} has non-finite values")
      else:
        if not np.issubdtype(a.dtype, np.integer):
          raise SchemaError(f"{source}: feature {f.name!r} has dtype {a.dtype}, expected integer")
        if a.size and (a.min() < PAD or a.max() >= f.max_value):
          raise SchemaError(
            f"{source}: feature {f.name!r} has values in [{a.min()}, {a.max()}]; allowed "
            f"[0, {f.max_value}) and {PAD} for missing/padding"
          )
    return int(num_rows or 0)
