"""MovieLens in its GroupLens layout (ML-100k or ML-1M): ``--config.data.path=DIR``.

``--config=configs/movielens.py`` is base (SSL with CFM) on MovieLens. A variant's model and loss
come with ``configs/movielens.py:VARIANT`` (``baseline``, ``cfm``, ``rfm``, ``spread_out``,
``ssl_same_dist``): that variant's config with the MovieLens fields below, so the comparisons run
with identical data and training settings. ``--config=configs/baseline.py
--config.data.name=movielens --config.data.path=DIR`` works too, with base's training settings.
"""

import importlib

from configs import real_data

VARIANTS = ("base", "baseline", "cfm", "rfm", "spread_out", "ssl_same_dist")


def get_config(variant: str = "base"):
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; allowed: {VARIANTS}")
  c = importlib.import_module(f"configs.{variant}").get_config()
  c.data.name = "movielens"
  c.data.path = ""  # required: --config.data.path=DIR
  # Each user's latest 20% of ratings is eval: every eval user has a history. 'global' (one time
  # cutoff, base's default) is stricter, but its eval users are mostly new ones.
  c.data.split = "user"
  return real_data.apply(c)  # epochs, validation, early stopping, popularity prior
