"""MovieLens reader: both GroupLens layouts, the time split without leakage, bad input."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from sslrec.data import movielens, sources, table
from tests.conftest import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ML100K = os.path.join(REPO, "tests", "fixtures", "ml-100k")
ML1M = os.path.join(REPO, "tests", "fixtures", "ml-1m")


def ml_config(path=ML100K):
  """The tiny config on a MovieLens fixture: trains a few steps in seconds."""
  c = tiny_config()
  c.data.name = "movielens"
  c.data.path = path
  c.data.embed_dim = 8
  c.model.query_hidden = (16,)
  c.model.item_hidden = (16,)
  c.model.output_dim = 8
  c.train.batch_size = 8
  c.ssl.batch_size = 8
  c.train.num_steps = 20
  c.train.log_every = 10
  c.optimizer.warmup_steps = 2
  c.eval.ks = (1, 5)
  c.train.select_metric = "recall@5"
  return c


def _ratings(path):
  """Raw (user, movie, rating, time) rows of a fixture, in file order."""
  if os.path.exists(os.path.join(path, "u.data")):
    rows = [
      line.split("\t") for line in open(os.path.join(path, "u.data")).read().split("\n") if line
    ]
  else:
    rows = [
      line.split("::")
      for line in open(os.path.join(path, "ratings.dat")).read().split("\n")
      if line
    ]
  return np.array([[int(x) for x in r] for r in rows], np.int64)


@pytest.mark.parametrize("path", [ML100K, ML1M])
def test_layouts_parse_to_the_same_dataset(path):
  d = movielens.load(path, embed_dim=8)
  ref = movielens.load(ML100K, embed_dim=8)
  assert d.name == "movielens-" + ("100k" if path == ML100K else "1m")
  assert d.item_spec.names == ("movie_id", "title_words", "genres", "year")
  assert d.query_spec.names == ("user_id", "gender", "age", "occupation", "zip", "history")
  assert list(d.item_keys) == list(range(1, 14))
  assert d.item_names[8] == "Café au Lait (Métisse) (1993)"  # latin-1
  for name in ("movie_id", "title_words", "genres", "year"):
    np.testing.assert_array_equal(d.items[name], ref.items[name])
  for name in ("user_id", "gender", "age", "zip", "history"):  # 100k ages map to 1M's groups
    np.testing.assert_array_equal(d.queries[name], ref.queries[name])
  np.testing.assert_array_equal(d.train_item, ref.train_item)
  np.testing.assert_array_equal(d.eval_item, ref.eval_item)
  # Vocabularies: raw value of each id, id 0 the OOV bucket.
  genres = d.vocabularies["genres"]
  assert genres[0] is None and "Animation" in genres
  toy = [genres[i] for i in d.items["genres"][0] if i >= 0]
  assert toy == ["Animation", "Children's", "Comedy"]
  words = d.vocabularies["title_words"]
  assert [words[i] for i in d.items["title_words"][11] if i >= 0] == ["usual", "suspects", "the"]
  assert d.vocabularies["year"][d.items["year"][9]] == 1975  # Star Wars (1977), 5-year buckets
  assert d.vocabularies["movie_id"][d.items["movie_id"][0]] == 1


def test_positives_vocabularies_and_cold_items():
  d = movielens.load(ML100K, min_rating=4, embed_dim=8)
  r = _ratings(ML100K)
  assert d.num_train + d.num_eval == int((r[:, 2] >= 4).sum())
  freq = np.bincount(d.train_item, minlength=d.num_items)
  # Movie 9 is only rated after the cutoff: cold, its id and its unseen words are OOV (0).
  assert freq[8] == 0 and 8 in d.eval_item
  assert d.items["movie_id"][8] == 0
  assert set(d.items["title_words"][8][d.items["title_words"][8] >= 0]) == {0}
  # Movie 13 is never rated: in the catalogue only.
  assert freq[12] == 0 and 12 not in d.eval_item and d.items["movie_id"][12] == 0
  d5 = movielens.load(ML100K, min_rating=5, embed_dim=8)
  assert d5.num_train + d5.num_eval == int((r[:, 2] >= 5).sum())


def _decode_history(d, q):
  vocab = d.vocabularies["history"]
  return tuple(vocab[i] for i in d.queries["history"][q] if i >= 0)


def _reference_split(r, split, fraction):
  """``bool [rows]``: the eval period of each rating, computed the obvious way."""
  if split == "global":
    return r[:, 3] >= np.sort(r[:, 3])[int(np.ceil((1 - fraction) * len(r)))]
  is_eval = np.zeros(len(r), bool)
  for u in np.unique(r[:, 0]):
    mine = np.flatnonzero(r[:, 0] == u)
    n_eval = int(np.floor(fraction * mine.size))
    if n_eval:
      boundary = np.sort(r[mine, 3])[mine.size - n_eval]
      is_eval[mine] = r[mine, 3] >= boundary
  return is_eval


@pytest.mark.parametrize("split", ["global", "user"])
def test_split_and_histories_have_no_leakage(split):
  hist_len = 4
  d = movielens.load(ML100K, split=split, eval_fraction=0.25, history_length=hist_len, embed_dim=8)
  r = _ratings(ML100K)
  is_eval = _reference_split(r, split, 0.25)
  pos = r[:, 2] >= 4

  def history(u, before):  # the user's latest ratings strictly before `before`, latest first
    mine = r[(r[:, 0] == u) & (r[:, 3] < before)]
    mine = mine[np.argsort(-mine[:, 3], kind="stable")]
    return tuple(int(m) for m in mine[:hist_len, 1])

  # Train pairs: one context each; history = strictly earlier ratings.
  users = d.vocabularies["user_id"]
  got = {
    (users[d.queries["user_id"][q]], int(d.item_keys[i])): _decode_history(d, q)
    for q, i in zip(d.train_query, d.train_item)
  }
  time_of = {(int(u), int(m)): int(t) for u, m, _, t in r}
  want = {(int(u), int(m)): history(u, t) for u, m, _, t in r[~is_eval & pos]}
  assert got == want
  for (u, m), hist in got.items():
    assert all(time_of[(u, h)] < time_of[(u, m)] for h in hist)
  # Eval contexts: one per user, at the start of its eval period.
  got = sorted(
    (
      _decode_history(d, q),
      tuple(sorted(int(d.item_keys[i]) for i in d.eval_item[d.eval_query == q])),
    )
    for q in np.unique(d.eval_query)
  )
  want = []
  for u in np.unique(r[is_eval & pos, 0]):
    start = r[is_eval & (r[:, 0] == u), 3].min()
    items = tuple(sorted(int(m) for m in r[is_eval & pos & (r[:, 0] == u), 1]))
    hist = history(u, start)
    assert all(time_of[(int(u), h)] < start for h in hist) and not set(hist) & set(items)
    want.append((hist, items))
  assert got == sorted(want)
  # Within each user, training ratings are strictly earlier than eval ratings.
  for u in np.unique(r[:, 0]):
    mine = r[:, 0] == u
    if (mine & is_eval).any() and (mine & ~is_eval).any():
      assert r[mine & ~is_eval, 3].max() < r[mine & is_eval, 3].min()


def test_global_cutoff_separates_train_and_eval_in_time():
  d = movielens.load(ML1M, split="global", eval_fraction=0.2, embed_dim=8)
  r = _ratings(ML1M)
  cutoff = np.sort(r[:, 3])[int(np.ceil(0.8 * len(r)))]
  pos = r[r[:, 2] >= 4]
  assert pos[pos[:, 3] < cutoff, 3].max() < cutoff <= pos[pos[:, 3] >= cutoff, 3].min()
  assert sorted(int(k) for k in d.item_keys[d.train_item]) == sorted(pos[pos[:, 3] < cutoff, 1])
  assert sorted(int(k) for k in d.item_keys[d.eval_item]) == sorted(pos[pos[:, 3] >= cutoff, 1])


def test_seen_items_are_the_users_training_period_ratings():
  d = movielens.load(ML100K, embed_dim=8)
  r = _ratings(ML100K)
  seen = {}
  for q, i in zip(d.eval_seen_query, d.eval_seen_item):
    seen.setdefault(int(q), set()).add(int(d.item_keys[i]))
  user_vocab = d.vocabularies["user_id"]
  cutoff = np.sort(r[:, 3])[int(np.ceil(0.8 * len(r)))]
  for q in np.unique(d.eval_query):
    uid = user_vocab[d.queries["user_id"][q]]
    if uid is None:  # a user with no training period: nothing seen
      assert int(q) not in seen
      continue
    rated = {int(m) for u, m, _, t in r if u == uid and t < cutoff}  # all ratings, not positives
    assert seen[int(q)] == rated


def test_item_to_item_queries_are_previous_items():
  d = movielens.load(ML100K, query_mode="user", history_length=0, embed_dim=8)
  assert "history" not in d.query_spec.names
  assert d.num_queries == 7  # static contexts: one row per user
  d = movielens.load(ML100K, query_mode="item", share_tables=True, embed_dim=8)
  assert d.query_spec.features == d.item_spec.features
  assert d.query_spec.share_tables_with == "item"
  assert d.num_queries == d.num_items + len(np.unique(d.eval_query))
  r = _ratings(ML100K)
  # Train query = the user's previous rated movie (strictly earlier).
  prev = {}
  for u in np.unique(r[:, 0]):
    rows = r[r[:, 0] == u]
    rows = rows[np.argsort(rows[:, 3], kind="stable")]
    for k in range(1, len(rows)):
      if rows[k, 3] > rows[k - 1, 3]:
        prev.setdefault(int(rows[k, 1]), set()).add(int(rows[k - 1, 1]))
  for q, i in zip(d.train_query, d.train_item):
    assert q < d.num_items
    assert int(d.item_keys[q]) in prev[int(d.item_keys[i])]
  assert (d.eval_query >= d.num_items).all()


def test_train_fraction_keeps_eval(tmp_path):
  c = ml_config()
  full = sources.load(c)
  c.data.train_fraction = 0.5
  half = sources.load(c)
  again = sources.load(c)
  assert half.num_train == round(0.5 * full.num_train)
  np.testing.assert_array_equal(half.train_item, again.train_item)  # seeded
  assert set(zip(half.train_query, half.train_item)) <= set(zip(full.train_query, full.train_item))
  np.testing.assert_array_equal(half.eval_item, full.eval_item)
  np.testing.assert_array_equal(half.eval_seen_item, full.eval_seen_item)
  c.seed = 1  # the init / stream seed: the same data
  np.testing.assert_array_equal(sources.load(c).train_item, half.train_item)
  c.data.seed = 1
  assert not np.array_equal(sources.load(c).train_item, half.train_item)


def test_train_fraction_thins_the_references_fit():
  """At train_fraction < 1 the references learn from that fraction of the seen items (as much of
  the training period as the model), while exclusion and scoring keep the whole histories."""
  import jax

  from sslrec import evaluate

  c = ml_config()
  full = sources.load(c)
  c.data.train_fraction = 0.5
  half = sources.load(c)
  assert (half.train_fraction, full.train_fraction) == (0.5, 1.0)
  freq = np.bincount(full.train_item, minlength=full.num_items)
  head = freq >= np.median(freq)
  mesh = jax.make_mesh((1,), ("data",))

  def fit(d):
    ev = evaluate.Evaluator(None, d, freq, head, mesh=mesh, ks=(5,), references=())
    _, r = ev.interactions()
    return ev, r

  ev_full, r_full = fit(full)
  ev_half, r_half = fit(half)
  seen = ev_full.history[0].size
  assert ev_half.history[0].size == seen  # exclusion and scoring: the whole histories

  def fitted_seen(d, r):  # the fit's entries beyond the D_train pairs (distinct rows here)
    return r.nnz - np.unique(d.train_query.astype(np.int64) * d.num_items + d.train_item).size

  assert seen > 10 and fitted_seen(full, r_full) == seen
  assert fitted_seen(half, r_half) == round(0.5 * seen)  # half of the seen items
  assert (fit(half)[1] != r_half).nnz == 0  # seeded


def test_train_fraction_applies_to_synthetic():
  c = tiny_config()
  full = sources.load(c)
  c.data.train_fraction = 0.1
  small = sources.load(c)
  assert small.num_train == 4000 and full.num_train == 40_000
  np.testing.assert_array_equal(small.eval_item, full.eval_item)
  assert small.eval_seen_query.size == 0  # the embedded dataset's eval queries are new


# ----------------------------------------------------------------------------------------------
# Bad input: one clear DataError naming the file (and line) and what is expected.


def _copy(tmp_path, src=ML100K):
  dst = tmp_path / "ml"
  shutil.copytree(src, dst)
  return dst


def test_missing_files_name_themselves(tmp_path):
  with pytest.raises(
    table.DataError,
    match=r"no such folder .*u\.data, u\.item, u\.user.*"
    r"ratings\.dat, movies\.dat, users\.dat",
  ):
    movielens.load(str(tmp_path / "nope"))
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "README").write_text("x")
  with pytest.raises(table.DataError, match=r"no MovieLens ratings file .*found \['README'\]"):
    movielens.load(str(empty))
  d = _copy(tmp_path)
  os.remove(d / "u.user")
  with pytest.raises(
    table.DataError,
    match=r"u\.user: no such file; the ML-100k layout needs "
    r"u\.data, u\.item, u\.user",
  ):
    movielens.load(str(d))


@pytest.mark.parametrize(
  "layout,file,line,expect",
  [
    ("100k", "u.data", "7\t1\t5\n", r"u\.data:3: expected 4 fields .*found 3: '7\\t1\\t5'"),
    ("100k", "u.data", "7\t1\tfive\t875000000\n", r"u\.data:3: rating 'five' is not a number"),
    (
      "100k",
      "u.data",
      "7\t1\t5\t2020-01-01\n",
      r"u\.data:3: timestamp '2020-01-01' is not an integer",
    ),
    ("1m", "ratings.dat", "7::1::5:875000000\n", r"ratings\.dat:3: expected 4 fields"),
    ("1m", "ratings.dat", "7::1::5::\n", r"ratings\.dat:3: Timestamp '' is not an integer"),
    ("100k", "u.item", "14|Broken (1995)|01-Jan-1995\n", r"u\.item:3: expected 24 fields"),
    (
      "1m",
      "movies.dat",
      "x::Broken (1995)::Drama\n",
      r"movies\.dat:3: movie id 'x' is not an integer",
    ),
    (
      "1m",
      "movies.dat",
      "1::Toy Story again (1995)::Drama\n",
      r"movies\.dat:3: movie id 1 already on line 1",
    ),
    ("1m", "users.dat", "8::M::old::1::55555\n", r"users\.dat:3: age 'old' is not an integer"),
  ],
)
def test_malformed_lines_give_file_line_and_text(tmp_path, layout, file, line, expect):
  d = _copy(tmp_path, ML100K if layout == "100k" else ML1M)
  lines = open(d / file, encoding="latin-1").read().split("\n")
  lines.insert(2, line.rstrip("\n"))
  with open(d / file, "w", encoding="latin-1") as f:
    f.write("\n".join(lines))
  with pytest.raises(table.DataError, match=expect):
    movielens.load(str(d))


def test_unknown_items_dropped_and_reported_or_error(tmp_path, caplog):
  d = _copy(tmp_path)
  with open(d / "u.data", "a") as f:
    f.write("1\t99\t5\t875000001\n2\t98\t5\t875000002\n3\t99\t1\t875000003\n")
  ref = movielens.load(ML100K, embed_dim=8)
  got = movielens.load(str(d), embed_dim=8)
  assert (
    "3 of 69 interactions have movie ids absent from u.item (e.g. 98, 99); dropped" in caplog.text
  )
  np.testing.assert_array_equal(got.train_item, ref.train_item)
  with pytest.raises(
    table.DataError,
    match=r"3 of 69 interactions have movie ids absent from "
    r"u\.item .*unknown_items='drop' drops them",
  ):
    movielens.load(str(d), unknown_items="error")


def test_empty_splits_are_clear_errors(tmp_path):
  with pytest.raises(table.DataError, match=r"no positive interactions \(.*min_rating=6"):
    movielens.load(ML100K, min_rating=6)
  d = _copy(tmp_path)
  # Every positive late: the training period has none.
  rows = _ratings(ML100K)
  with open(d / "u.data", "w") as f:
    for u, m, r, t in rows:
      f.write(f"{u}\t{m}\t{r if t > 875090000 - 1 else 1}\t{t}\n")
  with pytest.raises(table.DataError, match="the training period has no positive interactions"):
    movielens.load(str(d))


@pytest.mark.parametrize(
  "config,expect",
  [
    ("configs/movielens.py", "no such folder (config.data.path); a MovieLens folder holds"),
    ("configs/movielens.py:bogus", "--config=configs/movielens.py:bogus: unknown variant 'bogus'"),
  ],
)
def test_cli_errors_are_one_line_without_traceback(tmp_path, config, expect):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [
      sys.executable,
      "launch/main.py",
      f"--config={config}",
      f"--config.data.path={tmp_path / 'nope'}",
      f"--workdir={tmp_path / 'run'}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )
  assert proc.returncode == 2, proc.stderr
  err = proc.stderr.strip()
  assert err.startswith("error: ") and expect in err and "\n" not in err, err
  assert "Traceback" not in proc.stderr + proc.stdout
