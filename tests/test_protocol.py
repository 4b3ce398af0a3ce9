"""The evaluation protocol: train / validation / test without leakage, checkpoint selection on
validation, early stopping, one test evaluation of the selected checkpoint."""

import re

import jax
import numpy as np
import pytest

from sslrec import configuration, train
from sslrec.data import interactions, movielens, sources, table
from sslrec.run import workdir as workdir_lib
from tests.conftest import tiny_config
from tests.test_movielens import ML100K, _decode_history, _ratings, _reference_split, ml_config


def _log(n_users=30, n_events=20, seed=0):
  rng = np.random.default_rng(seed)
  key = np.repeat(np.arange(n_users), n_events)
  time = rng.integers(0, 10_000, key.size)
  item = rng.integers(0, 50, key.size)
  return interactions.Log(key=key, item=item, time=time, positive=rng.random(key.size) < 0.8)


@pytest.mark.parametrize("how", ["global", "user"])
def test_three_periods_in_time_order(how):
  lg = _log()
  s = interactions.split_log(lg, how, eval_fraction=0.2, valid_fraction=0.1)
  periods = s.period
  assert set(np.unique(periods)) == {interactions.TRAIN, interactions.VALID, interactions.TEST}
  if how == "global":  # one cutoff each: every train event before every valid event, and so on
    t = s.time
    assert t[periods == 0].max() < t[periods == 1].min()
    assert t[periods == 1].max() < t[periods == 2].min()
    frac = np.bincount(periods) / periods.size
    np.testing.assert_allclose(frac, [0.7, 0.1, 0.2], atol=0.02)
  for k in range(30):  # per key, the periods follow each other in time
    rows = s.key == k
    p, t = periods[rows], s.time[rows]
    for a, b in ((0, 1), (1, 2), (0, 2)):
      if (p == a).any() and (p == b).any():
        assert t[p == a].max() < t[p == b].min()
  # Without a validation fraction the test period is the one of the old two-way split.
  two = interactions.split_log(lg, how, eval_fraction=0.2)
  np.testing.assert_array_equal(two.period == interactions.TEST, s.period == interactions.TEST)
  assert not (two.period == interactions.VALID).any()


@pytest.mark.parametrize("split", ["global", "user"])
def test_movielens_periods_histories_and_exclusions(split):
  """Validation = the slice just before test; each held-out context's history = the user's
  ratings before its own period (so never an item of that period); its excluded items = the
  same earlier ratings; training pairs only from the training period."""
  hist_len = 4
  d = movielens.load(
    ML100K,
    split=split,
    eval_fraction=0.25,
    valid_fraction=0.25,
    history_length=hist_len,
    embed_dim=8,
  )
  r = _ratings(ML100K)
  is_test = _reference_split(r, split, 0.25)
  is_held = _reference_split(r, split, 0.5) | is_test
  period = np.where(is_test, 2, np.where(is_held, 1, 0))
  pos = r[:, 2] >= 4
  users = d.vocabularies["user_id"]
  time_of = {(int(u), int(m)): int(t) for u, m, _, t in r}

  def history(u, before):  # the user's latest ratings strictly before `before`, latest first
    mine = r[(r[:, 0] == u) & (r[:, 3] < before)]
    mine = mine[np.argsort(-mine[:, 3], kind="stable")]
    return tuple(int(m) for m in mine[:hist_len, 1])

  train_pairs = {
    (users[d.queries["user_id"][q]], int(d.item_keys[i]))
    for q, i in zip(d.train_query, d.train_item)
  }
  assert train_pairs == {(int(u), int(m)) for u, m, _, _ in r[(period == 0) & pos]}
  for p, name in ((1, "valid"), (2, "test")):
    s = d.for_split(name)
    seen = {}
    for q, i in zip(s.eval_seen_query, s.eval_seen_item):
      seen.setdefault(int(q), set()).add(int(d.item_keys[i]))
    got = sorted(
      (
        _decode_history(d, q),
        tuple(sorted(int(d.item_keys[i]) for i in s.eval_item[s.eval_query == q])),
        tuple(sorted(seen.get(int(q), ()))),
      )
      for q in np.unique(s.eval_query)
    )
    want = []
    for u in np.unique(r[(period == p) & pos, 0]):
      mine = r[:, 0] == u
      start = r[(period == p) & mine, 3].min()
      items = tuple(sorted(int(m) for m in r[(period == p) & pos & mine, 1]))
      before = tuple(sorted(int(m) for m in r[(period < p) & mine, 1]))
      hist = history(u, start)
      assert all(time_of[(int(u), h)] < start for h in hist) and not set(hist) & set(items)
      want.append((hist, items, before))
    assert got == sorted(want), name
  # Vocabularies from the training period only: an item first rated after it is out of vocabulary.
  first_train = {int(m) for m in r[period == 0, 1]}
  vocab = d.vocabularies["movie_id"]
  assert set(vocab[1:]) == first_train


