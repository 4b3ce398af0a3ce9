"""Evaluation on real-data layouts (cold items, excluded training items) and training end to end."""

import json
import os

import jax
import numpy as np

from sslrec import evaluate, parallel, step, train
from sslrec.data import sources, stats
from sslrec.run import workdir as workdir_lib
from tests.conftest import tiny_config
from tests.test_movielens import ml_config


def _model(config):
  dataset = sources.load(config)
  model = step.create_model(config, dataset)
  query, item = step.example_inputs(dataset)
  params = model.init(jax.random.key(0), query, item)
  mesh = parallel.make_mesh(config.mesh.shape, config.mesh.axes)
  freq = stats.item_frequencies(dataset.train_item, dataset.num_items)
  return dataset, model, params, mesh, freq


def _brute_force(dataset, model, params, freq, ks, exclude):
  """Hits of the model and of popularity, from full numpy rankings: each query's seen items
  removed except its positives (any of its eval targets)."""
  items = np.asarray(model.apply(params, dataset.items, method=model.item_tower))
  queries = {k: v[dataset.eval_query] for k, v in dataset.queries.items()}
  q = np.asarray(model.apply(params, queries, method=model.query_tower))
  scores = q @ items.T
  pop = np.broadcast_to(freq.astype(np.float64) - 1e-9 * np.arange(freq.size), scores.shape).copy()
  if exclude:
    for p, qr in enumerate(dataset.eval_query):
      positives = dataset.eval_item[dataset.eval_query == qr]
      removed = dataset.eval_seen_item[
        (dataset.eval_seen_query == qr) & ~np.isin(dataset.eval_seen_item, positives)
      ]
      scores[p, removed] = -np.inf
      pop[p, removed] = -np.inf
  out = []
  for s in (scores, pop):
    t = s[np.arange(len(s)), dataset.eval_item]
    ids = np.arange(s.shape[1])[None, :]
    rank = ((s > t[:, None]) | ((s == t[:, None]) & (ids < dataset.eval_item[:, None]))).sum(1)
    out.append(np.stack([rank < k for k in ks], axis=1))
  return out


def test_exclude_train_items_and_cold_recall():
  config = ml_config()
  config.eval.ks = (1, 3, 5)
  dataset, model, params, mesh, freq = _model(config)
  head = stats.head_items(freq, config.eval.head_fraction)
  ks = config.eval.ks
  assert dataset.eval_seen_query.size > 0
  for exclude in (True, False):
    got = evaluate.evaluate(
      params,
      model,
      dataset,
      freq,
      head,
      mesh=mesh,
      ks=ks,
      batch_size=4,
      exclude_train_items=exclude,
    )
    hits, pop_hits = _brute_force(dataset, model, params, freq, ks, exclude)
    cold = freq[dataset.eval_item] == 0
    assert cold.any() and got["eval/cold_pairs"] == cold.sum()
    for j, k in enumerate(ks):
      np.testing.assert_allclose(got[f"recall@{k}"], hits[:, j].mean(), err_msg=f"{exclude} {k}")
      np.testing.assert_allclose(got[f"recall@{k}/cold"], hits[cold, j].mean())
      np.testing.assert_allclose(got[f"popularity/recall@{k}"], pop_hits[:, j].mean())
  # Removing training items never lowers a recall; here it raises popularity's.
  on = evaluate.evaluate(params, model, dataset, freq, head, mesh=mesh, ks=ks, batch_size=4)
  off = evaluate.evaluate(
    params, model, dataset, freq, head, mesh=mesh, ks=ks, batch_size=4, exclude_train_items=False
  )
  assert all(on[k] >= off[k] for k in on if k.startswith("recall@") and not np.isnan(on[k]))
  assert on["popularity/recall@3"] > off["popularity/recall@3"]
  # The config switch reaches evaluation through the dataset.
  config.eval.exclude_train_items = False
  assert sources.load(config).eval_seen_query.size == 0
  table = evaluate.format_table(on, ks)
  assert "| R@1/cold |" in table and "\n| itemknn |" in table and "| N@5 |" in table


