"""A sweep's results: every run's final evaluation gathered into tables and plots.

    DIR/results.csv    one row per run: variant, grid values, seed, status, every eval metric,
                       and for a failed run its error (the last lines of its log)
    DIR/summary.csv    one row per variant x grid point: n (finished seeds), mean and std of
                       every metric
    DIR/results.md     the summary as a Markdown table (mean +- std), then the failures
    DIR/*.png          (with matplotlib) head / tail Recall@K per variant; an alpha x tau heatmap
                       of tail Recall@50 when both are in the grid; recall against
                       data.train_fraction when it is in the grid

std is the sample standard deviation over seeds (n - 1 in the denominator); empty when n = 1.
"""

from __future__ import annotations

import csv
import math
import os
import re
from typing import Any, Sequence

from sslrec import sweep as sweep_lib

ALPHA, TAU, FRACTION = "ssl.alpha", "ssl.temperature", "data.train_fraction"
ERROR_LINES = 5  # log lines kept as a failed run's error


def gather(sweep: sweep_lib.Sweep, workdir: str, outcomes: dict | None = None) -> list[dict]:
  """One record per run: ``{'run', 'variant', 'seed', 'status', 'values', 'metrics', 'error'}``.

  ``status`` is 'ok' (final eval present), 'failed' (launched and did not finish) or 'missing'
  (not run yet).
  """
  outcomes = outcomes or {}
  records = []
  for run in sweep.runs:
    result = sweep_lib.final_eval(workdir, run)
    outcome = outcomes.get(run.name, {})
    if result is not None:
      status, error = "ok", ""
    else:
      status = "failed" if outcome.get("status") == "failed" else "missing"
      error = sweep_lib.log_tail(os.path.join(sweep_lib.run_dir(workdir, run), "log.txt"),
                                 ERROR_LINES)
      if status == "failed" and not error:
        error = f"exit code {outcome.get('returncode')}"
    metrics = {k: v for k, v in (result or {}).items() if k != "step" and _is_num(v)}
    records.append({"run": run.name, "variant": run.variant.label, "seed": run.seed,
                    "status": status, "values": dict(run.values),
                    "point": tuple(sweep_lib.format_value(v) for _, v in run.values),
                    "step": (result or {}).get("step"), "metrics": metrics, "error": error})
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


def summarize(records: Sequence[dict]) -> list[dict]:
  """Groups finished runs by (variant, grid point): ``{'variant', 'point', 'values', 'n',
  'seeds', 'failed', 'mean': {metric: m}, 'std': {metric: s or None}}``, in sweep order."""
  groups: dict[tuple, dict] = {}
  for r in records:
    key = (r["variant"], r["point"])
    g = groups.setdefault(key, {"variant": r["variant"], "point": r["point"],
                                "values": r["values"], "runs": [], "failed": 0})
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
    out.append({"variant": g["variant"], "point": g["point"], "values": g["values"],
                "n": len(g["runs"]), "seeds": [r["seed"] for r in g["runs"]],
                "failed": g["failed"], "mean": mean, "std": std})
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
    g = groups.setdefault((variant, point), {"variant": variant, "point": point,
                                             "values": r["values"], "diffs": {}})
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
    out.append({"variant": g["variant"], "point": g["point"], "values": g["values"],
                "n": min(len(xs) for xs in g["diffs"].values()),
                "mean": {k: m for k, (m, _) in stats.items()},
                "std": {k: sd for k, (_, sd) in stats.items()}})
  return out


def metric_sort_key(name: str):
  """recall@10, recall@10/head, recall@10/tail, recall@50, ..., then the rest (popularity...)."""
  m = re.fullmatch(r"(popularity/)?recall@(\d+)(/head|/tail)?", name)
  if not m:
    return (2, 0, 0, name)
  return (1 if m.group(1) else 0, int(m.group(2)), {"": 0, "/head": 1, "/tail": 2}[m.group(3) or ""],
          name)


def ks_of(names) -> list[int]:
  return sorted({int(m.group(1)) for n in names if (m := re.fullmatch(r"recall@(\d+)", n))})


def _fmt(v: float | None, digits: int = 4) -> str:
  return "" if v is None else f"{v:.{digits}f}"


