"""Tests of the corpus statistics (frequencies, logQ, head split, mutual information)."""

import collections
import math

import numpy as np
import pytest

from sslrec import features as features_lib
from sslrec.data import stats, synthetic, table

F = features_lib.FeatureSpec


# ----------------------------------------------------------------------------- frequencies


def test_item_frequencies():
  freq = stats.item_frequencies(np.array([0, 2, 2, 4, 2], np.int32), 6)
  assert freq.dtype == np.int64
  np.testing.assert_array_equal(freq, [1, 0, 3, 0, 1, 0])
  with pytest.raises(table.DataError):
    stats.item_frequencies(np.array([0, 6]), 6)
  with pytest.raises(table.DataError):
    stats.item_frequencies(np.array([-1, 0]), 6)


def test_log_q_finite_and_consistent():
  freq = np.array([6, 0, 3, 1, 0])
  lq = stats.log_q(freq)
  assert lq.dtype == np.float32 and lq.shape == (5,)
  assert np.all(np.isfinite(lq))
  np.testing.assert_allclose(np.exp(lq), [0.6, 0.1, 0.3, 0.1, 0.1], rtol=1e-6)
  # Ordering follows the frequencies; unseen items equal a single occurrence.
  assert lq[0] > lq[2] > lq[3] == lq[1] == lq[4]


def test_log_q_all_zero_is_uniform():
  np.testing.assert_allclose(stats.log_q(np.zeros(4, np.int64)), np.log(0.25), rtol=1e-6)


def test_head_items_fraction_and_tie_break():
  freq = np.array([1, 5, 3, 3, 3, 0, 7, 3])
  head = stats.head_items(freq, 0.5)  # 4 items: 6 (7), 1 (5), then ties of 3 -> lowest index.
  assert head.dtype == bool
  np.testing.assert_array_equal(np.flatnonzero(head), [1, 2, 3, 6])
  np.testing.assert_array_equal(np.flatnonzero(stats.head_items(freq, 0.3)), [1, 2, 6])  # ceil 2.4
  assert not stats.head_items(freq, 0.0).any()
  assert stats.head_items(freq, 1.0).all()
  # Float round-up does not add an item: 0.1 * 30 = 3.0000000000000004.
  assert stats.head_items(np.arange(30), 0.1).sum() == 3
  with pytest.raises(ValueError):
    stats.head_items(freq, 1.5)


def test_head_items_of_generated_dataset():
  d = synthetic.generate(
    0, num_items=1000, num_queries=500, num_train_pairs=5000, num_eval_pairs=10
  )
  freq = stats.item_frequencies(d.train_item, d.num_items)
  head = stats.head_items(freq, 0.2)
  assert head.sum() == 200
  assert freq[head].min() >= freq[~head].max()


# ----------------------------------------------------------------------------- mutual information


def _reference_values(x: np.ndarray, f: features_lib.FeatureSpec, dense_bins: int = 16):
  """Per item, the list of (value, weight) the MI definition assigns (plain Python)."""
  out = []
  if f.kind == "dense":
    edges = np.quantile(x[:, 0], np.linspace(0, 1, dense_bins + 1)[1:-1])
    for v in x[:, 0]:
      out.append([(int(np.searchsorted(edges, v, side="right")), 1.0)])
    return out
  for row in np.asarray(x).reshape(len(x), -1):
    present = [int(v) for v in row if v >= 0]
    if not present:
      out.append([("missing", 1.0)])
    else:
      out.append([(v, 1.0 / len(present)) for v in present])
  return out


def _reference_mi(items, spec) -> np.ndarray:
  """Brute-force sum_{vi,vj} P(vi,vj) log(P(vi,vj) / (P(vi) P(vj))) with Python loops."""
  vals = [_reference_values(items[f.name], f) for f in spec.features]
  n = len(vals[0])
  k = spec.num_features
  marg = []
  for fv in vals:
    m = collections.defaultdict(float)
    for row in fv:
      for v, w in row:
        m[v] += w / n
    marg.append(m)
  mi = np.zeros((k, k))
  for i in range(k):
    mi[i, i] = -sum(p * math.log(p) for p in marg[i].values() if p > 0)
    for j in range(k):
      if i == j:
        continue
      joint = collections.defaultdict(float)
      for ri, rj in zip(vals[i], vals[j]):
        for vi, wi in ri:
          for vj, wj in rj:
            joint[vi, vj] += wi * wj / n
      mi[i, j] = sum(
        p * math.log(p / (marg[i][vi] * marg[j][vj])) for (vi, vj), p in joint.items() if p > 0
      )
  return mi


