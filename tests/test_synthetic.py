"""Tests of the synthetic dataset generator."""

import numpy as np
import pytest

from sslrec import features as features_lib
from sslrec.data import synthetic, table

SMALL = dict(num_items=2000, num_queries=4000, num_train_pairs=40_000, num_eval_pairs=4000)


@pytest.fixture(scope="module")
def dataset() -> table.Dataset:
  return synthetic.generate(0, **SMALL)


def _all_arrays(d: table.Dataset) -> dict[str, np.ndarray]:
  out = {f"items/{k}": v for k, v in d.items.items()}
  out.update({f"queries/{k}": v for k, v in d.queries.items()})
  out.update(
    train_query=d.train_query,
    train_item=d.train_item,
    eval_query=d.eval_query,
    eval_item=d.eval_item,
    item_keys=d.item_keys,
  )
  return out


def test_deterministic_per_seed(dataset):
  same = _all_arrays(synthetic.generate(0, **SMALL))
  ref = _all_arrays(dataset)
  assert same.keys() == ref.keys()
  for k in ref:
    np.testing.assert_array_equal(same[k], ref[k], err_msg=k)
    assert same[k].dtype == ref[k].dtype, k
  other = _all_arrays(synthetic.generate(1, **SMALL))
  for k in (
    "items/category",
    "items/tags",
    "queries/q_history",
    "queries/q_dense",
    "train_item",
    "eval_query",
  ):
    assert not np.array_equal(other[k], ref[k]), k


def test_validates_with_expected_schema(dataset):
  assert dataset.validate() is dataset
  assert dataset.name == "synthetic"
  assert dataset.item_spec.name == "item" and dataset.query_spec.name == "query"
  assert dataset.num_items == SMALL["num_items"]
  assert dataset.num_queries == SMALL["num_queries"]
  assert dataset.num_train == SMALL["num_train_pairs"]
  # The held-out pairs are split by query into validation and test: no user in both.
  assert dataset.num_eval + dataset.num_valid == SMALL["num_eval_pairs"]
  assert dataset.num_eval > 0 and dataset.num_valid > 0
  assert not set(dataset.valid_query.tolist()) & set(dataset.eval_query.tolist())
  assert not set(dataset.valid_query.tolist()) & set(dataset.train_query.tolist())
  for spec, tab in ((dataset.item_spec, dataset.items), (dataset.query_spec, dataset.queries)):
    assert set(tab) == set(spec.names)
    for f in spec.features:
      a = tab[f.name]
      assert a.shape == (tab[spec.names[0]].shape[0],) + f.shape, f.name
      assert a.dtype == f.dtype, f.name
      assert f.embed_dim == 32
  for a in (dataset.train_query, dataset.train_item, dataset.eval_query, dataset.eval_item):
    assert a.dtype == np.int32 and a.ndim == 1
  np.testing.assert_array_equal(dataset.item_keys, np.arange(dataset.num_items))
  np.testing.assert_array_equal(dataset.items["item_id"], np.arange(dataset.num_items))
  assert dataset.item_spec["item_id"].vocab_size == dataset.num_items


def test_feature_inventory(dataset):
  spec = dataset.item_spec
  kinds = [f.kind for f in spec.features]
  assert spec.num_features >= 8
  assert kinds.count("multi") >= 3
  assert "item_id" in spec.names
  # Query tower: own features, no query id, one of each kind.
  qkinds = {f.kind for f in dataset.query_spec.features}
  assert qkinds == {"id", "multi", "dense"}
  assert not any("id" == n or n.endswith("_id") for n in dataset.query_spec.names)


def test_embed_dim_is_propagated():
  d = synthetic.generate(
    3, embed_dim=8, num_items=200, num_queries=50, num_train_pairs=100, num_eval_pairs=10
  )
  assert {f.embed_dim for f in d.item_spec.features + d.query_spec.features} == {8}


def test_minimum_sizes():
  # The smallest: 2 held-out users (one validation, one test) and one pair each.
  d = synthetic.generate(0, num_items=100, num_queries=10, num_train_pairs=1, num_eval_pairs=2)
  assert (
    d.num_items == 100 and d.num_queries == 10 and d.num_train == d.num_eval == d.num_valid == 1
  )
  with pytest.raises(table.DataError, match="leave the validation or the test split empty"):
    synthetic.generate(7, num_items=100, num_queries=10, num_train_pairs=1, num_eval_pairs=1)
  d = synthetic.generate(
    7,
    num_items=100,
    num_queries=10,
    num_train_pairs=500,
    num_eval_pairs=50,
    feature_noise=1.0,
    popularity_exponent=0.0,
  )
  assert d.validate() is d


def test_planted_groups_match_schema(dataset):
  groups = synthetic.planted_groups()
  assert len(groups) >= 3
  names = [n for g in groups for n in g]
  assert len(names) == len(set(names)), "groups overlap"
  assert set(names) == set(dataset.item_spec.names) - {"item_id"}
  for g in groups:
    assert len(g) >= 2
    assert any(dataset.item_spec[n].kind == "multi" for n in g)


def test_multi_features_right_padded(dataset):
  for tab, spec in ((dataset.items, dataset.item_spec), (dataset.queries, dataset.query_spec)):
    for f in spec.features:
      if f.kind != "multi":
        continue
      present = tab[f.name] >= 0
      lengths = present.sum(1)
      # Present values first, then padding only.
      np.testing.assert_array_equal(present, np.arange(f.max_len)[None, :] < lengths[:, None])
      assert lengths.max() == f.max_len, f.name
  # Tag bags hold distinct values when there is no noise.
  d = synthetic.generate(
    0, feature_noise=0.0, num_items=500, num_queries=50, num_train_pairs=100, num_eval_pairs=10
  )
  tags = d.items["tags"]
  for row in tags[:100]:
    v = row[row >= 0]
    assert len(set(v.tolist())) == len(v)


