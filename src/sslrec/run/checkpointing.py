"""Checkpoints that survive crashes: integrity seals, and restore with fallback.

orbax writes a checkpoint into ``checkpoints/<step>.orbax-checkpoint-tmp`` and renames it to
``checkpoints/<step>`` once every item is written, so a save cut short by a crash leaves only the
temporary folder, which is never restored (orbax replaces it when that step is saved again).

Once a save has completed, ``Sealer`` writes ``checkpoints/<step>/SEAL`` with the size and CRC-32
of every file of the checkpoint. ``restore_latest`` tries the newest checkpoint first. A
checkpoint whose files do not match its seal (truncated, changed, missing) or that has no seal
and fails to restore is *bad*: the run names it and falls back to the previous one; once a good
one is restored, the bad ones are moved to ``WORKDIR/checkpoints_bad/`` (never deleted). A sealed
checkpoint that is intact but does not fit the run (other shapes: the model or the data changed)
stops the run with a ``CheckpointError``, as does a workdir none of whose checkpoints can be read:
a run never starts from scratch silently when checkpoints exist.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
import zlib
from collections.abc import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from sslrec import paths

SEAL = "SEAL"  # per-checkpoint file: {relative path: [size, crc32]}
TMP_MARK = ".orbax-checkpoint-tmp"
BAD_DIR = "checkpoints_bad"
_CHUNK = 1 << 22


class CheckpointError(ValueError):
  """No checkpoint of the workdir can be used; the message says which and why."""


class SaveFailed(CheckpointError):
  """A checkpoint could not be written (a full disk, a lost mount, no permission); the run stops
  at once, and the message names the last good checkpoint a rerun resumes from."""


class CheckpointMismatch(ValueError):
  """An intact checkpoint whose contents do not fit the run (shapes / structure)."""


def _abs(workdir: str) -> str:
  """A local workdir made absolute; a remote one (``gs://...``) as given."""
  return workdir if paths.is_remote(workdir) else os.path.abspath(workdir)


def directory(workdir: str) -> str:
  return paths.join(_abs(workdir), "checkpoints")


def best_directory(workdir: str) -> str:
  """The parameters of the checkpoint selected on validation (``train.select_metric``)."""
  return paths.join(_abs(workdir), "best")


def best_manager(workdir: str):
  """An orbax manager of the parameters of each validation improvement (a finished run keeps only
  the selected one: ``prune_best``)."""
  return ocp.CheckpointManager(
    best_directory(workdir), options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True)
  )


def prune_best(mgr, *, keep: int) -> None:
  """Deletes every best-parameter step but ``keep`` (the finished run's selected one)."""
  mgr.wait_until_finished()
  for s in mgr.all_steps():
    if s != keep:
      mgr.delete(s)


def best_args(params, *, save: bool):
  """The orbax args of a ``best`` checkpoint: the model parameters only."""
  if save:
    return ocp.args.Composite(params=ocp.args.StandardSave(params))
  return ocp.args.Composite(params=ocp.args.StandardRestore(params))


def manager(workdir: str, config):
  return ocp.CheckpointManager(
    directory(workdir),
    options=ocp.CheckpointManagerOptions(max_to_keep=config.train.max_checkpoints, create=True),
  )


def unfinished_saves(ckpt_dir: str) -> list[str]:
  """Names of the temporary folders of saves that never completed."""
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(n for n in os.listdir(ckpt_dir) if TMP_MARK in n)


def _files(step_dir: str) -> list[str]:
  out = []
  for root, _, names in os.walk(step_dir):
    for n in names:
      rel = os.path.relpath(os.path.join(root, n), step_dir)
      if rel != SEAL and not rel.startswith(SEAL + "."):
        out.append(rel)
  return sorted(out)


def _crc(path: str) -> int:
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      crc = zlib.crc32(chunk, crc)
  return crc


def seal(step_dir: str) -> None:
  """Writes the seal of a completed checkpoint (atomically: a crash leaves no partial seal).
  A remote checkpoint is not sealed: its object store's writes are whole (orbax commits it)."""
  if paths.is_remote(step_dir):
    return
  entries = {
    rel: [os.path.getsize(os.path.join(step_dir, rel)), _crc(os.path.join(step_dir, rel))]
    for rel in _files(step_dir)
  }
  tmp = os.path.join(step_dir, SEAL + ".tmp")
  with open(tmp, "w") as f:
    json.dump(entries, f, sort_keys=True)
  os.replace(tmp, os.path.join(step_dir, SEAL))


