"""Book-Crossing through the files source: ``--config.data.path=DIR``.

DIR holds the tables ``python launch/fetch_data.py bookcrossing DIR`` writes (docs/data.md, "A
second real dataset"): ``interactions.csv`` user_id,item_id,rating (no timestamps: the rows are in a
seeded random order); ``items.csv`` item_id (ISBN),title,author,publisher,year,title_words;
``users.csv`` user_id,city,state,country,age.

``--config=configs/bookcrossing.py`` is base (SSL with CFM) on this data;
``configs/bookcrossing.py:VARIANT`` (``baseline``, ``cfm``, ``rfm``, ``spread_out``,
``ssl_same_dist``) is that variant with the same data and training fields, as for MovieLens.
"""

import importlib

import ml_collections

from configs import real_data

VARIANTS = ("base", "baseline", "cfm", "rfm", "spread_out", "ssl_same_dist")


def get_config(variant: str = "base"):
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; allowed: {VARIANTS}")
  c = importlib.import_module(f"configs.{variant}").get_config()
  c.data.name = "files"
  c.data.path = ""  # required: --config.data.path=DIR (the folder fetch_data.py wrote)
  # Every row is a positive pair: rating 0 is an implicit interaction, 1..10 explicit ratings.
  # data.min_rating=1 keeps only the explicit ratings as positives (the others stay seen).
  c.data.min_rating = 0.0
  # No timestamps, so the row order is the time order, and fetch_data.py writes the rows in a
  # seeded random order: 'user' holds out a random part of each user's books (every eval user has
  # a history).
  c.data.split = "user"
  f = c.data.files
  f.interactions = "interactions.csv"
  f.item_table = "items.csv"
  f.query_table = "users.csv"
  f.query_key = "user_id"
  f.item_key = "item_id"
  f.timestamp = ""  # none in Book-Crossing: the (shuffled) row order is the time order
  f.weight = "rating"  # positives: rating >= data.min_rating
  f.item_name = "title"
  f.item_features = ml_collections.ConfigDict(
    {
      "item": {"kind": "id", "column": "item_id"},  # the ISBN
      "author": {"kind": "id"},  # the first author; vocabulary of the training-period books
      "publisher": {"kind": "id"},
      "year": {"kind": "id"},  # year of publication (empty outside 1000..2005: the default id)
      # Distinct lower-cased title words (~9k in the 10-core tables' vocabulary), at most 8.
      "title_words": {"kind": "multi", "separator": " ", "max_len": 8},
    }
  )
  f.query_features = ml_collections.ConfigDict(
    {
      "user": {"kind": "id", "column": "user_id"},
      "country": {"kind": "id"},  # last part of the user's "city, state, country" location
      "state": {"kind": "id"},
      "age": {"kind": "id"},  # empty for 29% of the users (NULL in the dump, or out of 5..100)
      "history": {"kind": "history", "max_len": 20},  # the user's latest books before the query
    }
  )
  # The 10-core tables (366k interactions): ~259k training pairs, ~500 steps an epoch at batch 512.
  return real_data.apply(c)  # epochs, validation, early stopping, popularity prior
