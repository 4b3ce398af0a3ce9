"""Benchmarks (``launch/bench.py`` calls ``run_command``): train step, input pipeline, MI
statistics, evaluation.

Every figure is the median of several timed repetitions after compilation; ratios are taken within
one run (this kind of machine is shared and noisy). Each train-step configuration runs in its own
subprocess so that its peak RSS is its own. Records (a list, written as JSON by ``--out``):

  {"benchmark": "train_step", "variant": a name of ``VARIANTS``, "update": "dense" | "sparse",
   "table_rows": ..., "examples_per_sec": ..., "step_ms": ..., "peak_rss_bytes": ...,
   "state_bytes": ..., "repeats": ..., "loop_step_ms": the same step fed as the training loop
   feeds it (grain, one packed transfer, ``data.device_prefetch`` thread), "loop_vs_resident":
   their ratio, "inline_loop_step_ms": fed on the training thread without the prefetch thread}
  {"benchmark": "input_pipeline", "examples_per_sec": ..., "repeats": ...}
  {"benchmark": "mi_stats", "items": ..., "seconds": ..., "repeats": ...}
  {"benchmark": "eval", "items": ..., "queries_per_sec": ..., "scoring_flops_per_sec": the
   blocked score + running top-k kernel alone, "matmul_peak_flops_per_sec": a 2048^3 float32
   matmul, "fraction_of_matmul_peak": their ratio, "repeats": ...}
  {"benchmark": "collectives", "part": "embeddings" | "step", "devices": n,
   "per_device_batch": b, "bytes_per_device": x, "collectives": count,
   "overflow_bytes_per_device": ..., "variant": ...,
   "update": ..., "table_rows": ...}

Every ``--config.*`` override of the command reaches every measurement, the train-step
subprocesses included (``config_args``); the catalogue (``data.num_items``), the schema's widths
(``data.embed_dim``, ``model.*_hidden``, ``model.output_dim``) and the batch sizes are such
overrides, so the bench can be matched to another implementation.

``collectives``: the communication of the compiled train step, read from its optimised HLO
(``collective_bytes``) on ``n`` fake CPU devices at a fixed per-device batch: every all-reduce /
all-gather / reduce-scatter / all-to-all / collective-permute, each counted by the larger of its
result and its operands (per device: the HLO is the per-device SPMD program), once per
occurrence in the program. ``part='embeddings'``: the collectives of the sparse embedding path
(ops under the ``embeddings`` named scope, ``sparse.Plan``); ``'step'``: all of them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np

from sslrec import evaluate, parallel, train
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


def variant_run(base_config, variant: str, update: str, table_rows: int, devices=None):
  config = apply_overrides(base_config.copy_and_resolve_references(), VARIANTS[variant])
  config.optimizer.embedding_update = update
  dataset = with_item_table_rows(sources.load(config).validate(), table_rows, config.seed)
  return train.Run(config, dataset=dataset, devices=devices)


def device_batches(run, n: int) -> list:
  batches = [run.next_batches() for _ in range(n)]
  return [
    (p, i if i is not None else {"item": p["item"], "item_id": p["item_id"]}) for p, i in batches
  ]


def train_step_record(
  base_config,
  variant: str,
  update: str,
  table_rows: int,
  *,
  steps: int,
  repeats: int,
  profile_dir: str | None = None,
) -> dict:
  """Examples/sec of the compiled train step alone: ``steps`` distinct device-resident batches
  (drawn from the run's streams before timing, so no batch repeats within a timed repetition).
  ``profile_dir``: afterwards, ``steps`` more steps under ``jax.profiler.trace`` there."""
  run = variant_run(base_config, variant, update, table_rows)
  config = run.config
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(run.state))
  batches = device_batches(run, steps)
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

  def loop(n):  # the training loop's path: grain, packed transfer, device prefetch thread
    m = None
    for _ in range(n):
      m = run.step()
    jax.block_until_ready(m)

  def inline(n):  # the same without the thread: the batches sent on the training thread
    nonlocal state
    m = None
    for _ in range(n):
      p, i = run.next_batches()
      if i is None:
        i = {"item": p["item"], "item_id": p["item_id"]}
      state, m = run.step_fn(state, p, i, run.step_rng)
    jax.block_until_ready(m)

  run.state = state  # the resident loop donated the run's first state
  loop(2)
  loop_sec = _median_seconds(lambda: loop(steps), repeats)
  run.close_input()
  state = run.state
  inline_sec = _median_seconds(lambda: inline(steps), repeats)
  if profile_dir:
    os.makedirs(profile_dir, exist_ok=True)
    with jax.profiler.trace(profile_dir):
      go(steps)
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
    "loop_step_ms": 1e3 * loop_sec / steps,
    "loop_vs_resident": loop_sec / sec,
    "inline_loop_step_ms": 1e3 * inline_sec / steps,
    "peak_rss_bytes": peak_rss_bytes(),
    "state_bytes": int(state_bytes),
    "repeats": repeats,
  }


def config_args(argv: Sequence[str]) -> list[str]:
  """The ``--config.*`` overrides of a command line (``--config.a.b=v`` or ``--config.a.b v``),
  to pass on to a subprocess unchanged."""
  out, argv = [], list(argv)
  for i, a in enumerate(argv):
    if a.startswith("--config."):
      out.append(a if "=" in a or i + 1 >= len(argv) else f"{a}={argv[i + 1]}")
  return out


def subprocess_records(
  config_path: str,
  spec: dict,
  overrides: Sequence[str] = (),
  *,
  devices: int | None = None,
) -> list[dict]:
  """``launch/bench.py --one=spec`` in a fresh process (own peak RSS; ``devices``: that many fake
  CPU devices) with the command's ``--config.*`` ``overrides``; returns the JSON records it prints.
  A failure becomes one record with ``error`` (its last stderr line)."""
  launch = os.path.join(_REPO, "launch", "bench.py")
  cmd = [sys.executable, launch, f"--config={config_path}", f"--one={json.dumps(spec)}"]
  env = dict(os.environ)
  if devices is not None:
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env.setdefault("JAX_PLATFORMS", "cpu")
  p = subprocess.run(cmd + list(overrides), capture_output=True, text=True, env=env)
  records = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
  if records:
    return records
  keys = ("variant", "update", "table_rows", "devices", "per_device_batch")
  return [
    {
      "benchmark": spec.get("benchmark", "train_step"),
      **{k: spec[k] for k in keys if k in spec},
      "error": (p.stderr or p.stdout).strip().splitlines()[-1:],
    }
  ]


def train_step_subprocess(
  config_path: str,
  variant: str,
  update: str,
  table_rows: int,
  *,
  steps: int,
  repeats: int,
  overrides: Sequence[str] = (),
  profile_dir: str | None = None,
) -> dict:
  """``train_step_record`` in a fresh process (own peak RSS); an error becomes a record too."""
  spec = {
    "variant": variant,
    "update": update,
    "table_rows": table_rows,
    "steps": steps,
    "repeats": repeats,
    "profile_dir": profile_dir,
  }
  return subprocess_records(config_path, spec, overrides)[0]


_COLLECTIVE = re.compile(
  r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+"
  r"(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute|ragged-all-to-all)"
  r"(-start)?\((.*?)\)"
)
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S.*?)\s+[\w\-]+\(")
_ARRAY = re.compile(r"\b(pred|[subfc]\d+|bf16)\[([\d,]*)\]")


def _array_bytes(shape_text: str) -> list[int]:
  out = []
  for dtype, dims in _ARRAY.findall(shape_text):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    bits = 8 if dtype == "pred" else int(re.sub(r"\D", "", dtype))
    out.append(n * bits // 8)
  return out


def collective_bytes(
  hlo_text: str, scope: str | None = None, exclude: str | None = "overflow"
) -> tuple[int, int]:
  """``(bytes, count)`` of the collectives of an optimised (per-device, SPMD-partitioned) HLO
  module: each counted by the larger of its result and its operands (an async ``-start``: its
  largest buffer). ``scope``: only ops whose ``op_name`` metadata lies under this named scope;
  ``exclude``: without those under this one (default: the owner-routed path's full-capacity
  fallback, ``sparse.RoutedPlan``, which runs only in a step whose ids overflow a buffer; its
  bytes are the records' ``overflow_bytes_per_device``)."""
  shapes = {}
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if m:
      shapes[m.group(1)] = m.group(2)
  total = count = 0
  for line in hlo_text.splitlines():
    m = _COLLECTIVE.match(line)
    if not m:
      continue
    if scope is not None and not re.search(rf'op_name="[^"]*\b{re.escape(scope)}/', line):
      continue
    if exclude is not None and re.search(rf'op_name="[^"]*\b{re.escape(exclude)}/', line):
      continue
    _name, result, _op, start, operands = m.groups()
    res = _array_bytes(result)
    res_bytes = max(res, default=0) if start else sum(res)
    ops = sum(sum(_array_bytes(shapes.get(o.strip().lstrip("%"), ""))) for o in operands.split(","))
    total += max(res_bytes, ops)
    count += 1
  return total, count


def collectives_records(
  base_config, variant: str, update: str, table_rows: int, *, per_device_batch: int
) -> list[dict]:
  """The collectives of the compiled train step on every device of this process, at
  ``per_device_batch`` pairs (and SSL items) per device: the records ``embeddings`` and
  ``step``."""
  n = jax.device_count()
  config = base_config.copy_and_resolve_references()
  config.train.batch_size = per_device_batch * n
  config.ssl.batch_size = per_device_batch * n
  run = variant_run(config, variant, update, table_rows)
  (p, i) = device_batches(run, 1)[0]
  hlo = run.step_fn.lower(run.state, p, i, run.step_rng).compile().as_text()
  out = []
  for part, scope in (("embeddings", "embeddings"), ("step", None)):
    b, c = collective_bytes(hlo, scope)
    b_all, _ = collective_bytes(hlo, scope, exclude=None)
    out.append(
      {
        "benchmark": "collectives",
        "part": part,
        "devices": n,
        "per_device_batch": per_device_batch,
        "bytes_per_device": b,
        "collectives": c,
        "overflow_bytes_per_device": b_all - b,
        "variant": variant,
        "update": update,
        "table_rows": table_rows,
        "routing": run.config.optimizer.embedding_routing,
      }
    )
  return out


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
  scoring = scoring_flops(run.mesh, emb, batch=run.config.eval.batch_size, repeats=repeats)
  peak = matmul_peak_flops(repeats=repeats)
  return {
    "benchmark": "eval",
    "items": num_items,
    "queries": num_queries,
    "queries_per_sec": num_queries / sec,
    "scoring_flops_per_sec": scoring,
    "matmul_peak_flops_per_sec": peak,
    "fraction_of_matmul_peak": scoring / peak,
    "repeats": repeats,
  }


def scoring_flops(mesh, emb: np.ndarray, *, batch: int, repeats: int) -> float:
  """FLOP/s of the evaluation's scoring kernel alone: blocked scores + running top-100 of a
  device-resident query batch against the row-sharded catalogue (``2 * batch * items * dim``
  multiply-adds per call; the top-k's comparisons are not counted)."""
  chunk = evaluate.item_chunk(emb.shape[0], mesh, batch)  # the blocks evaluate.retrieve scores
  items, n = parallel.shard_rows(emb, mesh, chunk or 1)
  top_k = parallel.make_sharded_top_k(mesh, 100, n, chunk)
  q = jax.device_put(
    np.random.default_rng(1).normal(size=(batch, emb.shape[1])).astype(np.float32),
    parallel.replicated(mesh),
  )
  jax.block_until_ready(top_k(q, items))
  sec = _median_seconds(lambda: jax.block_until_ready(top_k(q, items)), repeats)
  return 2 * batch * n * emb.shape[1] / sec


def matmul_peak_flops(size: int = 2048, repeats: int = 5) -> float:
  """The machine's measured float32 matmul rate: the best of ``repeats`` timed ``size``-cubed
  products on the default device (XLA's own kernel, all its threads)."""
  a = jax.device_put(np.random.default_rng(2).normal(size=(size, size)).astype(np.float32))
  f = jax.jit(lambda x: x @ x)
  jax.block_until_ready(f(a))
  best = float("inf")
  for _ in range(max(repeats, 3)):
    t = time.perf_counter()
    jax.block_until_ready(f(a))
    best = min(best, time.perf_counter() - t)
  return 2 * size**3 / best


def markdown(records: list[dict]) -> str:
  lines = []
  steps = [r for r in records if r["benchmark"] == "train_step"]
  if steps and all("error" in r for r in steps):
    lines += [
      f"{r['variant']} {r['update']} {r['table_rows']:,}: error: {' '.join(r['error'])}"
      for r in steps
    ]
  elif steps:
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
      "vs smallest table | peak RSS GiB | state GiB | loop step ms | loop / resident | "
      "inline loop ms |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in steps:
      if "error" in r:
        lines.append(
          f"| {r['variant']} | {r['update']} | {r['table_rows']:,} | error: "
          f"{' '.join(r['error'])} | | | | | | | | |"
        )
        continue
      b = base.get((r["update"], r["table_rows"]))
      vs_base = f"{r['step_ms'] / b['step_ms']:.2f}x" if b else "-"
      s = small[(r["variant"], r["update"])]
      lines.append(
        f"| {r['variant']} | {r['update']} | {r['table_rows']:,} | {r['examples_per_sec']:,.0f} | "
        f"{r['step_ms']:.2f} | {vs_base} | {r['step_ms'] / s['step_ms']:.2f}x | "
        f"{r['peak_rss_bytes'] / 2**30:.2f} | {r['state_bytes'] / 2**30:.2f} | "
        f"{r['loop_step_ms']:.2f} | {r['loop_vs_resident']:.2f}x | {r['inline_loop_step_ms']:.2f} |"
      )
  coll = [r for r in records if r["benchmark"] == "collectives"]
  if coll:
    lines += [
      "| variant | update | table rows | routing | part | devices | per-device batch | "
      "MiB per device | collectives | vs fewest devices |",
      "|---|---|---|---|---|---|---|---|---|---|",
    ]
    first = {}
    for r in coll:
      if "error" in r:
        lines.append(
          f"| {r['variant']} | {r['update']} | {r['table_rows']:,} | | | {r['devices']} | | "
          f"error: {' '.join(r['error'])} | | |"
        )
        continue
      key = (r["variant"], r["update"], r["table_rows"], r["part"])
      f = first.setdefault(key, r)
      ratio = (
        f"{r['bytes_per_device'] / f['bytes_per_device']:.2f}x" if f["bytes_per_device"] else "-"
      )
      lines.append(
        f"| {r['variant']} | {r['update']} | {r['table_rows']:,} | {r['routing']} | {r['part']} | "
        f"{r['devices']} | {r['per_device_batch']} | {r['bytes_per_device'] / 2**20:.3f} | "
        f"{r['collectives']} | {ratio} |"
      )
  for r in records:
    if r["benchmark"] == "input_pipeline":
      lines.append(f"\ninput pipeline (both streams): {r['examples_per_sec']:,.0f} examples/sec")
    if r["benchmark"] == "mi_stats":
      lines.append(f"MI statistics over {r['items']:,} items: {r['seconds']:.2f} s")
    if r["benchmark"] == "eval":
      lines.append(
        f"evaluation against {r['items']:,} items: {r['queries_per_sec']:,.0f} queries/sec; "
        f"scoring kernel {r['scoring_flops_per_sec'] / 1e9:.1f} GFLOP/s = "
        f"{r['fraction_of_matmul_peak']:.0%} of the measured matmul peak "
        f"({r['matmul_peak_flops_per_sec'] / 1e9:.1f} GFLOP/s)"
      )
  return "\n".join(lines)


def run_command(
  config,
  *,
  config_path: str,
  overrides: Sequence[str] = (),
  quick: bool = False,
  variants: Sequence[str] | None = None,
  updates: Sequence[str] = ("dense", "sparse"),
  table_rows: Sequence[str] | None = None,
  out_path: str | None = None,
  one: str | None = None,
  collectives: bool = False,
  collective_devices: Sequence[int] = (2, 4, 8),
  per_device_batch: int = 512,
  profile_dir: str | None = None,
  steps_only: bool = False,
) -> list[dict]:
  """The benchmark command (``launch/bench.py`` parses the flags and calls this).

  Measures every train-step configuration (each in its own subprocess), the input pipeline, the
  MI statistics and evaluation; prints each train-step record as a JSON line, then the markdown
  table; writes all records as JSON to ``out_path`` if given, and returns them.

  Args:
    config: the base config (``--config``, overrides applied).
    config_path: its file, passed on to the train-step subprocesses.
    overrides: the command's ``--config.*`` arguments (``config_args``), passed on to them too.
    quick: a subset (about a minute or two).
    variants: train-step variants (default by mode).
    updates: embedding update paths.
    table_rows: item-id table sizes, e.g. ``'1e6'`` (default by mode).
    out_path: write the records as JSON here.
    one: internal (a subprocess): measure only this spec (JSON) and print its records as JSON
      lines.
    collectives: instead of timings, the collectives records of every variant / update / table
      size on each of ``collective_devices`` fake CPU devices at ``per_device_batch``.
    profile_dir: a ``jax.profiler`` trace of each train-step configuration, in a subfolder
      ``<variant>_<update>_<rows>`` of this folder.
    steps_only: only the train-step records (no input pipeline, MI statistics or evaluation).
  """
  if one:  # one measurement in this process (own peak RSS / own device count)
    spec = json.loads(one)
    if spec.get("benchmark") == "collectives":
      records = collectives_records(
        config,
        spec["variant"],
        spec["update"],
        spec["table_rows"],
        per_device_batch=spec["per_device_batch"],
      )
    else:
      records = [
        train_step_record(
          config,
          spec["variant"],
          spec["update"],
          spec["table_rows"],
          steps=spec["steps"],
          repeats=spec["repeats"],
          profile_dir=spec.get("profile_dir"),
        )
      ]
    for r in records:
      print(json.dumps(r), flush=True)
    return records
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
        if collectives:
          for d in collective_devices:
            spec = {
              "benchmark": "collectives",
              "variant": v,
              "update": update,
              "table_rows": n,
              "devices": d,
              "per_device_batch": per_device_batch,
            }
            rs = subprocess_records(config_path, spec, overrides, devices=d)
            records += rs
            for r in rs:
              print(json.dumps(r), flush=True)
          continue
        prof = os.path.join(profile_dir, f"{v}_{update}_{n}") if profile_dir else None
        r = train_step_subprocess(
          config_path,
          v,
          update,
          n,
          steps=steps,
          repeats=repeats,
          overrides=overrides,
          profile_dir=prof,
        )
        records.append(r)
        print(json.dumps(r), flush=True)
  if not (collectives or steps_only):
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
