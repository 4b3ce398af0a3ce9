"""Builds the configured dataset (``config.data.name``)."""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from sslrec.data import files, mechanism, movielens, synthetic
from sslrec.data import table as table_lib


def _generated(d: ml_collections.ConfigDict) -> dict:
  """The config fields both embedded generators read."""
  return dict(
    num_items=d.num_items,
    num_queries=d.num_queries,
    num_train_pairs=d.num_train_pairs,
    num_eval_pairs=d.num_eval_pairs,
    popularity_exponent=d.popularity_exponent,
    feature_noise=d.feature_noise,
    embed_dim=d.embed_dim,
  )


def _synthetic(config: ml_collections.ConfigDict) -> table_lib.Dataset:
  return synthetic.generate(table_lib.data_seed(config), **_generated(config.data))


def _mechanism(config: ml_collections.ConfigDict) -> table_lib.Dataset:
  d = config.data
  return mechanism.generate(
    table_lib.data_seed(config), nuisance_values=d.nuisance_values, **_generated(d)
  )


def _movielens(config: ml_collections.ConfigDict) -> table_lib.Dataset:
  d = config.data
  return movielens.load(
    d.path,
    min_rating=d.min_rating,
    split=d.split,
    eval_fraction=d.eval_fraction,
    valid_fraction=d.valid_fraction,
    history_length=d.history_length,
    query_mode=d.query_mode,
    unknown_items=d.unknown_items,
    share_tables=config.model.share_item_tables,
    seed=table_lib.data_seed(config),
    embed_dim=d.embed_dim,
  )


# The data sources by ``data.name`` (configuration reads the allowed names from here): a new
# source is one ``fn(config) -> Dataset`` plus one line.
SOURCES = {
  "synthetic": _synthetic,
  "mechanism": _mechanism,
  "movielens": _movielens,
  "files": files.load,
}


def load(config: ml_collections.ConfigDict) -> table_lib.Dataset:
  """The dataset named by ``config.data.name``; raises DataError for unusable data.

  Then, for every source: ``data.train_fraction`` thins D_train, and
  ``eval.exclude_train_items=False`` empties the pairs evaluation would exclude.
  """
  d = config.data
  if d.name not in SOURCES:
    raise table_lib.DataError(f"config.data.name={d.name!r}; allowed: {tuple(SOURCES)}")
  dataset = SOURCES[d.name](config)
  if d.train_fraction < 1.0:
    dataset = subsample_train(dataset, d.train_fraction, table_lib.data_seed(config))
  if not config.eval.exclude_train_items:
    empty = np.zeros(0, np.int32)
    dataset = dataclasses.replace(dataset, eval_seen_query=empty, eval_seen_item=empty)
    if dataset.valid_query is not None:
      dataset = dataclasses.replace(dataset, valid_seen_query=empty, valid_seen_item=empty)
  return dataset


def subsample_train(dataset: table_lib.Dataset, fraction: float, seed: int) -> table_lib.Dataset:
  """Keeps a seeded random ``fraction`` of the D_train pairs (at least one; order kept).

  Everything else (catalogue, queries, vocabularies, eval pairs and their exclusions) is unchanged,
  so runs at different fractions are evaluated on the same pairs.
  """
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"subsample_train: fraction={fraction}; must be in (0, 1]")
  n = dataset.num_train
  size = max(1, int(round(fraction * n)))
  if size >= n:
    return dataset
  keep = table_lib.seeded_subset(n, fraction, seed, 0x7F4A1C)

  # Pin the exclusions to the full training period before the pairs they derive from go.
  def pinned(query, seen_q, seen_i):
    if seen_q is None and query is not None:
      derived = np.isin(dataset.train_query, np.unique(query))
      return dataset.train_query[derived].astype(np.int32), dataset.train_item[derived].astype(
        np.int32
      )
    return seen_q, seen_i

  eval_q, eval_i = pinned(dataset.eval_query, dataset.eval_seen_query, dataset.eval_seen_item)
  valid_q, valid_i = pinned(dataset.valid_query, dataset.valid_seen_query, dataset.valid_seen_item)
  return dataclasses.replace(
    dataset,
    train_query=dataset.train_query[keep],
    train_item=dataset.train_item[keep],
    eval_seen_query=eval_q,
    eval_seen_item=eval_i,
    valid_seen_query=valid_q,
    valid_seen_item=valid_i,
    train_fraction=float(fraction),
    train_fraction_seed=int(seed),
  ).validate()
