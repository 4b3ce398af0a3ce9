"""Sweep planning: the cartesian product of config overrides x variants x seeds, as named runs.

    python launch/sweep.py --config=configs/base.py --workdir=DIR \
        --grid ssl.alpha=0,0.1,0.3,1.0 --grid ssl.temperature=0.05,0.1,0.2 --seeds=3

``plan`` parses the grid (or a spec file's ``get_sweep()``) and builds and validates every run's
config in this process before anything is launched, so a bad grid key or value stops the sweep
with one line (``SweepError``). Each run gets a NAME built from its variant, grid values and seed
(readable, filesystem-safe, the same on every invocation) and lives in ``DIR/runs/NAME``
(``run_dir``); ``final_eval`` tells whether it finished. Running the plan is ``execute``'s job,
its tables ``report``'s and its figures ``plots``'.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import os
import re
import warnings
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import flags as absl_flags
from ml_collections.config_flags import config_flags

from sslrec import configuration, shipped
from sslrec.run import workdir as workdir_lib

_SAFE = re.compile(r"[^A-Za-z0-9._=+-]")
MAX_NAME_LEN = 120  # longer run names are cut and made unique by a hash suffix


class SweepError(ValueError):
  """Bad sweep input (grid, variants, spec); the message is one line for the user."""


@dataclasses.dataclass(frozen=True)
class Variant:
  """A config file (with an optional ``:arg`` for its ``get_config``) and its short label."""

  label: str
  path: str  # as given, e.g. 'configs/rfm.py' or 'configs/paper.py:ssl_cfm'


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One run of the sweep.

  Attributes:
    name: the run's subdirectory name under ``DIR/runs``.
    variant: the variant it runs.
    point: the grid values ``((key, raw value string), ...)`` in grid key order.
    seed: the run's ``config.seed``.
    flags: the ``--config.KEY=VALUE`` flags passed to main.py (fixed overrides, grid, seed).
    num_steps: the run's final step (``train.num_steps``).
    values: the parsed grid values, ``{key: value}`` (for the report).
    same_as: the name of the run this one cannot differ from (``NO_EFFECT``): it is not run, its
      results are that run's.
  """

  name: str
  variant: Variant
  point: tuple[tuple[str, str], ...]
  seed: int
  flags: tuple[str, ...]
  num_steps: int
  values: tuple[tuple[str, Any], ...]
  same_as: str | None = None


# Fields that cannot change a run while a condition holds: (condition, its text, fields). Grid
# points that differ only in such fields run once (the others share its results, with a note).
NO_EFFECT = (
  (
    lambda c: float(c.ssl.alpha) == 0.0,
    "ssl.alpha=0",
    ("ssl.temperature", "ssl.mask_fraction", "ssl.dropout_rate"),
  ),
)


def _no_effect_keys(config) -> tuple[str, tuple[str, ...]] | None:
  for condition, text, fields in NO_EFFECT:
    if condition(config):
      return text, fields
  return None


@dataclasses.dataclass(frozen=True)
class Sweep:
  variants: tuple[Variant, ...]
  grid: tuple[tuple[str, tuple[str, ...]], ...]  # ((key, (raw values...)), ...), given order
  seeds: tuple[int, ...]
  overrides: tuple[str, ...]  # fixed --config.KEY=VALUE flags applied to every run
  runs: tuple[RunSpec, ...]
  notes: tuple[str, ...] = ()  # e.g. the grid points that run once


# ----------------------------------------------------------------------------------------------
# Building the plan (no runs started).


def split_values(text: str) -> list[str]:
  """Splits ``'0,0.1,(64,32)'`` on the commas outside brackets and quotes."""
  out, depth, cur, quote = [], 0, [], None
  for ch in text:
    if quote:
      quote = None if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 0:
      out.append("".join(cur).strip())
      cur = []
      continue
    cur.append(ch)
  out.append("".join(cur).strip())
  return out


