"""Builds the configured dataset (``config.data.name``)."""

from __future__ import annotations

import ml_collections

from sslrec.data import synthetic
from sslrec.data import table as table_lib


def load(config: ml_collections.ConfigDict) -> table_lib.Dataset:
  """The dataset named by ``config.data.name``; raises DataError for unusable data."""
  d = config.data
  if d.name == "synthetic":
    return synthetic.generate(
        config.seed, num_items=d.num_items, num_queries=d.num_queries,
        num_train_pairs=d.num_train_pairs, num_eval_pairs=d.num_eval_pairs,
        popularity_exponent=d.popularity_exponent, feature_noise=d.feature_noise,
        embed_dim=d.embed_dim)
  raise table_lib.DataError(f"config.data.name={d.name!r}; allowed: 'synthetic'")
