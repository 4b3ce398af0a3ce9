"""Benchmarks: ``python launch/bench.py [--quick] [--out=bench.json]``.

Prints a markdown table and writes the records as JSON (format: src/sslrec/bench.py). ``--quick``
measures a subset (about a minute or two); the full run covers baseline / RFM / CFM, dense and
sparse updates, item tables of 10^4..10^7 rows (dim 64).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

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
  from sslrec import bench
  if _ONE.value:  # one train-step measurement in this process (own peak RSS)
    spec = json.loads(_ONE.value)
    print(json.dumps(bench.train_step_record(_CONFIG.value, spec["variant"], spec["update"],
                                             spec["table_rows"], steps=spec["steps"],
                                             repeats=spec["repeats"])), flush=True)
    return
  quick = _QUICK.value
  variants = _VARIANTS.value or (["baseline", "cfm"] if quick else ["baseline", "rfm", "cfm"])
  rows = [int(float(r)) for r in (_ROWS.value or (["1e4", "1e6"] if quick else
                                                  ["1e4", "1e5", "1e6", "1e7"]))]
  steps, repeats = (10, 3) if quick else (20, 5)
  config_path = flags.FLAGS["config"].config_filename
  records = []
  for n in rows:
    for update in _UPDATES.value:
      for v in variants:
        r = bench.train_step_subprocess(config_path, v, update, n, steps=steps, repeats=repeats,
                                        embed_dim=64)
        records.append(r)
        print(json.dumps(r), flush=True)
  records.append(bench.input_pipeline_record(_CONFIG.value, batches=50, repeats=repeats))
  for n in ((10**5,) if quick else (10**5, 10**6)):
    records.append(bench.mi_stats_record(n, repeats=1 if quick else 3))
  records.append(bench.eval_record(_CONFIG.value, num_items=10**6,
                                   num_queries=1024 if quick else 4096, repeats=repeats))
  print(bench.markdown(records))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(records, f, indent=1)


if __name__ == "__main__":
  app.run(main)
