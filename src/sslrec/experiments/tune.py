"""Tuning: a budgeted search per variant on the validation split, then its best over paired seeds.

    python launch/tune.py --spec=configs/tune_movielens.py --workdir=DIR --trials=8 --seeds=3 \
        --config.data.path=data/ml-100k

Each variant gets its own optuna study (TPE, a fixed sampler seed) in ``DIR/<variant>/study.db``
(sqlite): ``trials`` runs of ``launch/main.py`` with seed 0 in ``DIR/<variant>/trial_<n>/``, each
scored by the best VALIDATION value of the objective over the run's evaluations (the ``split ==
"valid"`` lines of its eval.jsonl; the test line is never read while searching). The best trial's
setting is then trained with seeds 0..seeds-1 (seed 0 is the trial's own run, linked as
``best_seed0``; the others run in ``DIR/<variant>/best_seed<k>/``) and those runs' TEST lines are
the results: ``DIR/results.md`` / ``DIR/results.csv`` (chosen hyperparameters, mean ± std of the
test figures, paired differences to the first variant with a 95% t-interval), ``DIR/runs.csv``
(one row per seed run) and ``DIR/trials.csv`` (one row per trial). So every variant is compared
at its own best, and the comparison is paired: the same seed and ``data.seed`` mean the same data
and the same streams.

Everything (spec, space, objective, every variant's config with every bound) is validated before
the first run; a bad input is one ``TuneError`` line. Re-running the command resumes: finished
trials (complete or failed) are not rerun, an interrupted one resumes from its checkpoints, and a
finished best-seed run is read, not rerun. The trial sampled at number n depends only on the
sampler seed, n and the trials before it, so an interrupted search samples what an uninterrupted
one would have.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from sslrec import configuration
from sslrec.experiments import execute, plan, report
from sslrec.run import workdir as workdir_lib

KINDS = ("float", "log", "int", "int_log", "categorical")
SPEC_FIELDS = (
  "variants",
  "space",
  "per_variant_space",
  "trials",
  "seeds",
  "objective",
  "fixed",
  "sampler_seed",
  "startup_trials",
)
DEFAULT_TRIALS = 8
DEFAULT_SEEDS = 3
DEFAULT_OBJECTIVE = "recall@50"
SAME_FAILURES = 3  # this many failed trials in a row with one error, none completed: stop
_LABEL = re.compile(r"[A-Za-z0-9._-]+")
_FLAG = re.compile(r"--(no)?config\.([\w.]+)(=|$)")
_PRIMITIVE = (type(None), bool, int, float, str)


class TuneError(plan.SweepError):
  """Bad tuning input (spec, space, objective, flags); the message is one line for the user."""


# ----------------------------------------------------------------------------------------------
# The search space.


@dataclasses.dataclass(frozen=True)
class Param:
  """One searched field: ``kind`` in KINDS; ``low``/``high`` for numbers, ``choices`` else."""

  key: str
  kind: str
  low: float | int | None = None
  high: float | int | None = None
  choices: tuple = ()

  def distribution(self):
    """The optuna distribution (categorical choices that are not None/bool/int/float/str, e.g.
    tuples, are stored as their text)."""
    import optuna  # optional (the 'tune' extra); only the tuning process imports it

    d = optuna.distributions
    if self.kind in ("float", "log"):
      return d.FloatDistribution(float(self.low), float(self.high), log=self.kind == "log")
    if self.kind in ("int", "int_log"):
      return d.IntDistribution(int(self.low), int(self.high), log=self.kind == "int_log")
    return d.CategoricalDistribution([_choice_key(c) for c in self.choices])

  def decode(self, stored: Any) -> Any:
    """The value a trial stored -> the config value."""
    if self.kind == "categorical":
      return {_choice_key(c): c for c in self.choices}[stored]
    if self.kind in ("int", "int_log"):
      return int(stored)
    return float(stored)

  def describe(self) -> str:
    if self.kind == "categorical":
      return f"{self.key} in {{{', '.join(flag_value(c) for c in self.choices)}}}"
    return f"{self.key} {self.kind} [{self.low}, {self.high}]"

  def signature(self) -> list:
    return [self.key, self.kind, self.low, self.high, [flag_value(c) for c in self.choices]]


def _choice_key(c):
  return c if isinstance(c, _PRIMITIVE) else flag_value(c)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_param(key: str, entry: Any) -> Param:
  """``('log', 0.02, 0.5)``, ``('float', lo, hi)``, ``('int', lo, hi)``, ``('int_log', lo, hi)``
  or ``('categorical', (v1, v2, ...))`` -> Param; TuneError naming the entry otherwise."""
  where = f"space {key!r}"
  if not isinstance(key, str) or not key:
    raise TuneError(f"space: keys are dotted config fields (e.g. 'ssl.alpha'), got {key!r}")
  if key.startswith("config."):
    key = key[len("config.") :]
  if not isinstance(entry, (tuple, list)) or not entry:
    raise TuneError(
      f"{where}: {entry!r}: expected (KIND, LOW, HIGH) or ('categorical', "
      f"(V1, V2, ...)) with KIND one of {', '.join(KINDS)}"
    )
  kind = entry[0]
  if kind not in KINDS:
    close = difflib.get_close_matches(str(kind), KINDS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise TuneError(f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}{hint}")
  if kind == "categorical":
    if len(entry) != 2 or not isinstance(entry[1], (tuple, list)):
      raise TuneError(f"{where}: {entry!r}: expected ('categorical', (V1, V2, ...))")
    choices = tuple(entry[1])
    keys = [_choice_key(c) for c in choices]
    if len(choices) < 2:
      raise TuneError(
        f"{where}: a categorical needs at least 2 choices (fix a single value "
        "with 'fixed' or --config.KEY=VALUE instead)"
      )
    if len(set(map(repr, keys))) != len(keys):
      raise TuneError(f"{where}: a choice is repeated in {choices!r}")
    return Param(key=key, kind=kind, choices=choices)
  if len(entry) != 3:
    raise TuneError(f"{where}: {entry!r}: expected ({kind!r}, LOW, HIGH)")
  low, high = entry[1], entry[2]
  if not (_is_number(low) and _is_number(high)):
    raise TuneError(f"{where}: bounds {low!r}, {high!r} must be finite numbers")
  if kind in ("int", "int_log") and not (float(low).is_integer() and float(high).is_integer()):
    raise TuneError(f"{where}: {kind!r} bounds must be integers, got {low!r}, {high!r}")
  if low >= high:
    raise TuneError(f"{where}: low {low!r} >= high {high!r}; need low < high")
  if kind in ("log", "int_log") and low <= 0:
    raise TuneError(f"{where}: a {kind!r} range needs low > 0, got {low!r}")
  if kind in ("int", "int_log"):
    low, high = int(low), int(high)
  else:
    low, high = float(low), float(high)
  return Param(key=key, kind=kind, low=low, high=high)


def flag_value(v: Any) -> str:
  """A config value as the text of ``--config.KEY=TEXT`` (floats at full precision)."""
  if isinstance(v, bool) or v is None:
    return str(v)
  if isinstance(v, float):
    return repr(v)
  if isinstance(v, (tuple, list)):
    return str(tuple(v))
  return str(v)


# ----------------------------------------------------------------------------------------------
# The spec and the validated plan (nothing run).


@dataclasses.dataclass(frozen=True)
class TunedVariant:
  variant: plan.Variant
  params: tuple[Param, ...]  # this variant's searched fields, in the space's order


@dataclasses.dataclass(frozen=True)
class Tuning:
  variants: tuple[TunedVariant, ...]
  trials: int
  seeds: int
  objective: str
  overrides: tuple[str, ...]  # fixed --config.KEY=VALUE flags of every run (spec 'fixed', CLI)
  select_flags: tuple[str, ...]  # --config.train.select_metric=OBJECTIVE unless fixed
  sampler_seed: int
  startup_trials: int
  notes: tuple[str, ...] = ()  # lines for the user (e.g. a space key that is fixed)

  @property
  def reference(self) -> str:
    return self.variants[0].variant.label


def load_spec(path: str) -> dict:
  """The dict ``get_tuning()`` of the spec file returns (fields checked, nothing else)."""
  if not path:
    raise TuneError("--spec is required (e.g. --spec=configs/tune_movielens.py)")
  if not os.path.isfile(path):
    raise TuneError(f"--spec={path}: no such file (e.g. configs/tune_movielens.py)")
  try:
    module_spec = importlib.util.spec_from_file_location("sslrec_tuning_spec", path)
    module = importlib.util.module_from_spec(module_spec)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", DeprecationWarning)
      module_spec.loader.exec_module(module)
  except Exception as e:  # noqa: BLE001 -- any failure of the user's file is a user error
    raise TuneError(
      f"--spec={path}: the file raised {type(e).__name__}: {' '.join(str(e).split())}"
    ) from None
  if not callable(getattr(module, "get_tuning", None)):
    raise TuneError(f"--spec={path}: the file has no get_tuning() (see configs/tune_movielens.py)")
  try:
    spec = module.get_tuning()
  except Exception as e:  # noqa: BLE001
    raise TuneError(
      f"--spec={path}: get_tuning() raised {type(e).__name__}: {' '.join(str(e).split())}"
    ) from None
  if not isinstance(spec, dict):
    raise TuneError(f"--spec={path}: get_tuning() must return a dict, got {type(spec).__name__}")
  for field in spec:
    if field not in SPEC_FIELDS:
      close = difflib.get_close_matches(str(field), SPEC_FIELDS, n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise TuneError(
        f"--spec={path}: unknown field {field!r}{hint}; fields: {', '.join(SPEC_FIELDS)}"
      )
  return spec


def _variants(spec: dict, spec_path: str) -> tuple[plan.Variant, ...]:
  raw = spec.get("variants")
  if isinstance(raw, dict):
    items = [(str(k), str(v)) for k, v in raw.items()]
  elif isinstance(raw, (tuple, list)) and all(isinstance(v, str) for v in raw):
    items = [(None, v) for v in raw]
  else:
    raise TuneError(
      "spec 'variants': expected config paths ('configs/movielens.py:baseline', "
      "...) or {label: path}"
    )
  out = []
  for label, path in items:
    path = path.strip()
    if ".py" not in path:  # an argument of the spec file's own get_config
      path = f"{spec_path}:{path}"
    file = path.split(":", 1)[0]
    if not os.path.isfile(file):
      raise TuneError(f"variant {path}: no such config file (configs are in configs/)")
    label = label or plan.variant_label(path)
    if not _LABEL.fullmatch(label):
      raise TuneError(
        f"variant label {label!r}: use letters, digits, '.', '_' or '-' (it names DIR/<label>/)"
      )
    if any(v.label == label for v in out):
      raise TuneError(
        f"two variants are labelled {label!r}; give them distinct labels ({{label: path}})"
      )
    out.append(plan.Variant(label=label, path=path))
  if not out:
    raise TuneError("spec 'variants' is empty")
  return tuple(out)


def _flag_key(flag: str) -> str:
  m = _FLAG.match(flag)
  if not m:
    raise TuneError(f"{flag}: fixed overrides are --config.KEY=VALUE")
  return m.group(2)


def _int_field(value, name: str, low: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise TuneError(f"{name}={value}: must be an integer >= {low}")
  return value


def make_tuning(
  spec: dict,
  spec_path: str,
  *,
  trials: int | None = None,
  seeds: int | None = None,
  objective: str | None = None,
  overrides: Sequence[str] = (),
) -> Tuning:
  """Validates the spec and the flags and builds every variant's config at every bound.

  Raises:
    TuneError: one line naming the bad input; nothing has been run or written.
  """
  trials = _int_field(spec.get("trials", DEFAULT_TRIALS) if trials is None else trials, "--trials")
  seeds = _int_field(spec.get("seeds", DEFAULT_SEEDS) if seeds is None else seeds, "--seeds")
  objective = objective or spec.get("objective", DEFAULT_OBJECTIVE)
  if not isinstance(objective, str) or not objective:
    raise TuneError(
      f"objective {objective!r}: expected a validation metric name such as 'recall@50'"
    )
  sampler_seed = _int_field(spec.get("sampler_seed", 0), "spec 'sampler_seed'", low=0)
  startup = spec.get("startup_trials", min(10, max(2, trials // 3)))
  startup = _int_field(startup, "spec 'startup_trials'", low=0)
  variants = _variants(spec, spec_path)

  space_raw = spec.get("space", {})
  if not isinstance(space_raw, dict) or not space_raw:
    raise TuneError(
      "spec 'space': expected {config key: (KIND, LOW, HIGH) or ('categorical', "
      "(V1, ...))}, at least one"
    )
  space = [parse_param(k, v) for k, v in space_raw.items()]
  keys = [p.key for p in space]
  if len(set(keys)) != len(keys):
    raise TuneError("spec 'space': a key is given twice")
  for p in space:
    if p.key == "seed":
      raise TuneError(
        "space 'seed': the tuner sets the seeds (0 while tuning, 0..N-1 for the "
        "best); tune data or model fields"
      )

  fixed = spec.get("fixed", {})
  if not isinstance(fixed, dict):
    raise TuneError("spec 'fixed': expected {config key: value}")
  flags: dict[str, str] = {}
  for k, v in fixed.items():
    k = str(k)[len("config.") :] if str(k).startswith("config.") else str(k)
    flags[k] = f"--config.{k}={flag_value(v)}"
  for o in overrides:  # the command line replaces the spec's fixed value of the same key
    flags[_flag_key(o)] = o
  if "seed" in flags:
    raise TuneError(
      f"{flags['seed']}: the tuner sets config.seed (0 while tuning, 0..N-1 for "
      "the best); fix data.seed to choose the data"
    )
  fixed_flags = tuple(flags.values())
  select_flags = (
    () if "train.select_metric" in flags else (f"--config.train.select_metric={objective}",)
  )
  notes = []
  for p in space:
    if p.key in flags:
      notes.append(f"note: {p.key} is fixed ({flags[p.key]}): not searched")
  space = [p for p in space if p.key not in flags]

  per_variant = spec.get("per_variant_space", {}) or {}
  if not isinstance(per_variant, dict):
    raise TuneError("spec 'per_variant_space': expected {variant: [space keys]}")
  by_name = {**{v.path: v for v in variants}, **{v.label: v for v in variants}}
  chosen: dict[str, list[str]] = {}
  for name, ks in per_variant.items():
    if name not in by_name:
      raise TuneError(
        f"per_variant_space[{name!r}]: not a variant of the spec; one of "
        f"{[v.label for v in variants]}"
      )
    if isinstance(ks, str) or not isinstance(ks, (tuple, list)):
      raise TuneError(f"per_variant_space[{name!r}]: expected a list of space keys")
    for k in ks:
      if k not in keys:
        close = difflib.get_close_matches(str(k), keys, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TuneError(f"per_variant_space[{name!r}]: {k!r} is not a key of 'space'{hint}")
    chosen[by_name[name].label] = list(ks)

  tuned = []
  for variant in variants:
    wanted = chosen.get(variant.label)
    params = tuple(p for p in space if wanted is None or p.key in wanted)
    if not params:
      raise TuneError(
        f"variant {variant.label}: nothing to search (every space key is fixed "
        "or left out by per_variant_space)"
      )
    _check_variant(variant, params, fixed_flags, select_flags, objective)
    tuned.append(TunedVariant(variant=variant, params=params))
  return Tuning(
    variants=tuple(tuned),
    trials=trials,
    seeds=seeds,
    objective=objective,
    overrides=fixed_flags,
    select_flags=select_flags,
    sampler_seed=sampler_seed,
    startup_trials=startup,
    notes=tuple(notes),
  )


def _check_variant(
  variant: plan.Variant,
  params: Sequence[Param],
  overrides: Sequence[str],
  select_flags: Sequence[str],
  objective: str,
) -> None:
  raw = plan.build_config(variant.path, ())
  for o in overrides:
    plan.check_key(raw, _flag_key(o), o.split("=", 1)[0])
  base = plan.build_config(variant.path, [*overrides])
  metrics = configuration.selectable_metrics(base.eval.ks)
  if objective not in metrics:
    raise TuneError(
      f"objective {objective!r}: not a validation metric the runs report (higher "
      f"is better); one of {', '.join(metrics)} (eval.ks={tuple(base.eval.ks)})"
    )
  base = plan.build_config(variant.path, [*overrides, *select_flags])
  try:
    configuration.validate(base)
  except configuration.ConfigError as e:
    raise TuneError(f"{variant.path} with the fixed overrides: {e}") from None
  for p in params:
    plan.check_key(base, p.key, f"space {p.key}")
    current = plan._get(base, p.key)  # pylint: disable=protected-access
    if p.kind != "categorical":
      if isinstance(current, (bool, str, tuple, list)) or current is None:
        raise TuneError(
          f"space {p.key}: the field holds {current!r}, not a number; use "
          "('categorical', (V1, V2, ...))"
        )
      if isinstance(current, int) and p.kind in ("float", "log"):
        raise TuneError(
          f"space {p.key}: an integer field; use ('int', LOW, HIGH) or ('int_log', LOW, HIGH)"
        )
    probes = p.choices if p.kind == "categorical" else (p.low, p.high)
    for v in probes:  # each bound / choice alone, so that a bad one is named
      flag = f"--config.{p.key}={flag_value(v)}"
      try:
        config = plan.build_config(variant.path, [*overrides, *select_flags, flag])
        configuration.validate(config)
      except (plan.SweepError, configuration.ConfigError) as e:
        text = str(e).split(": ", 1)[-1] if isinstance(e, plan.SweepError) else str(e)
        raise TuneError(f"space {p.key}={flag_value(v)} ({variant.path}): {text}") from None


# ----------------------------------------------------------------------------------------------
# Reading a run (eval.jsonl): validation lines for the search, the test line for the results.


def read_evals(run_dir: str) -> list[dict]:
  """The records of ``run_dir/eval.jsonl`` ([] when absent or unreadable)."""
  try:
    return workdir_lib.read_jsonl(os.path.join(run_dir, "eval.jsonl"))
  except (OSError, ValueError):
    return []


def best_valid(records: Sequence[dict], objective: str) -> tuple[float, int] | None:
  """The best (highest) finite ``objective`` over the ``split == "valid"`` records and its step;
  None when there is none. Test (and unlabelled) lines are never read."""
  best = None
  for r in records:
    if r.get("split") != "valid":
      continue
    v = r.get(objective)
    if not _is_number(v):
      continue
    if best is None or v > best[0]:
      best = (float(v), int(r.get("step", 0)))
  return best


def test_record(records: Sequence[dict]) -> dict | None:
  """The run's test line (the last ``split == "test"`` record), or None."""
  tests = [r for r in records if r.get("split") == "test"]
  return tests[-1] if tests else None


