"""Command-line glue: turns user errors into one clear line and a non-zero exit."""

from __future__ import annotations

import sys

from sslrec import configuration, features, workdir
from sslrec.data import table

USER_ERRORS = (configuration.ConfigError, table.DataError, features.SchemaError,
               workdir.WorkdirError)


def run_main(config, workdir_path: str, *, allow_config_change: bool = False) -> int:
  """Runs ``train_and_evaluate``; returns the process exit code (2 for user errors)."""
  from sslrec import train
  try:
    train.train_and_evaluate(config, workdir_path, allow_config_change=allow_config_change)
  except USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  return 0
