"""``sslrec-export`` from a checkout: ``python launch/export.py ...`` (commands/export.py)."""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_ROOT, "src"))  # this checkout's sslrec, installed or not

from sslrec.commands import export  # noqa: E402

if __name__ == "__main__":
  export.run()