def write_csv(sweep: sweep_lib.Sweep, records: Sequence[dict], summary: Sequence[dict],
              workdir: str) -> tuple[str, str]:
  keys = [k for k, _ in sweep.grid]
  metrics = sorted({k for r in records for k in r["metrics"]}, key=metric_sort_key)
  results_path = os.path.join(workdir, "results.csv")
  with open(results_path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["run", "variant", *keys, "seed", "status", "step", *metrics, "error"])
    for r in records:
      w.writerow([r["run"], r["variant"], *r["point"], r["seed"], r["status"],
                  "" if r["step"] is None else r["step"],
                  *(_fmt(r["metrics"].get(m), 6) for m in metrics), r["error"]])
  summary_path = os.path.join(workdir, "summary.csv")
  with open(summary_path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["variant", *keys, "n", "failed", *(f"{m}{s}" for m in metrics
                                                    for s in ("_mean", "_std"))])
    for g in summary:
      row = [g["variant"], *g["point"], g["n"], g["failed"]]
      for m in metrics:
        row += [_fmt(g["mean"].get(m), 6), _fmt(g["std"].get(m), 6)]
      w.writerow(row)
  return results_path, summary_path


def markdown_table(sweep: sweep_lib.Sweep, summary: Sequence[dict], *,
                   metrics: Sequence[str] | None = None, prefix: str = "",
                   signed: bool = False) -> str:
  """The summary as Markdown: one row per variant x grid point, cells ``mean ± std``."""
  keys = [k for k, _ in sweep.grid]
  names = metrics or sorted({k for g in summary for k in g["mean"]
                             if re.fullmatch(r"recall@\d+(/head|/tail)?", k)},
                            key=metric_sort_key)
  head = ["variant", *keys, "n", *(prefix + _short(m) for m in names)]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for g in summary:
    cells = [g["variant"], *g["point"], str(g["n"]) + (f" ({g['failed']} failed)"
                                                       if g.get("failed") else "")]
    for m in names:
      mean, std = g["mean"].get(m), g["std"].get(m)
      cells.append("" if mean is None else
                   f"{mean:{'+' if signed else ''}.4f}" + ("" if std is None else f" ± {std:.4f}"))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _short(metric: str) -> str:
  return metric.replace("popularity/", "").replace("recall@", "R@")


def write_markdown(sweep: sweep_lib.Sweep, records: Sequence[dict], summary: Sequence[dict],
                   workdir: str, *, command: str = "", plots: Sequence[str] = (),
                   reference: str | None = None) -> str:
  n_ok = sum(r["status"] == "ok" for r in records)
  failed = [r for r in records if r["status"] == "failed"]
  missing = [r for r in records if r["status"] == "missing"]
  parts = ["# Sweep results", ""]
  if command:
    parts += ["```", command, "```", ""]
  parts += [f"{len(records)} runs: {n_ok} finished, {len(failed)} failed"
            + (f", {len(missing)} not run" if missing else "")
            + f". Variants: {', '.join(v.label for v in sweep.variants)}. "
            f"Cells: mean ± sample std over seeds (n = finished seeds; std omitted for n = 1); "
            "every metric of every run is in results.csv / summary.csv.",
            "", markdown_table(sweep, summary), ""]
  pop = sorted({k for g in summary for k in g["mean"]
                if re.fullmatch(r"popularity/recall@\d+(/head|/tail)?", k)}, key=metric_sort_key)
  if pop:  # it depends on the data only: one row per grid point
    first = [dict(g, variant="popularity") for g in summary
             if g["variant"] == sweep.variants[0].label]
    parts += ["The most-popular recommender on the same eval pairs (a reference):", "",
              markdown_table(sweep, first, metrics=pop), ""]
  reference = reference or sweep.variants[0].label
  diffs = paired(records, reference)
  ks = ks_of({k for g in summary for k in g["mean"]})
  if diffs and ks and len(sweep.seeds) > 1:
    k = _pick_k(ks)
    parts += [f"Paired differences to `{reference}` (same grid point and seed; on the embedded "
              "data a seed fixes the data set and the init): mean ± sample std over seeds.", "",
              markdown_table(sweep, diffs, metrics=[f"recall@{k}", f"recall@{k}/head",
                                                    f"recall@{k}/tail"], prefix="Δ", signed=True),
              ""]
  if plots:
    parts += ["Plots: " + ", ".join(f"[{os.path.basename(p)}]({os.path.basename(p)})"
                                    for p in plots), ""]
  if failed:
    parts += ["## Failed runs", ""]
    for r in failed:
      parts += [f"### {r['run']}", "", f"log: `runs/{r['run']}/log.txt`", "", "```",
                r["error"] or "(empty log)", "```", ""]
  path = os.path.join(workdir, "results.md")
  with open(path, "w") as f:
    f.write("\n".join(parts))
  return path


