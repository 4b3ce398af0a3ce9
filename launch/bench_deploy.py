"""Deployment benchmark: ANN load time with and without a persisted index; sslrec-serve latency.

    python launch/bench_deploy.py --export=EXPORT_DIR --num_items=1000000 --out=bench_deploy.json

1. Copies ``--export`` to ``--workdir`` with its catalogue replaced by ``--num_items`` clustered
   unit vectors of the export's width (as launch/bench_serving.py draws them), listed in the
   manifest (the towers are the export's own: the timings, not the answers, are the point).
2. Load (each figure in a fresh process): ``Retriever.load`` + the first ``method="ann"`` search,
   (a) without a persisted index: it is built and calibrated in that process, as before; (b) with
   the index persisted by ``Retriever.save_ann_index``: it is read from ``ann/BACKEND/``.
3. HTTP: starts ``sslrec-serve`` on the copy (a real process on loopback); ``--clients`` threads,
   each with its own keep-alive connection, send requests of ``--batch`` random queries (k=10)
   for ``--seconds``; p50 / p99 latency and requests/s per search method.
"""

import json
import os
import shutil
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

from absl import app, flags  # noqa: E402

_EXPORT = flags.DEFINE_string("export", None, "Export directory (launch/export.py).")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/bench_deploy", "Scratch directory (replaced).")
_NUM_ITEMS = flags.DEFINE_integer("num_items", 1_000_000, "Catalogue size of the copy.")
_CLUSTERS = flags.DEFINE_integer("clusters", 1000, "Cluster centres of the random catalogue.")
_BACKENDS = flags.DEFINE_list("backends", ["scann", "faiss"], "ann backends for the load figures.")
_METHODS = flags.DEFINE_list("methods", ["exact", "ann"], "Search methods for the HTTP figures.")
_CLIENTS = flags.DEFINE_integer("clients", 8, "Concurrent HTTP clients.")
_BATCH = flags.DEFINE_integer("batch", 1, "Queries per HTTP request.")
_SECONDS = flags.DEFINE_float("seconds", 20.0, "Duration of each HTTP measurement.")
_OUT = flags.DEFINE_string("out", None, "Write the figures as JSON here.")
flags.mark_flag_as_required("export")

LOAD_CODE = """
import time, json, sys
t0 = time.perf_counter()
from sslrec import serving
r = serving.Retriever.load(sys.argv[1])
t1 = time.perf_counter()
r.search_embeddings(r.item_embeddings[:8], k=10, method="ann", backend=sys.argv[2])
t2 = time.perf_counter()
print(json.dumps({"load_s": t1 - t0, "first_ann_search_s": t2 - t1, "total_s": t2 - t0}))
"""


def scaled_copy(export_dir, out, n, clusters):
  """A copy of ``export_dir`` whose catalogue is ``n`` random clustered unit vectors."""
  import numpy as np

  from sslrec import serving

  if os.path.exists(out):
    shutil.rmtree(out)
  shutil.copytree(export_dir, out, ignore=shutil.ignore_patterns(serving.ANN_DIR))
  manifest = serving.read_manifest(out)
  d = manifest["embedding_dim"]
  rng = np.random.default_rng(0)
  centres = rng.standard_normal((clusters, d)).astype(np.float32)
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  items = np.empty((n, d), np.float32)
  for s in range(0, n, 100_000):
    m = min(100_000, n - s)
    x = centres[rng.integers(0, clusters, m)] + rng.standard_normal((m, d), np.float32) / np.sqrt(d)
    items[s : s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
  np.save(os.path.join(out, serving.ITEM_EMBEDDINGS), items)
  np.save(os.path.join(out, serving.ITEM_KEYS), np.arange(n, dtype=np.int64))
  files = manifest["files"]
  if files.pop(serving.ITEM_NAMES, None) is not None:
    os.remove(os.path.join(out, serving.ITEM_NAMES))
  for name in (serving.ITEM_EMBEDDINGS, serving.ITEM_KEYS):
    path = os.path.join(out, name)
    files[name] = {"sha256": serving.sha256_file(path), "bytes": os.path.getsize(path)}
  manifest["num_items"] = n
  with open(os.path.join(out, serving.MANIFEST), "w") as f:
    json.dump(manifest, f, indent=2)
  return out


def env():
  return dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "src")] + sys.path[1:]))


