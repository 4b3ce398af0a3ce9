"""Benchmarks: ``python launch/bench.py [--quick] [--out=bench.json]``.

Prints a markdown table and writes the records as JSON (see sslrec/bench.py for the format).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/base.py", "Base config.")
_OUT = flags.DEFINE_string("out", None, "Write the records as JSON here.")
_QUICK = flags.DEFINE_bool("quick", False, "Fewer repetitions and smaller MI sizes (~1 minute).")
_VARIANTS = flags.DEFINE_list("variants", "baseline,spread_out,rfm,cfm", "Train-step variants.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from sslrec import bench
  quick = _QUICK.value
  steps, repeats = (20, 3) if quick else (50, 5)
  records = []
  for v in _VARIANTS.value:
    records.append(bench.train_step_throughput(_CONFIG.value, v, steps=steps, repeats=repeats))
    print(json.dumps(records[-1]), flush=True)
  records.append(bench.input_pipeline_throughput(_CONFIG.value, batches=steps, repeats=repeats))
  for n in ((10**5,) if quick else (10**5, 10**6)):
    records.append(bench.mi_stats_time(n, repeats=1 if quick else 3))
  print(bench.markdown(records))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(records, f, indent=1)


if __name__ == "__main__":
  app.run(main)
