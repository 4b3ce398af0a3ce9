"""Export: layout, manifest, fidelity of the exported towers to the training code, safe writes."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import tiny_config

from sslrec import export, serving, train
from sslrec.run import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A tiny run with checkpoints at steps 2 and 4 (eval at 4) and its export."""
  config = tiny_config()
  config.train.num_steps = 4
  config.train.log_every = 2
  config.train.checkpoint_every = 2
  root = tmp_path_factory.mktemp("export")
  wd = str(root / "run")
  train.train_and_evaluate(config, wd)
  out = str(root / "export")
  summary = export.export(wd, out, log=lambda _: None)
  return config, wd, out, summary


def test_layout_and_manifest(run):
  config, wd, out, summary = run
  assert summary["step"] == 4 and summary["max_abs_diff"] <= 1e-5
  assert summary["item_max_abs_diff"] <= 1e-5
  assert sorted(os.listdir(out)) == sorted(
    [
      "manifest.json",
      "item_embeddings.npy",
      "item_keys.npy",
      "query_tower.jax",
      "query_params.npz",
      "schema.json",
      "vocabularies.json",
      "item_tower.jax",
      "item_params.npz",
      "item_vocabularies.json",
    ]
  )
  m = json.load(open(os.path.join(out, "manifest.json")))
  assert m["format"] == "sslrec-export" and m["format_version"] == serving.FORMAT_VERSION
  assert m["step"] == 4 and m["num_items"] == config.data.num_items
  assert m["embedding_dim"] == config.model.output_dim
  evals = workdir_lib.read_jsonl(os.path.join(wd, "eval.jsonl"))
  assert m["eval"] == evals[-1] and m["eval"]["step"] == 4
  assert m["config"]["ssl"]["alpha"] == config.ssl.alpha
  assert m["versions"]["jax"] == jax.__version__
  for name, meta in m["files"].items():
    assert serving.sha256_file(os.path.join(out, name)) == meta["sha256"]
  keys = np.load(os.path.join(out, "item_keys.npy"))
  np.testing.assert_array_equal(keys, np.arange(config.data.num_items))
  schema = json.load(open(os.path.join(out, "schema.json")))
  assert [f["name"] for f in schema["query"]] == m["query_features"]
  assert all(f["oov_id"] == -1 for f in schema["query"])
  # Only the query tower's weights are exported with it.
  params = np.load(os.path.join(out, "query_params.npz"))
  assert params.files and all("query" in k for k in params.files)


def test_exported_towers_match_training_code(run):
  config, wd, out, _ = run
  r = train.Run(config)  # the training code's own model, restored from the run's checkpoint
  manager = train.checkpoint_manager(wd, config)
  r.restore(manager, 4)
  manager.close()
  retriever = serving.Retriever.load(out)
  rows = np.arange(300)
  from sslrec.data import table as table_lib

  queries = table_lib.take(r.dataset.queries, rows)
  want = np.asarray(r.model.apply(r.state.params, queries, method=r.model.query_tower))
  got = retriever.embed_batch(queries)
  assert got.shape == want.shape and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  items = table_lib.take(r.dataset.items, np.arange(500))
  want_items = np.asarray(r.model.apply(r.state.params, items, method=r.model.item_tower))
  np.testing.assert_allclose(retriever.item_embeddings[:500], want_items, atol=1e-5, rtol=0)
  # The exported item tower embeds an item like the trained model, from ids or from raw values.
  np.testing.assert_allclose(retriever.embed_item_batch(items), want_items, atol=1e-5, rtol=0)
  raw = [
    {
      name: (v[v >= 0].tolist() if v.ndim else int(v)) if v.dtype.kind == "i" else v.tolist()
      for name, v in ((name, items[name][i]) for name in items)
    }
    for i in range(7)
  ]
  emb, _ = retriever.embed_items(raw)
  np.testing.assert_allclose(emb, want_items[:7], atol=1e-5, rtol=0)
  # The batch dimension is symbolic: any batch size, same rows.
  for b in (1, 7, 256):
    np.testing.assert_allclose(
      retriever.embed_batch(table_lib.take(queries, np.arange(b))), want[:b], atol=1e-5, rtol=0
    )


def test_serving_runs_without_training_code(run):
  _, _, out, _ = run
  code = f"""
import sys
for blocked in ("flax", "orbax", "orbax.checkpoint", "optax", "grain", "ml_collections",
                "sslrec.train", "sslrec.model", "sslrec.data", "sslrec.export"):
  sys.modules[blocked] = None  # importing any of these now fails
from sslrec import serving
r = serving.Retriever.load({out!r})
res = r.search({{"q_topic": 1, "q_history": [3, 4]}}, k=5)
print(res.rows.shape, r.similar_items(0, k=3).rows.shape)
"""
  p = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert p.returncode == 0, p.stderr
  assert p.stdout.strip() == "(1, 5) (1, 3)"


