"""Tuning: ``python launch/tune.py --spec=configs/tune_movielens.py --workdir=DIR --trials=8``.

Per variant of the spec's ``get_tuning()``: a budgeted optuna (TPE) search of its space on the
VALIDATION split (``DIR/<variant>/study.db``, trials in ``DIR/<variant>/trial_<n>/``, seed 0),
then its best setting over seeds 0..N-1 (``DIR/<variant>/best_seed<k>/``), whose TEST figures
make ``DIR/results.md`` / ``DIR/results.csv``: each variant at its own best, paired differences
to the first. ``--config.KEY=VALUE`` flags apply to every run. Re-running the command resumes.
See docs/tuning.md and ``src/sslrec/experiments/tune.py``.
"""

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for configs/

from absl import app, flags  # noqa: E402

from sslrec import cli  # noqa: E402
from sslrec.experiments import tune  # noqa: E402

_SPEC = flags.DEFINE_string(
  "spec", None, "Tuning spec file with get_tuning() (configs/tune_movielens.py)."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Tuning directory (studies, runs, results).")
_TRIALS = flags.DEFINE_integer(
  "trials", None, f"Trials per variant (default: the spec's, else {tune.DEFAULT_TRIALS})."
)
_SEEDS = flags.DEFINE_integer(
  "seeds",
  None,
  f"Seeds 0..N-1 of each variant's best (default: the spec's, else {tune.DEFAULT_SEEDS}).",
)
_OBJECTIVE = flags.DEFINE_string(
  "objective",
  None,
  f"Validation metric maximised (default: the spec's, else {tune.DEFAULT_OBJECTIVE}).",
)

_MAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "main.py")
_overrides = []


def main(argv):
  command = cli.launcher_command(argv)
  sys.exit(
    tune.run_command(
      spec=_SPEC.value,
      workdir=_WORKDIR.value,
      trials=_TRIALS.value,
      seeds=_SEEDS.value,
      objective=_OBJECTIVE.value,
      overrides=_overrides,
      main_script=_MAIN,
      command=command,
    )
  )


if __name__ == "__main__":
  app.run(main, flags_parser=functools.partial(cli.parse_flags, set_aside=_overrides))
