"""A sweep's figures (150 dpi), drawn into the sweep directory and linked from results.md:

    DIR/recall_head_tail.png          head / tail Recall@K per variant
    DIR/paired_differences.png        each variant minus the reference variant, paired by seed
                                      and grid point, with 95% t intervals (2 seeds or more)
    DIR/learning_curves.png           train loss and validation Recall@K against the step, per
                                      variant (mean over seeds)
    DIR/recall_by_decile.png          test Recall@K by item popularity decile, per variant
    DIR/heatmap_alpha_tau.png         tail Recall@50 over ssl.alpha x ssl.temperature (when both
                                      are in the grid)
    DIR/recall_vs_train_fraction.png  recall against data.train_fraction (when it is in the grid)

Drawn from ``report.summarize``'s groups (mean +- sample std over seeds), the per-run records
(paired differences) and the runs' metrics.jsonl / eval.jsonl (learning curves). matplotlib is a
dependency; it is imported only when ``plot`` is called.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from sslrec.experiments import plan, report
from sslrec.run import workdir as workdir_lib

DPI = 150
MAX_LINES = 12  # learning curves / decile lines drawn (the first ones, in sweep order)

ALPHA, TAU, FRACTION = "ssl.alpha", "ssl.temperature", "data.train_fraction"


def _other_keys(sweep, exclude) -> list[str]:
  return [k for k, _ in sweep.grid if k not in exclude]


def _label(g: dict, keys: Sequence[str], with_variant: bool = True) -> str:
  parts = [g["variant"]] if with_variant else []
  parts += [f"{k.split('.')[-1]}={plan.format_value(g['values'][k])}" for k in keys]
  return " ".join(parts) or "-"


def plot(
  sweep: plan.Sweep,
  summary: Sequence[dict],
  workdir: str,
  *,
  records: Sequence[dict] | None = None,
  reference: str | None = None,
) -> list[str]:
  """Draws the sweep's figures into ``workdir``; returns their paths. Raises ImportError
  without matplotlib."""
  # Imported here: only the process that draws pays for matplotlib's import.
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  groups = [g for g in summary if g["n"] > 0]
  ks = report.ks_of({k for g in groups for k in g["mean"]})
  if not groups or not ks:
    return []
  paths = [_plot_bars(plt, sweep, groups, ks, workdir)]
  reference = reference or sweep.variants[0].label
  if records is not None and len(sweep.variants) > 1:
    p = _plot_paired(plt, records, reference, report.pick_k(ks), workdir)
    if p:
      paths.append(p)
  p = _plot_curves(plt, sweep, workdir, report.pick_k(ks))
  if p:
    paths.append(p)
  p = _plot_deciles(plt, groups, workdir)
  if p:
    paths.append(p)
  grid_keys = [k for k, _ in sweep.grid]
  if ALPHA in grid_keys and TAU in grid_keys:
    paths.append(_plot_heatmap(plt, sweep, groups, report.pick_k(ks), workdir))
  if FRACTION in grid_keys:
    paths.append(_plot_fraction(plt, sweep, groups, report.pick_k(ks), workdir))
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
  columns = (
    [(part, [p]) for p in points for part in ("head", "tail")]
    if split
    else [(part, points) for part in ("head", "tail")]
  )
  per_col = len(variants) * (1 if split else max(1, len(points)) ** 0.5)
  fig, axes = plt.subplots(
    len(ks),
    len(columns),
    squeeze=False,
    figsize=(max(3.2, 0.55 * per_col + 1.5) * len(columns), 2.8 * len(ks)),
  )
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
        ax.bar(xs, ys, width, yerr=es, capsize=2, label=point_name(point) if len(pts) > 1 else None)
      ax.set_xticks(range(len(variants)))
      ax.set_xticklabels(variants, rotation=30, ha="right", fontsize=8)
      title = f"Recall@{k} ({part})" + (f"\n{point_name(pts[0])}" if split else "")
      ax.set_title(title, fontsize=9)
      if shown:  # from 0: the differences between variants are in paired_differences.png
        highs = [g["mean"][metric] + (g["std"][metric] or 0) for g in shown]
        ax.set_ylim(0.0, max(highs) * 1.15 + 1e-3)
      ax.set_ylabel(f"Recall@{k} ({part})")
      if row == len(ks) - 1:
        ax.set_xlabel("variant")
      ax.grid(axis="y", alpha=0.3)
      if row == 0 and col == len(columns) - 1 and len(pts) > 1:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
  return _save(
    plt,
    fig,
    "Head / tail Recall@K per variant (mean ± std over seeds)",
    os.path.join(workdir, "recall_head_tail.png"),
  )


def _plot_heatmap(plt, sweep, groups, k, workdir) -> str:
  alphas = list(dict.fromkeys(plan.format_value(g["values"][ALPHA]) for g in groups))
  taus = list(dict.fromkeys(plan.format_value(g["values"][TAU]) for g in groups))
  others = _other_keys(sweep, (ALPHA, TAU))
  panel_of = lambda g: (
    (g["variant"],)
    + tuple(  # noqa: E731
      plan.format_value(g["values"][o]) for o in others
    )
  )
  panels = list(dict.fromkeys(panel_of(g) for g in groups))
  metric = f"recall@{k}/tail"
  fig, axes = plt.subplots(
    1,
    len(panels),
    figsize=(1.3 * len(taus) * len(panels) + 2, 0.7 * len(alphas) + 1.8),
    squeeze=False,
  )
  for ax, panel in zip(axes[0], panels):
    cells = [[None] * len(taus) for _ in alphas]
    for g in groups:
      if panel_of(g) != panel or metric not in g["mean"]:
        continue
      i = alphas.index(plan.format_value(g["values"][ALPHA]))
      j = taus.index(plan.format_value(g["values"][TAU]))
      cells[i][j] = (g["mean"][metric], g["std"][metric])
    values = [[c[0] if c else float("nan") for c in row] for row in cells]
    im = ax.imshow(values, cmap="viridis", aspect="auto")
    for i, row in enumerate(cells):
      for j, c in enumerate(row):
        if c:
          ax.text(
            j,
            i,
            f"{c[0]:.3f}" + (f"\n±{c[1]:.3f}" if c[1] is not None else ""),
            ha="center",
            va="center",
            fontsize=7,
            color="w",
          )
    ax.set_xticks(range(len(taus)), taus)
    ax.set_yticks(range(len(alphas)), alphas)
    ax.set_xlabel("ssl.temperature (tau)")
    ax.set_ylabel("ssl.alpha")
    title = panel[0] + "".join(f" {o.split('.')[-1]}={v}" for o, v in zip(others, panel[1:]))
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
  return _save(
    plt,
    fig,
    f"Tail Recall@{k} (mean ± std over seeds)",
    os.path.join(workdir, "heatmap_alpha_tau.png"),
  )


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
      ax.errorbar(
        [g["values"][FRACTION] for g in gs],
        [g["mean"][metric] for g in gs],
        yerr=[g["std"][metric] or 0.0 for g in gs],
        marker="o",
        capsize=3,
        label=label,
      )
    ax.set_xscale("log")
    fractions = sorted({g["values"][FRACTION] for g in groups})
    ax.set_xticks(fractions, [plan.format_value(f) for f in fractions])
    ax.minorticks_off()
    ax.set_xlabel("data.train_fraction")
    ax.set_ylabel(f"Recall@{k}{part or ' (all)'}")
    ax.set_title(f"Recall@{k}{part or ' (all)'}", fontsize=9)
    ax.grid(alpha=0.3)
  axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
  return _save(
    plt,
    fig,
    "Recall against the fraction of D_train kept (mean ± std over seeds)",
    os.path.join(workdir, "recall_vs_train_fraction.png"),
  )


def _plot_paired(plt, records, reference, k, workdir) -> str | None:
  """A forest plot: per variant and grid point, the mean paired difference to ``reference``
  (same seed and grid point) of Recall@k overall / head / tail, with its 95% t interval."""
  ok = {(r["variant"], r["point"], r["seed"]): r for r in records if r["status"] == "ok"}
  rows: dict[tuple, dict[str, list[float]]] = {}
  for (variant, point, seed), r in ok.items():
    ref = ok.get((reference, point, seed))
    if variant == reference or ref is None:
      continue
    for part in ("", "/head", "/tail"):
      m = f"recall@{k}{part}"
      if m in r["metrics"] and m in ref["metrics"]:
        rows.setdefault((variant, point), {}).setdefault(part, []).append(
          r["metrics"][m] - ref["metrics"][m]
        )
  if not rows:
    return None
  values = {(r["variant"], r["point"]): r["values"] for r in ok.values()}
  labels = [
    " ".join([v, *(f"{k.split('.')[-1]}={plan.format_value(x)}" for k, x in values[v, p].items())])
    for v, p in rows
  ]
  fig, axes = plt.subplots(1, 3, figsize=(12, 0.45 * len(rows) + 1.8), sharey=True, squeeze=False)
  for ax, part in zip(axes[0], ("", "/head", "/tail")):
    for y, diffs in enumerate(rows.values()):
      xs = diffs.get(part, [])
      if not xs:
        continue
      mean, interval = report.t_interval(xs)
      if interval is None:
        ax.plot([mean], [y], "o", color="C1")  # one seed: no interval
      else:
        ax.errorbar(
          [mean], [y], xerr=[[mean - interval[0]], [interval[1] - mean]], fmt="o", capsize=3
        )
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel(f"Recall@{k}{part or ' (all)'} minus {reference}")
    ax.grid(axis="x", alpha=0.3)
  axes[0][0].set_ylabel("variant, grid point")
  axes[0][0].invert_yaxis()
  return _save(
    plt,
    fig,
    f"Paired differences to {reference} (mean and 95% t interval over seeds; dot alone: 1 seed)",
    os.path.join(workdir, "paired_differences.png"),
  )


def _curve_label(run) -> str:
  return " ".join([run.variant.label, *(f"{k.split('.')[-1]}={v}" for k, v in run.point)])


def _plot_curves(plt, sweep, workdir, k) -> str | None:
  """Train loss and validation Recall@k against the step, one line per variant x grid point
  (mean over its seeds at the steps they share)."""
  lines: dict[str, dict[str, dict[int, list[float]]]] = {}
  for run in sweep.runs:
    if run.same_as is not None:
      continue
    label = _curve_label(run)
    if label not in lines and len(lines) >= MAX_LINES:
      continue
    rd = plan.run_dir(workdir, run)
    d = lines.setdefault(label, {"loss": {}, "valid": {}})
    for r in workdir_lib.read_jsonl(os.path.join(rd, "metrics.jsonl")):
      if isinstance(r.get("loss"), (int, float)):
        d["loss"].setdefault(int(r["step"]), []).append(r["loss"])
    for r in workdir_lib.read_jsonl(os.path.join(rd, "eval.jsonl")):
      v = r.get(f"recall@{k}")
      if r.get("split") == "valid" and "popularity_prior" not in r and isinstance(v, float):
        d["valid"].setdefault(int(r["step"]), []).append(v)
  if not any(d["loss"] or d["valid"] for d in lines.values()):
    return None
  fig, axes = plt.subplots(1, 2, figsize=(12, 4))
  for label, d in lines.items():
    for ax, key in zip(axes, ("loss", "valid")):
      steps = sorted(d[key])
      if steps:
        ys = [sum(d[key][s]) / len(d[key][s]) for s in steps]
        ax.plot(steps, ys, marker="o" if len(steps) < 20 else None, ms=3, label=label)
  axes[0].set_ylabel("train loss")
  axes[1].set_ylabel(f"validation Recall@{k}")
  for ax in axes:
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
  return _save(
    plt,
    fig,
    "Learning curves (mean over seeds)",
    os.path.join(workdir, "learning_curves.png"),
  )


def _plot_deciles(plt, groups, workdir) -> str | None:
  """Test Recall@K by popularity decile of the target item (0 = the most popular tenth)."""
  pat = re.compile(r"recall@(\d+)/decile_(\d+)")
  matches = [pat.fullmatch(name) for g in groups for name in g["mean"]]
  found = [(int(m.group(1)), int(m.group(2))) for m in matches if m]
  if not found:
    return None
  k = max(kk for kk, _ in found)
  deciles = sorted({d for kk, d in found if kk == k})
  fig, ax = plt.subplots(figsize=(8, 4))
  for g in groups[:MAX_LINES]:
    ys = [g["mean"].get(f"recall@{k}/decile_{d}") for d in deciles]
    if any(y is not None for y in ys):
      ax.plot(
        deciles,
        [float("nan") if y is None else y for y in ys],
        marker="o",
        ms=3,
        label=" ".join([g["variant"], *g["point"]]),
      )
  ax.set_xticks(deciles)
  ax.set_xlabel("popularity decile of the target item (0 = most popular)")
  ax.set_ylabel(f"test Recall@{k}")
  ax.set_ylim(bottom=0.0)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
  return _save(
    plt,
    fig,
    f"Recall@{k} by item popularity decile (mean over seeds)",
    os.path.join(workdir, "recall_by_decile.png"),
  )


def _save(plt, fig, title: str, path: str) -> str:
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=DPI, bbox_inches="tight")
  plt.close(fig)
  return path
