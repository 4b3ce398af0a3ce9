"""The run's directory: config compatibility on resume, and the metrics writers.

Layout (a contract other tools read; see README "Outputs"):
  WORKDIR/config.json     the resolved config
  WORKDIR/checkpoints/    orbax checkpoints (step-numbered)
  WORKDIR/metrics.jsonl   one JSON object per logged step
  WORKDIR/eval.jsonl      one JSON object per evaluation
  WORKDIR/tensorboard/    TensorBoard event files

Before a run starts, ``check_writable`` and ``check_free_space`` refuse a workdir that cannot take
its outputs; on resume, ``truncate_logs`` drops the lines a killed run wrote after its last
checkpoint, so the files read as one clean run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time

from sslrec import configuration, paths
from sslrec.run import lock as lock_lib

LOCK = ".lock"  # WORKDIR/.lock: the run that owns the workdir (sslrec.run.lock)


class WorkdirError(ValueError):
  """A workdir that cannot be used for this run; nothing in it was changed."""


def prepare(workdir: str, config_dict: dict, *, allow_config_change: bool) -> bool:
  """Checks ``workdir`` against ``config_dict`` without writing anything to it but a probe
  (``save_config`` writes config.json once the run's data has loaded).

  Returns True when the workdir already holds a run (a resume). Raises WorkdirError, without
  touching anything, when the saved config describes a different model and
  ``allow_config_change`` is False, or when the workdir cannot be written.
  """
  wd = paths.check(workdir, flag="--workdir")  # a remote path's missing client: one line
  if wd.exists() and not wd.is_dir():
    raise WorkdirError(f"--workdir={workdir} exists and is not a directory")
  path = wd / "config.json"
  ckpt_dir = wd / "checkpoints"
  resuming = path.exists()
  if resuming:
    try:
      with path.open() as f:
        saved = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise WorkdirError(
        f"{path}: cannot read the saved config ({e}); refusing to touch this workdir"
      ) from None
    if not isinstance(saved, dict):
      raise WorkdirError(
        f"{path}: the saved config is a JSON {type(saved).__name__}, not an object; refusing to "
        "touch this workdir"
      )
    diff = configuration.diff_model_fields(saved, config_dict)
    if diff and not allow_config_change:
      shown = "; ".join(diff[:6]) + (f"; ... ({len(diff)} fields)" if len(diff) > 6 else "")
      raise WorkdirError(
        f"{workdir} holds a run with a different model config ({shown}). Use another --workdir, "
        "or pass --allow_config_change to continue that run with the new config (its "
        "checkpoints are kept)"
      )
  elif ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
    raise WorkdirError(f"{workdir} has checkpoints but no config.json; refusing to reuse it")
  check_writable(workdir)  # every process: each writes its share of the checkpoints
  return resuming


def hold(workdir: str, *, log=print) -> lock_lib.Lock | None:
  """Makes this run (this process, or this multi-host job through process 0) the workdir's only
  owner until the returned lock is released. Raises WorkdirError naming the other run when one
  holds it; nothing in the workdir is changed then. Every process of a job calls it: process 0
  takes the lock and all agree on the outcome (so no process waits on a job that stopped)."""
  import jax  # lazily: this module is read by tools that do not start jax
  import numpy as np

  held, error = None, None
  if jax.process_index() == 0:
    try:
      held = lock_lib.acquire(os.path.join(workdir, LOCK), f"--workdir={workdir}")
    except lock_lib.Busy as e:
      error = WorkdirError(str(e))
    except OSError as e:
      error = WorkdirError(f"--workdir={workdir}: cannot create its lock file ({e.strerror or e})")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
    if not int(ok) and error is None:
      error = WorkdirError(
        f"--workdir={workdir} is in use by another run (process 0 names it); nothing was changed"
      )
  if error is not None:
    if held is not None:
      held.release()
    raise error
  if held is not None and held.stale:
    log(f"took over the stale lock of {lock_lib.describe(held.stale)}, which no longer runs")
  if held is not None and not held.supported:
    log(
      f"warning: {workdir}'s file system does not support locks; not guarded against a second run"
    )
  return held


def save_config(workdir: str, config_dict: dict) -> None:
  """Writes ``workdir/config.json`` (atomically); a saved config of a different model is kept
  aside as ``config.<time>.json``. Call after ``prepare`` has accepted the workdir, and only
  once the run has got far enough (its data loaded) that the config is known to be usable."""
  wd = paths.path(workdir)
  path = wd / "config.json"
  if path.exists():
    with path.open() as f:
      saved = json.load(f)
    if saved == config_dict:
      return
    if configuration.diff_model_fields(saved, config_dict):
      path.rename(wd / f"config.{int(time.time())}.json")
  _write_atomic(path, json.dumps(config_dict, indent=2, sort_keys=True))


def _write_atomic(path, text: str) -> None:
  """Writes ``text`` to the epath ``path``: through a renamed temporary file where the
  filesystem has renames (local), directly where an object store writes whole objects."""
  if not paths.is_remote(path):
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  else:
    path.write_text(text)


def check_writable(workdir: str) -> None:
  """Creates ``workdir`` if needed and a temporary file in it; WorkdirError when it cannot."""
  if paths.is_remote(workdir):
    wd = paths.check(workdir, flag="--workdir")
    try:
      wd.mkdir(parents=True, exist_ok=True)
      probe = wd / f".write_probe.{os.getpid()}"
      probe.write_bytes(b"x")
      probe.unlink()
    except OSError as e:
      raise WorkdirError(f"--workdir={workdir} is not writable ({e})") from None
    return
  try:
    os.makedirs(workdir, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write_probe.", dir=workdir)
    try:
      os.write(fd, b"x")
      os.fsync(fd)
    finally:
      os.close(fd)
      os.unlink(probe)
  except OSError as e:
    raise WorkdirError(
      f"--workdir={workdir} is not writable ({e.strerror or e}); choose a "
      "directory this process can write"
    ) from None


def check_free_space(workdir: str, checkpoint_bytes: int, max_checkpoints: int) -> str | None:
  """WorkdirError when the workdir's file system cannot take one more checkpoint of about
  ``checkpoint_bytes`` (with a 2x margin); a warning line when it cannot take ``max_checkpoints``
  of them, else None."""
  try:
    free = shutil.disk_usage(workdir).free
  except OSError:
    return None  # not measurable here (e.g. a remote file system): not refused
  gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
  if free < 2 * checkpoint_bytes + (16 << 20):
    raise WorkdirError(
      f"--workdir={workdir} has {gib(free)} free; a checkpoint of this run takes "
      f"about {gib(checkpoint_bytes)} (need at least {gib(2 * checkpoint_bytes)} "
      "plus room for metrics); free some space or use another --workdir"
    )
  if free < (max_checkpoints + 1) * checkpoint_bytes:
    return (
      f"warning: --workdir={workdir} has {gib(free)} free, less than "
      f"train.max_checkpoints + 1 = {max_checkpoints + 1} checkpoints of about "
      f"{gib(checkpoint_bytes)}"
    )
  return None


def truncate_logs(workdir: str, step: int) -> int:
  """Drops from metrics.jsonl and eval.jsonl every line with a step > ``step`` (and any line a
  crash cut short), rewriting each file atomically. Returns the number of lines dropped."""
  dropped = 0
  for name in ("metrics.jsonl", "eval.jsonl"):
    path = paths.path(workdir) / name
    if not path.exists():
      continue
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      at = record.get("step", 0) if isinstance(record, dict) else None
      if isinstance(at, int) and not isinstance(at, bool) and at <= step:
        kept.append(line)  # lines that are not a record of a step are dropped too
    if len(kept) == len(lines):
      continue
    dropped += len(lines) - len(kept)
    _write_atomic(path, "".join(line + "\n" for line in kept))
  return dropped


def _clean(v):
  v = float(v)
  return None if math.isnan(v) else v


class MetricsWriter:
  """Appends JSON lines and TensorBoard scalars (process 0 only; a no-op elsewhere)."""

  def __init__(self, workdir: str, *, enabled: bool = True, purge_step: int | None = None):
    """``purge_step``: on resume, TensorBoard hides the events a killed run logged at steps
    >= it."""
    self.enabled = enabled
    self._tb = None
    self.workdir = workdir
    self._remote = {}  # object stores cannot append: a remote file's lines, rewritten whole
    if enabled:
      paths.path(workdir).mkdir(parents=True, exist_ok=True)
      try:  # imported lazily on purpose: only the writing process pays for it
        from sslrec import tracking

        self._tb = tracking.TensorBoard(paths.join(workdir, "tensorboard"), purge_step=purge_step)
      except ImportError:  # optional at import time; a dependency of the package
        self._tb = None

  def write(self, filename: str, step: int, scalars: dict, *, tags: dict | None = None):
    """One JSON line ``{"step", **tags, **scalars}``; ``tags`` (e.g. ``{"split": "valid"}``) are
    JSON only, scalars also go to TensorBoard (``train/loss``, ``valid/recall@50``, ...)."""
    if not self.enabled:
      return
    tags = dict(tags or {})
    record = {"step": int(step), **tags, **{k: _clean(v) for k, v in scalars.items()}}
    if paths.is_remote(self.workdir):
      target = paths.path(self.workdir) / filename
      if filename not in self._remote:
        self._remote[filename] = target.read_text() if target.exists() else ""
      self._remote[filename] += json.dumps(record) + "\n"
      target.write_text(self._remote[filename])
    else:
      with open(os.path.join(self.workdir, filename), "a") as f:
        f.write(json.dumps(record) + "\n")
    if self._tb is not None:  # tags: sslrec.tracking.tag
      self._tb.scalars(filename, step, scalars, tags)

  def tensorboard(self, kind: str, step: int, scalars: dict, split: str | None = None):
    """Scalars for TensorBoard only (``kind``: 'train' or 'eval', as the JSON file names)."""
    if self.enabled and self._tb is not None:
      self._tb.scalars(kind, step, scalars, {"split": split} if split else None)

  def start(self, config_dict: dict, references=()):
    """TensorBoard's HParams session and config text (sslrec.tracking)."""
    if self._tb is not None:
      self._tb.start(config_dict, references)

  def close(self):
    if self._tb is not None:
      self._tb.close()


class LogError(ValueError):
  """A damaged line in a run's metrics / eval log; the message names the file and line."""


def read_jsonl(path: str) -> list[dict]:
  """The records of a .jsonl file; a last line cut short by a crash is skipped. Raises LogError
  naming ``path:line`` for any other line that is not a JSON object."""
  p = paths.path(path)
  if not p.exists():
    return []
  try:
    lines = [(i, line) for i, line in enumerate(p.read_text().splitlines(), 1) if line.strip()]
  except (OSError, UnicodeDecodeError) as e:
    raise LogError(f"{path}: cannot read it ({e})") from None
  records = []
  for k, (i, line) in enumerate(lines):
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      if k == len(lines) - 1:
        break  # cut short by a crash: the resume drops it (truncate_logs)
      raise LogError(f"{path}:{i}: not a JSON line ({e.msg}); repair or remove that line") from None
    if not isinstance(record, dict):
      raise LogError(f"{path}:{i}: a JSON {type(record).__name__}, not an object")
    records.append(record)
  return records