def test_excluding_top_k_matches_retrieve():
  """With nothing removed, the evaluator's per-query top-K (the excluding scorer) agrees with the
  sharded top-K of ``retrieve``; with removals, its lists skip exactly the removed items."""
  config = ml_config()
  dataset, model, params, mesh, freq = _model(config)
  head = stats.head_items(freq, 0.2)
  off = evaluate.Evaluator(
    model,
    dataset,
    freq,
    head,
    mesh=mesh,
    ks=(2, 5),
    batch_size=2,
    exclude_train_items=False,
    references=(),
  )
  item_emb = evaluate.item_embeddings(params, model, dataset, mesh, 4)
  queries = {k: v[off.query_rows] for k, v in dataset.queries.items()}
  top = evaluate.retrieve(
    params, model, queries, off.num_queries, item_emb, mesh, k=5, batch_size=4
  )
  np.testing.assert_array_equal(off.model_top_k(params), top)
  on = evaluate.Evaluator(
    model, dataset, freq, head, mesh=mesh, ks=(2, 5), batch_size=2, references=()
  )
  assert on.excluded[0].size > 0
  full = evaluate.retrieve(
    params, model, queries, on.num_queries, item_emb, mesh, k=dataset.num_items, batch_size=4
  )
  got = on.model_top_k(params)
  for q in range(on.num_queries):
    removed = on.excluded[1][on.excluded[0] == q]
    want = [i for i in full[q] if i not in removed][:5]
    assert got[q].tolist() == want + [-1] * (5 - len(want))


def test_synthetic_evaluation_unchanged_by_exclusions():
  config = tiny_config()
  config.data.num_items, config.data.num_queries = 300, 400
  config.data.num_train_pairs, config.data.num_eval_pairs = 2000, 64
  dataset, model, params, mesh, freq = _model(config)
  head = stats.head_items(freq, 0.2)
  a = evaluate.evaluate(params, model, dataset, freq, head, mesh=mesh, ks=(10,), batch_size=32)
  b = evaluate.evaluate(
    params,
    model,
    dataset,
    freq,
    head,
    mesh=mesh,
    ks=(10,),
    batch_size=32,
    exclude_train_items=False,
  )
  np.testing.assert_equal(a, b)  # NaN (an empty decile) compares equal
  # The eval queries are new (no history): ItemKNN falls back to popularity.
  pop = {k[len("popularity/") :]: v for k, v in a.items() if k.startswith("popularity/")}
  knn = {k[len("itemknn/") :]: v for k, v in a.items() if k.startswith("itemknn/")}
  assert pop and knn.keys() == pop.keys()
  np.testing.assert_equal(knn, pop)


def test_movielens_trains_end_to_end(tmp_path):
  config = ml_config()
  config.train.num_steps = 30
  wd = str(tmp_path / "run")
  result = train.train_and_evaluate(config, wd)
  assert np.isfinite(result["recall@5"]) and "recall@5/cold" in result
  evals = workdir_lib.read_jsonl(os.path.join(wd, "eval.jsonl"))
  assert evals[-1]["step"] == 30 and evals[-1]["eval/pairs"] == 10
  saved = json.load(open(os.path.join(wd, "config.json")))
  assert saved["data"]["name"] == "movielens" and saved["data"]["path"].endswith("ml-100k")
  metrics = workdir_lib.read_jsonl(os.path.join(wd, "metrics.jsonl"))
  assert metrics[-1]["loss/ssl"] > 0 and np.isfinite(metrics[-1]["loss"])


def test_item_to_item_mode_trains_with_shared_tables():
  config = ml_config()
  config.data.query_mode = "item"
  config.model.share_item_tables = True
  config.ssl.alpha = 0.3
  run = train.Run(config)
  params = run.state.params["params"]
  assert "query_input" not in params and "item_input" in params and "query_mlp" in params
  losses = [float(run.step()["loss/main"]) for _ in range(30)]
  assert np.isfinite(losses).all() and np.mean(losses[-5:]) < np.mean(losses[:5])
  result = run.evaluate()
  assert 0.0 <= result["recall@5"] <= 1.0
  # Without sharing the query tower owns its tables.
  config.model.share_item_tables = False
  dataset = sources.load(config)
  model = step.create_model(config, dataset)
  query, item = step.example_inputs(dataset)
  assert "query_input" in model.init(jax.random.key(0), query, item)["params"]