def error_line(run_dir: str, returncode: int | None) -> str:
  """Why a run failed: its last ``error:`` line, else the last line of its log."""
  tail = plan.log_tail(os.path.join(run_dir, "log.txt"), 40).splitlines()
  errors = [ln.strip() for ln in tail if ln.strip().startswith("error:")]
  if errors:
    return errors[-1]
  if returncode == 0:
    return "exited 0 without a test evaluation in eval.jsonl (stopped by a signal?)"
  return (tail[-1].strip() if tail else "") or f"exit code {returncode}"


# ----------------------------------------------------------------------------------------------
# Paths and the studies.


def variant_dir(workdir: str, label: str) -> str:
  return os.path.join(workdir, label)


def trial_dir(workdir: str, label: str, number: int) -> str:
  return os.path.join(workdir, label, f"trial_{number}")


def seed_dir(workdir: str, label: str, seed: int) -> str:
  return os.path.join(workdir, label, f"best_seed{seed}")


def storage_url(workdir: str, label: str) -> str:
  return "sqlite:///" + os.path.abspath(os.path.join(workdir, label, "study.db"))


def study_signature(tuning: Tuning, tv: TunedVariant) -> dict:
  """What makes a study's past trials comparable; a resume with another signature is refused."""
  return {
    "variant": tv.variant.path,
    "objective": tuning.objective,
    "overrides": list(tuning.overrides),
    "space": [p.signature() for p in tv.params],
  }


