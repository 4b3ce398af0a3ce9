"""The test table of a finished sweep: ``python launch/summarize.py --workdir=SWEEP_DIR``.

Writes SWEEP_DIR/test_summary.md (see src/sslrec/experiments/summary.py) and prints it.
"""

import sys

from absl import app, flags

from sslrec import cli
from sslrec.experiments import summary

_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory written by launch/sweep.py.")
_REFERENCE = flags.DEFINE_string("reference", "baseline", "Variant the differences compare to.")
_K = flags.DEFINE_integer("k", 50, "The cut-off K of the table.")
flags.mark_flag_as_required("workdir")


def main(argv):
  del argv
  try:
    print(summary.summarize(_WORKDIR.value, _REFERENCE.value, _K.value), end="")
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