def test_step_flag_exports_that_checkpoint(run, tmp_path):
  _, wd, out, _ = run
  out2 = str(tmp_path / "step2")
  summary = export.export(wd, out2, step=2, log=lambda _: None)
  m = json.load(open(os.path.join(out2, "manifest.json")))
  assert summary["step"] == m["step"] == 2
  assert m["eval"] is None  # the run evaluated only at step 4
  a = np.load(os.path.join(out, "item_embeddings.npy"))
  b = np.load(os.path.join(out2, "item_embeddings.npy"))
  assert not np.allclose(a, b)
  with pytest.raises(export.ExportError, match=r"--step=3: no checkpoint .* available: 2, 4"):
    export.export(wd, str(tmp_path / "step3"), step=3)
  with pytest.raises(export.ExportError, match=r"--ann=nope: ann backend 'nope'; allowed"):
    export.export(wd, str(tmp_path / "step3"), ann_backends=["nope"])
  assert not os.path.exists(tmp_path / "step3")


def test_existing_output_is_refused_unless_overwrite(run, tmp_path):
  _, wd, out, _ = run
  other = tmp_path / "other"
  other.mkdir()
  (other / "notes.txt").write_text("keep me")
  for overwrite in (False, True):  # --overwrite replaces exports only, never other directories
    with pytest.raises(export.ExportError, match="not empty"):
      export.export(wd, str(other), overwrite=overwrite)
    assert os.listdir(other) == ["notes.txt"]
  (tmp_path / "empty").mkdir()
  export.export(wd, str(tmp_path / "empty"), step=2, log=lambda _: None)
  with pytest.raises(export.ExportError, match="--overwrite"):
    export.export(wd, str(tmp_path / "empty"))
  summary = export.export(wd, str(tmp_path / "empty"), overwrite=True, log=lambda _: None)
  assert summary["replaced"] and serving.read_manifest(str(tmp_path / "empty"))["step"] == 4
  assert sorted(os.listdir(tmp_path)) == ["empty", "other"]  # no temporary directories left


def test_item_names_string_keys_and_vocabularies_are_exported(run, tmp_path, monkeypatch):
  _, wd, _, _ = run
  from sslrec.data import sources

  load = sources.load

  def load_with_metadata(config):
    d = load(config)
    d.item_keys = np.asarray([f"sku-{i}" for i in range(d.num_items)])
    d.item_names = np.asarray([f"Item {i}" for i in range(d.num_items)])
    d.vocabularies = {
      "q_region": [f"r{i}" for i in range(16)],  # no OOV id: OOV -> missing
      "q_style": [None] + [f"s{i}" for i in range(1, 24)],
    }  # a reader's: OOV = 0
    return d

  monkeypatch.setattr(sources, "load", load_with_metadata)
  out = str(tmp_path / "named")
  export.export(wd, out, log=lambda _: None)
  r = serving.Retriever.load(out)
  assert r.item_keys[3] == "sku-3" and r.item_names[3] == "Item 3"
  assert json.load(open(os.path.join(out, "vocabularies.json")))["q_region"][3] == "r3"
  oov = {f["name"]: f["oov_id"] for f in json.load(open(os.path.join(out, "schema.json")))["query"]}
  assert oov == {"q_topic": -1, "q_style": 0, "q_history": -1, "q_region": -1, "q_dense": -1}
  res = r.similar_items("sku-3", k=4)
  assert res.names.shape == (1, 4) and all(n.startswith("Item ") for n in res.names[0])
  batch, notes = r.encode({"q_region": "r5"})
  assert batch["q_region"][0] == 5
  batch, notes = r.encode({"q_region": "5"})  # has a vocabulary: raw ids are not raw values
  assert batch["q_region"][0] == -1 and any("q_region='5' is out of vocabulary" in n for n in notes)
  batch, notes = r.encode({"q_style": "s7", "q_history": [3]})
  assert batch["q_style"][0] == 7
  batch, notes = r.encode({"q_style": "zzz"})
  assert batch["q_style"][0] == 0 and any(
    "'zzz' is out of vocabulary (-> the OOV id 0)" in n for n in notes
  )


def _launch(*args):
  return subprocess.run(
    [sys.executable, os.path.join(ROOT, "launch", "export.py"), *args],
    capture_output=True,
    text=True,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )


def test_launch_export_errors_are_one_line(run, tmp_path):
  _, wd, out, _ = run
  for args, expected in (
    ([f"--workdir={tmp_path / 'nope'}", f"--out={tmp_path / 'x'}"], "no such directory"),
    ([f"--workdir={wd}", f"--out={out}"], "exists and is not empty"),
  ):
    p = _launch(*args)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], p.stderr
  assert not os.path.exists(tmp_path / "x")
