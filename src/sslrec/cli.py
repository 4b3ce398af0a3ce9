"""Command-line glue: turns user errors into one clear line and a non-zero exit."""

from __future__ import annotations

import os
import re
import shlex
import sys

import jax
from absl import flags

from sslrec import configuration, features, parallel, paths, shipped, train
from sslrec.data import table
from sslrec.run import checkpointing, reliability, workdir

USER_ERRORS = (
  configuration.ConfigError,
  table.DataError,
  features.SchemaError,
  workdir.WorkdirError,
  workdir.LogError,
  parallel.DistributedError,
  checkpointing.CheckpointError,
  paths.PathError,
)


def quiet_library_errors() -> None:
  """Drops orbax's own ERROR log records (a failed save logs its traceback once per background
  thread, a hundred lines for a full disk): the run reports the failure itself, in one line
  (``checkpointing.SaveFailed``). ``--verbosity`` set on the command line keeps them."""
  import logging as py_logging

  from absl import logging as absl_logging

  class _NoOrbax(py_logging.Filter):
    def filter(self, record):
      return "/orbax/" not in record.pathname.replace("\\", "/")

  absl_logging.get_absl_handler().addFilter(_NoOrbax())
  # ... and asyncio's "exception was never retrieved" for the same failure's pending writes.
  py_logging.getLogger("asyncio").setLevel(py_logging.CRITICAL)
  import warnings

  warnings.filterwarnings(
    "ignore", message="coroutine .* was never awaited", category=RuntimeWarning
  )


def interrupt_on_sigterm() -> None:
  """SIGTERM raises KeyboardInterrupt in the main thread (as Ctrl-C does), so the ``finally``
  blocks that remove partial outputs run; for tools without their own stop handling (export)."""
  import signal
  import threading

  def handler(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)

  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, handler)


def os_error_line(e: OSError) -> str:
  """An OSError as one line naming the file: ``PATH: No space left on device``."""
  where = e.filename or ""
  if e.filename2:
    where = f"{where} -> {e.filename2}"
  what = e.strerror or str(e)
  return f"{where}: {what}" if where else what


def _one_line(text: str) -> str:
  return " ".join(str(text).split())


def resume_command() -> str:
  """This process's command line, to re-run for a resume."""
  exe = "python" if os.path.basename(sys.executable).startswith("python") else sys.executable
  return shlex.join([exe, *sys.argv])


def run_main(
  config, workdir_path: str, *, allow_config_change: bool = False, distributed: dict | None = None
) -> int:
  """Runs ``train_and_evaluate`` (after joining the distributed runtime when asked); returns
  the process exit code: 0 when finished or stopped by SIGTERM / SIGINT after saving a
  checkpoint (one line says how to resume), 1 when a step was not finite, 2 for user errors
  (bad config, data, workdir or checkpoints), 130 when interrupted before a checkpoint could be
  saved. Each failure is one ``error:`` line on stderr."""
  try:
    configuration.validate(config)  # before waiting on other processes
    parallel.set_cpu_devices(config.mesh.cpu_devices)
    if distributed:
      parallel.initialize_distributed(**distributed)
    train.train_and_evaluate(config, workdir_path, allow_config_change=allow_config_change)
  except USER_ERRORS as e:
    print(f"error: {_one_line(e)}", file=sys.stderr, flush=True)
    return 2
  except OSError as e:  # a file system that turned read-only, filled up, went away, ...
    print(f"error: {os_error_line(e)}", file=sys.stderr, flush=True)
    return 2
  except MemoryError as e:
    print(
      f"error: out of host memory ({_one_line(e) or 'MemoryError'}); reduce the data or model "
      "sizes",
      file=sys.stderr,
      flush=True,
    )
    return 2
  except reliability.NonFiniteError as e:
    print(f"error: {_one_line(e)}", file=sys.stderr, flush=True)
    return 1
  except reliability.Stopped as e:
    if jax.process_index() == 0:
      print(
        f"stopped at step {e.step} on {e.signal_name}; checkpoint saved in {e.checkpoint}. "
        f"To resume, run the same command again: {resume_command()}",
        flush=True,
      )
    return 0
  except KeyboardInterrupt as e:
    why = f"{e}; " if str(e) else ""
    print(
      f"error: interrupted ({why}no checkpoint saved since the last one)",
      file=sys.stderr,
      flush=True,
    )
    return 130
  return 0