def test_empty_validation_split_is_one_clear_error():
  c = ml_config()
  c.data.split = "user"
  c.data.valid_fraction = 0.01  # floor(0.01 * n) = 0 for every user
  with pytest.raises(
    table.DataError,
    match=r"the validation period has no positive interactions "
    r"\(.*data\.valid_fraction=0\.01",
  ):
    sources.load(c)


@pytest.mark.parametrize(
  "field,value,allowed",
  [
    ("train.early_stopping_patience", -1, "an integer >= 0"),
    ("train.select_metric", "recall@7", "a validation metric the evaluation computes"),
    ("train.select_metric", "loss", "a validation metric the evaluation computes"),
    ("train.num_epochs", -0.5, "a number >= 0"),
    ("data.valid_fraction", 0.0, "a number in (0, 0.8)"),
    ("data.valid_fraction", 0.85, "a number in (0, 0.8)"),
    ("data.seed", -3, "an integer in [0, 2**31)"),
  ],
)
def test_bad_protocol_fields(field, value, allowed):
  c = tiny_config()
  section, name = field.split(".")
  c[section][name] = value
  with pytest.raises(
    configuration.ConfigError, match=rf"config\.{field}=.*allowed: {re.escape(allowed)}"
  ):
    configuration.validate(c)


def test_num_epochs_sets_the_length():
  c = tiny_config()
  c.train.num_epochs = 2.0
  assert configuration.num_steps(c, 1000) == int(np.ceil(2.0 * 1000 / c.train.batch_size))
  c.train.num_epochs = 0.0
  assert configuration.num_steps(c, 1000) == c.train.num_steps


def _leaf(params):
  return np.asarray(jax.tree.leaves(params["params"]["item_mlp"])[0])


def test_selection_early_stopping_and_one_test_evaluation(tmp_path, monkeypatch):
  """Validation figures that peak at step 20 and then fall: with patience 2 the run stops at step
  40, and the one test evaluation scores the parameters of step 20 (restored from best/)."""
  c = tiny_config()
  c.train.num_steps = 100
  c.train.eval_every = 10
  c.train.log_every = 10
  c.train.checkpoint_every = 10
  c.train.early_stopping_patience = 2
  curve = {10: 0.1, 20: 0.5, 30: 0.4, 40: 0.3}
  original = train.Run.evaluate
  seen_params = {}

  def evaluate(self, split="valid", params=None, prior_weight=None):
    out = original(self, split, params, prior_weight)
    step = int(self.state.step)
    if split == "valid":
      out["recall@50"] = curve[step]
      seen_params[step] = _leaf(self.state.params)
    else:
      used = params if params is not None else self.state.params
      seen_params["test"] = _leaf(used)
    return out

  monkeypatch.setattr(train.Run, "evaluate", evaluate)
  train.train_and_evaluate(c, str(tmp_path))
  lines = workdir_lib.read_jsonl(str(tmp_path / "eval.jsonl"))
  assert [(r["step"], r["split"]) for r in lines] == [
    (10, "valid"),
    (20, "valid"),
    (30, "valid"),
    (40, "valid"),
    (40, "test"),
  ]
  assert lines[-1]["selected_step"] == 20
  assert "selected_step" not in lines[0]
  np.testing.assert_array_equal(seen_params["test"], seen_params[20])
  assert not np.array_equal(seen_params[20], seen_params[40])
  # Running the finished workdir again trains nothing more and tests the same checkpoint.
  train.train_and_evaluate(c, str(tmp_path))
  again = workdir_lib.read_jsonl(str(tmp_path / "eval.jsonl"))
  assert again[-1]["split"] == "test" and again[-1]["selected_step"] == 20
  np.testing.assert_array_equal(seen_params["test"], seen_params[20])
