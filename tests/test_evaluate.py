"""Per-query evaluation (recall, NDCG, MAP, coverage, deciles, exclusions) and the references."""

import logging
import math

import jax
import numpy as np
import pytest

from sslrec import evaluate, parallel, references, step
from sslrec.data import sources, stats, table
from tests.test_movielens import ml_config


class LookupModel:
  """A stand-in two-tower model: embeddings looked up by row id, ``params = {'query': [Q, D],
  'item': [N, D]}``; with one-hot item embeddings a query's embedding *is* its score vector."""

  def item_tower(self, params, batch):
    return params["item"][batch["id"]]

  def query_tower(self, params, batch):
    return params["query"][batch["id"]]

  def apply(self, params, batch, method):
    return method(params, batch)


def _dataset(num_items, num_queries, train, pairs, seen=None):
  """A dataset of id-only rows; ``train`` / ``pairs`` / ``seen``: ``(query rows, items)``."""
  arr = lambda x: np.asarray(x, np.int32)
  seen = (None, None) if seen is None else tuple(map(arr, seen))
  return table.Dataset(
    name="tiny",
    item_spec=None,
    query_spec=None,
    items={"id": np.arange(num_items, dtype=np.int32)},
    queries={"id": np.arange(num_queries, dtype=np.int32)},
    train_query=arr(train[0]),
    train_item=arr(train[1]),
    eval_query=arr(pairs[0]),
    eval_item=arr(pairs[1]),
    eval_seen_query=seen[0],
    eval_seen_item=seen[1],
  )


def _mesh():
  return parallel.make_mesh((-1,), ("data",))