def _quiet_optuna():
  import optuna  # optional (the 'tune' extra); only the tuning process imports it

  optuna.logging.set_verbosity(optuna.logging.WARNING)
  warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
  return optuna


def open_study(tuning: Tuning, tv: TunedVariant, workdir: str, *, create: bool):
  """The variant's study (created when ``create``; None if absent and not ``create``)."""
  optuna = _quiet_optuna()
  path = os.path.join(variant_dir(workdir, tv.variant.label), "study.db")
  if not create and not os.path.exists(path):
    return None
  os.makedirs(os.path.dirname(path), exist_ok=True)
  study = optuna.create_study(
    storage=storage_url(workdir, tv.variant.label),
    study_name=tv.variant.label,
    direction="maximize",
    load_if_exists=True,
  )
  if "signature" not in study.user_attrs:
    study.set_user_attr("signature", study_signature(tuning, tv))
  return study


def check_resumable(tuning: Tuning, workdir: str) -> None:
  """TuneError when a variant's existing study was tuned with another space, objective or
  fixed overrides (its trials would not be comparable)."""
  for tv in tuning.variants:
    path = os.path.join(variant_dir(workdir, tv.variant.label), "study.db")
    if not os.path.exists(path):
      continue
    try:
      study = open_study(tuning, tv, workdir, create=False)
    except Exception as e:  # noqa: BLE001 -- an unreadable database is the user's to move
      raise TuneError(
        f"{path}: cannot open the study ({' '.join(str(e).split())}); move it "
        "away or use another --workdir"
      ) from None
    saved = study.user_attrs.get("signature")
    want = study_signature(tuning, tv)
    if saved is not None and saved != want:
      differ = [k for k in want if saved.get(k) != want[k]]
      raise TuneError(
        f"{path} was tuned with a different {' and '.join(differ)}; its trials "
        "are not comparable: use another --workdir (or the same spec and flags)"
      )


