"""Benchmarks (``launch/bench.py`` calls ``run_command``): train step, input pipeline, MI
statistics, evaluation.

Every figure is the median of several timed repetitions after compilation; ratios are taken within
one run (this kind of machine is shared and noisy). Each train-step configuration runs in its own
subprocess so that its peak RSS is its own. Records (a list, written as JSON by ``--out``):

  {"benchmark": "train_step", "variant": a name of ``VARIANTS``, "update": "dense" | "sparse",
   "table_rows": ..., "examples_per_sec": ..., "step_ms": ..., "peak_rss_bytes": ...,
   "state_bytes": ..., "repeats": ...}
  {"benchmark": "input_pipeline", "examples_per_sec": ..., "repeats": ...}
  {"benchmark": "mi_stats", "items": ..., "seconds": ..., "repeats": ...}
  {"benchmark": "eval", "items": ..., "queries_per_sec": ..., "repeats": ...}
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np

from sslrec import evaluate, train
from sslrec.data import sources, stats, synthetic, table

# src/sslrec/experiments/bench.py -> the repository root (launch/bench.py runs each train step).
_REPO = os.path.dirname(
  os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
)

VARIANTS = {
  # name: config overrides
  "baseline": {"ssl.alpha": 0.0},
  "spread_out": {"ssl.alpha": 0.0, "reg.spread_out_weight": 1.0},
  "rfm": {"ssl.masking": "rfm"},
  "cfm": {"ssl.masking": "cfm"},
  # the negatives' options, each on the baseline (issue 15)
  "streaming_logq": {"ssl.alpha": 0.0, "loss.logq_source": "streaming"},
  "mixed_negatives": {"ssl.alpha": 0.0, "loss.mixed_negatives": True},
  "corrected_logq": {"ssl.alpha": 0.0, "loss.logq_mode": "corrected"},
}


def apply_overrides(config, overrides: dict):
  for path, value in overrides.items():
    node = config
    *parents, leaf = path.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _median_seconds(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def with_item_table_rows(dataset, rows: int, seed: int = 0):
  """The dataset with its ``item_id`` table grown to ``rows`` rows: the catalogue's ids are
  spread over ``[0, rows)`` by a seeded injective map (a large id space, as in production)."""
  spec = dataset.item_spec
  if rows < dataset.num_items:
    raise ValueError(f"table_rows={rows} < catalogue size {dataset.num_items}")
  f = spec["item_id"]
  new_f = dataclasses.replace(f, vocab_size=rows)
  new_spec = dataclasses.replace(
    spec, features=tuple(new_f if x.name == "item_id" else x for x in spec.features)
  )
  ids = np.random.default_rng(seed).choice(rows, size=dataset.num_items, replace=False)
  items = dict(dataset.items, item_id=ids.astype(np.int32))
  return dataclasses.replace(dataset, item_spec=new_spec, items=items)


def train_step_record(
  base_config, variant: str, update: str, table_rows: int, *, steps: int, repeats: int
) -> dict:
  """Examples/sec of the compiled train step alone (device-resident batches, cycled)."""
  config = apply_overrides(base_config.copy_and_resolve_references(), VARIANTS[variant])
  config.optimizer.embedding_update = update
  config.data.num_items = min(config.data.num_items, 10_000)  # table_rows >= catalogue
  dataset = with_item_table_rows(sources.load(config).validate(), table_rows, config.seed)
  run = train.Run(config, dataset=dataset)
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(run.state))
  batches = [run.next_batches() for _ in range(4)]
  batches = [
    (p, i if i is not None else {"item": p["item"], "item_id": p["item_id"]}) for p, i in batches
  ]
  state = run.state

  def go(n):
    nonlocal state
    m = None
    for s in range(n):
      p, i = batches[s % len(batches)]
      state, m = run.step_fn(state, p, i, run.step_rng)
    jax.block_until_ready(m)

  go(2)  # compile + warm up
  sec = _median_seconds(lambda: go(steps), repeats)
  return {
    "benchmark": "train_step",
    "variant": variant,
    "update": update,
    "table_rows": table_rows,
    "embed_dim": config.data.embed_dim,
    "batch_size": config.train.batch_size,
    "ssl_batch_size": config.ssl.batch_size,
    "examples_per_sec": steps * config.train.batch_size / sec,
    "step_ms": 1e3 * sec / steps,
    "peak_rss_bytes": peak_rss_bytes(),
    "state_bytes": int(state_bytes),
    "repeats": repeats,
  }


def train_step_subprocess(
  config_path: str,
  variant: str,
  update: str,
  table_rows: int,
  *,
  steps: int,
  repeats: int,
  embed_dim: int,
) -> dict:
  """``train_step_record`` in a fresh process (own peak RSS); an error becomes a record too."""
  launch = os.path.join(_REPO, "launch", "bench.py")
  spec = json.dumps(
    {
      "variant": variant,
      "update": update,
      "table_rows": table_rows,
      "steps": steps,
      "repeats": repeats,
    }
  )
  cmd = [
    sys.executable,
    launch,
    f"--config={config_path}",
    f"--one={spec}",
    f"--config.data.embed_dim={embed_dim}",
  ]
  p = subprocess.run(cmd, capture_output=True, text=True)
  for line in p.stdout.splitlines()[::-1]:
    if line.startswith("{"):
      return json.loads(line)
  return {
    "benchmark": "train_step",
    "variant": variant,
    "update": update,
    "table_rows": table_rows,
    "error": (p.stderr or p.stdout).strip().splitlines()[-1:],
  }


def input_pipeline_record(base_config, *, batches: int, repeats: int) -> dict:
  """Examples/sec (pairs) of both grain streams together, to host numpy batches."""
  run = train.Run(base_config.copy_and_resolve_references())

  def go():
    for _ in range(batches):
      next(run.pair_iter)
      if run.item_iter is not None:
        next(run.item_iter)

  go()
  sec = _median_seconds(go, repeats)
  return {
    "benchmark": "input_pipeline",
    "examples_per_sec": batches * run.config.train.batch_size / sec,
    "batch_size": run.config.train.batch_size,
    "repeats": repeats,
  }


def mi_stats_record(num_items: int, *, repeats: int, seed: int = 0) -> dict:
  """Seconds to compute the item-feature MI matrix over ``num_items`` generated items."""
  d = synthetic.generate(
    seed, num_items=num_items, num_queries=1000, num_train_pairs=1000, num_eval_pairs=100
  )
  sec = _median_seconds(lambda: stats.mutual_information(d.items, d.item_spec), repeats)
  return {"benchmark": "mi_stats", "items": num_items, "seconds": sec, "repeats": repeats}


def eval_record(base_config, *, num_items: int, num_queries: int, repeats: int) -> dict:
  """Queries/sec of full-corpus exact retrieval (query tower + sharded top-100) against
  ``num_items`` item embeddings."""
  run = train.Run(base_config.copy_and_resolve_references())
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(num_items, run.config.model.output_dim)).astype(np.float32)
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  queries = table.take(run.dataset.queries, np.arange(num_queries) % run.dataset.num_queries)

  def go():
    evaluate.retrieve(
      run.state.params,
      run.model,
      queries,
      num_queries,
      emb,
      run.mesh,
      k=100,
      batch_size=run.config.eval.batch_size,
    )

  go()
  sec = _median_seconds(go, repeats)
  return {
    "benchmark": "eval",
    "items": num_items,
    "queries": num_queries,
    "queries_per_sec": num_queries / sec,
    "repeats": repeats,
  }


def markdown(records: list[dict]) -> str:
  lines = []
  steps = [r for r in records if r["benchmark"] == "train_step"]
  if steps:
    base = {
      (r["update"], r["table_rows"]): r
      for r in steps
      if r.get("variant") == "baseline" and "error" not in r
    }
    small = {}
    for r in steps:
      if "error" not in r:
        key = (r["variant"], r["update"])
        if key not in small or r["table_rows"] < small[key]["table_rows"]:
          small[key] = r
    lines += [
      "| variant | update | table rows | examples/sec | step ms | vs baseline | "
      "vs smallest table | peak RSS GiB | state GiB |",
      "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in steps:
      if "error" in r:
        lines.append(
          f"| {r['variant']} | {r['update']} | {r['table_rows']:,} | error: "
          f"{' '.join(r['error'])} | | | | | |"
        )
        continue
      b = base.get((r["update"], r["table_rows"]))
      vs_base = f"{r['step_ms'] / b['step_ms']:.2f}x" if b else "-"
      s = small[(r["variant"], r["update"])]
      lines.append(
        f"| {r['variant']} | {r['update']} | {r['table_rows']:,} | {r['examples_per_sec']:,.0f} | "
        f"{r['step_ms']:.2f} | {vs_base} | {r['step_ms'] / s['step_ms']:.2f}x | "
        f"{r['peak_rss_bytes'] / 2**30:.2f} | {r['state_bytes'] / 2**30:.2f} |"
      )
  for r in records:
    if r["benchmark"] == "input_pipeline":
      lines.append(f"\ninput pipeline (both streams): {r['examples_per_sec']:,.0f} examples/sec")
    if r["benchmark"] == "mi_stats":
      lines.append(f"MI statistics over {r['items']:,} items: {r['seconds']:.2f} s")
    if r["benchmark"] == "eval":
      lines.append(
        f"evaluation against {r['items']:,} items: {r['queries_per_sec']:,.0f} queries/sec"
      )
  return "\n".join(lines)


def run_command(
  config,
  *,
  config_path: str,
  quick: bool = False,
  variants: Sequence[str] | None = None,
  updates: Sequence[str] = ("dense", "sparse"),
  table_rows: Sequence[str] | None = None,
  out_path: str | None = None,
  one: str | None = None,
) -> list[dict]:
  """The benchmark command (``launch/bench.py`` parses the flags and calls this).

  Measures every train-step configuration (each in its own subprocess), the input pipeline, the
  MI statistics and evaluation; prints each train-step record as a JSON line, then the markdown
  table; writes all records as JSON to ``out_path`` if given, and returns them.

  Args:
    config: the base config (``--config``, overrides applied).
    config_path: its file, passed on to the train-step subprocesses.
    quick: a subset (about a minute or two).
    variants: train-step variants (default by mode).
    updates: embedding update paths.
    table_rows: item-id table sizes, e.g. ``'1e6'`` (default by mode).
    out_path: write the records as JSON here.
    one: internal (a train-step subprocess): measure only this train-step config (JSON) and
      print its record as one JSON line.
  """
  if one:  # one train-step measurement in this process (own peak RSS)
    spec = json.loads(one)
    record = train_step_record(
      config,
      spec["variant"],
      spec["update"],
      spec["table_rows"],
      steps=spec["steps"],
      repeats=spec["repeats"],
    )
    print(json.dumps(record), flush=True)
    return [record]
  variants = variants or (["baseline", "cfm"] if quick else ["baseline", "rfm", "cfm"])
  rows = [
    int(float(r))
    for r in (table_rows or (["1e4", "1e6"] if quick else ["1e4", "1e5", "1e6", "1e7"]))
  ]
  steps, repeats = (10, 3) if quick else (20, 5)
  records = []
  for n in rows:
    for update in updates:
      for v in variants:
        r = train_step_subprocess(
          config_path, v, update, n, steps=steps, repeats=repeats, embed_dim=64
        )
        records.append(r)
        print(json.dumps(r), flush=True)
  records.append(input_pipeline_record(config, batches=50, repeats=repeats))
  for n in (10**5,) if quick else (10**5, 10**6):
    records.append(mi_stats_record(n, repeats=1 if quick else 3))
  records.append(
    eval_record(config, num_items=10**6, num_queries=1024 if quick else 4096, repeats=repeats)
  )
  print(markdown(records))
  if out_path:
    with open(out_path, "w") as f:
      json.dump(records, f, indent=1)
  return records
