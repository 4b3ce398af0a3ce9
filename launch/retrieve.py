"""``sslrec-retrieve`` from a checkout: ``python launch/retrieve.py ...`` (commands/retrieve.py)."""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_ROOT, "src"))  # this checkout's sslrec, installed or not

from sslrec.commands import retrieve  # noqa: E402

if __name__ == "__main__":
  retrieve.run()
