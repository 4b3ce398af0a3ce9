"""The in-memory dataset every source (generator, file readers) produces.

Columnar numpy arrays, one per feature, shaped as ``features.py`` says. Items are rows
``0..num_items-1`` of ``items`` (the catalogue, D_item); queries are rows of ``queries``;
interactions are ``(query row, item row)`` index pairs into those two tables.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sslrec import features as features_lib


class DataError(ValueError):
  """A data source that cannot be used; the message names the file/field and the problem."""


@dataclasses.dataclass
class Dataset:
  """A recommendation dataset.

  Attributes:
    name: human-readable source name.
    item_spec / query_spec: the towers' feature schemas.
    items: catalogue features, ``{name: [num_items, ...]}``; row i is item i.
    queries: query features, ``{name: [num_queries, ...]}``.
    train_query / train_item: ``int32 [P]`` D_train pairs (query row, item row).
    eval_query / eval_item: ``int32 [E]`` held-out *test* pairs (scored once, at the end).
    valid_query / valid_item: ``int32 [V]`` held-out *validation* pairs (periodic evaluations,
      checkpoint selection, early stopping, tuning); None for a dataset without a validation split.
    item_keys: optional ``[num_items]`` original item keys (for display / export).
    item_names: optional ``[num_items]`` human-readable item names (titles), for display.
    vocabularies: optional ``{feature name: [raw value of id 0, raw value of id 1, ...]}`` for
      features whose ids were built from raw values (readers); a feature absent here takes its raw
      integer value as its id (the embedded generator). Serving uses it to map raw query values.
      The file readers give id 0 to out-of-vocabulary values (entry ``None``); hashed features
      (31-bit fingerprints, ``hashed`` in the spec; see ``data/encode.py``) have no entry.
    eval_seen_query / eval_seen_item: optional ``int32 [S]`` (eval query row, item row) pairs: the
      items each eval query's user already interacted with in the training period; evaluation
      removes them from that query's ranking (``eval.exclude_train_items``). ``None``: the D_train
      pairs of the eval query rows (none for the embedded dataset, whose eval queries are new).
    valid_seen_query / valid_seen_item: the same for the validation queries.
    train_fraction / train_fraction_seed: the fraction of the training period's pairs D_train
      keeps (``data.train_fraction``, ``sources.subsample_train``) and the seed that drew it; the
      references' fit keeps the same fraction of the seen items (``Evaluator.interactions``).
  """

  name: str
  item_spec: features_lib.TowerSpec
  query_spec: features_lib.TowerSpec
  items: dict[str, np.ndarray]
  queries: dict[str, np.ndarray]
  train_query: np.ndarray
  train_item: np.ndarray
  eval_query: np.ndarray
  eval_item: np.ndarray
  item_keys: np.ndarray | None = None
  item_names: np.ndarray | None = None
  vocabularies: dict[str, list] = dataclasses.field(default_factory=dict)
  eval_seen_query: np.ndarray | None = None
  eval_seen_item: np.ndarray | None = None
  valid_query: np.ndarray | None = None
  valid_item: np.ndarray | None = None
  valid_seen_query: np.ndarray | None = None
  valid_seen_item: np.ndarray | None = None
  train_fraction: float = 1.0
  train_fraction_seed: int = 0

  @property
  def num_items(self) -> int:
    return int(next(iter(self.items.values())).shape[0])

  @property
  def num_queries(self) -> int:
    return int(next(iter(self.queries.values())).shape[0])

  @property
  def num_train(self) -> int:
    return int(self.train_item.shape[0])

  @property
  def num_eval(self) -> int:
    return int(self.eval_item.shape[0])

  @property
  def num_valid(self) -> int:
    return 0 if self.valid_item is None else int(self.valid_item.shape[0])

  def for_split(self, split: str) -> "Dataset":
    """The dataset whose ``eval_*`` pairs (and seen items) are those of ``split``: 'test' (this
    dataset) or 'valid'; what ``evaluate`` scores."""
    if split == "test":
      return self
    if split != "valid":
      raise ValueError(f"split={split!r}; allowed: 'valid', 'test'")
    if self.valid_item is None:
      raise DataError(f"{self.name}: this dataset has no validation split")
    return dataclasses.replace(
      self,
      eval_query=self.valid_query,
      eval_item=self.valid_item,
      eval_seen_query=self.valid_seen_query,
      eval_seen_item=self.valid_seen_item,
    )

  def validate(self) -> "Dataset":
    """Checks shapes, ranges and pair indices; raises DataError naming the problem."""
    try:
      n_items = self.item_spec.validate(self.items, source=f"{self.name} items")
      n_queries = self.query_spec.validate(self.queries, source=f"{self.name} queries")
    except features_lib.SchemaError as e:
      raise DataError(str(e)) from None
    splits = [
      ("train", self.train_query, self.train_item),
      ("test", self.eval_query, self.eval_item),
    ]
    if (self.valid_query is None) != (self.valid_item is None):
      raise DataError(f"{self.name}: valid_query and valid_item must both be set or None")
    if self.valid_query is not None:
      splits.append(("validation", self.valid_query, self.valid_item))
    for split, q, i in splits:
      if q.shape != i.shape or q.ndim != 1:
        raise DataError(
          f"{self.name}: {split} pairs have query shape {q.shape}, item shape {i.shape}"
        )
      if q.size == 0:
        raise DataError(f"{self.name}: the {split} split has no pairs")
      if q.min() < 0 or q.max() >= n_queries:
        raise DataError(f"{self.name}: {split} query index out of range [0, {n_queries})")
      if i.min() < 0 or i.max() >= n_items:
        raise DataError(f"{self.name}: {split} item index out of range [0, {n_items})")
    for what, q, i in (
      ("eval_seen", self.eval_seen_query, self.eval_seen_item),
      ("valid_seen", self.valid_seen_query, self.valid_seen_item),
    ):
      self._check_seen(what, q, i, n_queries, n_items)
    return self

  def _check_seen(self, what, q, i, n_queries, n_items):
    if (q is None) != (i is None):
      raise DataError(f"{self.name}: {what}_query and {what}_item must both be set or None")
    if q is not None:
      if q.shape != i.shape or q.ndim != 1:
        raise DataError(f"{self.name}: {what} pairs have shapes {q.shape}, {i.shape}")
      if q.size and (q.min() < 0 or q.max() >= n_queries or i.min() < 0 or i.max() >= n_items):
        raise DataError(f"{self.name}: {what} pair index out of range")


def check_regular_file(path: str) -> None:
  """DataError unless ``path`` is a regular file (or missing: the reader says so): a FIFO, a
  socket or a device would block or stream forever instead of being read."""
  import os
  import stat

  try:
    mode = os.stat(path).st_mode
  except OSError:
    return
  if not stat.S_ISREG(mode):
    kind = (
      "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a file"
    )
    raise DataError(f"{path}: {kind}, not a regular file; data files must be regular files")


def take(table: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
  """Gathers ``rows`` of every column: ``{name: [len(rows), ...]}``."""
  return {k: v[rows] for k, v in table.items()}


def seeded_subset(n: int, fraction: float, seed: int, salt: int) -> np.ndarray:
  """Sorted indices of a seeded random ``fraction`` of ``range(n)`` (at least one): how
  ``data.train_fraction`` thins D_train (``sources.subsample_train``) and the references' fit
  (``Evaluator.interactions``), each with its own ``salt``."""
  rng = np.random.default_rng(np.random.SeedSequence([seed, salt]))
  size = max(1, int(round(fraction * n)))
  return np.sort(rng.choice(n, size=size, replace=False))


def data_seed(config) -> int:
  """The seed of the data (generator, split, subsample): ``data.seed``, or ``seed`` when
  ``data.seed`` is -1 (sweeps over ``--seeds`` then vary the data too: paired data seeds)."""
  return int(config.seed if config.data.seed < 0 else config.data.seed)


def fingerprint(dataset: Dataset) -> dict:
  """What a checkpoint's embeddings and counts are tied to: sizes, each feature's vocabulary
  size, and SHA-256 digests of the vocabularies, the item keys and the training pairs. Stored in
  every checkpoint and compared on resume: a data folder whose vocabulary shifted while the padded
  shapes still match (the rows would now belong to other items) is refused."""
  import hashlib
  import json

  def digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
      a = np.ascontiguousarray(a)
      h.update(f"{a.dtype.str}{a.shape}".encode())
      h.update(a.tobytes() if a.dtype != object else json.dumps(a.tolist(), default=str).encode())
    return h.hexdigest()[:16]

  vocab = json.dumps(
    {k: [str(v) for v in vals] for k, vals in sorted((dataset.vocabularies or {}).items())}
  )
  return {
    "num_items": int(dataset.num_items),
    "num_queries": int(dataset.num_queries),
    "num_train": int(dataset.num_train),
    "vocab_sizes": {
      f.name: int(f.vocab_size)
      for spec in (dataset.item_spec, dataset.query_spec)
      for f in spec.features
      if f.kind != "dense"
    },
    "vocabularies": digest(np.frombuffer(vocab.encode(), np.uint8)),
    "item_keys": digest(np.asarray([str(k) for k in dataset.item_keys]))
    if dataset.item_keys is not None
    else None,
    "train_pairs": digest(dataset.train_query, dataset.train_item),
  }


def fingerprint_diff(saved: dict, now: dict) -> list[str]:
  """The fields of two fingerprints that differ: ``"num_items: 1682 -> 1700"``."""
  out = []
  for key in sorted(set(saved) | set(now)):
    a, b = saved.get(key), now.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      out += [
        f"{key}.{k}: {a.get(k)} -> {b.get(k)}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
      ]
    elif a != b:
      out.append(f"{key}: {a} -> {b}")
  return out