def _sampler(tuning: Tuning, number: int):
  """A TPE sampler seeded by (sampler_seed, trial number): trial n's point depends only on the
  seed, n and the finished trials, whether or not the search was interrupted in between."""
  optuna = _quiet_optuna()
  seed = int(np.random.SeedSequence([tuning.sampler_seed, number]).generate_state(1)[0])
  return optuna.samplers.TPESampler(
    seed=seed, n_startup_trials=tuning.startup_trials, multivariate=True, constant_liar=False
  )


def trial_values(tv: TunedVariant, params: dict) -> dict[str, Any]:
  """A trial's stored params -> config values, in the space's order."""
  by_key = {p.key: p for p in tv.params}
  return {k: by_key[k].decode(params[k]) for k in by_key if k in params}


def run_flags(tuning: Tuning, values: dict[str, Any], seed: int) -> tuple[str, ...]:
  return (
    *tuning.overrides,
    *tuning.select_flags,
    *(f"--config.{k}={flag_value(v)}" for k, v in values.items()),
    f"--config.seed={seed}",
  )


def _fmt_values(values: dict) -> str:
  return ", ".join(f"{k}={_short_value(v)}" for k, v in values.items())


def _short_value(v) -> str:
  return f"{v:.4g}" if isinstance(v, float) else flag_value(v)


# ----------------------------------------------------------------------------------------------
# Running (one main.py at a time; the search is sequential).


class Runner:
  """Runs ``launch/main.py`` for one run dir and waits, printing a status line every
  ``status_every`` seconds. On KeyboardInterrupt (Ctrl-C, or SIGTERM in the main thread) the
  run is stopped (it saves a checkpoint) and the interrupt goes on."""

  def __init__(
    self,
    *,
    main_script: str,
    python: str = sys.executable,
    env: dict | None = None,
    status_every: float = 60.0,
    out=sys.stdout,
  ):
    self.main_script, self.python, self.env = main_script, python, env
    self.status_every, self.out = status_every, out

  def say(self, msg: str) -> None:
    try:
      print(msg, file=self.out, flush=True)
    except (BrokenPipeError, ValueError):  # a closed pipe must not orphan the run
      pass

  def run(self, variant_path: str, rd: str, flags: Sequence[str], name: str) -> tuple[int, float]:
    """Returns (exit code, seconds)."""
    proc, log = execute.start_run(
      variant_path, rd, flags, main_script=self.main_script, python=self.python, env=self.env
    )
    t0 = last = time.time()
    try:
      while proc.poll() is None:
        time.sleep(0.2)
        if time.time() - last >= self.status_every:
          last = time.time()
          line = execute.last_step_line(os.path.join(rd, "log.txt"))
          self.say(f"  ...  {name}: {line} ({execute._fmt_time(time.time() - t0)})")  # pylint: disable=protected-access
    except KeyboardInterrupt:
      proc.terminate()
      try:
        proc.wait(timeout=60)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
      raise
    finally:
      log.close()
    return proc.returncode, time.time() - t0


