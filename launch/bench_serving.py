"""Serving benchmark: approximate vs exact top-K, and the exported query tower's latency.

    python launch/bench_serving.py --export=EXPORT_DIR --out=bench_serving.json

1. ``--num_items`` (10^6) random-but-clustered unit vectors of dim ``--dim`` (64): ``--clusters``
   random unit centres, each vector a centre plus Gaussian noise of norm ~``--spread``, normalised
   (``--spread=1``: a vector's cosine to its centre is ~0.7). Queries are drawn the same way.
2. Exact top-``--k`` (``sslrec.serving.exact_search``: JAX matmul + top_k) is the ground truth;
   its queries/sec at batch 256 and batch 1.
3. Each installed ann backend (``sslrec.serving.ann``): build time, then Recall@k against exact and
   queries/sec (all queries in one call, and one query per call) for a sweep of its search-time
   knob (ScaNN ``leaves_to_search``, faiss ``nprobe``); the default setting is marked.
4. With ``--export``: the exported query tower's latency at batch 1 and batch 256 (median of
   ``--repeats`` calls after warm-up), and batch-1 end-to-end search (encode + tower + exact top-k
   over that export's catalogue).

Memory: the vectors once in numpy and once on the JAX device (2 x 256 MB at 10^6 x 64), plus one
index at a time (each keeps its own copy, ~256-300 MB): under ~1.5 GB.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

from absl import app, flags, logging  # noqa: E402

_NUM_ITEMS = flags.DEFINE_integer("num_items", 1_000_000, "Catalogue size.")
_DIM = flags.DEFINE_integer("dim", 64, "Embedding width.")
_CLUSTERS = flags.DEFINE_integer("clusters", 1000, "Number of cluster centres.")
_SPREAD = flags.DEFINE_float("spread", 1.0, "Norm of the noise added to a centre.")
_NUM_QUERIES = flags.DEFINE_integer("num_queries", 2000, "Queries for recall and throughput.")
_K = flags.DEFINE_integer("k", 10, "Items per query (Recall@k).")
_BACKENDS = flags.DEFINE_list("backends", ["scann", "faiss"], "ann backends to measure.")
_EXPORT = flags.DEFINE_string("export", None, "Export directory for the query tower latency.")
_REPEATS = flags.DEFINE_integer("repeats", 50, "Timed calls per latency figure.")
_SEED = flags.DEFINE_integer("seed", 0, "Data seed.")
_OUT = flags.DEFINE_string("out", None, "Write the figures as JSON here.")

SWEEP = (5, 10, 20, 40, 80)  # values of each backend's search-time knob (index.knob)


def clustered(n, centres, spread, rng, chunk=100_000):
  import numpy as np

  out = np.empty((n, centres.shape[1]), np.float32)
  for s in range(0, n, chunk):
    m = min(chunk, n - s)
    x = centres[rng.integers(0, len(centres), m)] + rng.standard_normal(
      (m, centres.shape[1]), dtype=np.float32
    ) * (spread / np.sqrt(centres.shape[1]))
    out[s : s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
  return out


def timed(fn, repeats):
  """Median seconds of ``repeats`` calls (after one warm-up call)."""
  import numpy as np

  fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def one_at_a_time(search, queries, n):
  """Queries/sec answering ``n`` distinct queries one per call (a repeated query would be served
  from the CPU caches)."""
  search(queries[n : n + 1])
  t = time.perf_counter()
  for i in range(n):
    search(queries[i : i + 1])
  return n / (time.perf_counter() - t)


def recall(found, truth):
  import numpy as np

  k = truth.shape[1]
  return float(np.mean([len(set(a[:k]) & set(b)) / k for a, b in zip(found, truth)]))


def bench_search(results):
  import jax
  import numpy as np

  from sslrec import serving
  from sslrec.serving import ann

  rng = np.random.default_rng(_SEED.value)
  d = _DIM.value
  centres = rng.standard_normal((_CLUSTERS.value, d), dtype=np.float32)
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  t = time.perf_counter()
  items = clustered(_NUM_ITEMS.value, centres, _SPREAD.value, rng)
  queries = clustered(
    _NUM_QUERIES.value, centres, _SPREAD.value, np.random.default_rng(_SEED.value + 1)
  )
  print(
    f"data: {items.shape[0]:,} x {d} vectors in {_CLUSTERS.value} clusters (spread "
    f"{_SPREAD.value}), {len(queries)} queries; {time.perf_counter() - t:.1f}s",
    flush=True,
  )
  k = _K.value
  items_dev = jax.device_put(items)
  serving.exact_search(queries[:256], items_dev, k)  # compile
  t = time.perf_counter()
  _, truth = serving.exact_search(queries, items_dev, k)
  exact_qps = len(queries) / (time.perf_counter() - t)
  one = one_at_a_time(lambda q: serving.exact_search(q, items_dev, k), queries, 20)  # noqa: B023, F821 -- called at once
  results["exact"] = {"qps_batch256": exact_qps, "qps_batch1": one}
  print(
    f"exact (JAX): {exact_qps:,.0f} queries/s at batch 256, {one:,.0f} at batch 1 "
    f"({1e3 / one:.1f} ms/query)",
    flush=True,
  )

  for backend in _BACKENDS.value:
    try:
      ann.resolve(backend)
    except ann.AnnUnavailable as e:
      print(f"{backend}: skipped ({e})")
      continue
    t = time.perf_counter()
    index = ann.build(items, backend)
    build_s = time.perf_counter() - t
    knob = index.knob
    default = getattr(index, knob)
    rows = []
    print(f"{backend}: built in {build_s:.1f}s ({index.describe()})", flush=True)
    for v in sorted(set(SWEEP) | {default}):
      setattr(index, knob, v)
      index.search(queries[:64], k)  # warm
      t = time.perf_counter()
      _, found = index.search(queries, k)
      qps = len(queries) / (time.perf_counter() - t)
      single = one_at_a_time(lambda q: index.search(q, k), queries, 500)  # noqa: B023, F821 -- called at once
      r = recall(found, truth)
      rows.append(
        {knob: v, "recall": r, "qps_batch": qps, "qps_batch1": single, "default": v == default}
      )
      print(
        f"  {knob}={v:<4d}{' (default)' if v == default else '          '} recall@{k} "
        f"{r:.4f} | {qps:,.0f} queries/s batched ({qps / exact_qps:.0f}x exact) | "
        f"{single:,.0f} queries/s one at a time",
        flush=True,
      )
    # What serving does on build (Retriever.build_ann_index): calibrate the knob for Recall@k >=
    # 0.95 on 256 catalogue vectors used as queries (themselves excluded), doubling from 1%.
    setattr(index, knob, max(1, index.partitions // 100))
    t = time.perf_counter()
    sample = np.random.default_rng(0).choice(len(items), 256, replace=False)
    _, near = serving.exact_search(items[sample], items_dev, k + 1)
    near = np.asarray([[r for r in t_ if r != x][:k] for t_, x in zip(near.tolist(), sample)])
    value, cal_recall = ann.calibrate(index, items[sample], near, 0.95, exclude_rows=sample)
    cal_s = time.perf_counter() - t
    t = time.perf_counter()
    _, found = index.search(queries, k)
    qps = len(queries) / (time.perf_counter() - t)
    r = recall(found, truth)
    calibrated = {
      knob: value,
      "calibration_recall": cal_recall,
      "calibration_s": cal_s,
      "recall": r,
      "qps_batch": qps,
    }
    print(
      f"  calibrated for 0.95 on catalogue samples in {cal_s:.1f}s: {knob}={value} "
      f"(sample recall {cal_recall:.4f}) -> recall@{k} {r:.4f} on the queries, "
      f"{qps:,.0f} queries/s batched ({qps / exact_qps:.0f}x exact)",
      flush=True,
    )
    results[backend] = {
      "build_s": build_s,
      "params": index.describe(),
      "sweep": rows,
      "calibrated": calibrated,
    }
    del index
  del items_dev


def bench_tower(results):
  import numpy as np

  from sslrec import serving

  r = serving.Retriever.load(_EXPORT.value)
  rng = np.random.default_rng(0)

  def raw_query():
    q = {}
    for f in r.features:
      if f.kind == "id":
        q[f.name] = int(rng.integers(f.vocab_size))
      elif f.kind == "multi":
        q[f.name] = rng.integers(0, f.vocab_size, int(rng.integers(1, f.max_len + 1))).tolist()
      else:
        q[f.name] = rng.standard_normal(f.dense_dim).tolist()
    return q

  out = {"export": os.path.abspath(_EXPORT.value), "num_items": r.num_items}
  for b in (1, 256):
    batch, _ = r.encode([raw_query() for _ in range(b)])
    s = timed(lambda: r.embed_batch(batch), _REPEATS.value)  # noqa: B023, F821 -- called at once
    out[f"tower_ms_batch{b}"] = s * 1e3
    print(f"query tower, batch {b}: {s * 1e3:.3f} ms ({b / s:,.0f} queries/s)", flush=True)
  qs = [raw_query() for _ in range(_REPEATS.value + 1)]
  s = 1 / one_at_a_time(lambda q: r.search(q[0], k=_K.value), qs, _REPEATS.value)
  out["search_ms_batch1"] = s * 1e3
  print(
    f"end-to-end search, batch 1 (encode + tower + exact top-{_K.value} over "
    f"{r.num_items:,} items): {s * 1e3:.3f} ms",
    flush=True,
  )
  results["query_tower"] = out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  import jax

  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs", flush=True)
  results = {
    "config": {
      f: flags.FLAGS[f].value
      for f in ("num_items", "dim", "clusters", "spread", "num_queries", "k", "seed")
    }
  }
  if _EXPORT.value:
    bench_tower(results)
  bench_search(results)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(results, f, indent=2)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
