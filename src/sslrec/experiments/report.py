"""A sweep's results as tables: every run's final evaluation gathered, then summarised.

    DIR/results.csv    one row per run: variant, grid values, seed, status, every eval metric,
                       and for a failed run its error (the last lines of its log)
    DIR/summary.csv    one row per variant x grid point: n (finished seeds), mean and std of
                       every metric
    DIR/results.md     the summary as a Markdown table (mean +- std), paired differences to a
                       reference variant, links to the plots (``plots``), then the failures

std is the sample standard deviation over seeds (n - 1 in the denominator); empty when n = 1.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Sequence

from scipy import stats

from sslrec.experiments import plan

ERROR_LINES = 5  # log lines kept as a failed run's error


def gather(sweep: plan.Sweep, workdir: str, outcomes: dict | None = None) -> list[dict]:
  """One record per run: ``{'run', 'variant', 'seed', 'status', 'values', 'metrics', 'error'}``.

  ``status`` is 'ok' (final eval present), 'failed' (launched and did not finish) or 'missing'
  (not run yet).
  """
  outcomes = outcomes or {}
  records = []
  for run in sweep.runs:
    result = plan.final_eval(workdir, run)
    outcome = outcomes.get(run.name, {})
    if result is not None:
      status, error = "ok", ""
    else:
      status = "failed" if outcome.get("status") == "failed" else "missing"
      error = plan.log_tail(os.path.join(plan.run_dir(workdir, run), "log.txt"), ERROR_LINES)
      if status == "failed" and not error:
        error = f"exit code {outcome.get('returncode')}"
    metrics = {k: v for k, v in (result or {}).items() if k != "step" and _is_num(v)}
    records.append(
      {
        "run": run.name,
        "variant": run.variant.label,
        "seed": run.seed,
        "status": status,
        "values": dict(run.values),
        "point": tuple(plan.format_value(v) for _, v in run.values),
        "step": (result or {}).get("step"),
        "metrics": metrics,
        "error": error,
      }
    )
  return records


def _is_num(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def mean_std(xs: Sequence[float]) -> tuple[float, float | None]:
  """Mean and sample standard deviation (None for a single value)."""
  n = len(xs)
  m = sum(xs) / n
  if n < 2:
    return m, None
  return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))


def t_interval(
  xs: Sequence[float], confidence: float = 0.95
) -> tuple[float, tuple[float, float] | None]:
  """The mean of ``xs`` and its two-sided Student-t interval (n - 1 degrees of freedom); the
  interval is None for fewer than 2 values. For paired differences: ``xs`` are per-seed
  differences, and an interval that excludes 0 is a difference the seeds agree on."""
  m, sd = mean_std(xs)
  if sd is None:
    return m, None
  half = float(stats.t.ppf(0.5 + confidence / 2, len(xs) - 1)) * sd / math.sqrt(len(xs))
  return m, (m - half, m + half)


def summarize(records: Sequence[dict]) -> list[dict]:
  """Groups finished runs by (variant, grid point): ``{'variant', 'point', 'values', 'n',
  'seeds', 'failed', 'mean': {metric: m}, 'std': {metric: s or None}}``, in sweep order."""
  groups: dict[tuple, dict] = {}
  for r in records:
    key = (r["variant"], r["point"])
    g = groups.setdefault(
      key,
      {
        "variant": r["variant"],
        "point": r["point"],
        "values": r["values"],
        "runs": [],
        "failed": 0,
      },
    )
    if r["status"] == "ok":
      g["runs"].append(r)
    elif r["status"] == "failed":
      g["failed"] += 1
  out = []
  for g in groups.values():
    names = sorted({k for r in g["runs"] for k in r["metrics"]}, key=metric_sort_key)
    mean, std = {}, {}
    for k in names:
      xs = [r["metrics"][k] for r in g["runs"] if k in r["metrics"]]
      mean[k], std[k] = mean_std(xs)
    out.append(
      {
        "variant": g["variant"],
        "point": g["point"],
        "values": g["values"],
        "n": len(g["runs"]),
        "seeds": [r["seed"] for r in g["runs"]],
        "failed": g["failed"],
        "mean": mean,
        "std": std,
      }
    )
  return out


def paired(records: Sequence[dict], reference: str) -> list[dict]:
  """Per-seed differences to the ``reference`` variant at the same grid point and seed (on the
  embedded data a seed fixes the dataset and the init, so these pair like with like):
  ``{'variant', 'point', 'values', 'n', 'mean': {metric: m}, 'std': {metric: s or None}}``."""
  ok = {(r["variant"], r["point"], r["seed"]): r for r in records if r["status"] == "ok"}
  groups: dict[tuple, dict] = {}
  for (variant, point, seed), r in ok.items():
    ref = ok.get((reference, point, seed))
    if variant == reference or ref is None:
      continue
    g = groups.setdefault(
      (variant, point), {"variant": variant, "point": point, "values": r["values"], "diffs": {}}
    )
    for k, v in r["metrics"].items():
      if k in ref["metrics"]:
        g["diffs"].setdefault(k, []).append(v - ref["metrics"][k])
  order = list(dict.fromkeys((r["variant"], r["point"]) for r in records))
  out = []
  for key in order:
    if key not in groups:
      continue
    g = groups[key]
    stats = {k: mean_std(xs) for k, xs in g["diffs"].items()}
    out.append(
      {
        "variant": g["variant"],
        "point": g["point"],
        "values": g["values"],
        "n": min(len(xs) for xs in g["diffs"].values()),
        "mean": {k: m for k, (m, _) in stats.items()},
        "std": {k: sd for k, (_, sd) in stats.items()},
      }
    )
  return out


def metric_sort_key(name: str):
  """recall@10, recall@10/head, recall@10/tail, recall@50, ..., then the rest (popularity...)."""
  m = re.fullmatch(r"(popularity/)?recall@(\d+)(/head|/tail)?", name)
  if not m:
    return (2, 0, 0, name)
  return (
    1 if m.group(1) else 0,
    int(m.group(2)),
    {"": 0, "/head": 1, "/tail": 2}[m.group(3) or ""],
    name,
  )


def ks_of(names) -> list[int]:
  return sorted({int(m.group(1)) for n in names if (m := re.fullmatch(r"recall@(\d+)", n))})


def pick_k(ks: Sequence[int], want: int = 50) -> int:
  """The K shown when only one fits (Recall@50, else the closest)."""
  return want if want in ks else min(ks, key=lambda k: abs(k - want))


def _fmt(v: float | None, digits: int = 4) -> str:
  return "" if v is None else f"{v:.{digits}f}"


def write_csv(
  sweep: plan.Sweep, records: Sequence[dict], summary: Sequence[dict], workdir: str
) -> tuple[str, str]:
  keys = [k for k, _ in sweep.grid]
  metrics = sorted({k for r in records for k in r["metrics"]}, key=metric_sort_key)
  results_path = os.path.join(workdir, "results.csv")
  with open(results_path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["run", "variant", *keys, "seed", "status", "step", *metrics, "error"])
    for r in records:
      w.writerow(
        [
          r["run"],
          r["variant"],
          *r["point"],
          r["seed"],
          r["status"],
          "" if r["step"] is None else r["step"],
          *(_fmt(r["metrics"].get(m), 6) for m in metrics),
          r["error"],
        ]
      )
  summary_path = os.path.join(workdir, "summary.csv")
  with open(summary_path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(
      ["variant", *keys, "n", "failed", *(f"{m}{s}" for m in metrics for s in ("_mean", "_std"))]
    )
    for g in summary:
      row = [g["variant"], *g["point"], g["n"], g["failed"]]
      for m in metrics:
        row += [_fmt(g["mean"].get(m), 6), _fmt(g["std"].get(m), 6)]
      w.writerow(row)
  return results_path, summary_path


def markdown_table(
  sweep: plan.Sweep,
  summary: Sequence[dict],
  *,
  metrics: Sequence[str] | None = None,
  prefix: str = "",
  signed: bool = False,
) -> str:
  """The summary as Markdown: one row per variant x grid point, cells ``mean ± std``."""
  keys = [k for k, _ in sweep.grid]
  names = metrics or sorted(
    {k for g in summary for k in g["mean"] if re.fullmatch(r"recall@\d+(/head|/tail)?", k)},
    key=metric_sort_key,
  )
  head = ["variant", *keys, "n", *(prefix + _short(m) for m in names)]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for g in summary:
    cells = [
      g["variant"],
      *g["point"],
      str(g["n"]) + (f" ({g['failed']} failed)" if g.get("failed") else ""),
    ]
    for m in names:
      mean, std = g["mean"].get(m), g["std"].get(m)
      cells.append(
        ""
        if mean is None
        else f"{mean:{'+' if signed else ''}.4f}" + ("" if std is None else f" ± {std:.4f}")
      )
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _short(metric: str) -> str:
  return metric.replace("popularity/", "").replace("recall@", "R@")


def write_markdown(
  sweep: plan.Sweep,
  records: Sequence[dict],
  summary: Sequence[dict],
  workdir: str,
  *,
  command: str = "",
  plots: Sequence[str] = (),
  reference: str | None = None,
) -> str:
  n_ok = sum(r["status"] == "ok" for r in records)
  failed = [r for r in records if r["status"] == "failed"]
  missing = [r for r in records if r["status"] == "missing"]
  parts = ["# Sweep results", ""]
  if command:
    parts += ["```", command, "```", ""]
  parts += [
    f"{len(records)} runs: {n_ok} finished, {len(failed)} failed"
    + (f", {len(missing)} not run" if missing else "")
    + f". Variants: {', '.join(v.label for v in sweep.variants)}. "
    f"Cells: mean ± sample std over seeds (n = finished seeds; std omitted for n = 1); "
    "every metric of every run is in results.csv / summary.csv.",
    "",
    *[f"Note: {note}." for note in sweep.notes],
    *([""] if sweep.notes else []),
    markdown_table(sweep, summary),
    "",
  ]
  pop = sorted(
    {
      k
      for g in summary
      for k in g["mean"]
      if re.fullmatch(r"popularity/recall@\d+(/head|/tail)?", k)
    },
    key=metric_sort_key,
  )
  if pop:  # it depends on the data only: one row per grid point
    first = [
      dict(g, variant="popularity") for g in summary if g["variant"] == sweep.variants[0].label
    ]
    parts += [
      "The most-popular recommender on the same eval pairs (a reference):",
      "",
      markdown_table(sweep, first, metrics=pop),
      "",
    ]
  reference = reference or sweep.variants[0].label
  diffs = paired(records, reference)
  ks = ks_of({k for g in summary for k in g["mean"]})
  if diffs and ks and len(sweep.seeds) > 1:
    k = pick_k(ks)
    parts += [
      f"Paired differences to `{reference}` (same grid point and seed; on the embedded "
      "data a seed fixes the data set and the init): mean ± sample std over seeds.",
      "",
      markdown_table(
        sweep,
        diffs,
        metrics=[f"recall@{k}", f"recall@{k}/head", f"recall@{k}/tail"],
        prefix="Δ",
        signed=True,
      ),
      "",
    ]
  if plots:
    parts += [
      "Plots: " + ", ".join(f"[{os.path.basename(p)}]({os.path.basename(p)})" for p in plots),
      "",
    ]
  if failed:
    parts += ["## Failed runs", ""]
    for r in failed:
      parts += [
        f"### {r['run']}",
        "",
        f"log: `runs/{r['run']}/log.txt`",
        "",
        "```",
        r["error"] or "(empty log)",
        "```",
        "",
      ]
  path = os.path.join(workdir, "results.md")
  with open(path, "w") as f:
    f.write("\n".join(parts))
  return path