def _fmt_time(seconds: float) -> str:
  return execute._fmt_time(seconds)  # pylint: disable=protected-access


def _score(tuning: Tuning, rd: str, rc: int | None) -> tuple[float | None, int | None, str]:
  """(objective, its step, error): a finished run with a test line and a finite valid value."""
  records = read_evals(rd)
  if rc not in (None, 0):
    return None, None, error_line(rd, rc)
  if test_record(records) is None:
    return None, None, error_line(rd, rc) if rc is not None else "no test evaluation"
  best = best_valid(records, tuning.objective)
  if best is None:
    return (
      None,
      None,
      (f"no finite validation {tuning.objective} in eval.jsonl (split == 'valid' lines)"),
    )
  return best[0], best[1], ""


def _finish_trial(
  study,
  tuning: Tuning,
  tv: TunedVariant,
  number: int,
  rd: str,
  rc: int | None,
  seconds: float,
  runner: Runner,
) -> str:
  """Tells the study the trial's result; returns its error ('' when it completed)."""
  optuna = _quiet_optuna()
  value, step, error = _score(tuning, rd, rc)
  label = tv.variant.label
  info = {"seconds": round(seconds, 1)}
  if value is None:
    info["error"] = error
    study.set_user_attr(f"trial_{number}", info)
    study.tell(number, state=optuna.trial.TrialState.FAIL)
    runner.say(
      f"{label} trial {number} FAILED"
      + (f" (exit {rc})" if rc not in (None, 0) else "")
      + f": {error} | the trial is "
      "marked failed; the search continues"
    )
    return error
  info["step"] = step
  study.set_user_attr(f"trial_{number}", info)
  study.tell(number, value)
  best = study.best_trial
  runner.say(
    f"{label} trial {number} done ({_fmt_time(seconds)}): valid {tuning.objective} "
    f"{value:.4f} at step {step} | best {best.value:.4f} (trial {best.number})"
  )
  return ""


def _set_aside(rd: str, runner: Runner) -> None:
  """A new trial's directory that holds something (e.g. a deleted study's run) is kept aside:
  main.py would otherwise resume that other run."""
  if os.path.isdir(rd) and os.listdir(rd):
    new = f"{rd}.stale-{int(time.time())}"
    os.replace(rd, new)
    runner.say(f"note: {rd} held an earlier run not in the study; moved to {new}")


def tune_variant(tuning: Tuning, tv: TunedVariant, workdir: str, runner: Runner):
  """Runs the variant's trials up to ``tuning.trials`` finished ones; returns the study."""
  optuna = _quiet_optuna()
  states = optuna.trial.TrialState
  label = tv.variant.label
  study = open_study(tuning, tv, workdir, create=True)
  trials = study.get_trials(deepcopy=False)
  finished = [t for t in trials if t.state in (states.COMPLETE, states.FAIL, states.PRUNED)]
  pending = [t for t in trials if t.state in (states.RUNNING, states.WAITING)]
  todo = max(tuning.trials - len(finished), 0)
  runner.say(
    f"{label}: {len(finished)} of {tuning.trials} trials finished "
    f"({sum(t.state == states.FAIL for t in finished)} failed), "
    f"{min(len(pending), todo)} to resume, {max(todo - len(pending), 0)} to sample"
  )
  for t in pending[:todo]:  # interrupted earlier: resume its run (or read it if it finished)
    rd = trial_dir(workdir, label, t.number)
    values = trial_values(tv, t.params)
    if test_record(read_evals(rd)) is not None:
      _finish_trial(study, tuning, tv, t.number, rd, None, 0.0, runner)
      continue
    runner.say(f"{label} trial {t.number} resume: {_fmt_values(values)}")
    rc, seconds = runner.run(
      tv.variant.path, rd, run_flags(tuning, values, 0), f"{label} trial {t.number}"
    )
    _finish_trial(study, tuning, tv, t.number, rd, rc, seconds, runner)
  todo -= min(len(pending), todo)
  distributions = {p.key: p.distribution() for p in tv.params}
  same_errors: list[str] = []  # the errors of the failures in a row, while none completed
  for i in range(todo):
    if len(same_errors) >= SAME_FAILURES and len(set(same_errors)) == 1 and not _complete(study):
      runner.say(
        f"{label}: {SAME_FAILURES} trials in a row failed with the same error and none "
        f"completed; search stopped (not a hyperparameter problem?): {same_errors[0]}"
      )
      break
    study.sampler = _sampler(tuning, len(study.get_trials(deepcopy=False)))
    trial = study.ask(distributions)
    values = trial_values(tv, trial.params)
    rd = trial_dir(workdir, label, trial.number)
    _set_aside(rd, runner)
    runner.say(
      f"{label} trial {trial.number} start ({tuning.trials - todo + i + 1}"
      f"/{tuning.trials}): {_fmt_values(values)}"
    )
    rc, seconds = runner.run(
      tv.variant.path, rd, run_flags(tuning, values, 0), f"{label} trial {trial.number}"
    )
    error = _finish_trial(study, tuning, tv, trial.number, rd, rc, seconds, runner)
    same_errors = [*same_errors, error] if error else []
  return study


def _complete(study):
  optuna = _quiet_optuna()
  return [
    t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE
  ]


def best_trial(study):
  """The completed trial with the highest objective (the first of ties), or None."""
  done = _complete(study)
  return max(done, key=lambda t: (t.value, -t.number)) if done else None


def _link_seed0(workdir: str, label: str, number: int) -> None:
  link = seed_dir(workdir, label, 0)
  target = f"trial_{number}"
  try:
    if os.path.islink(link):
      if os.readlink(link) == target:
        return
      os.unlink(link)
    elif os.path.exists(link):
      return  # something the user put there: left alone
    os.symlink(target, link)
  except OSError:  # a file system without links: seed 0 is read from trial_<n> anyway
    pass