def test_query_dense_standardised(dataset):
  x = dataset.queries["q_dense"]
  np.testing.assert_allclose(x.mean(0), 0.0, atol=1e-4)
  np.testing.assert_allclose(x.std(0), 1.0, atol=1e-3)


def test_noise_free_features_are_functions_of_the_latent():
  d = synthetic.generate(
    5, feature_noise=0.0, num_items=1000, num_queries=50, num_train_pairs=100, num_eval_pairs=10
  )
  cat, sub = d.items["category"], d.items["subcategory"]
  np.testing.assert_array_equal(sub // synthetic.SUBCATS_PER_TOPIC, cat)
  tags = d.items["tags"]
  np.testing.assert_array_equal(
    np.where(tags >= 0, tags // synthetic.TAGS_PER_TOPIC, cat[:, None]),
    np.broadcast_to(cat[:, None], tags.shape),
  )


def test_item_frequency_follows_power_law(dataset):
  freq = np.bincount(dataset.train_item, minlength=dataset.num_items)
  counts = np.sort(freq)[::-1]
  top = int(0.2 * dataset.num_items)
  assert counts[:top].sum() / counts.sum() > 0.7  # head items dominate D_train
  assert (freq == 0).mean() > 0.02  # a real tail of (nearly) unseen items
  rank = np.arange(1, dataset.num_items + 1)
  fit = (rank > 5) & (rank <= 500) & (counts > 0)
  slope = np.polyfit(np.log(rank[fit]), np.log(counts[fit]), 1)[0]
  assert -1.6 < slope < -0.6, slope


def test_popularity_exponent_controls_skew():
  args = dict(num_items=2000, num_queries=2000, num_train_pairs=20_000, num_eval_pairs=10)

  def head_share(exponent):
    d = synthetic.generate(0, popularity_exponent=exponent, **args)
    counts = np.sort(np.bincount(d.train_item, minlength=2000))[::-1]
    return counts[:400].sum() / counts.sum()

  assert head_share(0.0) < 0.5 < head_share(1.1)


def test_query_features_carry_signal(dataset):
  q, i = dataset.train_query, dataset.train_item
  q_topic = dataset.queries["q_topic"][q]
  category = dataset.items["category"][i]
  agree = np.mean(q_topic == category)
  # Chance level: the same marginals, paired independently.
  p_q = np.bincount(q_topic, minlength=synthetic.NUM_TOPICS) / q.size
  p_i = np.bincount(category, minlength=synthetic.NUM_TOPICS) / q.size
  chance = float(p_q @ p_i)
  assert agree > 0.3 and agree > 8 * chance, (agree, chance)
  style = dataset.items["brand"][i] // synthetic.BRANDS_PER_STYLE
  assert np.mean((dataset.queries["q_style"][q] == style)[dataset.items["brand"][i] >= 0]) > 0.3


def test_features_beat_popularity_on_eval(dataset):
  """A simple feature-based scorer gets much higher recall than the most popular items."""
  freq = np.bincount(dataset.train_item, minlength=dataset.num_items)
  log_pop = np.log(np.maximum(freq, 0.5))
  q, i = dataset.eval_query[:1000], dataset.eval_item[:1000]
  topic_match = dataset.queries["q_topic"][q][:, None] == dataset.items["category"][None, :]
  item_style = dataset.items["brand"] // synthetic.BRANDS_PER_STYLE
  style_match = dataset.queries["q_style"][q][:, None] == item_style[None, :]
  scores = log_pop[None, :] + synthetic.BETA * (topic_match.astype(float) + style_match)
  k = 10
  top_feat = np.argpartition(-scores, k, axis=1)[:, :k]
  recall_feat = np.mean((top_feat == i[:, None]).any(1))
  recall_pop = np.mean(np.isin(i, np.argsort(-freq, kind="stable")[:k]))
  assert recall_feat > 1.5 * recall_pop, (recall_feat, recall_pop)


def test_eval_queries_held_out(dataset):
  train_q, eval_q = set(dataset.train_query.tolist()), set(dataset.eval_query.tolist())
  assert not train_q & eval_q
  boundary = dataset.num_queries - round(synthetic.EVAL_QUERY_FRACTION * dataset.num_queries)
  assert max(train_q) < boundary <= min(eval_q)
  valid_q = set(dataset.valid_query.tolist())
  assert not valid_q & eval_q and not valid_q & train_q and boundary <= min(valid_q)
  assert len(eval_q | valid_q) > 0.9 * (
    dataset.num_queries - boundary
  )  # most held-out queries used


@pytest.mark.parametrize(
  "kwargs",
  [
    dict(num_items=99),
    dict(num_queries=5),
    dict(num_train_pairs=0),
    dict(num_eval_pairs=-1),
    dict(feature_noise=-0.1),
    dict(feature_noise=1.5),
    dict(popularity_exponent=-1.0),
    dict(popularity_exponent=float("nan")),
    dict(embed_dim=0),
    dict(num_items=1000.5),
  ],
)
def test_bad_arguments_raise(kwargs):
  with pytest.raises(table.DataError):
    synthetic.generate(0, **kwargs)


def test_negative_seed_raises():
  with pytest.raises(table.DataError, match="seed"):
    synthetic.generate(-1)


def test_schema_helpers_match_generated(dataset):
  assert synthetic.item_spec(32, dataset.num_items) == dataset.item_spec
  assert synthetic.query_spec(32) == dataset.query_spec
  assert isinstance(dataset.item_spec, features_lib.TowerSpec)
