"""A sweep's figures, drawn into the sweep directory and linked from results.md:

    DIR/recall_head_tail.png          head / tail Recall@K per variant
    DIR/heatmap_alpha_tau.png         tail Recall@50 over ssl.alpha x ssl.temperature (when both
                                      are in the grid)
    DIR/recall_vs_train_fraction.png  recall against data.train_fraction (when it is in the grid)

Drawn from ``report.summarize``'s groups (mean +- sample std over seeds). matplotlib is an
optional extra (``pip install -e '.[sweep]'``): it is imported only when ``plot`` is called.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from sslrec.experiments import plan, report

ALPHA, TAU, FRACTION = "ssl.alpha", "ssl.temperature", "data.train_fraction"


def _other_keys(sweep, exclude) -> list[str]:
  return [k for k, _ in sweep.grid if k not in exclude]


def _label(g: dict, keys: Sequence[str], with_variant: bool = True) -> str:
  parts = [g["variant"]] if with_variant else []
  parts += [f"{k.split('.')[-1]}={plan.format_value(g['values'][k])}" for k in keys]
  return " ".join(parts) or "-"


def plot(sweep: plan.Sweep, summary: Sequence[dict], workdir: str) -> list[str]:
  """Draws the sweep's figures into ``workdir``; returns their paths. Raises ImportError
  without matplotlib."""
  # Imported here on purpose: matplotlib is an optional extra (pip install -e '.[sweep]'), so
  # this module, and the sweep without plots, must import without it.
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  groups = [g for g in summary if g["n"] > 0]
  ks = report.ks_of({k for g in groups for k in g["mean"]})
  if not groups or not ks:
    return []
  paths = [_plot_bars(plt, sweep, groups, ks, workdir)]
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
      if shown:  # zoom on the differences, which are small next to the values
        lows = [g["mean"][metric] - (g["std"][metric] or 0) for g in shown]
        highs = [g["mean"][metric] + (g["std"][metric] or 0) for g in shown]
        span = max(highs) - min(lows)
        ax.set_ylim(max(0.0, min(lows) - 0.5 * span - 1e-3), max(highs) + 0.3 * span + 1e-3)
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
    ax.set_title(f"Recall@{k}{part or ' (all)'}", fontsize=9)
    ax.grid(alpha=0.3)
  axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
  return _save(
    plt,
    fig,
    "Recall against the fraction of D_train kept (mean ± std over seeds)",
    os.path.join(workdir, "recall_vs_train_fraction.png"),
  )


def _save(plt, fig, title: str, path: str) -> str:
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=80, bbox_inches="tight")
  plt.close(fig)
  return path
