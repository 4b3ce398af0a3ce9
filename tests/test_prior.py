"""The popularity prior of retrieval (sslrec.prior), query feature dropout and the warmup cap."""

import json
import os

import jax
import numpy as np
import pytest
from conftest import tiny_config

from sslrec import evaluate, export, parallel, prior, serving, step, train
from sslrec.data import table as table_lib
from tests.test_evaluate import LookupModel, _dataset, _mesh


def test_prior_is_a_dot_product_column():
  rng = np.random.default_rng(0)
  x, q = rng.normal(size=(7, 4)).astype(np.float32), rng.normal(size=(3, 4)).astype(np.float32)
  freq = np.array([0, 1, 2, 5, 10, 100, 3])
  assert prior.with_items(x, freq, 0.0, 0.05) is x and prior.with_queries(q, 0.0) is q
  xs, qs = prior.with_items(x, freq, 2.0, 0.05), np.asarray(prior.with_queries(q, 2.0))
  assert xs.shape == (7, 5) and qs.shape == (3, 5)
  np.testing.assert_allclose(qs @ xs.T, q @ x.T + 2.0 * 0.05 * np.log1p(freq)[None], rtol=1e-5)
  with pytest.raises(ValueError, match="non-negative"):
    prior.item_column(np.array([1, -1]), 1.0, 1.0)


@pytest.mark.parametrize("weight", [0.0, 0.7])
def test_evaluator_ranks_by_score_plus_prior(weight):
  rng = np.random.default_rng(1)
  n_items, n_q, tau = 40, 12, 0.05
  scores = rng.normal(size=(n_q, n_items)).astype(np.float32)
  freq = rng.integers(0, 50, n_items)
  seen_q, seen_i = rng.integers(0, n_q, 30), rng.integers(0, n_items, 30)
  pairs = (np.arange(n_q), rng.integers(0, n_items, n_q))
  data = _dataset(n_items, n_q, train=([0], [0]), pairs=pairs, seen=(seen_q, seen_i))
  params = {"query": scores, "item": np.eye(n_items, dtype=np.float32)}
  ev = evaluate.Evaluator(
    LookupModel(),
    data,
    freq,
    freq > 20,
    mesh=_mesh(),
    ks=(5,),
    references=(),
    popularity_prior=weight,
    temperature=tau,
  )
  want = scores.astype(np.float64) + weight * tau * np.log1p(freq)[None]
  for q, i in zip(seen_q, seen_i, strict=True):
    if i != pairs[1][q]:
      want[q, i] = -np.inf
  top = np.argsort(-want, axis=1, kind="stable")[:, :5]
  np.testing.assert_array_equal(ev.model_top_k(params), top)


def test_export_folds_the_prior_into_the_vectors(tmp_path):
  config = tiny_config()
  config.train.num_steps = 2
  config.eval.popularity_prior = 0.5
  wd = str(tmp_path / "run")
  train.train_and_evaluate(config, wd)
  out = str(tmp_path / "export")
  summary = export.export(wd, out, log=lambda _: None)
  assert summary["max_abs_diff"] <= 1e-5
  m = json.load(open(os.path.join(out, "manifest.json")))
  assert m["popularity_prior"] == 0.5 and m["embedding_dim"] == config.model.output_dim + 1
  r = train.Run(config)
  manager = train.checkpoint_manager(wd, config)
  r.restore(manager, 2)
  manager.close()
  retriever = serving.Retriever.load(out)
  queries = table_lib.take(r.dataset.queries, np.arange(5))
  q = np.asarray(r.model.apply(r.state.params, queries, method=r.model.query_tower))
  x = export.item_embeddings(r.model, r.state.params, r.dataset)
  want = q @ x.T + 0.5 * config.loss.temperature * np.log1p(r.stats.item_freq)[None]
  got = retriever.search_embeddings(retriever.embed_batch(queries), 3)
  np.testing.assert_allclose(got.scores, np.sort(want, axis=1)[:, ::-1][:, :3], atol=1e-4)
  # Item-to-item: the item's own prior column is not part of the query.
  sim = retriever.similar_items(retriever.item_keys[0], k=3)
  want_sim = x @ x[0] + 0.5 * config.loss.temperature * np.log1p(r.stats.item_freq)
  want_sim[0] = -np.inf
  np.testing.assert_allclose(sim.scores[0], np.sort(want_sim)[::-1][:3], atol=1e-4)


def test_query_feature_mask():
  config = tiny_config()
  run = train.Run(config)
  pairs = {"query": table_lib.take(run.dataset.queries, np.arange(4000))}
  assert step.query_feature_mask(jax.random.key(0), pairs, model=run.model, config=config) is None
  config.model.query_feature_dropout = 0.3
  a = step.query_feature_mask(jax.random.key(0), pairs, model=run.model, config=config)
  b = step.query_feature_mask(jax.random.key(1), pairs, model=run.model, config=config)
  assert a.shape == (4000, run.model.query_spec.num_features) and a.dtype == bool
  assert abs(float(a.mean()) - 0.3) < 0.02 and bool((a != b).any())


def test_query_feature_dropout_trains_and_changes_the_step():
  def loss_after(p):
    config = tiny_config()
    config.model.query_feature_dropout = p
    run = train.Run(config)
    pairs = parallel.to_global(next(run.pair_iter), run.mesh)
    items = parallel.to_global(next(run.item_iter), run.mesh)
    _, metrics = run.step_fn(run.state, pairs, items, run.step_rng)
    return float(metrics["loss/main"])

  base, dropped = loss_after(0.0), loss_after(0.5)
  assert np.isfinite(dropped) and dropped != base


def test_warmup_is_capped_by_the_run_length():
  config = tiny_config()
  config.optimizer.warmup_steps = 100
  assert step.warmup_steps(config) == 100
  assert step.warmup_steps(config, 3000) == 100
  assert step.warmup_steps(config, 64) == 6
  lr = step.learning_rate(config, 64)
  assert float(lr(6)) == pytest.approx(config.optimizer.learning_rate)
  assert float(step.learning_rate(config)(6)) < config.optimizer.learning_rate


def test_prior_weight_is_chosen_on_validation(tmp_path):
  config = tiny_config()
  config.train.num_steps = 2
  config.eval.popularity_prior_candidates = (0.5, 4.0)
  wd = str(tmp_path / "run")
  train.train_and_evaluate(config, wd)
  lines = [json.loads(line) for line in open(os.path.join(wd, "eval.jsonl"))]
  scored = {
    r["popularity_prior"]: r for r in lines if "popularity_prior" in r and r["split"] == "valid"
  }
  assert sorted(scored) == [0.0, 0.5, 4.0]
  metric = config.train.select_metric
  best = max(sorted(scored), key=lambda w: (scored[w][metric], -w))
  (test,) = [r for r in lines if r["split"] == "test"]
  assert test["popularity_prior"] == best and export.prior_weight(wd, config) == best
  # The candidates score differently (the prior changes the ranking), references alike.
  assert len({scored[w][metric] for w in scored}) > 1
  assert len({scored[w][f"popularity/{metric}"] for w in scored}) == 1
