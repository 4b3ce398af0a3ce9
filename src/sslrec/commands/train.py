"""Train and evaluate: ``sslrec-train --config=base --workdir=DIR`` (or
``python launch/main.py --config=configs/base.py --workdir=DIR`` in a checkout).

``--config`` is a config file (``PATH`` or ``PATH:ARG``) or the name of a config shipped with sslrec
(``base``, ``smoke``, ``movielens:cfm``, ...; see ``sslrec.shipped``). Overrides:
``--config.ssl.alpha=0.3 --config.train.num_steps=500``. Re-running the same command in the same
workdir resumes from its latest checkpoint.
"""

import functools
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from sslrec import cli

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Config file (PATH or PATH:ARG) or a shipped config's name (base, smoke, movielens:cfm, ...).",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, config).")
_ALLOW = flags.DEFINE_bool(
  "allow_config_change", False, "Continue a workdir whose saved config describes a different model."
)
_COORD = flags.DEFINE_string(
  "coordinator_address",
  None,
  "HOST:PORT of process 0, for a multi-process run (jax.distributed.initialize).",
)
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes of the run.")
_PID = flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.")
_MULTIHOST = flags.DEFINE_bool(
  "multihost",
  False,
  "Call jax.distributed.initialize() with no arguments (TPU pods, "
  "SLURM, ...: the cluster is detected).",
)
_DIST_TIMEOUT = flags.DEFINE_integer(
  "distributed_timeout", 300, "Seconds to wait for every process to join."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # keep library INFO chatter (orbax) out of the log
    cli.quiet_library_errors()  # and its tracebacks of a failed save (reported in one line)
  sys.exit(
    cli.run_main(
      _CONFIG.value,
      _WORKDIR.value,
      allow_config_change=_ALLOW.value,
      distributed=dict(
        coordinator_address=_COORD.value,
        num_processes=_NPROC.value,
        process_id=_PID.value,
        multihost=_MULTIHOST.value,
        timeout_s=_DIST_TIMEOUT.value,
      ),
    )
  )


def run():
  """The ``sslrec-train`` console script."""
  app.run(main, flags_parser=functools.partial(cli.parse_flags, config_file=True))


if __name__ == "__main__":
  run()
