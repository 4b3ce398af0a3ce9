"""Sweeps: ``sslrec-sweep --config=base --workdir=DIR --grid ssl.alpha=0,0.3`` (or
``python launch/sweep.py --config=configs/base.py ...`` in a checkout).

Runs the cartesian product of ``--grid KEY=V1,V2,...`` overrides x ``--variants`` x ``--seeds``
(each run: ``python -m sslrec.commands.train``, i.e. sslrec-train, in ``DIR/runs/NAME``), skips
finished runs, resumes interrupted ones, then writes ``DIR/results.csv``, ``DIR/summary.csv``,
``DIR/results.md`` and plots.
``--config.KEY=VALUE`` flags apply to every run. ``--spec=configs/paper.py`` takes the variants,
grid and seeds from the file's ``get_sweep()``. See ``src/sslrec/experiments/`` (``plan``,
``execute``, ``report``, ``plots``) and docs/results.md.
"""

import functools
import sys

from absl import app, flags

from sslrec import cli
from sslrec.experiments import execute

_CONFIG = flags.DEFINE_string("config", None, "Config file (path or path:arg) of the sweep.")
_VARIANTS = flags.DEFINE_list(
  "variants", [], "Config files to compare (path or path:arg); with --config, added after it."
)
_SPEC = flags.DEFINE_string("spec", None, "Sweep spec file with get_sweep() (configs/paper.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory (runs/, results, plots).")
_GRID = flags.DEFINE_multi_string("grid", [], "KEY=V1,V2,... (repeatable; cartesian product).")
_SEEDS = flags.DEFINE_integer("seeds", None, "Seeds per grid point: 0..N-1 (default 1).")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Runs at a time (subprocesses).")
_PLOTS = flags.DEFINE_bool("plots", True, "Draw the plots (needs matplotlib).")
_REFERENCE = flags.DEFINE_string(
  "reference", None, "Variant the paired-differences table compares to (default: the first)."
)

_MAIN = ("-m", "sslrec.commands.train")  # each run's command after the python executable
_overrides = []


def main(argv):
  command = cli.launcher_command(argv)
  sys.exit(
    execute.run_command(
      workdir=_WORKDIR.value,
      config=_CONFIG.value,
      variants=_VARIANTS.value,
      spec=_SPEC.value,
      grid=_GRID.value,
      seeds=_SEEDS.value,
      parallel=_PARALLEL.value,
      overrides=_overrides,
      main_script=_MAIN,
      command=command,
      draw=_PLOTS.value,
      reference=_REFERENCE.value,
    )
  )


def run():
  """The ``sslrec-sweep`` console script."""
  app.run(main, flags_parser=functools.partial(cli.parse_flags, set_aside=_overrides))


if __name__ == "__main__":
  run()
