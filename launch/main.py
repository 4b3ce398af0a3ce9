"""Train and evaluate: ``python launch/main.py --config=configs/base.py --workdir=DIR``.

Overrides: ``--config.ssl.alpha=0.3 --config.train.num_steps=500``. Re-running the same command in
the same workdir resumes from its latest checkpoint.
"""

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for configs/

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from sslrec import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file (configs/*.py).", lock_config=True
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


if __name__ == "__main__":
  app.run(main, flags_parser=functools.partial(cli.parse_flags, config_file=True))
