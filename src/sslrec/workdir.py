"""The run's directory: config compatibility on resume, and the metrics writers.

Layout (a contract other tools read; see README "Outputs"):
  WORKDIR/config.json     the resolved config
  WORKDIR/checkpoints/    orbax checkpoints (step-numbered)
  WORKDIR/metrics.jsonl   one JSON object per logged step
  WORKDIR/eval.jsonl      one JSON object per evaluation
  WORKDIR/tensorboard/    TensorBoard event files
"""

from __future__ import annotations

import json
import math
import os
import time

from sslrec import configuration


class WorkdirError(ValueError):
  """A workdir that cannot be used for this run; nothing in it was changed."""


def prepare(workdir: str, config_dict: dict, *, allow_config_change: bool, write: bool) -> bool:
  """Checks ``workdir`` against ``config_dict``; writes config.json when allowed.

  Returns True when the workdir already holds a run (a resume). Raises WorkdirError, without
  touching anything, when the saved config describes a different model and
  ``allow_config_change`` is False.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"--workdir={workdir} exists and is not a directory")
  path = os.path.join(workdir, "config.json")
  resuming = os.path.exists(path)
  if resuming:
    try:
      with open(path) as f:
        saved = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise WorkdirError(f"{path}: cannot read the saved config ({e}); refusing to touch this "
                         "workdir") from None
    diff = configuration.diff_model_fields(saved, config_dict)
    if diff and not allow_config_change:
      shown = "; ".join(diff[:6]) + (f"; ... ({len(diff)} fields)" if len(diff) > 6 else "")
      raise WorkdirError(
          f"{workdir} holds a run with a different model config ({shown}). Use another --workdir, "
          "or pass --allow_config_change to continue that run with the new config (its "
          "checkpoints are kept)")
    if diff and write:
      os.replace(path, os.path.join(workdir, f"config.{int(time.time())}.json"))
  elif not os.path.isdir(os.path.join(workdir, "checkpoints")) or not os.listdir(
      os.path.join(workdir, "checkpoints")):
    pass
  else:
    raise WorkdirError(f"{workdir} has checkpoints but no config.json; refusing to reuse it")
  if write:
    os.makedirs(workdir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(config_dict, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
  return resuming


def _clean(v):
  v = float(v)
  return None if math.isnan(v) else v


class MetricsWriter:
  """Appends JSON lines and TensorBoard scalars (process 0 only; a no-op elsewhere)."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    self.workdir = workdir
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:  # optional at import time; a dependency of the package
        self._tb = None

  def write(self, filename: str, step: int, scalars: dict):
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _clean(v) for k, v in scalars.items()}}
    with open(os.path.join(self.workdir, filename), "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      tag_prefix = "eval/" if filename.startswith("eval") else "train/"
      for k, v in scalars.items():
        self._tb.add_scalar(tag_prefix + k, float(v), int(step))
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


def read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