def seed_runs(
  tuning: Tuning, tv: TunedVariant, study, workdir: str, runner: Runner | None
) -> list[dict]:
  """Runs (when ``runner``) and reads the best trial's seeds 0..seeds-1. Returns one record per
  seed: ``{'seed', 'dir', 'status' ('ok' | 'failed' | 'missing'), 'test', 'valid', 'error'}``.

  ``DIR/<variant>/best.json`` names the trial the best_seed<k> runs belong to; when a later
  search finds another best, those runs are renamed ``best_seed<k>.trial<old>`` and rerun."""
  label = tv.variant.label
  best = best_trial(study) if study is not None else None
  if best is None:
    return []
  values = trial_values(tv, best.params)
  record_path = os.path.join(variant_dir(workdir, label), "best.json")
  if runner is not None:
    old = None
    if os.path.exists(record_path):
      with open(record_path) as f:
        old = json.load(f).get("trial")
    if old is not None and old != best.number:
      for k in range(1, 10_000):
        rd = seed_dir(workdir, label, k)
        if not os.path.exists(rd):
          break
        os.replace(rd, f"{rd}.trial{old}")
      runner.say(
        f"{label}: the best trial is now {best.number} (was {old}); the runs of trial "
        f"{old}'s seeds are kept as best_seed<k>.trial{old}"
      )
    with open(record_path, "w") as f:
      json.dump({"trial": best.number, "value": best.value, "values": values}, f, indent=2)
    _link_seed0(workdir, label, best.number)
  out = []
  for seed in range(tuning.seeds):
    rd = trial_dir(workdir, label, best.number) if seed == 0 else seed_dir(workdir, label, seed)
    records = read_evals(rd)
    rc, name = None, f"{label} best_seed{seed}"
    if test_record(records) is None and seed > 0 and runner is not None:
      runner.say(f"{name} start (trial {best.number}'s setting, seed {seed})")
      rc, seconds = runner.run(tv.variant.path, rd, run_flags(tuning, values, seed), name)
      records = read_evals(rd)
      if rc == 0 and test_record(records) is not None:
        runner.say(f"{name} done ({_fmt_time(seconds)})")
      else:
        runner.say(f"{name} FAILED (exit {rc}): {error_line(rd, rc)}")
    test = test_record(records)
    valid = best_valid(records, tuning.objective)
    if test is not None:
      status, error = "ok", ""
    elif rc is not None:
      status, error = "failed", error_line(rd, rc)
    else:
      status, error = "missing", ""
    out.append(
      {
        "seed": seed,
        "dir": os.path.relpath(rd, workdir),
        "status": status,
        "test": test,
        "valid": valid,
        "error": error,
      }
    )
  return out


# ----------------------------------------------------------------------------------------------
# Results.


def gather(tuning: Tuning, workdir: str, seed_records: dict | None = None) -> list[dict]:
  """Per variant: ``{'label', 'path', 'params' (Param), 'trials' [{'number', 'state', 'value',
  'values', 'step', 'error', 'seconds'}], 'best' (trial number or None), 'best_value',
  'best_values', 'seeds' (seed_runs records)}``. Reads only; runs nothing."""
  out = []
  for tv in tuning.variants:
    label = tv.variant.label
    study = open_study(tuning, tv, workdir, create=False)
    trials, best = [], None
    if study is not None:
      attrs = study.user_attrs
      for t in study.get_trials(deepcopy=False):
        info = attrs.get(f"trial_{t.number}", {})
        trials.append(
          {
            "number": t.number,
            "state": t.state.name.lower(),
            "value": t.value,
            "values": trial_values(tv, t.params),
            "step": info.get("step"),
            "error": info.get("error", ""),
            "seconds": info.get("seconds"),
          }
        )
      best = best_trial(study)
    seeds = (seed_records or {}).get(label)
    if seeds is None:
      seeds = seed_runs(tuning, tv, study, workdir, None)
    out.append(
      {
        "label": label,
        "path": tv.variant.path,
        "params": tv.params,
        "trials": trials,
        "best": None if best is None else best.number,
        "best_value": None if best is None else best.value,
        "best_values": {} if best is None else trial_values(tv, best.params),
        "seeds": seeds,
      }
    )
  return out


def table_metrics(results: Sequence[dict]) -> list[str]:
  """recall@K, recall@K/head, recall@K/tail, ndcg@K with K = 50 (else the closest reported)."""
  names = {k for r in results for s in r["seeds"] if s["test"] for k in s["test"]}
  ks = report.ks_of(names) or [50]
  k = report.pick_k(ks)
  return [f"recall@{k}", f"recall@{k}/head", f"recall@{k}/tail", f"ndcg@{k}"]


def _summary(results: Sequence[dict], metrics: Sequence[str], reference: str) -> dict:
  """mean/std per variant, the references once, and paired differences to ``reference``."""
  rows, refs, diffs = [], [], []
  by_label = {r["label"]: r for r in results}
  for r in results:
    ok = [s for s in r["seeds"] if s["status"] == "ok"]
    stats = {}
    for m in metrics:
      xs = [s["test"][m] for s in ok if report._is_num(s["test"].get(m))]  # pylint: disable=protected-access
      stats[m] = report.mean_std(xs) if xs else (None, None)
    rows.append({"label": r["label"], "n": len(ok), "stats": stats})
  first = next((s["test"] for r in results for s in r["seeds"] if s["status"] == "ok"), None)
  if first is not None:  # the references depend on the data only: shown once
    for name in ("popularity", "itemknn", "als"):
      if any(f"{name}/{m}" in first for m in metrics):
        refs.append({"label": name, "values": {m: first.get(f"{name}/{m}") for m in metrics}})
  ref = by_label.get(reference)
  ref_ok = {s["seed"]: s["test"] for s in (ref or {}).get("seeds", []) if s["status"] == "ok"}
  for r in results:
    if r["label"] == reference:
      continue
    pairs = [
      (s["test"], ref_ok[s["seed"]])
      for s in r["seeds"]
      if s["status"] == "ok" and s["seed"] in ref_ok
    ]
    cells = {}
    for m in metrics:
      xs = [a[m] - b[m] for a, b in pairs if report._is_num(a.get(m)) and report._is_num(b.get(m))]  # pylint: disable=protected-access
      cells[m] = (report.t_interval(xs), len(xs)) if xs else ((None, None), 0)
    diffs.append({"label": r["label"], "n": len(pairs), "cells": cells})
  return {"rows": rows, "refs": refs, "diffs": diffs}


def _f(v, digits: int = 4, signed: bool = False) -> str:
  if v is None:
    return ""
  return f"{v:{'+' if signed else ''}.{digits}f}"


def _short(metric: str) -> str:
  return metric.replace("recall@", "R@").replace("ndcg@", "N@")