def verify(step_dir: str) -> tuple[str, str]:
  """``('ok' | 'unsealed' | 'bad', detail)``: the checkpoint's files against its seal."""
  if paths.is_remote(step_dir):
    return "unsealed", "remote (not sealed)"
  path = os.path.join(step_dir, SEAL)
  if not os.path.exists(path):
    return "unsealed", "no seal"
  try:
    with open(path) as f:
      entries = json.load(f)
    if not isinstance(entries, dict):
      raise ValueError("not a mapping")
  except (OSError, ValueError) as e:
    return "bad", f"{SEAL}: unreadable ({e})"
  for rel, entry in sorted(entries.items()):
    if (
      not isinstance(entry, list)
      or len(entry) != 2
      or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in entry)
    ):
      return "bad", f"{SEAL}: the entry of {rel!r} is {entry!r}, not [size, crc32]"
    size, crc = entry
    full = os.path.join(step_dir, rel)
    if not os.path.isfile(full):
      return "bad", f"{rel}: missing"
    actual = os.path.getsize(full)
    if actual != size:
      return "bad", f"{rel}: {actual} bytes, {size} when saved"
    if _crc(full) != crc:
      return "bad", f"{rel}: contents changed since it was saved (CRC mismatch)"
  return "ok", ""


class Sealer:
  """Saves through the manager and seals each checkpoint once its asynchronous save has completed
  (the seal on process 0 only, in a background thread: reading a large checkpoint back does not
  hold up training).

  A save that fails, synchronously or in orbax's background thread (seen at the next step's
  ``flush_if_done``), raises ``SaveFailed`` naming the step and the last good checkpoint (the
  last completed save, or ``last_good`` given at start: the checkpoint the run resumed from); the
  failed save's temporary folder is removed (it is never restored, and it holds space a full disk
  needs). After a failure every later call is a no-op, so cleanup on the way out raises nothing
  more."""

  def __init__(self, mgr, enabled: bool, last_good: int | None = None):
    self.manager = mgr
    self.enabled = enabled
    self.pending: int | None = None
    self.last_good = last_good
    self.failed = False
    self._thread: threading.Thread | None = None

  def _fail(self, step: int | None, e: BaseException):
    self.failed = True
    try:  # let orbax's background threads end before the run unwinds (no stray tracebacks)
      self.manager.wait_until_finished()
    except Exception:
      pass  # the failure being reported
    directory_ = str(self.manager.directory)
    if self.enabled:
      for name in unfinished_saves(directory_):
        shutil.rmtree(os.path.join(directory_, name), ignore_errors=True)
    where = (
      f"the last good checkpoint is step {self.last_good} "
      f"({os.path.join(directory_, str(self.last_good))}); rerun the same command to resume from "
      "it once the cause is fixed"
      if self.last_good is not None
      else "no checkpoint of this run was saved before it"
    )
    what = f"step {step}" if step is not None else "a checkpoint"
    raise SaveFailed(
      f"saving the checkpoint of {what} to {directory_} failed ({first_line(e)}); the run "
      f"stopped; {where}"
    ) from None

  def save(self, step: int, args):
    """``manager.save(step, args)``; SaveFailed when it (or the previous, pending save) fails."""
    if self.failed:
      return
    try:
      self.manager.save(step, args=args)
    except Exception as e:  # orbax wraps OS errors as ValueError / OSError / XlaRuntimeError
      previous = self.pending
      if previous is not None:  # did the previous save complete? then this one failed
        try:
          self.manager.wait_until_finished()
        except Exception:
          pass
        if os.path.isdir(os.path.join(str(self.manager.directory), str(previous))):
          self._seal(previous)
          previous = None
      self._fail(previous if previous is not None else step, e)
    self.saved(step)

  def saved(self, step: int):
    """Call right after ``manager.save(step)``; seals the previous save first if pending."""
    self.flush_if_done()
    if self.pending is not None:  # orbax waits for the previous save inside save(): it is done
      self._seal(self.pending)
    self.pending = step

  def flush_if_done(self):
    """Non-blocking: starts sealing the pending checkpoint if its save has completed (and raises
    SaveFailed if it failed)."""
    if self.failed or self.pending is None or self.manager.is_saving_in_progress():
      return
    self._check(self.pending)
    self._seal(self.pending)

  def _check(self, step: int):
    """SaveFailed unless checkpoint ``step`` (whose save is no longer in progress) completed:
    orbax reports some background failures (its finalize thread) only on the next save, so the
    folder is checked too: a completed save has renamed its temporary folder into place."""
    try:
      self.manager.check_for_errors()
      if not os.path.isdir(os.path.join(str(self.manager.directory), str(step))):
        self.manager.wait_until_finished()  # raises the background thread's error, if it kept one
        raise OSError(f"the save of step {step} did not complete")
    except Exception as e:
      self._fail(step, e)

  def flush(self):
    """Waits for the pending save and for its seal."""
    if self.failed:
      return
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      self._fail(self.pending, e)
    if self.pending is not None:
      self._check(self.pending)
      self._seal(self.pending)
    self._join()

  def _join(self):
    if self._thread is not None:
      self._thread.join()
      self._thread = None

  def _seal(self, step: int):
    self.pending = None
    self.last_good = step
    if not self.enabled:
      return
    self._join()
    step_dir = os.path.join(str(self.manager.directory), str(step))
    self._thread = threading.Thread(target=_seal_if_present, args=(step_dir,), daemon=True)
    self._thread.start()


