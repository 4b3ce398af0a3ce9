"""Benchmarks: ``python launch/bench.py [--quick] [--out=bench.json] [--config.FIELD=VALUE ...]``.

Prints a markdown table and writes the records as JSON (format and the code:
src/sslrec/experiments/bench.py). ``--quick`` measures a subset (about a minute or two); the full
run covers baseline / RFM / CFM, dense and sparse updates, item tables of 10^4..10^7 rows.

Every ``--config.*`` override applies to every measurement, the train-step subprocesses included:
the catalogue is ``--config.data.num_items`` (default here 10^4, ``--num_items``), the feature
width ``--config.data.embed_dim`` (default here 64, ``--embed_dim``), the towers
``--config.model.*``, the batches ``--config.train.batch_size`` / ``--config.ssl.batch_size``.
``--collectives``: bytes per device of the compiled step's collectives (HLO) on 2, 4 and 8 fake
CPU devices at ``--per_device_batch``; ``--profile=DIR``: a ``jax.profiler`` trace of each
train-step configuration.
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
_NUM_ITEMS = flags.DEFINE_integer(
  "num_items", 10_000, "Catalogue size (data.num_items) unless --config.data.num_items is given."
)
_EMBED_DIM = flags.DEFINE_integer(
  "embed_dim", 64, "Feature width (data.embed_dim) unless --config.data.embed_dim is given."
)
_COLLECTIVES = flags.DEFINE_bool(
  "collectives", False, "Collectives bytes per device (compiled HLO) instead of timings."
)
_DEVICES = flags.DEFINE_list("collective_devices", "2,4,8", "Device counts of --collectives.")
_PER_DEVICE = flags.DEFINE_integer("per_device_batch", 512, "--collectives: batch per device.")
_PROFILE = flags.DEFINE_string("profile", None, "Write a jax.profiler trace per step config here.")
_STEPS_ONLY = flags.DEFINE_bool("steps_only", False, "Only the train-step measurements.")
_ONE = flags.DEFINE_string("one", None, "Internal: measure one spec (JSON) in this process.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  overrides = bench.config_args(sys.argv[1:])
  sizes = {"data.num_items": _NUM_ITEMS.value, "data.embed_dim": _EMBED_DIM.value}
  given = {a.split("=")[0][len("--config.") :] for a in overrides}
  defaults = [f"--config.{k}={v}" for k, v in sizes.items() if k not in given]
  config = _CONFIG.value
  if _ONE.value is None:
    bench.apply_overrides(config, {k: v for k, v in sizes.items() if k not in given})
  bench.run_command(
    config,
    config_path=flags.FLAGS["config"].config_filename,
    overrides=defaults + overrides,
    quick=_QUICK.value,
    variants=_VARIANTS.value,
    updates=_UPDATES.value,
    table_rows=_ROWS.value,
    out_path=_OUT.value,
    one=_ONE.value,
    collectives=_COLLECTIVES.value,
    collective_devices=[int(d) for d in _DEVICES.value],
    per_device_batch=_PER_DEVICE.value,
    profile_dir=_PROFILE.value,
    steps_only=_STEPS_ONLY.value,
  )


if __name__ == "__main__":
  app.run(main)
