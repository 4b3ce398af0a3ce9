"""Your own tables (Parquet or CSV) with a declared feature schema: ``--config.data.path=DIR``.

The tables and schema below describe the small example in tests/fixtures/files (MovieLens-like:
``interactions.csv`` user_id,item_id,timestamp,rating; ``items.csv``
item_id,title,genres,year,price;
``users.csv`` user_id,country,age). For your data, copy this file and change the names; every field
is documented in configs/base.py (``data.files.*``) and docs/data.md. A feature is
``{kind, column, buckets, max_len, separator}``: kind 'id' | 'multi' | 'dense' (queries also
'history': the user's latest items); column defaults to the feature's name; buckets 0 = vocabulary
from the training period with an OOV id, > 0 = hash buckets. Features are read in name order.
"""

import ml_collections

from configs import base, real_data


def get_config():
  c = base.get_config()
  c.data.name = "files"
  c.data.path = ""  # required: --config.data.path=DIR (the folder holding the tables)
  c.data.min_rating = 4.0  # a row is a positive pair when its 'rating' column is >= 4
  f = c.data.files
  f.interactions = "interactions.csv"
  f.item_table = "items.csv"
  f.query_table = "users.csv"
  f.query_key = "user_id"
  f.item_key = "item_id"
  f.timestamp = "timestamp"
  f.weight = "rating"
  f.item_name = "title"
  f.item_features = ml_collections.ConfigDict(
    {
      "item": {"kind": "id", "column": "item_id"},
      "genres": {"kind": "multi", "separator": "|", "max_len": 6},
      "title_words": {
        "kind": "multi",
        "column": "title",
        "separator": " ",
        "max_len": 8,
        "buckets": 1000,
      },
      "year": {"kind": "id"},
      "price": {"kind": "dense"},
    }
  )
  f.query_features = ml_collections.ConfigDict(
    {
      "user": {"kind": "id", "column": "user_id"},
      "country": {"kind": "id"},
      "age": {"kind": "id"},
      "history": {"kind": "history", "max_len": 20},
    }
  )
  return real_data.apply(c)  # epochs, validation, early stopping, popularity prior
