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
    eval_query / eval_item: ``int32 [E]`` held-out pairs.
    item_keys: optional ``[num_items]`` original item keys (for display / export).
    item_names: optional ``[num_items]`` human-readable item names (titles), for display.
    vocabularies: optional ``{feature name: [raw value of id 0, raw value of id 1, ...]}`` for
      features whose ids were built from raw values (readers); a feature absent here takes its raw
      integer value as its id (the embedded generator). Serving uses it to map raw query values.
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

  def validate(self) -> "Dataset":
    """Checks shapes, ranges and pair indices; raises DataError naming the problem."""
    try:
      n_items = self.item_spec.validate(self.items, source=f"{self.name} items")
      n_queries = self.query_spec.validate(self.queries, source=f"{self.name} queries")
    except features_lib.SchemaError as e:
      raise DataError(str(e)) from None
    for split, q, i in (("train", self.train_query, self.train_item),
                        ("eval", self.eval_query, self.eval_item)):
      if q.shape != i.shape or q.ndim != 1:
        raise DataError(f"{self.name}: {split} pairs have query shape {q.shape}, item shape {i.shape}")
      if q.size == 0:
        raise DataError(f"{self.name}: the {split} split has no pairs")
      if q.min() < 0 or q.max() >= n_queries:
        raise DataError(f"{self.name}: {split} query index out of range [0, {n_queries})")
      if i.min() < 0 or i.max() >= n_items:
        raise DataError(f"{self.name}: {split} item index out of range [0, {n_items})")
    return self


def take(table: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
  """Gathers ``rows`` of every column: ``{name: [len(rows), ...]}``."""
  return {k: v[rows] for k, v in table.items()}