def _tiny_table(seed: int = 0, n: int = 60):
  rng = np.random.default_rng(seed)
  spec = features_lib.TowerSpec(
    "item",
    (
      F("a", "id", vocab_size=4),
      F("b", "id", vocab_size=7),
      F("bag", "multi", vocab_size=5, max_len=3),
      F("bag2", "multi", vocab_size=6, max_len=4),
      F("x", "dense", dense_dim=2),
    ),
  )
  a = rng.integers(0, 4, n)
  b = np.where(rng.random(n) < 0.2, -1, (a * 2 + rng.integers(0, 2, n)) % 7)  # missing ids
  lengths = rng.integers(0, 4, n)  # includes empty bags
  bag = np.where(
    np.arange(3)[None, :] < lengths[:, None], (a[:, None] + rng.integers(0, 2, (n, 3))) % 5, -1
  )
  lengths2 = rng.integers(0, 5, n)
  bag2 = np.where(np.arange(4)[None, :] < lengths2[:, None], rng.integers(0, 6, (n, 4)), -1)
  bag2[3] = [2, 2, 5, -1]  # a repeated value counts once per occurrence
  x = np.stack([a + rng.normal(size=n), rng.normal(size=n)], 1)
  items = {
    "a": a.astype(np.int32),
    "b": b.astype(np.int32),
    "bag": bag.astype(np.int32),
    "bag2": bag2.astype(np.int32),
    "x": x.astype(np.float32),
  }
  return items, spec


def test_mi_hand_computed_example():
  # item 0: a=0, bag={0, 1}; item 1: a=1, bag={2}. Joint: (0,0)=.25, (0,1)=.25, (1,2)=.5.
  spec = features_lib.TowerSpec(
    "item", (F("a", "id", vocab_size=2), F("bag", "multi", vocab_size=3, max_len=2))
  )
  items = {"a": np.array([0, 1], np.int32), "bag": np.array([[0, 1], [2, -1]], np.int32)}
  mi = stats.mutual_information(items, spec)
  np.testing.assert_allclose(
    mi, [[math.log(2), math.log(2)], [math.log(2), 1.5 * math.log(2)]], rtol=1e-12
  )


@pytest.mark.parametrize("seed", [0, 1])
def test_mi_matches_brute_force_reference(seed):
  items, spec = _tiny_table(seed)
  ref = _reference_mi(items, spec)
  mi = stats.mutual_information(items, spec)
  assert mi.shape == (5, 5) and mi.dtype == np.float64
  np.testing.assert_allclose(mi, ref, atol=1e-10)
  # The sparse (np.unique) path gives the same numbers.
  np.testing.assert_allclose(
    stats.mutual_information(items, spec, max_bincount_size=1), ref, atol=1e-10
  )


def test_mi_chunked_paths_agree(monkeypatch):
  items, spec = _tiny_table(2, n=300)
  ref = stats.mutual_information(items, spec)
  monkeypatch.setattr(stats, "_CHUNK_ENTRIES", 7)
  np.testing.assert_allclose(stats.mutual_information(items, spec), ref, atol=1e-10)
  np.testing.assert_allclose(
    stats.mutual_information(items, spec, max_bincount_size=1), ref, atol=1e-10
  )


def test_mi_large_vocab_id_uses_unique_path():
  rng = np.random.default_rng(0)
  n = 500
  spec = features_lib.TowerSpec(
    "item",
    (
      F("item_id", "id", vocab_size=10**9),
      F("c", "id", vocab_size=3),
      F("t", "multi", vocab_size=10**6, max_len=2),
    ),
  )
  items = {
    "item_id": (np.arange(n) * 1_999_999 + 7).astype(np.int32),
    "c": rng.integers(0, 3, n).astype(np.int32),
    "t": rng.integers(-1, 10**6, (n, 2)).astype(np.int32),
  }
  items["t"] = np.sort(items["t"], axis=1)[:, ::-1].copy()  # right-pad the -1s
  mi = stats.mutual_information(items, spec)
  np.testing.assert_allclose(mi, _reference_mi(items, spec), atol=1e-10)
  # Unique ids: MI with any feature is that feature's entropy.
  np.testing.assert_allclose(mi[0, 0], math.log(n), rtol=1e-12)
  np.testing.assert_allclose(mi[0, 1], mi[1, 1], rtol=1e-12)


