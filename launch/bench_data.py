"""Data loading cost of a config's dataset.

    python launch/bench_data.py --config=configs/movielens.py --config.data.path=DIR


Builds the configured dataset (read, split, vocabularies, contexts) and its corpus statistics
(item frequencies, logQ, head split, feature MI) in a fresh process, and prints the wall time of
each and the process's peak RSS (the figures docs/data.md reports).
"""

import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")


def main(argv):
  del argv
  from sslrec import cli
  from sslrec.data import sources, stats

  config = _CONFIG.value
  t0 = time.perf_counter()
  try:
    dataset = sources.load(config).validate()
  except cli.USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  t1 = time.perf_counter()
  stats.corpus_stats(dataset, head_fraction=config.eval.head_fraction)
  t2 = time.perf_counter()
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(
    f"{dataset.name} (data.split={config.data.split!r}): {dataset.num_items} items, "
    f"{dataset.num_queries} query rows, {dataset.num_train} train pairs, {dataset.num_eval} eval "
    f"pairs | load + split {t1 - t0:.2f}s, statistics {t2 - t1:.2f}s, total {t2 - t0:.2f}s | "
    f"peak RSS {rss:.0f} MB"
  )


if __name__ == "__main__":
  app.run(main)
