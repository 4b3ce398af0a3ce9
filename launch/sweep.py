"""``sslrec-sweep`` from a checkout: ``python launch/sweep.py ...`` (sslrec/commands/sweep.py)."""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_ROOT, "src"))  # this checkout's sslrec, installed or not

from sslrec.commands import sweep  # noqa: E402

if __name__ == "__main__":
  sweep.run()
