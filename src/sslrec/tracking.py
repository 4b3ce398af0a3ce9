"""What a run shows in TensorBoard, its progress ETA and its profiler window.

TensorBoard (through tensorboardX, process 0 only):

* scalars named as in the JSON files: ``train/loss``, ``valid/recall@50``, ``test/recall@50``
  (tensorboardX's own ``add_scalar`` would rewrite ``@`` as ``_``);
* the series that do not move with training apart, so the model's curves come first: the
  classical references (``valid_references/popularity/recall@50``), the per-decile recalls
  (``valid_deciles/...``), the prior's validation candidates (``valid_prior/...``) and the input
  statistics and counts (``train_inputs/...``, ``valid_inputs/pairs``);
* ``train/learning_rate`` and ``train/step_time_ms`` (steady, compilation left out);
* the HParams dashboard: the resolved config (dotted keys) with the final test metrics and the best
  validation value of ``train.select_metric`` (``valid_best/...``);
* the resolved config as text (``config``).
"""

from __future__ import annotations

import json
import time

from sslrec.errors import ConfigError

_INPUT_STATS = ("data/", "ssl/masked_features")  # train scalars that describe the inputs


def tag(filename: str, key: str, tags: dict | None, references=()) -> str:
  """The TensorBoard tag of the JSON field ``key`` of a ``filename`` record with ``tags``."""
  tags = tags or {}
  if not filename.startswith("eval"):
    return f"train_inputs/{key}" if key.startswith(_INPUT_STATS) else f"train/{key}"
  split = tags.get("split", "eval")
  if key.startswith(split + "/"):
    key = key[len(split) + 1 :]
  if key.startswith("eval/"):  # the evaluation's own counts (pairs, queries): constant
    return f"{split}_inputs/{key[len('eval/') :]}"
  if key.split("/", 1)[0] in references:
    return f"{split}_references/{key}"
  if "popularity_prior" in tags and split == "valid":
    return f"valid_prior/{tags['popularity_prior']:g}/{key}"
  if "/decile_" in key:
    return f"{split}_deciles/{key}"
  return f"{split}/{key}"


def flatten(config_dict: dict, prefix: str = "") -> dict:
  """A nested config dict as ``{"train.batch_size": 512, ...}`` of HParams values (bool, int,
  float, str; anything else as its JSON text)."""
  out = {}
  for k, v in config_dict.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(v, (bool, int, float, str)):
      out[f"{prefix}{k}"] = v
    else:
      out[f"{prefix}{k}"] = json.dumps(v)
  return out


def metric_tags(config_dict: dict) -> list[str]:
  """The HParams dashboard's metric columns: test recall / ndcg at every K, the last and the
  best validation value of the selection metric."""
  ks = config_dict.get("eval", {}).get("ks", (10, 50, 100))
  select = config_dict.get("train", {}).get("select_metric", "recall@50")
  tags = [f"test/{m}@{k}" for k in ks for m in ("recall", "ndcg")]
  return [*tags, f"valid/{select}", f"valid_best/{select}"]


class TensorBoard:
  """The run's event file: scalars, HParams and text (see the module docstring)."""

  def __init__(self, logdir: str, *, purge_step: int | None = None):
    from tensorboardX import SummaryWriter

    self._writer = SummaryWriter(logdir, purge_step=purge_step)
    self._session = False
    self.references: tuple[str, ...] = ()

  def _add(self, summary, step: int | None = None):
    self._writer._get_file_writer().add_summary(summary, step)  # pylint: disable=protected-access

  def scalars(self, filename: str, step: int, scalars: dict, tags: dict | None = None):
    from tensorboardX.proto.summary_pb2 import Summary

    values = [
      Summary.Value(tag=tag(filename, k, tags, self.references), simple_value=float(v))
      for k, v in scalars.items()
    ]
    self._add(Summary(value=values), int(step))
    self._writer.flush()

  def start(self, config_dict: dict, references=()):
    """The HParams session (the config's values and the metric columns) and the config text."""
    from tensorboardX.summary import hparams

    self.references = tuple(references)
    exp, ssi, _ = hparams(flatten(config_dict), {t: 0.0 for t in metric_tags(config_dict)})
    self._add(exp)
    self._add(ssi)
    self._session = True
    text = json.dumps(config_dict, indent=2, sort_keys=True)
    self._writer.add_text("config", "\n".join("    " + line for line in text.splitlines()), 0)
    self._writer.flush()

  def close(self):
    if self._session:  # the session's end (status: success); a killed run leaves it open
      from tensorboardX.summary import hparams

      _, _, sei = hparams({}, {})
      self._add(sei)
    self._writer.close()


