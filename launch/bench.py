"""Benchmarks: ``python launch/bench.py [--quick] [--out=bench.json]``.

Prints a markdown table and writes the records as JSON (format and the code:
src/sslrec/experiments/bench.py). ``--quick`` measures a subset (about a minute or two); the full
run covers baseline / RFM / CFM, dense and sparse updates, item tables of 10^4..10^7 rows (dim 64).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from sslrec.experiments import bench  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/base.py", "Base config.")
_OUT = flags.DEFINE_string("out", None, "Write the records as JSON here.")
_QUICK = flags.DEFINE_bool("quick", False, "A subset, about a minute or two.")
_VARIANTS = flags.DEFINE_list("variants", None, "Train-step variants (default by mode).")
_UPDATES = flags.DEFINE_list("updates", "dense,sparse", "Embedding update paths.")
_ROWS = flags.DEFINE_list("table_rows", None, "Item-id table sizes (default by mode).")
_ONE = flags.DEFINE_string("one", None, "Internal: measure one train-step config (JSON).")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  bench.run_command(
    _CONFIG.value,
    config_path=flags.FLAGS["config"].config_filename,
    quick=_QUICK.value,
    variants=_VARIANTS.value,
    updates=_UPDATES.value,
    table_rows=_ROWS.value,
    out_path=_OUT.value,
    one=_ONE.value,
  )


if __name__ == "__main__":
  app.run(main)
