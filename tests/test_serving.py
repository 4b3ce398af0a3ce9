"""Serving an export: raw values -> ids, exact and approximate top-K, item-to-item, bad input."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import tiny_config

from sslrec import export, serving, step
from sslrec.data import sources, synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
  """``(dataset, model, params, export dir)``: an export of a tiny model (2000 items) with random
  weights, without a training run."""
  config = tiny_config()
  dataset = sources.load(config)
  model = step.create_model(config, dataset)
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(model.init, jax.random.key(0), *step.example_inputs(dataset))
  params = jax.tree.map(lambda a: (0.2 * rng.standard_normal(a.shape)).astype(a.dtype), shapes)
  out = str(tmp_path_factory.mktemp("serving") / "export")
  export.write_export(
    out, model=model, params=params, dataset=dataset, config=config, step=0, log=lambda _: None
  )
  return dataset, model, params, out


@pytest.fixture(scope="module")
def exported(towers):
  return towers[3]


@pytest.fixture(scope="module")
def retriever(exported):
  return serving.Retriever.load(exported)


def brute_force(queries, items, k):
  scores = queries.astype(np.float64) @ items.astype(np.float64).T
  rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(scores, rows, axis=1), rows


def test_exact_search_matches_numpy_brute_force(retriever):
  rng = np.random.default_rng(0)
  queries = [
    {
      "q_topic": int(rng.integers(32)),
      "q_style": int(rng.integers(24)),
      "q_history": rng.integers(0, 400, size=int(rng.integers(0, 10))).tolist(),
      "q_region": int(rng.integers(16)),
      "q_dense": rng.standard_normal(4).tolist(),
    }
    for _ in range(37)
  ]
  res = retriever.search(queries, k=20)
  emb, _ = retriever.embed_queries(queries)
  want_scores, want_rows = brute_force(emb, retriever.item_embeddings, 20)
  assert res.rows.shape == res.scores.shape == (37, 20) and res.method == "exact"
  np.testing.assert_allclose(res.scores, want_scores, atol=1e-5)
  same = res.rows == want_rows
  # A differing row may only be a near tie.
  assert same.mean() > 0.99 and np.all(np.abs(res.scores - want_scores)[~same] < 1e-5)
  np.testing.assert_array_equal(res.keys, retriever.item_keys[res.rows])
  assert res.names is None  # the synthetic dataset has no item names
  # One dict is a batch of one; the same query gives the same answer.
  one = retriever.search(queries[3], k=20)
  np.testing.assert_array_equal(one.rows[0], res.rows[3])


def test_similar_items_excludes_the_item_and_matches_brute_force(retriever):
  items = retriever.item_embeddings
  res = retriever.similar_items([5, "17", np.int64(1999)], k=10)  # keys: ints, or their strings
  rows = np.asarray([5, 17, 1999])
  want_scores, want_rows = brute_force(items[rows], items, 11)
  for i, row in enumerate(rows):
    assert row not in res.rows[i]
    expected = [r for r in want_rows[i] if r != row][:10]
    np.testing.assert_array_equal(res.rows[i], expected)
  assert np.all(np.diff(res.scores, axis=1) <= 1e-7)  # best first
  with pytest.raises(serving.QueryError, match="no item with key 'nope'"):
    retriever.similar_items("nope")


def test_raw_values_map_to_ids_with_oov(retriever):
  batch, notes = retriever.encode(
    [
      {
        "q_topic": 3,
        "q_style": "5",
        "q_history": [1, "2", 99999, "x"],
        "q_region": 15,
        "q_dense": [0.5, -1, 2, 0],
      },
      {"q_topic": 32, "q_style": -3, "q_history": 7, "q_region": 2.0},
      {"q_history": list(range(20))},
    ]
  )
  np.testing.assert_array_equal(batch["q_topic"], [3, -1, -1])  # 32 >= vocab_size: OOV
  np.testing.assert_array_equal(batch["q_style"], [5, -1, -1])
  np.testing.assert_array_equal(batch["q_region"], [15, 2, -1])
  hist = batch["q_history"]
  assert hist.shape == (3, synthetic.HISTORY_MAX_LEN) and hist.dtype == np.int32
  np.testing.assert_array_equal(hist[0], [1, 2] + [-1] * 6)  # OOV values leave the bag
  np.testing.assert_array_equal(hist[1], [7] + [-1] * 7)  # a scalar is a one-value bag
  np.testing.assert_array_equal(hist[2], list(range(8)))  # truncated to max_len
  np.testing.assert_allclose(batch["q_dense"], [[0.5, -1, 2, 0], [0] * 4, [0] * 4])
  text = "\n".join(notes)
  for expected in (
    "query 0: q_history: value 99999 is out of vocabulary",
    "query 0: q_history: value 'x' is out of vocabulary",
    "query 1: q_topic=32 is out of vocabulary (-> default embedding)",
    "query 1: q_style=-3 is out of vocabulary",
    "query 1: not given (missing -> default embedding; dense -> zeros): q_dense",
    "query 2: q_history: 20 known values, the tower reads the first 8",
  ):
    assert expected in text, text
  # An OOV id embeds exactly like a missing one (the learned default embedding).
  a, _ = retriever.embed_queries({"q_topic": 999, "q_style": 1})
  b, _ = retriever.embed_queries({"q_style": 1})
  np.testing.assert_array_equal(a, b)


def test_bad_queries_are_named(retriever):
  with pytest.raises(
    serving.QueryError,
    match=r"unknown query features: 'q_topc' \(did you mean 'q_topic'\?\), "
    r"'color'; the query tower reads: q_topic, q_style",
  ):
    retriever.search({"q_topc": 1, "color": 2})
  with pytest.raises(serving.QueryError, match="q_dense is a dense feature of 4 finite numbers"):
    retriever.search({"q_dense": [1, 2]})
  with pytest.raises(serving.QueryError, match="q_topic is single-valued; got 2 values"):
    retriever.search({"q_topic": [1, 2]})
  with pytest.raises(serving.QueryError, match="k=0; must be an integer >= 1"):
    retriever.search({"q_topic": 1}, k=0)
  with pytest.raises(serving.QueryError, match="method='fast'"):
    retriever.search({"q_topic": 1}, method="fast")


def test_k_larger_than_catalogue_is_clamped_with_a_warning(retriever):
  n = retriever.num_items
  with pytest.warns(serving.ServingWarning, match=f"k=5000 is larger than the {n} items"):
    res = retriever.search({"q_topic": 1}, k=5000)
  assert res.rows.shape == (1, n) and sorted(res.rows[0]) == list(range(n))
  assert any("using k=2000" in note for note in res.notes)
  with pytest.warns(serving.ServingWarning, match=f"larger than the {n - 1} items"):
    res = retriever.similar_items(0, k=n)
  assert res.rows.shape == (1, n - 1) and 0 not in res.rows[0]


def test_parse_query_syntax():
  assert serving.parse_query("q_topic=3, q_history=1|2|3 ,q_dense=0.5|1|2|3,q_style=7|") == {
    "q_topic": "3",
    "q_history": ["1", "2", "3"],
    "q_dense": ["0.5", "1", "2", "3"],
    "q_style": ["7"],
  }
  for bad, expected in (
    ("q_topic", "not name=value"),
    ("", "is empty"),
    ("a=1,a=2", "given twice"),
  ):
    with pytest.raises(serving.QueryError, match=expected):
      serving.parse_query(bad)


def _copy(exported, tmp_path):
  d = str(tmp_path / "copy")
  shutil.copytree(exported, d)
  return d


def _edit_manifest(d, **changes):
  path = os.path.join(d, "manifest.json")
  m = json.load(open(path))
  m.update(changes)
  json.dump(m, open(path, "w"))


@pytest.mark.parametrize(
  "damage, expected",
  [
    (lambda d: os.remove(os.path.join(d, "query_tower.jax")), r"missing files: query_tower.jax"),
    (lambda d: os.remove(os.path.join(d, "manifest.json")), r"not an sslrec export"),
    (
      lambda d: _edit_manifest(d, format_version=2),
      r"written in export format version 2; this sslrec reads version 1",
    ),
    (
      lambda d: open(os.path.join(d, "item_embeddings.npy"), "r+b").write(b"\x93NUMPY\x02"),
      r"checksum mismatch for item_embeddings.npy",
    ),
    (
      lambda d: open(os.path.join(d, "manifest.json"), "w").write("{"),
      r"manifest.json: unreadable",
    ),
    (lambda d: shutil.rmtree(d), r"no such export directory"),
  ],
)
def test_bad_export_dirs_are_refused_with_one_line(exported, tmp_path, damage, expected):
  d = _copy(exported, tmp_path)
  damage(d)
  with pytest.raises(serving.ExportDirError, match=expected) as e:
    serving.Retriever.load(d)
  assert "\n" not in str(e.value)


def test_corrupt_tower_with_matching_checksum_is_refused(exported, tmp_path):
  d = _copy(exported, tmp_path)
  with open(os.path.join(d, "query_tower.jax"), "r+b") as f:
    f.write(b"garbage!")
  files = json.load(open(os.path.join(d, "manifest.json")))["files"]
  files["query_tower.jax"]["sha256"] = serving.sha256_file(os.path.join(d, "query_tower.jax"))
  _edit_manifest(d, files=files)
  with pytest.raises(serving.ExportDirError, match="cannot deserialize the query tower"):
    serving.Retriever.load(d)


def test_missing_ann_extra_is_one_clear_error(retriever, monkeypatch):
  from sslrec.serving import ann

  def unavailable(backend):
    raise ann.AnnUnavailable(
      f"approximate search with {backend!r} needs ... pip install 'sslrec[ann]'"
    )

  monkeypatch.setattr(ann, "_import", unavailable)
  with pytest.raises(serving.ServingError, match=r"pip install 'sslrec\[ann\]'"):
    retriever.search({"q_topic": 1}, method="ann")


@pytest.mark.parametrize(
  "backend, params",
  [
    ("scann", dict(num_leaves=40, leaves_to_search=30, reorder=200)),
    ("faiss", dict(nlist=40, nprobe=30)),
  ],
)
def test_approximate_search_agrees_with_exact(retriever, backend, params):
  pytest.importorskip(backend)
  rng = np.random.default_rng(1)
  queries = [
    {"q_topic": int(rng.integers(32)), "q_style": int(rng.integers(24))} for _ in range(64)
  ]
  exact = retriever.search(queries, k=10)
  index = retriever.build_ann_index(backend, **params)  # partitioned (default: exact here)
  assert index.partitions == 40 and index.calibration is None  # the knob was given
  approx = retriever.search(queries, k=10, method="ann", backend=backend)
  assert approx.method == f"ann:{backend}" and approx.rows.shape == (64, 10)
  recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx.rows, exact.rows)])
  assert recall >= 0.9
  sim = retriever.similar_items(list(range(8)), k=5, method="ann", backend=backend)
  assert all(i not in sim.rows[i] for i in range(8))


@pytest.mark.parametrize("backend", ["scann", "faiss"])
def test_ann_index_is_calibrated_to_a_target_recall(retriever, backend):
  pytest.importorskip(backend)
  from sslrec.serving import ann

  partitions = {"scann": "num_leaves", "faiss": "nlist"}[backend]
  index = retriever.build_ann_index(backend, target_recall=0.97, **{partitions: 64})
  cal = index.calibration
  assert cal[index.knob] == getattr(index, index.knob) and cal["queries"] == 256
  assert cal["recall"] >= 0.97 or cal[index.knob] == 64
  # The calibrated knob holds on other item-to-item queries too (within sampling noise).
  rows = list(range(300, 556))
  exact = retriever.similar_items(rows, k=10)
  approx = retriever.similar_items(rows, k=10, method="ann", backend=backend)
  assert ann.recall_at_k(approx.rows, exact.rows) >= 0.85
  # Calibration doubles the knob from where it is.
  setattr(index, index.knob, 1)
  emb = retriever.item_embeddings[:128]
  truth = retriever.search_embeddings(emb, k=10).rows
  value, recall = ann.calibrate(index, emb, truth, 0.9)
  assert value in (2, 4, 8, 16, 32, 64) and recall >= 0.9 and getattr(index, index.knob) == value


def _retrieve(*args):
  return subprocess.run(
    [sys.executable, os.path.join(ROOT, "launch", "retrieve.py"), *args],
    capture_output=True,
    text=True,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )


def test_launch_retrieve(exported, tmp_path):
  p = _retrieve(f"--export={exported}", "--query=q_topic=3,q_style=5,q_history=1|2|99999", "--k=3")
  assert p.returncode == 0, p.stderr
  lines = p.stdout.strip().splitlines()
  assert lines[0].startswith("query q_topic=3, q_style=5, q_history=1|2|99999: top 3 of 2000")
  assert lines[1] == "| rank | item | score |" and len(lines) == 6
  assert "q_history: value '99999' is out of vocabulary" in p.stderr
  p = _retrieve(f"--export={exported}", "--item=42", "--k=2")
  assert p.returncode == 0 and "items most similar to item 42" in p.stdout
  d = _copy(exported, tmp_path)
  _edit_manifest(d, format_version=7)
  for args, expected in (
    ([f"--export={d}", "--item=1"], "format version 7"),
    ([f"--export={exported}", "--query=colour=red"], "unknown query features"),
    ([f"--export={exported}"], "exactly one of --query"),
  ):
    p = _retrieve(*args)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert expected in lines[0]


# -- New items: the exported item tower ---------------------------------------------------------


def test_new_items_are_embedded_by_the_exported_item_tower_and_added(towers, tmp_path):
  from sslrec.data import table as table_lib

  dataset, model, params, out = towers
  r = serving.Retriever.load(out)
  assert r.has_item_tower and r.item_features[0].name == "item_id"
  rows = np.arange(40)
  batch = table_lib.take(dataset.items, rows)
  want = np.asarray(model.apply(params, batch, method=model.item_tower))
  np.testing.assert_allclose(r.embed_item_batch(batch), want, atol=1e-5, rtol=0)
  np.testing.assert_allclose(r.item_embeddings[rows], want, atol=1e-5, rtol=0)
  # A new item: the features of row 3 without its trained id embedding (item_id unknown).
  raw = {
    name: (v[v >= 0].tolist() if v.ndim else int(v)) if v.dtype.kind == "i" else v.tolist()
    for name, v in ((name, batch[name][3]) for name in batch)
  }
  raw.pop("item_id")
  emb, notes = r.embed_items(raw)
  assert any("not given" in n and "item_id" in n for n in notes)
  n = r.num_items
  new_rows = r.add_items([5000, 5001], [raw, dict(raw, category=0)])
  np.testing.assert_array_equal(new_rows, [n, n + 1])
  assert r.num_items == n + 2 and r.item_keys[-1] == 5001
  np.testing.assert_allclose(r.item_embeddings[n], emb[0], atol=1e-6)
  # Searchable at once, by key and by vector; filters know the new keys.
  res = r.search_embeddings(emb, k=3)
  assert res.keys[0, 0] == 5000 and abs(res.scores[0, 0] - 1.0) < 1e-5
  assert 5000 not in r.search_embeddings(emb, k=3, exclude=[5000]).keys[0]
  assert r.similar_items(5001, k=2).rows.shape == (1, 2)
  with pytest.raises(serving.QueryError, match="item key 5000 is already in the catalogue"):
    r.add_items([5000], [raw])
  with pytest.raises(serving.QueryError, match="unknown item features: 'colour'"):
    r.add_items([6000], [{"colour": 1}])
  with pytest.raises(serving.QueryError, match="keys of this catalogue are integers"):
    r.add_items(["sku"], [raw])
  # An export without the item tower (an older one) says what to do.
  d = _copy(out, tmp_path)
  files = json.load(open(os.path.join(d, "manifest.json")))["files"]
  for name in ("item_tower.jax", "item_params.npz", "item_vocabularies.json"):
    del files[name]
    os.remove(os.path.join(d, name))
  _edit_manifest(d, files=files)
  old = serving.Retriever.load(d)
  with pytest.raises(serving.ServingError, match="has no item tower .* re-export"):
    old.embed_items(raw)


# -- Filters ------------------------------------------------------------------------------------


def test_exclude_and_allow_filters(retriever):
  rng = np.random.default_rng(3)
  queries = [{"q_topic": int(rng.integers(32)), "q_style": int(rng.integers(24))} for _ in range(5)]
  emb, _ = retriever.embed_queries(queries)
  _, order = brute_force(emb, retriever.item_embeddings, retriever.num_items)
  plain = retriever.search(queries, k=10)
  # One flat list for every query: the top rows of query 0 and some of query 1.
  seen = order[0, :4].tolist() + order[1, :2].tolist()
  res = retriever.search(queries, k=10, exclude=seen)
  for i in range(5):
    want = [r for r in order[i] if r not in seen][:10]
    np.testing.assert_array_equal(res.rows[i], want)
  # One list per query; keys may be given as strings.
  per = [[str(r) for r in order[i, : i + 1]] for i in range(5)]
  res = retriever.search(queries, k=10, exclude=per)
  for i in range(5):
    np.testing.assert_array_equal(res.rows[i], order[i, i + 1 : i + 11])
  # An allow-list: only those items, best first, excluded ones removed.
  allow = rng.choice(retriever.num_items, 30, replace=False).tolist()
  res = retriever.search(queries, k=5, allow=allow, exclude=[allow[0]])
  for i in range(5):
    want = [r for r in order[i] if r in allow and r != allow[0]][:5]
    np.testing.assert_array_equal(res.rows[i], want)
  # ann search honours the filters too (the index is exact below 10,000 items).
  if serving.ann.available():
    approx = retriever.search(queries, k=10, method="ann", exclude=seen)
    assert not set(approx.rows.ravel()) & set(seen)
  # A small allow-list clamps k; item-to-item filters.
  with pytest.warns(serving.ServingWarning, match="larger than the 3 items"):
    res = retriever.search(queries[0], k=10, allow=[1, 2, 3])
  assert sorted(res.rows[0]) == [1, 2, 3]
  sim = retriever.similar_items(7, k=5, exclude=plain.rows[0].tolist())
  assert 7 not in sim.rows[0] and not set(sim.rows[0]) & set(plain.rows[0])
  np.testing.assert_array_equal(plain.rows, retriever.search(queries, k=10).rows)  # unchanged
  for kw, expected in (
    (dict(exclude=[1, "nope"]), r"exclude: no item with key 'nope' in the catalogue"),
    (dict(allow=[[1], [2]]), r"allow has 2 lists of item keys for 5 queries"),
    (dict(exclude=[1, [2]]), r"exclude mixes item keys and lists"),
    (dict(allow=5), r"allow must be a list of item keys"),
    (dict(allow=[]), r"the filters leave no item to return"),
  ):
    with pytest.raises(serving.QueryError, match=expected):
      retriever.search(queries, k=3, **kw)


def test_launch_retrieve_filters(exported):
  p = _retrieve(f"--export={exported}", "--item=42", "--k=3", "--allow=1,2,3,4", "--exclude=2")
  assert p.returncode == 0, p.stderr
  keys = {int(line.split("|")[2]) for line in p.stdout.strip().splitlines()[3:]}
  assert keys == {1, 3, 4}
  p = _retrieve(f"--export={exported}", "--query=q_topic=3", "--exclude=1,zzz")
  assert p.returncode == 2 and p.stderr.strip() == (
    "error: exclude: no item with key 'zzz' in the catalogue (2000 items; keys look like "
    "0, 1, 2, ...)"
  )


# -- Persisted ANN indexes ----------------------------------------------------------------------


@pytest.mark.parametrize(
  "backend, params",
  [("scann", dict(num_leaves=40, leaves_to_search=8)), ("faiss", dict(nlist=40, nprobe=8))],
)
def test_persisted_ann_index_is_read_not_rebuilt_and_checked(
  exported, tmp_path, monkeypatch, backend, params
):
  pytest.importorskip(backend)
  from sslrec.serving import ann, index_store

  d = _copy(exported, tmp_path)
  first = serving.Retriever.load(d)
  first.save_ann_index(backend, target_recall=None, **params)
  saved = index_store.directory(d, backend)
  assert index_store.saved_backends(d) == [backend]
  queries = first.item_embeddings[:50]
  want = first.search_embeddings(queries, k=10, method="ann", backend=backend)

  def no_build(*a, **k):
    raise AssertionError("the persisted index was rebuilt")

  monkeypatch.setattr(ann, "build", no_build)
  r = serving.Retriever.load(d)
  got = r.search_embeddings(queries, k=10, method="ann", backend=backend)
  np.testing.assert_array_equal(got.rows, want.rows)
  assert r.ann_index(backend).partitions == 40
  monkeypatch.undo()

  files = json.load(open(os.path.join(saved, "index.json")))["files"]
  victim = os.path.join(saved, sorted(files)[0])
  for damage, expected in (
    (lambda: open(victim, "r+b").write(b"tampered"), "checksum mismatch for"),
    (lambda: open(os.path.join(saved, "scann_docids.pkl"), "wb").write(b"x"), "unlisted: scann"),
    (lambda: open(os.path.join(saved, "index.json"), "w").write("{"), "index.json: unreadable"),
  ):
    shutil.rmtree(saved)
    first.save_ann_index(backend)
    damage()
    with pytest.raises(serving.ExportDirError, match=expected) as e:
      serving.Retriever.load(d).search_embeddings(queries, k=5, method="ann", backend=backend)
    assert "\n" not in str(e.value) and f"delete {saved}" in str(e.value)
  # An index saved for another catalogue (the export's embeddings changed and were re-listed).
  shutil.rmtree(saved)
  first.save_ann_index(backend)
  meta = json.load(open(os.path.join(saved, "index.json")))
  meta["item_embeddings_sha256"] = "0" * 64
  json.dump(meta, open(os.path.join(saved, "index.json"), "w"))
  with pytest.raises(serving.ExportDirError, match="built for other item embeddings"):
    serving.Retriever.load(d).ann_index(backend)
  # After add_items the persisted index is not used (it lacks the new items), nor saved over.
  r = serving.Retriever.load(d)
  r.add_items([9999], [{"category": 1}])
  assert r.search_embeddings(queries[:2], k=3, method="ann", backend=backend).rows.shape == (2, 3)
  with pytest.raises(serving.ServingError, match="1 items were added since"):
    r.save_ann_index(backend)


# -- sslrec-serve: the HTTP server, end to end on loopback --------------------------------------


def _serve_env():
  path = os.pathsep.join([os.path.join(ROOT, "src"), os.environ.get("PYTHONPATH", "")])
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path)


@pytest.fixture(scope="module")
def server(exported):
  """A real ``sslrec-serve`` process on a free loopback port: ``(port, its first stdout line)``."""
  pytest.importorskip("starlette")
  pytest.importorskip("uvicorn")
  cmd = [sys.executable, "-m", "sslrec.serving.http", f"--export={exported}", "--port=0"]
  p = subprocess.Popen(
    cmd + ["--max_batch=64"],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env=_serve_env(),
  )
  line = p.stdout.readline().strip()
  if p.poll() is not None or "serving" not in line:
    pytest.fail(f"sslrec-serve did not start: {line} {p.stderr.read()}")
  yield int(line.rsplit(":", 1)[1]), line
  p.terminate()
  p.wait(timeout=30)


def _request(conn, method, path, body=None):
  """``(status, JSON body)`` of one request on an open connection."""
  data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
  conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
  response = conn.getresponse()
  assert response.getheader("Content-Type") == "application/json"
  return response.status, json.loads(response.read())


def test_http_answers_every_query_of_concurrent_batches(server, retriever):
  import concurrent.futures
  import http.client

  port, line = server
  assert "on http://127.0.0.1:" in line  # loopback by default
  rng = np.random.default_rng(5)
  requests = []
  for _ in range(32):
    queries = [
      {"q_topic": int(rng.integers(32)), "q_history": rng.integers(0, 400, 3).tolist()}
      for _ in range(int(rng.integers(1, 6)))
    ]
    exclude = [[int(x)] for x in rng.integers(0, 2000, len(queries))]
    requests.append({"queries": queries, "k": 5, "exclude": exclude})

  def client(chunk):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    out = [_request(conn, "POST", "/search", body) for body in chunk]
    conn.close()
    return out

  with concurrent.futures.ThreadPoolExecutor(8) as pool:  # 8 clients, 4 requests each
    answers = sum(pool.map(client, [requests[i::8] for i in range(8)]), [])
  order = [b for i in range(8) for b in requests[i::8]]
  for body, (status, got) in zip(order, answers):
    assert status == 200, got
    want = retriever.search(body["queries"], k=5, exclude=body["exclude"])
    assert len(got["results"]) == len(body["queries"])  # every query answered, in order
    for i, result in enumerate(got["results"]):
      assert result["keys"] == want.keys[i].tolist()
      np.testing.assert_allclose(result["scores"], want.scores[i], atol=1e-5)
    assert got["method"] == "exact" and got["step"] == 0
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
  status, got = _request(conn, "POST", "/similar", {"items": [3, "4"], "k": 2, "allow": [1, 2, 3]})
  assert status == 200 and got["results"][0]["keys"] == sorted(
    [1, 2], key=lambda j: -float(retriever.item_embeddings[3] @ retriever.item_embeddings[j])
  )
  assert _request(conn, "GET", "/health")[1]["num_items"] == 2000


def test_http_bad_requests_get_a_json_error_and_keep_the_connection(server):
  import http.client

  port, _ = server
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)  # one connection throughout
  for method, path, body, status, expected in (
    ("POST", "/search", b"{", 400, "the request body is not valid JSON"),
    ("POST", "/search", b"", 400, "not valid JSON"),
    ("POST", "/search", [1, 2], 400, "must be a JSON object, got list"),
    ("POST", "/search", {"k": 3}, 400, "give exactly one of the fields 'queries'"),
    ("POST", "/search", {"queries": []}, 400, "'queries' must be a non-empty list"),
    ("POST", "/search", {"queries": [{}] * 65}, 400, "at most 64 per request"),
    ("POST", "/search", {"query": {}, "kk": 3}, 400, "unknown fields: 'kk'"),
    ("POST", "/search", {"query": {}, "k": "3"}, 400, "field 'k' must be an integer"),
    ("POST", "/search", {"query": {}, "k": 0}, 400, "k=0; must be an integer >= 1"),
    ("POST", "/search", {"query": {"q_topc": 1}}, 400, "did you mean 'q_topic'"),
    ("POST", "/search", {"query": {}, "exclude": [7, "x"]}, 400, "exclude: no item with key 'x'"),
    ("POST", "/similar", {"item": "nope"}, 400, "no item with key 'nope'"),
    ("POST", "/search", {"query": {}, "method": "fast"}, 400, "'exact' or 'ann'"),
    ("GET", "/nope", None, 404, "GET /nope: not found; endpoints: GET /health"),
    ("GET", "/search", None, 405, "method not allowed"),
  ):
    got_status, got = _request(conn, method, path, body)
    assert got_status == status and expected in got["error"], (body, got)
    assert set(got) == {"error"} and "\n" not in got["error"]
  status, got = _request(conn, "POST", "/search", {"query": {"q_topic": 1}, "k": 2})
  assert status == 200 and len(got["results"][0]["keys"]) == 2  # the same connection still works


def test_sslrec_serve_bad_flags_are_one_line(tmp_path):
  pytest.importorskip("starlette")
  for args, expected in (
    ([f"--export={tmp_path / 'nope'}"], "no such export directory"),
    ([f"--export={tmp_path}", "--port=70000"], "--port=70000 is out of range"),
  ):
    p = subprocess.run(
      [sys.executable, "-m", "sslrec.serving.http", *args],
      capture_output=True,
      text=True,
      env=_serve_env(),
    )
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert expected in lines[0]
