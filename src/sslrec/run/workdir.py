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

from sslrec import configuration
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
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"--workdir={workdir} exists and is not a directory")
  path = os.path.join(workdir, "config.json")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  resuming = os.path.exists(path)
  if resuming:
    try:
      with open(path) as f:
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
  elif os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
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
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved == config_dict:
      return
    if configuration.diff_model_fields(saved, config_dict):
      os.replace(path, os.path.join(workdir, f"config.{int(time.time())}.json"))
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(config_dict, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def check_writable(workdir: str) -> None:
  """Creates ``workdir`` if needed and a temporary file in it; WorkdirError when it cannot."""
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
    path = os.path.join(workdir, name)
    if not os.path.exists(path):
      continue
    with open(path) as f:
      lines = f.read().splitlines()
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
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.write("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
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
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      try:  # imported lazily on purpose: only the writing process pays for it
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge_step)
      except ImportError:  # optional at import time; a dependency of the package
        self._tb = None

  def write(self, filename: str, step: int, scalars: dict, *, tags: dict | None = None):
    """One JSON line ``{"step", **tags, **scalars}``; ``tags`` (e.g. ``{"split": "valid"}``) are
    JSON only, scalars also go to TensorBoard (under ``<split>/`` for evaluations)."""
    if not self.enabled:
      return
    tags = dict(tags or {})
    record = {"step": int(step), **tags, **{k: _clean(v) for k, v in scalars.items()}}
    with open(os.path.join(self.workdir, filename), "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      tag_prefix = "train/"
      if filename.startswith("eval"):
        tag_prefix = f"{tags['split']}/" if "split" in tags else "eval/"
      for k, v in scalars.items():
        if math.isfinite(float(v)):  # an empty slice's NaN (no cold items) has no point to draw
          self._tb.add_scalar(tag_prefix + k, float(v), int(step))
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


class LogError(ValueError):
  """A damaged line in a run's metrics / eval log; the message names the file and line."""


def read_jsonl(path: str) -> list[dict]:
  """The records of a .jsonl file; a last line cut short by a crash is skipped. Raises LogError
  naming ``path:line`` for any other line that is not a JSON object."""
  if not os.path.exists(path):
    return []
  try:
    with open(path, encoding="utf-8") as f:
      lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
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