def _seal_if_present(step_dir: str) -> None:
  try:
    seal(step_dir)
  except OSError:  # deleted meanwhile (train.max_checkpoints): nothing to seal
    pass


def _os_cause(text: str) -> str | None:
  """The OS error inside a library's message (orbax / tensorstore: ``[os_error_code='28']``)."""
  import re

  m = re.search(r"os_error_code='?(\d+)", text)
  return f"{os.strerror(int(m.group(1)))} [errno {m.group(1)}]" if m else None


def first_line(e: BaseException, limit: int = 240) -> str:
  if isinstance(e, OSError) and e.strerror:
    return f"{e.filename + ': ' if e.filename else ''}{e.strerror}"
  cause = _os_cause(str(e))
  if cause:
    return cause
  text = " ".join(str(e).split()) or type(e).__name__
  return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def restore_latest(
  mgr, restore_fn: Callable[[int], dict], *, workdir: str, log: Callable[[str], None]
) -> tuple[int, dict] | None:
  """Restores the newest usable checkpoint with ``restore_fn(step)``; returns ``(step, what
  restore_fn returned)``, or None when the workdir has no checkpoint at all.

  Bad checkpoints newer than the restored one are named in the log and moved to
  ``WORKDIR/checkpoints_bad/``. Raises CheckpointError when none can be restored (nothing is
  moved then), or when an intact checkpoint does not fit the run.
  """
  ckpt_dir = directory(workdir)
  for name in unfinished_saves(ckpt_dir):
    log(f"ignoring {os.path.join(ckpt_dir, name)}: a checkpoint save that never completed")
  steps = sorted(mgr.all_steps(), reverse=True)
  if not steps:
    return None
  bad: list[tuple[int, str]] = []
  for step in steps:
    step_dir = os.path.join(ckpt_dir, str(step))
    status, detail = verify(step_dir)
    if status == "bad":
      bad.append((step, detail))
      log(f"checkpoint {step_dir} is corrupt ({detail}); trying the previous one")
      continue
    try:
      restored = restore_fn(step)
    except CheckpointMismatch as e:
      raise CheckpointError(
        f"checkpoint {step_dir} does not fit this run ({e}); the model or "
        "the data changed since it was saved. Use another --workdir"
      ) from None
    except Exception as e:  # noqa: BLE001 -- any failure to read it makes it unusable
      if status == "ok":  # intact files that do not restore: not a corruption
        raise CheckpointError(
          f"checkpoint {step_dir} cannot be restored into this run "
          f"({first_line(e)}); its files are intact: if the model or the "
          "data changed since it was saved, use another --workdir"
        ) from None
      bad.append((step, first_line(e)))
      log(f"checkpoint {step_dir} cannot be read ({first_line(e)}); trying the previous one")
      continue
    if bad:
      _quarantine(workdir, [s for s, _ in bad], log)
      mgr.reload()
    return step, restored
  listed = "; ".join(f"{s}: {d}" for s, d in bad)
  raise CheckpointError(
    f"none of the {len(steps)} checkpoints in {ckpt_dir} can be restored ({listed}). Move them "
    "away (or use another --workdir) to start from scratch"
  )


def _quarantine(workdir: str, steps: list[int], log) -> None:
  """Moves bad checkpoints out of the way (process 0; every process waits for it)."""
  ckpt_dir = directory(workdir)
  if jax.process_index() == 0:
    bad_dir = os.path.join(os.path.abspath(workdir), BAD_DIR)
    os.makedirs(bad_dir, exist_ok=True)
    for step in steps:
      dest = os.path.join(bad_dir, str(step))
      if os.path.exists(dest):
        dest = f"{dest}.{int(time.time())}"
      shutil.move(os.path.join(ckpt_dir, str(step)), dest)
      log(f"moved the bad checkpoint {step} to {dest}")
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("sslrec_checkpoint_quarantine")


def estimate_bytes(abstract_tree) -> int:
  """Bytes of a checkpoint of ``abstract_tree`` (its arrays, uncompressed)."""
  return sum(
    math.prod(x.shape) * np.dtype(x.dtype).itemsize
    for x in jax.tree.leaves(abstract_tree)
    if hasattr(x, "shape")
  )