def test_mi_properties():
  rng = np.random.default_rng(0)
  n = 20_000
  u = rng.integers(0, 4, n)
  spec = features_lib.TowerSpec(
    "item",
    (
      F("u", "id", vocab_size=4),
      F("u2", "id", vocab_size=4),
      F("v", "id", vocab_size=4),
      F("d", "dense", dense_dim=1),
    ),
  )
  items = {
    "u": u.astype(np.int32),
    "u2": u.astype(np.int32),
    "v": rng.integers(0, 4, n).astype(np.int32),
    "d": rng.permutation(n).astype(np.float32)[:, None],
  }
  mi = stats.mutual_information(items, spec)
  np.testing.assert_array_equal(mi, mi.T)
  assert np.all(mi >= 0)
  p = np.bincount(u, minlength=4) / n
  np.testing.assert_allclose(mi[0, 0], -(p * np.log(p)).sum(), rtol=1e-12)  # diagonal = H
  np.testing.assert_allclose(mi[0, 1], mi[0, 0], rtol=1e-12)  # identical features: MI = H
  assert mi[0, 2] < 0.01  # independent features
  np.testing.assert_allclose(mi[3, 3], math.log(16), rtol=1e-9)  # 16 equal-mass quantile bins
  assert mi[0, 3] < 0.01


def test_mi_validates_input():
  spec = features_lib.TowerSpec("item", (F("a", "id", vocab_size=2),))
  with pytest.raises(table.DataError):
    stats.mutual_information({"a": np.array([0, 2], np.int32)}, spec)
  with pytest.raises(table.DataError):
    stats.mutual_information({}, spec)


@pytest.fixture(scope="module")
def corpus() -> table.Dataset:
  # The catalogue must be large enough for plug-in MI bias between high-cardinality features
  # (about (|Vi| - 1)(|Vj| - 1) / 2N nats) to stay well below the planted dependencies.
  return synthetic.generate(
    0, num_items=20_000, num_queries=1000, num_train_pairs=20_000, num_eval_pairs=100
  )


def test_mi_recovers_planted_groups(corpus):
  mi = stats.mutual_information(corpus.items, corpus.item_spec)
  names = corpus.item_spec.names
  group_of = {n: g for g, members in enumerate(synthetic.planted_groups()) for n in members}
  candidates = [n for n in names if n != "item_id"]
  within, between = [], []
  for a in candidates:
    others = [b for b in candidates if b != a]
    row = [mi[names.index(a), names.index(b)] for b in others]
    best = others[int(np.argmax(row))]
    assert group_of[best] == group_of[a], (a, best)
    for b, v in zip(others, row):
      (within if group_of[a] == group_of[b] else between).append(v)
  assert min(within) > 2.0 * max(between), (min(within), max(between))
  assert np.mean(within) > 10 * np.mean(between)


def test_corpus_stats(corpus):
  s = stats.corpus_stats(corpus)
  n, k = corpus.num_items, corpus.item_spec.num_features
  assert s.item_freq.shape == (n,) and s.item_freq.dtype == np.int64
  assert s.item_freq.sum() == corpus.num_train
  assert s.log_q.shape == (n,) and s.log_q.dtype == np.float32 and np.isfinite(s.log_q).all()
  assert s.head.shape == (n,) and s.head.sum() == math.ceil(0.2 * n)
  assert s.mi.shape == (k, k)
  assert s.feature_names == corpus.item_spec.names
  assert s.head_fraction == 0.2
  assert stats.corpus_stats(corpus, head_fraction=0.1).head.sum() == n // 10
  # Head items hold most of the training pairs.
  assert s.item_freq[s.head].sum() > 0.7 * corpus.num_train
