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
def exported(tmp_path_factory):
  """An export of a tiny model (2000 items) with random weights, without a training run."""
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
  return out


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