# ----------------------------------------------------------------------------------------------
# Progress.


class Eta:
  """Time left of a run: the steps still to run at the steady step time (measured from the end of
  this process's first step, which compiles, with evaluations and saves taken out) plus the
  evaluations still to run at the duration of the last one."""

  def __init__(self, num_steps: int, eval_every: int):
    self.num_steps, self.eval_every = num_steps, max(int(eval_every), 1)
    self._t0 = self._step0 = None
    self._paused = 0.0
    self.eval_seconds: float | None = None

  def stepped(self, step: int):
    if self._t0 is None:
      self._t0, self._step0 = time.time(), step

  def paused(self, seconds: float):
    """Time spent outside the train steps (evaluation, checkpoint save) since the last call."""
    self._paused += seconds

  def evaluated(self, seconds: float):
    self.eval_seconds = seconds
    self.paused(seconds)

  def step_seconds(self, step: int) -> float | None:
    if self._t0 is None or step <= self._step0:
      return None
    return max(time.time() - self._t0 - self._paused, 0.0) / (step - self._step0)

  def seconds(self, step: int) -> tuple[float | None, bool]:
    """(seconds left, whether the evaluations still to come are counted); None before a steady
    step time is known."""
    per_step = self.step_seconds(step)
    if per_step is None:
      return None, False
    left = (self.num_steps - step) * per_step
    evals = self.num_steps // self.eval_every - step // self.eval_every
    evals += 1 if self.num_steps % self.eval_every else 0  # the last step always evaluates
    if self.eval_seconds is None:
      return left, evals == 0
    return left + evals * self.eval_seconds, True


def format_eta(eta: tuple[float | None, bool], fmt) -> str:
  seconds, complete = eta
  if seconds is None:
    return "eta after the first steps"
  return f"eta {fmt(seconds)}" + ("" if complete else " + evaluation")


# ----------------------------------------------------------------------------------------------
# Profiling.


def profile_window(config) -> tuple[int, int] | None:
  """``train.profile_steps`` as ``(first, last)`` (inclusive), or None when off."""
  value = tuple(config.train.get("profile_steps", ()) or ())
  if not value:
    return None
  if (
    len(value) != 2
    or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    or not 1 <= value[0] <= value[1]
  ):
    raise ConfigError(
      f"train.profile_steps={value!r}: give (FIRST, LAST) steps with 1 <= FIRST <= LAST, or () "
      "for no trace"
    )
  return value[0], value[1]


class Profiler:
  """A ``jax.profiler`` trace of steps FIRST..LAST into ``WORKDIR/profile`` (TensorBoard's
  profile plugin or Perfetto read it)."""

  def __init__(self, config, logdir: str, enabled: bool = True):
    self.window = profile_window(config) if enabled else None
    self.logdir = logdir
    self.active = False

  def before(self, step: int):
    if self.window and step == self.window[0] and not self.active:
      import jax

      jax.profiler.start_trace(self.logdir)
      self.active = True

  def after(self, step: int, log=print):
    if self.active and step >= self.window[1]:
      self.stop()
      log(f"profile of steps {self.window[0]}..{self.window[1]} written to {self.logdir}")

  def stop(self):
    if self.active:
      import jax

      jax.profiler.stop_trace()
      self.active = False