def load_time(export_dir, backend):
  p = subprocess.run(
    [sys.executable, "-c", LOAD_CODE, export_dir, backend],
    capture_output=True,
    text=True,
    env=env(),
    check=True,
  )
  return json.loads(p.stdout.strip().splitlines()[-1])


def random_queries(retriever, n, rng):
  out = []
  for _ in range(n):
    q = {}
    for f in retriever.features:
      if f.kind == "id":
        q[f.name] = int(rng.integers(max(1, f.vocab_size)))
      elif f.kind == "multi":
        q[f.name] = rng.integers(0, max(1, f.vocab_size), 3).tolist()
      else:
        q[f.name] = rng.standard_normal(f.dense_dim).round(3).tolist()
    out.append(q)
  return out


def http_figures(port, queries, method, clients, batch, seconds):
  """p50 / p99 latency (ms) and requests/s of ``clients`` concurrent keep-alive clients."""
  import http.client

  import numpy as np

  latencies = [[] for _ in range(clients)]
  errors = []
  stop = time.perf_counter() + seconds

  def client(c):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    i = c
    while time.perf_counter() < stop:
      body = json.dumps(
        {
          "queries": [queries[(i + j) % len(queries)] for j in range(batch)],
          "k": 10,
          "method": method,
        }
      ).encode()
      t = time.perf_counter()
      conn.request("POST", "/search", body=body, headers={"Content-Type": "application/json"})
      response = conn.getresponse()
      data = response.read()
      latencies[c].append(time.perf_counter() - t)
      if response.status != 200:
        errors.append(data[:200])
      i += clients * batch
    conn.close()

  t0 = time.perf_counter()
  threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  elapsed = time.perf_counter() - t0
  lat = np.concatenate([np.asarray(x) for x in latencies]) * 1e3
  return {
    "method": method,
    "clients": clients,
    "batch": batch,
    "requests": int(lat.size),
    "errors": len(errors),
    "p50_ms": float(np.percentile(lat, 50)),
    "p99_ms": float(np.percentile(lat, 99)),
    "requests_per_s": lat.size / elapsed,
    "queries_per_s": lat.size * batch / elapsed,
  }


def main(argv):
  del argv
  import numpy as np

  from sslrec import serving

  os.makedirs(_WORKDIR.value, exist_ok=True)
  big = scaled_copy(
    _EXPORT.value, os.path.join(_WORKDIR.value, "export"), _NUM_ITEMS.value, _CLUSTERS.value
  )
  report = {"num_items": _NUM_ITEMS.value, "load": [], "http": []}
  backends = [b for b in _BACKENDS.value if b in serving.ann.available()]
  for backend in backends:
    before = load_time(big, backend)
    t = time.perf_counter()
    r = serving.Retriever.load(big)
    r.save_ann_index(backend)
    saved = time.perf_counter() - t
    after = load_time(big, backend)
    row = {"backend": backend, "built": before, "persisted": after, "save_s": saved}
    report["load"].append(row)
    print(
      f"{backend}: load + first ann search {before['total_s']:.1f}s building the index, "
      f"{after['total_s']:.1f}s reading the persisted one (load alone {after['load_s']:.1f}s)",
      flush=True,
    )
    del r

  r = serving.Retriever.load(big, verify=False)
  queries = random_queries(r, 512, np.random.default_rng(1))
  del r
  for method in _METHODS.value:
    if method == "ann" and not backends:
      continue
    p = subprocess.Popen(
      [
        sys.executable,
        "-m",
        "sslrec.serving.http",
        f"--export={big}",
        "--port=0",
        f"--method={method}",
      ],
      stdout=subprocess.PIPE,
      text=True,
      env=env(),
    )
    try:
      line = p.stdout.readline().strip()
      port = int(line.rsplit(":", 1)[1])
      http_figures(port, queries, method, _CLIENTS.value, _BATCH.value, 2.0)  # warm-up
      row = http_figures(port, queries, method, _CLIENTS.value, _BATCH.value, _SECONDS.value)
    finally:
      p.terminate()
      p.wait(timeout=60)
    report["http"].append(row)
    print(
      f"HTTP {method}: {row['clients']} clients x batch {row['batch']}: p50 {row['p50_ms']:.1f} "
      f"ms, p99 {row['p99_ms']:.1f} ms, {row['requests_per_s']:.0f} requests/s "
      f"({row['requests']} requests, {row['errors']} errors)",
      flush=True,
    )
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  app.run(main)