def _interval_cell(mean, ci) -> str:
  if mean is None:
    return ""
  return f"{mean:+.4f} " + ("[n/a]" if ci is None else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]")


def write_results(
  tuning: Tuning, results: Sequence[dict], workdir: str, *, command: str = ""
) -> tuple[str, str]:
  """Writes results.md, results.csv, runs.csv and trials.csv; returns (md, csv) paths."""
  metrics = table_metrics(results)
  reference = tuning.reference
  summary = _summary(results, metrics, reference)
  keys = list(dict.fromkeys(p.key for r in results for p in r["params"]))
  obj = tuning.objective

  # results.csv: one row per variant (then the references), every figure of the markdown.
  csv_path = os.path.join(workdir, "results.csv")
  diff_by = {d["label"]: d for d in summary["diffs"]}
  with open(csv_path, "w", newline="") as f:
    w = csv.writer(f)
    head = [
      "kind",
      "variant",
      "config",
      "trials",
      "failed_trials",
      "best_trial",
      f"valid_{obj}",
      *keys,
      "n_seeds",
    ]
    for m in metrics:
      head += [f"{m}_mean", f"{m}_std"]
    for m in metrics:
      head += [f"delta_{m}_mean", f"delta_{m}_ci95_low", f"delta_{m}_ci95_high", f"delta_{m}_n"]
    w.writerow(head)
    for r, row in zip(results, summary["rows"]):
      failed = sum(t["state"] == "fail" for t in r["trials"])
      finished = sum(t["state"] in ("complete", "fail") for t in r["trials"])
      cells = [
        "variant",
        r["label"],
        r["path"],
        finished,
        failed,
        "" if r["best"] is None else r["best"],
        _f(r["best_value"], 6),
        *(flag_value(r["best_values"][k]) if k in r["best_values"] else "" for k in keys),
        row["n"],
      ]
      for m in metrics:
        mean, sd = row["stats"][m]
        cells += [_f(mean, 6), _f(sd, 6)]
      d = diff_by.get(r["label"])
      for m in metrics:
        if d is None or d["cells"][m][0][0] is None:
          cells += ["", "", "", "" if d is None else 0]
          continue
        (mean, ci), n = d["cells"][m]
        cells += [
          _f(mean, 6),
          "n/a" if ci is None else _f(ci[0], 6),
          "n/a" if ci is None else _f(ci[1], 6),
          n,
        ]
      w.writerow(cells)
    for ref in summary["refs"]:
      cells = ["reference", ref["label"], "", "", "", "", "", *([""] * len(keys)), ""]
      for m in metrics:
        cells += [_f(ref["values"][m], 6), ""]
      cells += [""] * (4 * len(metrics))
      w.writerow(cells)

  # runs.csv: one row per seed run (every test metric); trials.csv: one row per trial.
  test_keys = sorted(
    {
      k
      for r in results
      for s in r["seeds"]
      if s["test"]
      for k in s["test"]
      if k not in ("step", "split", "selected_step") and report._is_num(s["test"][k])
    },
    key=report.metric_sort_key,
  )  # pylint: disable=protected-access
  with open(os.path.join(workdir, "runs.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(
      [
        "variant",
        "seed",
        "run",
        "status",
        "step",
        "selected_step",
        f"valid_{obj}",
        *(f"test_{k}" for k in test_keys),
        "error",
      ]
    )
    for r in results:
      for s in r["seeds"]:
        t = s["test"] or {}
        w.writerow(
          [
            r["label"],
            s["seed"],
            s["dir"],
            s["status"],
            t.get("step", ""),
            t.get("selected_step", ""),
            _f(s["valid"][0], 6) if s["valid"] else "",
            *(_f(t.get(k), 6) for k in test_keys),
            s["error"],
          ]
        )
  with open(os.path.join(workdir, "trials.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["variant", "trial", "state", f"valid_{obj}", "step", *keys, "seconds", "error"])
    for r in results:
      for t in r["trials"]:
        w.writerow(
          [
            r["label"],
            t["number"],
            t["state"],
            _f(t["value"], 6),
            "" if t["step"] is None else t["step"],
            *(flag_value(t["values"][k]) if k in t["values"] else "" for k in keys),
            "" if t["seconds"] is None else t["seconds"],
            t["error"],
          ]
        )

  # results.md
  parts = ["# Tuning results", ""]
  if command:
    parts += ["```", command, "```", ""]
  parts += [
    f"Each variant was tuned on the **validation** split: {tuning.trials} trials "
    f"(optuna TPE, sampler seed {tuning.sampler_seed}, the first "
    f"{tuning.startup_trials} random), one run each with seed 0, scored by the best "
    f"validation `{obj}` over the run's evaluations. The best setting was then trained "
    f"with seeds 0..{tuning.seeds - 1} (seed 0 is the best trial's own run) and scored "
    "on the **test** split, at the checkpoint selected by validation "
    "`train.select_metric`. Runs of the same seed share the data (`data.seed`) and are "
    "paired. Per trial: trials.csv; per run: runs.csv; this page: results.csv.",
    "",
  ]
  if tuning.overrides:
    parts += ["Fixed: " + " ".join(f"`{o}`" for o in tuning.overrides), ""]
  parts += ["## Chosen hyperparameters", ""]
  head = ["variant", "trials", "best trial", f"valid {obj}", *keys]
  parts += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in results:
    failed = sum(t["state"] == "fail" for t in r["trials"])
    finished = sum(t["state"] in ("complete", "fail") for t in r["trials"])
    cells = [
      r["label"],
      f"{finished}" + (f" ({failed} failed)" if failed else ""),
      "none" if r["best"] is None else f"trial_{r['best']}",
      _f(r["best_value"]),
      *(
        _short_value(r["best_values"][k])
        if k in r["best_values"]
        else ("—" if all(p.key != k for p in r["params"]) else "")
        for k in keys
      ),
    ]
    parts.append("| " + " | ".join(cells) + " |")
  parts += [
    "",
    "Search space: "
    + "; ".join(dict.fromkeys(p.describe() for r in results for p in r["params"]))
    + " (— = not searched "
    "for that variant).",
    "",
  ]
  parts += ["## Test split: mean ± std over seeds", ""]
  head = ["recommender", "n", *(_short(m) for m in metrics)]
  parts += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row in summary["rows"]:
    cells = [row["label"], str(row["n"])]
    for m in metrics:
      mean, sd = row["stats"][m]
      cells.append("" if mean is None else f"{mean:.4f}" + ("" if sd is None else f" ± {sd:.4f}"))
    parts.append("| " + " | ".join(cells) + " |")
  for ref in summary["refs"]:
    parts.append(
      "| "
      + " | ".join([f"{ref['label']} (reference)", "—", *(_f(ref["values"][m]) for m in metrics)])
      + " |"
    )
  parts += [
    "",
    "std: sample standard deviation over seeds (omitted for n = 1). The references "
    "depend on the data only, not on the seed: shown once.",
    "",
  ]
  if summary["diffs"]:
    parts += [
      f"## Paired differences to `{reference}` (same seed)",
      "",
      "Mean of the per-seed differences [95% Student-t interval, n - 1 degrees of "
      "freedom; n/a for n < 2].",
      "",
    ]
    head = ["variant", "n", *(f"Δ{_short(m)}" for m in metrics)]
    parts += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d in summary["diffs"]:
      cells = [d["label"], str(d["n"])]
      for m in metrics:
        (mean, ci), _ = d["cells"][m]
        cells.append(_interval_cell(mean, ci))
      parts.append("| " + " | ".join(cells) + " |")
    parts.append("")
  failed = [(r["label"], t) for r in results for t in r["trials"] if t["state"] == "fail"]
  bad_seeds = [(r["label"], s) for r in results for s in r["seeds"] if s["status"] != "ok"]
  no_best = [r["label"] for r in results if r["best"] is None]
  if failed or bad_seeds or no_best:
    parts += ["## Failures", ""]
    for label in no_best:
      parts.append(f"- {label}: no trial finished: no best setting, no test figures")
    for label, t in failed:
      parts.append(
        f"- {label} trial {t['number']} (`{label}/trial_{t['number']}/log.txt`): "
        f"{t['error'] or 'failed'}"
      )
    for label, s in bad_seeds:
      parts.append(
        f"- {label} seed {s['seed']} (`{s['dir']}/log.txt`): {s['status']}"
        + (f": {s['error']}" if s["error"] else "")
      )
    parts.append("")
  md_path = os.path.join(workdir, "results.md")
  with open(md_path, "w") as f:
    f.write("\n".join(parts))
  return md_path, csv_path


# ----------------------------------------------------------------------------------------------
# The command (launch/tune.py parses the flags and calls this).


def _raise_interrupt(signum, frame):
  del signum, frame
  raise KeyboardInterrupt


def run_command(
  *,
  spec: str | None,
  workdir: str | None,
  trials: int | None = None,
  seeds: int | None = None,
  objective: str | None = None,
  overrides: Sequence[str] = (),
  main_script: str,
  command: str = "",
  python: str = sys.executable,
  env: dict | None = None,
  status_every: float = 60.0,
  out=sys.stdout,
  err=sys.stderr,
) -> int:
  """Validates everything, tunes every variant, runs its best over the seeds, writes the
  results; returns the exit code: 0 when every variant has a best and every seed run finished
  (failed trials are part of a search: listed, not fatal), 1 otherwise, 2 on bad input (one
  ``error:`` line, nothing run), 130 when interrupted (re-run the command to resume)."""
  try:
    if importlib.util.find_spec("optuna") is None:
      raise TuneError("optuna is not installed: pip install -e '.[tune]'")
    if not workdir:
      raise TuneError("--workdir is required")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
      raise TuneError(f"--workdir={workdir} exists and is not a directory")
    if trials is not None:
      _int_field(trials, "--trials")
    if seeds is not None:
      _int_field(seeds, "--seeds")
    raw = load_spec(spec)
    tuning = make_tuning(
      raw, spec, trials=trials, seeds=seeds, objective=objective, overrides=overrides
    )
    check_resumable(tuning, workdir)
  except plan.SweepError as e:  # TuneError, and the plan module's own (build_config, check_key)
    print(f"error: {e}", file=err, flush=True)
    return 2
  runner = Runner(
    main_script=main_script,
    python=python,
    env=dict(os.environ) if env is None else env,
    status_every=status_every,
    out=out,
  )
  for note in tuning.notes:
    runner.say(note)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "tune_command.txt"), "a") as f:
    f.write(command + "\n")
  runner.say(
    f"tune: {len(tuning.variants)} variants x {tuning.trials} trials on validation "
    f"{tuning.objective} (seed 0), then {tuning.seeds} seeds of each best; in {workdir}"
  )
  previous = signal.getsignal(signal.SIGTERM)
  main_thread = threading.current_thread() is threading.main_thread()
  if main_thread:
    signal.signal(signal.SIGTERM, _raise_interrupt)
  seeds_by_label: dict[str, list[dict]] = {}
  code = 0
  try:
    studies = {
      tv.variant.label: tune_variant(tuning, tv, workdir, runner) for tv in tuning.variants
    }
    for tv in tuning.variants:
      label = tv.variant.label
      best = best_trial(studies[label])
      if best is None:
        runner.say(f"{label}: no trial finished; no best setting to test")
        code = 1
        continue
      runner.say(
        f"{label} best: trial {best.number}, valid {tuning.objective} "
        f"{best.value:.4f}: {_fmt_values(trial_values(tv, best.params))}"
      )
      seeds_by_label[label] = seed_runs(tuning, tv, studies[label], workdir, runner)
      if any(s["status"] != "ok" for s in seeds_by_label[label]):
        code = 1
  except KeyboardInterrupt:
    runner.say(
      "interrupted; re-run the same command to resume (finished trials are kept, the "
      "interrupted run resumes from its checkpoint)"
    )
    code = 130
  finally:
    if main_thread:
      signal.signal(signal.SIGTERM, previous)
  results = gather(tuning, workdir, seeds_by_label if code != 130 else None)
  md, csv_path = write_results(tuning, results, workdir, command=command)
  failed = [(r["label"], t["number"]) for r in results for t in r["trials"] if t["state"] == "fail"]
  if failed:
    runner.say(
      f"{len(failed)} trials failed: "
      + ", ".join(f"{l} trial {n}" for l, n in failed)
      + " (their error lines: results.md, trials.csv)"
    )
  runner.say(f"results: {md}, {csv_path} (and runs.csv, trials.csv)")
  return code