def parse_grid(items: Sequence[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
  """``['ssl.alpha=0,0.1', ...]`` -> ``(('ssl.alpha', ('0', '0.1')), ...)``."""
  grid = []
  for item in items:
    key, sep, values = item.partition("=")
    key = key.strip()
    if key.startswith("config."):
      key = key[len("config.") :]
    if not sep or not key:
      raise SweepError(f"--grid {item!r}: expected KEY=V1,V2,... (e.g. --grid ssl.alpha=0,0.3)")
    vals = split_values(values)
    if not values.strip() or any(not v for v in vals):
      raise SweepError(f"--grid {item}: empty value list; expected KEY=V1,V2,...")
    if any(k == key for k, _ in grid):
      raise SweepError(f"--grid {key} is given twice; put all its values in one --grid")
    if key == "seed":
      raise SweepError(
        "--grid seed=...: use --seeds=N (seeds 0..N-1), which the report averages over"
      )
    if len(set(vals)) != len(vals):
      raise SweepError(f"--grid {item}: a value is repeated")
    grid.append((key, tuple(vals)))
  return tuple(grid)


def variant_label(path: str) -> str:
  """``'configs/rfm.py'`` -> ``'rfm'``; ``'configs/paper.py:ssl_cfm'`` -> ``'ssl_cfm'``."""
  file, _, arg = path.partition(":")
  return arg or os.path.splitext(os.path.basename(file))[0]


def resolve_name(value: str, *, flag: str = "--config", function: str = "get_config") -> str:
  """A config (or spec) given by path or by a shipped name (``base``, ``movielens:cfm``,
  ``paper``) as a path; SweepError (listing the names) for an unknown name."""
  try:
    path = shipped.resolve(value.strip(), flag=flag, function=function)
  except configuration.ConfigError as e:
    raise SweepError(str(e)) from None
  shipped.make_importable(path)
  return path


def parse_variants(paths: Sequence[str]) -> tuple[Variant, ...]:
  variants = []
  for path in paths:
    path = path.strip()
    if not path:
      continue
    path = resolve_name(path, flag="variant")
    file = path.split(":", 1)[0]
    if not os.path.isfile(file):
      raise SweepError(
        f"variant {path}: no such config file (configs are in configs/, e.g. configs/rfm.py)"
      )
    label = variant_label(path)
    if any(v.label == label for v in variants):
      raise SweepError(
        f"two variants are named {label!r} ({path}); give each a distinct file name or :arg"
      )
    variants.append(Variant(label=label, path=path))
  if not variants:
    raise SweepError("no variant: give --config=FILE or --variants=FILE1,FILE2,...")
  return tuple(variants)


def load_spec(path: str) -> dict:
  """A sweep spec file: a config file whose ``get_sweep()`` returns ``{'variants': (...),
  'grid': {key: (values...)}, 'seeds': N}``; a variant without ``.py`` is an argument of the
  spec file's own ``get_config``."""
  if not os.path.isfile(path):
    raise SweepError(f"--spec={path}: no such file (e.g. configs/paper.py)")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", DeprecationWarning)
      module = config_flags._LoadConfigModule("sweep_spec", path)  # pylint: disable=protected-access
  except SyntaxError as e:
    raise SweepError(f"--spec={path}:{e.lineno}: syntax error ({e.msg})") from None
  except Exception as e:  # anything the file raises when imported
    raise SweepError(f"--spec={path}: cannot load it ({type(e).__name__}: {e})") from None
  if not hasattr(module, "get_sweep"):
    raise SweepError(f"--spec={path}: the file has no get_sweep() (see configs/paper.py)")
  try:
    spec = module.get_sweep()
    if not isinstance(spec, dict):
      raise TypeError(f"it returned a {type(spec).__name__}, not a dict")
    spec = dict(spec)
    if not isinstance(spec.get("grid", {}), dict):
      raise TypeError("its 'grid' is not a dict {field: (values...)}")
    if not isinstance(spec.get("variants", ()), (list, tuple)):
      raise TypeError("its 'variants' is not a list")
    int(spec.get("seeds", 1))
  except Exception as e:
    raise SweepError(f"--spec={path}: get_sweep() failed ({type(e).__name__}: {e})") from None
  variants = [v if ".py" in v else f"{path}:{v}" for v in spec.get("variants", ())]
  grid = [f"{k}={','.join(str(v) for v in vals)}" for k, vals in spec.get("grid", {}).items()]
  return {"variants": variants, "grid": grid, "seeds": int(spec.get("seeds", 1))}


def _leaf_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  out = []
  for k, v in config.items():
    if isinstance(v, ml_collections.ConfigDict):
      out.extend(_leaf_paths(v, f"{prefix}{k}."))
    else:
      out.append(f"{prefix}{k}")
  return out


def check_key(config: ml_collections.ConfigDict, key: str, where: str) -> None:
  """Raises SweepError unless ``key`` (dotted) is a field (a leaf) of ``config``."""
  leaves = _leaf_paths(config)
  if key in leaves:
    return
  if any(p.startswith(key + ".") for p in leaves):
    raise SweepError(
      f"{where}: {key!r} is a section, not a field; name a field such as "
      f"{next(p for p in leaves if p.startswith(key + '.'))!r}"
    )
  close = difflib.get_close_matches(key, leaves, n=1)
  hint = f" (did you mean {close[0]!r}?)" if close else ""
  raise SweepError(f"{where}: no such config field {key!r}{hint}; see configs/base.py")


def build_config(variant_path: str, flags: Sequence[str]) -> ml_collections.ConfigDict:
  """The config main.py would build from ``--config=variant_path`` and ``flags``.

  Uses the same ml_collections flag parsing (types come from the config's fields). Raises
  SweepError with one line on an unparsable value.
  """
  argv = ["sweep", f"--config={variant_path}", *flags]
  fv = absl_flags.FlagValues()
  config_flags.DEFINE_config_file(
    "config", None, "config file", flag_values=fv, lock_config=True, sys_argv=argv
  )
  try:
    with warnings.catch_warnings():  # ml_collections loads the file with load_module()
      warnings.simplefilter("ignore", DeprecationWarning)
      fv(argv)
    return fv.config
  except Exception as e:  # noqa: BLE001 -- any parse failure is a user error here
    text = " ".join(str(e).split())
    m = re.match(r"flag (--config\.[\w.]+=.*?): (.*)", text)
    if m:
      text = f"{m.group(1)}: {m.group(2)}"
    raise SweepError(f"{variant_path}: {text}") from None


def _get(config, key: str):
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def format_value(v: Any) -> str:
  """A parsed config value as a short string for run names."""
  if isinstance(v, bool):
    return str(v)
  if isinstance(v, float):
    return repr(v)
  if isinstance(v, (tuple, list)):
    return "x".join(format_value(x) for x in v) or "none"
  return str(v)


def run_name(variant: str, values: Sequence[tuple[str, Any]], seed: int) -> str:
  """``'rfm__ssl.alpha=0.1__ssl.temperature=0.05__seed=0'``: keys sorted, so the name does not
  depend on the order of the --grid flags; characters outside ``[A-Za-z0-9._=+-]`` become ``_``
  and a hash of the exact text is appended when anything was changed or cut."""
  parts = [variant] + [f"{k}={format_value(v)}" for k, v in sorted(values)] + [f"seed={seed}"]
  text = "__".join(parts)
  safe = _SAFE.sub("_", text)
  if safe != text or len(safe) > MAX_NAME_LEN:
    digest = hashlib.sha1(text.encode()).hexdigest()[:8]
    safe = f"{safe[: MAX_NAME_LEN - 9]}-{digest}"
  return safe


def plan(
  *,
  variants: Sequence[str],
  grid: Sequence[str] = (),
  seeds: int = 1,
  overrides: Sequence[str] = (),
) -> Sweep:
  """Parses and validates everything; builds every run's config in-process.

  Args:
    variants: config file paths (``path`` or ``path:arg``).
    grid: ``KEY=V1,V2,...`` items; their cartesian product is crossed with variants and seeds.
    seeds: number of seeds, ``0..seeds-1``.
    overrides: ``--config.KEY=VALUE`` flags applied to every run.

  Raises:
    SweepError: one line naming the bad input; nothing has been started or written.
  """
  variant_list = parse_variants(variants)
  grid_items = parse_grid(grid)
  if not isinstance(seeds, int) or seeds < 1:
    raise SweepError(f"--seeds={seeds}: must be an integer >= 1")
  if not grid_items and len(variant_list) == 1 and seeds == 1:
    raise SweepError(
      "empty grid: nothing to sweep; give --grid KEY=V1,V2,..., --variants=A.py,B.py or --seeds=N"
    )
  for o in overrides:
    if not re.match(r"--(no)?config\.[\w.]+(=|$)", o):
      raise SweepError(f"{o}: fixed overrides are --config.KEY=VALUE")
  fixed_keys = {re.match(r"--(?:no)?config\.([\w.]+)", o).group(1) for o in overrides}
  for key, _ in grid_items:
    if key in fixed_keys:
      raise SweepError(f"--grid {key} is also a fixed override --config.{key}; give it once")
  if "seed" in fixed_keys and seeds > 1:
    raise SweepError("--config.seed with --seeds > 1: the sweep sets the seeds")
  runs, names, canonical, shared = [], {}, {}, {}
  keys = [k for k, _ in grid_items]
  for variant in variant_list:
    raw = build_config(variant.path, ())
    for o in overrides:
      check_key(raw, re.match(r"--(?:no)?config\.([\w.]+)", o).group(1), o.split("=", 1)[0])
    base = build_config(variant.path, overrides)
    for key, vals in grid_items:
      check_key(base, key, f"--grid {key}")
      for v in vals:  # each value alone, so that a bad one is named
        try:
          build_config(variant.path, [*overrides, f"--config.{key}={v}"])
        except SweepError as e:
          raise SweepError(
            f"--grid {key}={v}: {str(e).split(': ', 2)[-1]} ({variant.path})"
          ) from None
    for combo in itertools.product(*(vals for _, vals in grid_items)):
      point = tuple(zip(keys, combo))
      grid_flags = [f"--config.{k}={v}" for k, v in point]
      config = build_config(variant.path, [*overrides, *grid_flags])
      try:
        configuration.validate(config)
      except configuration.ConfigError as e:
        where = " ".join(f"--grid {k}={v}" for k, v in point) or "the overrides"
        raise SweepError(f"{where} ({variant.path}): {e}") from None
      for seed in range(seeds):
        if "seed" in fixed_keys:  # one seed, the one the user fixed
          seed_flags, run_seed = [], int(config.seed)
        else:
          seed_flags, run_seed = [f"--config.seed={seed}"], seed
        flags = (*overrides, *grid_flags, *seed_flags)
        values = tuple((k, _get(config, k)) for k in keys)
        name = run_name(variant.label, values, run_seed)
        same_as = None
        idle = _no_effect_keys(config)
        if idle and any(k in idle[1] for k in keys):
          sig = (variant.label, run_seed, tuple((k, v) for k, v in point if k not in idle[1]))
          same_as = canonical.setdefault(sig, name)
          if same_as == name:
            same_as = None
          else:
            shared.setdefault(idle[0], set()).update(k for k in keys if k in idle[1])
        if name in names:
          raise SweepError(
            f"runs {names[name]} and {flags} get the same directory {name!r} "
            "(the same value given twice?)"
          )
        names[name] = flags
        runs.append(
          RunSpec(
            name=name,
            variant=variant,
            point=point,
            seed=run_seed,
            flags=flags,
            num_steps=int(config.train.num_steps),
            values=values,
            same_as=same_as,
          )
        )
  notes = []
  for text, fields in shared.items():
    n = sum(r.same_as is not None for r in runs)
    notes.append(
      f"{', '.join(sorted(fields))} cannot change a run at {text}: those grid points run once "
      f"({n} runs share the result of an equivalent one)"
    )
  return Sweep(
    variants=variant_list,
    grid=grid_items,
    seeds=tuple(range(seeds)),
    overrides=tuple(overrides),
    runs=tuple(runs),
    notes=tuple(notes),
  )


# ----------------------------------------------------------------------------------------------
# Where a planned run lives, and whether it finished (read by execute and report).


def run_dir(workdir: str, run: RunSpec) -> str:
  """The run's directory (for a run ``same_as`` another, that one's: it shares its results)."""
  return os.path.join(workdir, "runs", run.same_as or run.name)


def final_eval(workdir: str, run: RunSpec) -> dict | None:
  """The run's final evaluation: its test line (the checkpoint selected on validation; a run
  that stopped early ends before ``num_steps``), or None if it has none (yet)."""
  try:
    records = workdir_lib.read_jsonl(os.path.join(run_dir(workdir, run), "eval.jsonl"))
  except (OSError, ValueError):
    return None
  done = [r for r in records if r.get("split") == "test"]
  return done[-1] if done else None


def log_tail(path: str, lines: int = 5) -> str:
  """The last non-empty lines of a log file ('' if none)."""
  try:
    with open(path, errors="replace") as f:
      text = f.read()[-20_000:]
  except OSError:
    return ""
  kept = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
  return "\n".join(kept[-lines:])