def flag_error_message(argv, exc: BaseException) -> str:
  """One line for a command-line parsing failure, naming the offending flag."""
  texts = []
  e = exc
  while e is not None:
    texts.append(str(e))
    e = e.__context__ or e.__cause__
  joined = " ".join(texts)
  m = re.search(r"Did you mean \\?\"(\w+)\\?\" instead of \\?\"(\w+)\\?\"", joined)
  if m:
    wrong = m.group(2)
    flag = next(
      (a.split("=", 1)[0] for a in argv[1:] if re.search(rf"\.{wrong}(\.|$)", a.split("=", 1)[0])),
      wrong,
    )
    return f"{flag}: no such config field (did you mean {m.group(1)!r}?); see configs/base.py"
  text = " ".join(str(exc).split())
  m = re.match(
    r"flag (--config=\S+): Error whilst parsing config file: Traceback .*"
    r"\b(\w+Error): (.*)$",
    text,
  )
  if m:  # get_config raised: its message, not the traceback ml_collections quotes
    return f"{m.group(1)}: {m.group(3)}"
  m = re.match(r"flag (--config\.[\w.]+)=(.*?): (.*)", text)
  if m:
    return f"{m.group(1)}={m.group(2)}: {m.group(3)}"
  for arg in argv[1:]:
    name = arg.split("=", 1)[0]
    if name.startswith("--config."):
      field = name.rsplit(".", 1)[-1]
      if f"'{field}'" in joined:
        return f"{name}: no such config field; see configs/base.py"
  return f"bad command line: {text}"


def resolve_config_flag(argv, flag: str = "--config", function: str = "get_config") -> list:
  """``argv`` with a shipped config's name in ``--config=NAME[:ARG]`` replaced by its file's path
  (``sslrec.shipped``), and that file's ``from configs import ...`` made importable. Raises
  ConfigError (one line, listing the names) for an unknown name."""
  argv = list(argv)
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith(f"{flag}="):
      value = shipped.resolve(arg.split("=", 1)[1], flag=flag, function=function)
      argv[i] = f"{flag}={value}"
    elif arg == flag and i + 1 < len(argv):
      value = argv[i + 1] = shipped.resolve(argv[i + 1], flag=flag, function=function)
    else:
      continue
    shipped.make_importable(value)
  return argv


def check_config_file(argv) -> str | None:
  """An error line when ``--config=PATH`` names a file that does not exist."""
  for i, arg in enumerate(argv[1:], start=1):
    path = None
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
    if path is not None:
      path = path.split(":", 1)[0]
      if not os.path.isfile(path):
        return (
          f"--config={path}: no such file (a path, or the name of a shipped config: "
          f"{', '.join(shipped.names())})"
        )
  return None


def parse_flags(argv, *, config_file: bool = False, set_aside: list | None = None):
  """The absl ``flags_parser`` of every launcher: a bad flag is one ``error:`` line and exit 2.

  ``config_file``: ``--config`` names an ml_collections config file (checked to exist first; an
  unknown field or a wrong type names the flag). ``set_aside``: ``--config.KEY=VALUE`` arguments
  are appended to this list instead of being parsed (the sweep passes them on to its runs).
  """
  if set_aside is not None:
    kept = [argv[0]]
    for arg in argv[1:]:
      (set_aside if arg.startswith(("--config.", "--noconfig.")) else kept).append(arg)
    argv = kept
  if config_file:
    try:
      argv = resolve_config_flag(argv)
    except configuration.ConfigError as e:
      print(f"error: {_one_line(e)}", file=sys.stderr, flush=True)
      sys.exit(2)
    bad = check_config_file(argv)
    if bad:
      print(f"error: {bad}", file=sys.stderr, flush=True)
      sys.exit(2)
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 -- any parse failure is a user error here
    message = flag_error_message(argv, e) if config_file else " ".join(str(e).split())
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def launcher_command(argv) -> str:
  """For the launchers that start runs (sweep, tune): stray positional arguments are one
  ``error:`` line and exit 2; returns this process's command line, as written in their logs."""
  if len(argv) > 1:
    print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
    sys.exit(2)
  return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
