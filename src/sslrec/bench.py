"""Benchmarks (``launch/bench.py``): train-step and input-pipeline throughput, MI statistics time.

Every figure is the median of several timed repetitions after compilation; ratios are taken within
one run (this kind of machine is shared and noisy). Results are records that other tools can read:
  {"benchmark": "train_step", "variant": ..., "examples_per_sec": ..., "step_ms": ..., "repeats": ...}
  {"benchmark": "input_pipeline", "examples_per_sec": ..., "repeats": ...}
  {"benchmark": "mi_stats", "items": ..., "seconds": ..., "repeats": ...}
"""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np

VARIANTS = {
    # name: config overrides
    "baseline": {"ssl.alpha": 0.0},
    "spread_out": {"ssl.alpha": 0.0, "reg.spread_out_weight": 1.0},
    "rfm": {"ssl.masking": "rfm"},
    "cfm": {"ssl.masking": "cfm"},
}


def _apply(config, overrides: dict):
  for path, value in overrides.items():
    node = config
    *parents, leaf = path.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _median_rate(fn, work: float, repeats: int) -> tuple[float, float]:
  """(median work/sec, median seconds) over ``repeats`` calls of ``fn``."""
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  med = statistics.median(times)
  return work / med, med


def train_step_throughput(base_config, variant: str, *, steps: int, repeats: int) -> dict:
  """Examples/sec of the compiled train step alone (device-resident batches, cycled)."""
  from sslrec import train
  config = _apply(base_config.copy_and_resolve_references(), VARIANTS[variant])
  run = train.Run(config)
  batches = [run.next_batches() for _ in range(4)]
  batches = [(p, i if i is not None else {"item": p["item"], "item_id": p["item_id"]})
             for p, i in batches]
  state = run.state

  def go(n):
    nonlocal state
    m = None
    for s in range(n):
      p, i = batches[s % len(batches)]
      state, m = run.step_fn(state, p, i, run.step_rng)
    jax.block_until_ready(m)

  go(3)  # compile + warm up
  rate, sec = _median_rate(lambda: go(steps), steps * config.train.batch_size, repeats)
  return {"benchmark": "train_step", "variant": variant, "update": "dense",
          "batch_size": config.train.batch_size, "ssl_batch_size": config.ssl.batch_size,
          "table_rows": int(run.dataset.num_items), "examples_per_sec": rate,
          "step_ms": 1e3 * sec / steps, "repeats": repeats}


def input_pipeline_throughput(base_config, *, batches: int, repeats: int) -> dict:
  """Examples/sec of both grain streams together, to host numpy batches (no device transfer)."""
  from sslrec import train
  config = base_config.copy_and_resolve_references()
  run = train.Run(config)

  def go():
    for _ in range(batches):
      next(run.pair_iter)
      if run.item_iter is not None:
        next(run.item_iter)

  go()
  rate, _ = _median_rate(go, batches * config.train.batch_size, repeats)
  return {"benchmark": "input_pipeline", "examples_per_sec": rate,
          "batch_size": config.train.batch_size, "repeats": repeats}


def mi_stats_time(num_items: int, *, repeats: int, seed: int = 0) -> dict:
  """Seconds to compute the item-feature MI matrix over ``num_items`` generated items."""
  from sslrec.data import stats, synthetic
  d = synthetic.generate(seed, num_items=num_items, num_queries=1000, num_train_pairs=1000,
                         num_eval_pairs=100)
  _, sec = _median_rate(lambda: stats.mutual_information(d.items, d.item_spec), 1.0, repeats)
  return {"benchmark": "mi_stats", "items": num_items, "seconds": sec, "repeats": repeats}


def markdown(records: list[dict]) -> str:
  lines = []
  steps = [r for r in records if r["benchmark"] == "train_step"]
  if steps:
    base = next((r for r in steps if r["variant"] == "baseline"), None)
    lines += ["| train step | examples/sec | step ms | vs baseline step time |", "|---|---|---|---|"]
    for r in steps:
      ratio = f"{r['step_ms'] / base['step_ms']:.2f}x" if base else "-"
      lines.append(f"| {r['variant']} | {r['examples_per_sec']:,.0f} | {r['step_ms']:.2f} | {ratio} |")
  for r in records:
    if r["benchmark"] == "input_pipeline":
      lines.append(f"\ninput pipeline (both streams): {r['examples_per_sec']:,.0f} examples/sec")
    if r["benchmark"] == "mi_stats":
      lines.append(f"MI statistics over {r['items']:,} items: {r['seconds']:.2f} s")
  return "\n".join(lines)