# ----------------------------------------------------------------------------------------------
# Plots (matplotlib is an optional extra: pip install -e '.[sweep]').


def _other_keys(sweep, exclude) -> list[str]:
  return [k for k, _ in sweep.grid if k not in exclude]


def _label(g: dict, keys: Sequence[str], with_variant: bool = True) -> str:
  parts = [g["variant"]] if with_variant else []
  parts += [f"{k.split('.')[-1]}={sweep_lib.format_value(g['values'][k])}" for k in keys]
  return " ".join(parts) or "-"


def _pick_k(ks: Sequence[int], want: int = 50) -> int:
  return want if want in ks else min(ks, key=lambda k: abs(k - want))


def plot(sweep: sweep_lib.Sweep, summary: Sequence[dict], workdir: str) -> list[str]:
  """Draws the sweep's figures into ``workdir``; returns their paths."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  groups = [g for g in summary if g["n"] > 0]
  ks = ks_of({k for g in groups for k in g["mean"]})
  if not groups or not ks:
    return []
  paths = [_plot_bars(plt, sweep, groups, ks, workdir)]
  grid_keys = [k for k, _ in sweep.grid]
  if ALPHA in grid_keys and TAU in grid_keys:
    paths.append(_plot_heatmap(plt, sweep, groups, _pick_k(ks), workdir))
  if FRACTION in grid_keys:
    paths.append(_plot_fraction(plt, sweep, groups, _pick_k(ks), workdir))
  return paths


def _plot_bars(plt, sweep, groups, ks, workdir) -> str:
  """Rows: K; columns: head, tail (per grid point when there are at most 3, each zoomed on its
  own range; otherwise the grid points are bar colours within one head and one tail panel)."""
  variants = list(dict.fromkeys(g["variant"] for g in groups))
  points = list(dict.fromkeys(g["point"] for g in groups))
  keys = [k for k, _ in sweep.grid]
  by = {(g["variant"], g["point"]): g for g in groups}
  point_name = lambda p: " ".join(f"{kk.split('.')[-1]}={v}" for kk, v in zip(keys, p))  # noqa
  split = 1 < len(points) <= 3
  columns = [(part, [p]) for p in points for part in ("head", "tail")] if split else \
      [(part, points) for part in ("head", "tail")]
  per_col = len(variants) * (1 if split else max(1, len(points)) ** 0.5)
  fig, axes = plt.subplots(len(ks), len(columns), squeeze=False,
                           figsize=(max(3.2, 0.55 * per_col + 1.5) * len(columns), 2.8 * len(ks)))
  for row, k in enumerate(ks):
    for col, (part, pts) in enumerate(columns):
      ax = axes[row][col]
      metric = f"recall@{k}/{part}"
      width = 0.8 / len(pts)
      shown = []
      for j, point in enumerate(pts):
        xs, ys, es = [], [], []
        for i, v in enumerate(variants):
          g = by.get((v, point))
          if g is None or metric not in g["mean"]:
            continue
          shown.append(g)
          xs.append(i - 0.4 + width * (j + 0.5))
          ys.append(g["mean"][metric])
          es.append(g["std"][metric] or 0.0)
        ax.bar(xs, ys, width, yerr=es, capsize=2,
               label=point_name(point) if len(pts) > 1 else None)
      ax.set_xticks(range(len(variants)))
      ax.set_xticklabels(variants, rotation=30, ha="right", fontsize=8)
      title = f"Recall@{k} ({part})" + (f"\n{point_name(pts[0])}" if split else "")
      ax.set_title(title, fontsize=9)
      if shown:  # zoom on the differences, which are small next to the values
        lows = [g["mean"][metric] - (g["std"][metric] or 0) for g in shown]
        highs = [g["mean"][metric] + (g["std"][metric] or 0) for g in shown]
        span = max(highs) - min(lows)
        ax.set_ylim(max(0.0, min(lows) - 0.5 * span - 1e-3), max(highs) + 0.3 * span + 1e-3)
      ax.grid(axis="y", alpha=0.3)
      if row == 0 and col == len(columns) - 1 and len(pts) > 1:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
  return _save(plt, fig, "Head / tail Recall@K per variant (mean ± std over seeds)",
               os.path.join(workdir, "recall_head_tail.png"))


def _plot_heatmap(plt, sweep, groups, k, workdir) -> str:
  alphas = list(dict.fromkeys(sweep_lib.format_value(g["values"][ALPHA]) for g in groups))
  taus = list(dict.fromkeys(sweep_lib.format_value(g["values"][TAU]) for g in groups))
  others = _other_keys(sweep, (ALPHA, TAU))
  panel_of = lambda g: (g["variant"],) + tuple(  # noqa: E731
      sweep_lib.format_value(g["values"][o]) for o in others)
  panels = list(dict.fromkeys(panel_of(g) for g in groups))
  metric = f"recall@{k}/tail"
  fig, axes = plt.subplots(1, len(panels), figsize=(1.3 * len(taus) * len(panels) + 2, 0.7 *
                                                    len(alphas) + 1.8), squeeze=False)
  for ax, panel in zip(axes[0], panels):
    cells = [[None] * len(taus) for _ in alphas]
    for g in groups:
      if panel_of(g) != panel or metric not in g["mean"]:
        continue
      i = alphas.index(sweep_lib.format_value(g["values"][ALPHA]))
      j = taus.index(sweep_lib.format_value(g["values"][TAU]))
      cells[i][j] = (g["mean"][metric], g["std"][metric])
    values = [[c[0] if c else float("nan") for c in row] for row in cells]
    im = ax.imshow(values, cmap="viridis", aspect="auto")
    for i, row in enumerate(cells):
      for j, c in enumerate(row):
        if c:
          ax.text(j, i, f"{c[0]:.3f}" + (f"\n±{c[1]:.3f}" if c[1] is not None else ""),
                  ha="center", va="center", fontsize=7, color="w")
    ax.set_xticks(range(len(taus)), taus)
    ax.set_yticks(range(len(alphas)), alphas)
    ax.set_xlabel("ssl.temperature (tau)")
    ax.set_ylabel("ssl.alpha")
    title = panel[0] + "".join(f" {o.split('.')[-1]}={v}" for o, v in zip(others, panel[1:]))
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
  return _save(plt, fig, f"Tail Recall@{k} (mean ± std over seeds)",
               os.path.join(workdir, "heatmap_alpha_tau.png"))


def _plot_fraction(plt, sweep, groups, k, workdir) -> str:
  others = _other_keys(sweep, (FRACTION,))
  lines: dict[str, list[dict]] = {}
  for g in groups:
    lines.setdefault(_label(g, others), []).append(g)
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
  for ax, part in zip(axes, ("", "/head", "/tail")):
    metric = f"recall@{k}{part}"
    for label, gs in lines.items():
      gs = sorted((g for g in gs if metric in g["mean"]), key=lambda g: g["values"][FRACTION])
      ax.errorbar([g["values"][FRACTION] for g in gs], [g["mean"][metric] for g in gs],
                  yerr=[g["std"][metric] or 0.0 for g in gs], marker="o", capsize=3,
                  label=label)
    ax.set_xscale("log")
    fractions = sorted({g["values"][FRACTION] for g in groups})
    ax.set_xticks(fractions, [sweep_lib.format_value(f) for f in fractions])
    ax.minorticks_off()
    ax.set_xlabel("data.train_fraction")
    ax.set_title(f"Recall@{k}{part or ' (all)'}", fontsize=9)
    ax.grid(alpha=0.3)
  axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
  return _save(plt, fig, "Recall against the fraction of D_train kept (mean ± std over seeds)",
               os.path.join(workdir, "recall_vs_train_fraction.png"))


def _save(plt, fig, title: str, path: str) -> str:
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=80, bbox_inches="tight")
  plt.close(fig)
  return path


def report(sweep: sweep_lib.Sweep, workdir: str, outcomes: dict | None = None, *,
           command: str = "", draw: bool = True, reference: str | None = None,
           out=None) -> dict[str, Any]:
  """Gathers, writes results.csv / summary.csv / results.md and (if possible) the plots.

  ``reference``: the variant label the paired-differences table compares to (default: the
  first variant)."""
  records = gather(sweep, workdir, outcomes)
  summary = summarize(records)
  results_csv, summary_csv = write_csv(sweep, records, summary, workdir)
  plots, note = [], ""
  if draw:
    try:
      plots = plot(sweep, summary, workdir)
    except ImportError:
      note = "matplotlib is not installed: no plots (pip install -e '.[sweep]')"
  md = write_markdown(sweep, records, summary, workdir, command=command, plots=plots,
                      reference=reference)
  if out is not None:
    print(f"results: {results_csv}, {summary_csv}, {md}"
          + (f", {len(plots)} plots" if plots else "") + (f"; {note}" if note else ""),
          file=out, flush=True)
  return {"records": records, "summary": summary, "plots": plots, "markdown": md}
