"""The test table of a finished sweep, with the classical references and paired intervals.

    python launch/summarize.py --workdir=SWEEP_DIR [--reference=baseline] [--k=50]

Reads each run's test line (``split == "test"``: the checkpoint selected on validation) from
``SWEEP_DIR/runs/*/eval.jsonl`` and writes ``SWEEP_DIR/test_summary.md``: per variant and grid
point, mean ± sample std over seeds of Recall@K overall / head / tail and NDCG@K; the references
(popularity, itemknn: the same for every seed, shown once per grid point); the ratio of the best
variant to popularity; paired differences to the reference variant (same grid point and seed, so
the same data and the same references) with a 95% t-interval (n - 1 degrees of freedom).
"""

from __future__ import annotations

import collections
import json
import os
import re

import numpy as np
from scipy import stats as scipy_stats

_SEED = re.compile(r"__seed=(\d+)$")


def read_runs(workdir: str) -> list[dict]:
  """``[{variant, point, seed, test}]`` of every run with a test line."""
  out = []
  runs = os.path.join(workdir, "runs")
  for name in sorted(os.listdir(runs)):
    path = os.path.join(runs, name, "eval.jsonl")
    if not os.path.exists(path):
      continue
    with open(path) as f:
      lines = [json.loads(line) for line in f if line.strip()]
    tests = [r for r in lines if r.get("split") == "test"]
    m = _SEED.search(name)
    if not tests or not m:
      continue
    stem = name[: m.start()]
    variant, _, point = stem.partition("__")
    out.append({"variant": variant, "point": point, "seed": int(m.group(1)), "test": tests[-1]})
  return out


def _mean_std(xs) -> str:
  xs = np.asarray(xs, float)
  if xs.size < 2:
    return f"{xs.mean():.4f}"
  return f"{xs.mean():.4f} ± {xs.std(ddof=1):.4f}"


def _interval(diffs) -> str:
  d = np.asarray(diffs, float)
  if d.size < 2:
    return f"{d.mean():+.4f} (n/a)"
  half = scipy_stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size)
  return f"{d.mean():+.4f} [{d.mean() - half:+.4f}, {d.mean() + half:+.4f}]"


def summarize(workdir: str, reference: str = "baseline", k: int = 50) -> str:
  runs = read_runs(workdir)
  if not runs:
    raise ValueError(f"{workdir}: no run with a test evaluation")
  keys = [f"recall@{k}", f"recall@{k}/head", f"recall@{k}/tail", f"ndcg@{k}"]
  heads = ["R@K", "R@K/head", "R@K/tail", "NDCG@K"]
  heads = [h.replace("K", str(k)) for h in heads]
  by = collections.defaultdict(dict)  # (point, variant) -> {seed: test}
  for r in runs:
    by[(r["point"], r["variant"])][r["seed"]] = r["test"]
  points = sorted({p for p, _ in by}, key=lambda p: (-len(p), p))
  variants = list(dict.fromkeys(r["variant"] for r in runs))
  lines = [
    f"Test split (checkpoint selected on validation), {len(runs)} runs; mean ± sample std "
    "over seeds.",
    "",
    "| grid point | recommender | n | " + " | ".join(heads) + " |",
    "|---|---|---|" + "---|" * len(heads),
  ]
  for p in points:
    first = None
    for v in variants:
      tests = by.get((p, v))
      if not tests:
        continue
      first = first or tests
      row = [_mean_std([t[key] for t in tests.values()]) for key in keys]
      lines.append(f"| {p or '-'} | {v} | {len(tests)} | " + " | ".join(row) + " |")
    for ref in ("popularity", "itemknn", "als"):
      t = next(iter(first.values()))
      if f"{ref}/recall@{k}" in t:
        row = [f"{t.get(f'{ref}/{key}', float('nan')):.4f}" for key in keys]
        lines.append(f"| {p or '-'} | *{ref}* | - | " + " | ".join(row) + " |")
  lines += [
    "",
    f"Paired differences to `{reference}` (same grid point and seed): mean and 95% t-interval.",
    "",
    "| grid point | variant | n | " + " | ".join(f"Δ{h}" for h in heads) + " |",
    "|---|---|---|" + "---|" * len(heads),
  ]
  for p in points:
    ref = by.get((p, reference), {})
    for v in variants:
      if v == reference or (p, v) not in by:
        continue
      seeds = sorted(set(by[(p, v)]) & set(ref))
      if not seeds:
        continue
      row = [_interval([by[(p, v)][s][key] - ref[s][key] for s in seeds]) for key in keys]
      lines.append(f"| {p or '-'} | {v} | {len(seeds)} | " + " | ".join(row) + " |")
  text = "\n".join(lines) + "\n"
  with open(os.path.join(workdir, "test_summary.md"), "w") as f:
    f.write(text)
  return text
