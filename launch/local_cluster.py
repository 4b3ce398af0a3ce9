"""Run ``launch/main.py`` as a local multi-process cluster (CPU collectives, fake devices).

    python launch/local_cluster.py --num_processes=2 --devices_per_process=4 -- \
        --config=configs/base.py --workdir=runs/mp

Everything after ``--`` is passed to every process's ``launch/main.py``.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=4)
  parser.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
  parser.add_argument("main_args", nargs=argparse.REMAINDER)
  args = parser.parse_args()
  main_args = args.main_args[1:] if args.main_args[:1] == ["--"] else args.main_args
  if args.num_processes < 1 or args.devices_per_process < 1:
    print("error: --num_processes and --devices_per_process must be >= 1", file=sys.stderr)
    sys.exit(2)
  from sslrec.run import cluster

  sys.exit(
    cluster.run(
      main_args,
      num_processes=args.num_processes,
      devices_per_process=args.devices_per_process,
      port=args.port,
    )
  )


if __name__ == "__main__":
  main()