def _hand_example():
  """6 items, 3 eval queries with hand-set scores (one-hot items)."""
  scores = np.array(
    [
      [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],  # q0: ranks 0..5; seen {0}; positives {2, 4}
      [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # q1: ranks 5..0; nothing seen; positive {5}
      [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # q2: all tied (lower index first); seen {1, 3}
      [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    ],  # row 3: only in D_train
    np.float32,
  )
  params = {"query": scores, "item": np.eye(6, dtype=np.float32)}
  data = _dataset(
    6,
    4,
    train=([3, 3, 3], [0, 1, 2]),
    pairs=([0, 2, 1, 0], [2, 3, 5, 4]),  # q2's positive 3 is also seen: kept
    seen=([0, 2, 2], [0, 1, 3]),
  )
  freq = np.array([5, 4, 3, 2, 1, 0])  # popularity order 0..5; item 5 cold
  head = np.array([1, 1, 1, 0, 0, 0], bool)
  return params, data, freq, head


def test_hand_built_metrics():
  params, data, freq, head = _hand_example()
  ev = evaluate.Evaluator(
    LookupModel(),
    data,
    freq,
    head,
    mesh=_mesh(),
    ks=(1, 3),
    batch_size=2,
    references=("popularity",),
  )
  # After exclusions: q0 -> 1 2 3 4 5, q1 -> 5 4 3 2 1 0, q2 -> 0 2 3 4 5 (1 removed, 3 kept).
  np.testing.assert_array_equal(ev.model_top_k(params), [[1, 2, 3], [5, 4, 3], [0, 2, 3]])
  m = ev(params)
  assert m["eval/pairs"] == 4 and m["eval/queries"] == 3 and m["eval/cold_pairs"] == 1
  # Pair hits @3: (0,2) rank 1 yes, (0,4) no, (1,5) rank 0 yes, (2,3) rank 2 yes.
  assert m["recall@1"] == 0.25 and m["recall@3"] == 0.75
  assert m["recall@3/head"] == 1.0 and m["recall@3/tail"] == pytest.approx(2 / 3)
  assert m["recall@3/cold"] == 1.0 and m["recall@1/cold"] == 1.0
  l2 = math.log2
  assert m["ndcg@3"] == pytest.approx(((1 / l2(3)) / (1 + 1 / l2(3)) + 1 + 0.5) / 3)
  assert m["ndcg@1"] == pytest.approx(1 / 3)
  assert m["ndcg@3/head"] == pytest.approx(1 / l2(3))  # q0 only (positive 2 at rank 1)
  assert m["ndcg@3/tail"] == pytest.approx((0 + 1 + 0.5) / 3)
  assert m["map@3"] == pytest.approx((0.5 / 2 + 1 + 1 / 3) / 3)
  assert m["map@1"] == pytest.approx(1 / 3)
  assert m["coverage@1"] == 0.5 and m["coverage@3"] == 1.0
  # Deciles of 6 items (most popular first): items 0..5 -> 0, 1, 3, 5, 6, 8.
  want = {0: None, 1: None, 2: None, 3: 1.0, 4: None, 5: 1.0, 6: 0.0, 7: None, 8: 1.0, 9: None}
  for d, v in want.items():
    got = m[f"recall@3/decile_{d}"]
    assert math.isnan(got) if v is None else got == v, (d, got)
  assert not any("decile" in k for k in m if k.startswith("recall@1/"))
  # Popularity: q0 -> 1 2 3, q1 -> 0 1 2, q2 -> 0 2 3.
  assert m["popularity/recall@3"] == 0.5 and m["popularity/recall@1"] == 0.0
  assert m["popularity/coverage@3"] == pytest.approx(4 / 6)
  assert m["popularity/map@3"] == pytest.approx((0.5 / 2 + 0 + 1 / 3) / 3)
  # Without exclusions q0 ranks 0 first, q2 ranks 1 before 3.
  off = evaluate.Evaluator(
    LookupModel(),
    data,
    freq,
    head,
    mesh=_mesh(),
    ks=(1, 3),
    exclude_train_items=False,
    references=(),
  )
  np.testing.assert_array_equal(off.model_top_k(params), [[0, 1, 2], [5, 4, 3], [0, 1, 2]])
  assert off(params)["recall@3"] == 0.5
  table_text = evaluate.format_table(m, (1, 3))
  assert "| N@3 |" in table_text and "| R@3/cold |" in table_text
  assert "\n| popularity |" in table_text and "itemknn" not in table_text
  assert (
    evaluate.Evaluator(
      LookupModel(), data, freq, head, mesh=_mesh(), ks=(3,), max_pairs=2, references=()
    )(params)["eval/queries"]
    == 2
  )


def _old_per_pair(scores, query, target, seen_q, seen_i, ks, freq):
  """The per-pair evaluation this module replaced (HEAD~ ``_target_ranks`` / popularity): each
  pair ranks its target among all items minus its query's seen items (its own target kept)."""
  n = scores.shape[1]
  pop_rank = np.empty(n, np.int64)
  pop_rank[np.argsort(-freq, kind="stable")] = np.arange(n)
  hits, pop_hits = [], []
  ids = np.arange(n)
  for q, t in zip(query, target, strict=True):
    s = scores[q]
    above = (s > s[t]) | ((s == s[t]) & (ids < t))
    removed = seen_i[(seen_q == q) & (seen_i != t)]
    above[removed] = False
    rank = above.sum()
    pop = pop_rank[t] - (pop_rank[removed] < pop_rank[t]).sum()
    hits.append([rank < k for k in ks])
    pop_hits.append([pop < k for k in ks])
  return np.array(hits), np.array(pop_hits)


def _brute_ndcg_map(scores, query, target, seen_q, seen_i, k):
  """NDCG@k and MAP@k from full numpy sorts, per distinct query."""
  ndcg, ap = [], []
  for q in np.unique(query):
    pos = set(target[query == q].tolist())
    s = scores[q].astype(np.float64).copy()
    s[[i for i in seen_i[seen_q == q] if i not in pos]] = -np.inf
    top = np.lexsort((np.arange(s.size), -s))[:k]
    rel = np.array([i in pos for i in top], float)
    ideal = sum(1 / math.log2(i + 2) for i in range(min(len(pos), k)))
    ndcg.append((rel / np.log2(np.arange(k) + 2)).sum() / ideal)
    ap.append((np.cumsum(rel) / np.arange(1, k + 1) * rel).sum() / min(len(pos), k))
  return np.mean(ndcg), np.mean(ap)


@pytest.mark.parametrize("chunked", [False, True])
def test_per_query_matches_per_pair_on_random_data(monkeypatch, chunked):
  if chunked:  # the item-block scan path: 8 devices x blocks of 2 rows
    monkeypatch.setattr(evaluate, "EVAL_ITEM_CHUNK", 2)
  rng = np.random.default_rng(0)
  n_items, n_queries, dim = 40, 30, 4
  params = {
    "query": rng.normal(size=(n_queries, dim)).astype(np.float32),
    "item": rng.normal(size=(n_items, dim)).astype(np.float32),
  }
  query = rng.integers(0, 20, size=60)  # several positives per query, some pairs repeated
  target = rng.integers(0, n_items, size=60)
  seen_q, seen_i = rng.integers(0, 25, size=150), rng.integers(0, n_items, size=150)
  clash = np.isin(seen_q * n_items + seen_i, query * n_items + target)
  seen_q, seen_i = seen_q[~clash], seen_i[~clash]  # seen never a positive: both views agree
  freq = rng.integers(0, 5, size=n_items)
  head = stats.head_items(freq, 0.25)
  data = _dataset(
    n_items, n_queries, train=([29], [0]), pairs=(query, target), seen=(seen_q, seen_i)
  )
  ks = (1, 5, 10)
  ev = evaluate.Evaluator(
    LookupModel(), data, freq, head, mesh=_mesh(), ks=ks, batch_size=8, references=("popularity",)
  )
  if chunked:
    assert ev._item_chunk == 2
  got = ev(params)
  scores = params["query"] @ params["item"].T
  hits, pop_hits = _old_per_pair(scores, query, target, seen_q, seen_i, ks, freq)
  for j, k in enumerate(ks):
    assert got[f"recall@{k}"] == pytest.approx(hits[:, j].mean())
    assert got[f"recall@{k}/head"] == pytest.approx(hits[head[target], j].mean())
    assert got[f"recall@{k}/tail"] == pytest.approx(hits[~head[target], j].mean())
    assert got[f"recall@{k}/cold"] == pytest.approx(hits[freq[target] == 0, j].mean())
    assert got[f"popularity/recall@{k}"] == pytest.approx(pop_hits[:, j].mean())
    ndcg, ap = _brute_ndcg_map(scores, query, target, seen_q, seen_i, k)
    assert got[f"ndcg@{k}"] == pytest.approx(ndcg) and got[f"map@{k}"] == pytest.approx(ap)
  assert 0.0 < got["recall@10"] < 1.0 and got["eval/queries"] == np.unique(query).size


def test_second_call_compiles_nothing():
  config = ml_config()
  dataset = sources.load(config)
  model = step.create_model(config, dataset)
  params = model.init(jax.random.key(0), *step.example_inputs(dataset))
  freq = stats.item_frequencies(dataset.train_item, dataset.num_items)
  head = stats.head_items(freq, 0.2)
  ev = evaluate.Evaluator(model, dataset, freq, head, mesh=_mesh(), ks=(1, 5), batch_size=2)
  assert len(ev.bounds) > 1 and ev.excluded[0].size > 0
  first = ev(params)
  fns = (ev._item_fn, ev._query_fn, ev._top_k)
  sizes = [f._cache_size() for f in fns]
  refs = ev._reference_metrics
  records = []

  class Catch(logging.Handler):
    def emit(self, record):
      records.append(record.getMessage())

  handler = Catch(level=logging.DEBUG)
  logger = logging.getLogger("jax")
  logger.addHandler(handler)
  try:
    with jax.log_compiles():
      second = ev(params)
  finally:
    logger.removeHandler(handler)
  assert not [r for r in records if "Compiling" in r], records
  assert [f._cache_size() for f in fns] == sizes
  assert ev._reference_metrics is refs  # the references were not recomputed
  np.testing.assert_equal(first, second)  # NaN (empty groups) compare equal
  assert "itemknn/recall@5" in second


def test_itemknn_equals_brute_force_cosine():
  rng = np.random.default_rng(1)
  r_dense = (rng.random((30, 20)) < 0.25).astype(np.float64)
  keys, r = references.interaction_matrix(*np.nonzero(r_dense), 20)
  np.testing.assert_array_equal(r.toarray(), r_dense[keys])
  r_dense = r_dense[keys]
  norm = np.sqrt(r_dense.sum(0))
  with np.errstate(invalid="ignore", divide="ignore"):
    cos = np.nan_to_num((r_dense.T @ r_dense) / np.outer(norm, norm))
  np.fill_diagonal(cos, 0.0)
  full = references.ItemKNN(r, neighbors=100)
  np.testing.assert_allclose(full.similarity.toarray(), cos, rtol=1e-6)
  # Top-3 neighbours per item (ties: lower index).
  knn = references.ItemKNN(r, neighbors=3)
  want = np.zeros_like(cos)
  for i in range(20):
    nz = np.flatnonzero(cos[i])
    keep = nz[np.lexsort((nz, -cos[i, nz]))][:3]
    want[i, keep] = cos[i, keep]
  np.testing.assert_allclose(knn.similarity.toarray(), want, rtol=1e-6)
  assert knn.similarity.nnz <= 3 * 20
  # Scores: summed similarities of the history items.
  hist = references.history_matrix(np.array([0, 0, 1, 2]), np.array([3, 7, 7, 1]), 3, 20)
  np.testing.assert_allclose(full.scores(hist).toarray(), hist.toarray() @ cos, rtol=1e-5)


def test_top_k_orders_scored_then_popularity_with_exclusions():
  rng = np.random.default_rng(2)
  n, rows, k = 15, 6, 7
  dense = np.where(rng.random((rows, n)) < 0.3, rng.integers(1, 4, (rows, n)), 0).astype(float)
  dense[5] = 0.0  # no scores at all: pure popularity
  ex = rng.random((rows, n)) < 0.3
  freq = rng.integers(0, 3, n)
  order, rank = references.popularity_order(freq)
  r, c = np.nonzero(dense)
  er, ec = np.nonzero(ex)
  got = references.top_k(r, c, dense[r, c], rows, er, ec, order, rank, k)
  for b in range(rows):
    items = [i for i in range(n) if not ex[b, i]]
    items.sort(key=lambda i: (0, -dense[b, i], i) if dense[b, i] else (1, rank[i], 0))
    want = (items + [-1] * k)[:k]
    assert got[b].tolist() == want, b


def _clustered(num_clusters=8, size=5, train_users=200, eval_users=40, seed=3):
  """Users who each interact with 3 items of one cluster; eval users hold out a 4th."""
  rng = np.random.default_rng(seed)
  n_items = num_clusters * size
  tq, ti = [], []
  for u in range(train_users):
    c = rng.integers(num_clusters)
    for i in rng.choice(size, 3, replace=False):
      tq.append(u)
      ti.append(c * size + i)
  sq, si, eq, ei = [], [], [], []
  for u in range(train_users, train_users + eval_users):
    c = rng.integers(num_clusters)
    picks = rng.choice(size, 4, replace=False) + c * size
    sq += [u] * 3
    si += picks[:3].tolist()
    eq.append(u)
    ei.append(picks[3])
  data = _dataset(n_items, train_users + eval_users, (tq, ti), (eq, ei), seen=(sq, si))
  return data, stats.item_frequencies(np.asarray(ti), n_items)


@pytest.mark.parametrize("reference", ["itemknn", "als"])
def test_reference_beats_popularity_on_clustered_items(reference):
  if reference == "als":
    pytest.importorskip("implicit")
  data, freq = _clustered()
  rng = np.random.default_rng(0)
  params = {
    "query": rng.normal(size=(data.num_queries, 4)).astype(np.float32),
    "item": rng.normal(size=(data.num_items, 4)).astype(np.float32),
  }
  ev = evaluate.Evaluator(
    LookupModel(),
    data,
    freq,
    stats.head_items(freq, 0.2),
    mesh=_mesh(),
    ks=(2,),
    references=("popularity", reference),
  )
  m = ev(params)
  # The two unseen items of the query's cluster are its top 2 by similarity.
  assert m[f"{reference}/recall@2"] >= 0.9 > m["popularity/recall@2"] + 0.5
  assert f"\n| {reference} |" in evaluate.format_table(m, (2,))
