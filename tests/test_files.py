"""Generic Parquet / CSV reader with a declared schema (configs/files.py)."""

import csv
import os
import shutil

import ml_collections
import numpy as np
import pytest

from configs import files as files_config
from sslrec import configuration
from sslrec.data import files, movielens, sources, table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "files")


def _config(path=FIXTURE):
  c = files_config.get_config()
  c.data.path = str(path)
  c.data.embed_dim = 8
  return c


def _rows(name):
  with open(os.path.join(FIXTURE, name), newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


def _copy(tmp_path):
  dst = tmp_path / "tables"
  shutil.copytree(FIXTURE, dst)
  return dst


def test_csv_tables_with_schema():
  d = sources.load(_config())
  assert d.name == "files"
  assert d.item_spec.names == ("genres", "item", "price", "title_words", "year")
  assert d.query_spec.names == ("age", "country", "user", "history")
  spec = {f.name: f for f in d.item_spec.features}
  assert spec["title_words"].vocab_size == 1000 and "title_words" not in d.vocabularies  # hashed
  assert spec["genres"].kind == "multi" and spec["genres"].max_len == 6
  assert spec["price"].kind == "dense" and spec["price"].dense_dim == 1
  items = _rows("items.csv")
  assert list(d.item_keys) == [r["item_id"] for r in items]
  assert list(d.item_names) == [r["title"] for r in items]
  genres = d.vocabularies["genres"]
  assert [genres[i] for i in d.items["genres"][0] if i >= 0] == [
    "Animation",
    "Children's",
    "Comedy",
  ]
  words = d.items["title_words"][0]
  np.testing.assert_array_equal(words[:2], files.encode.hash_ids(np.array(["Toy", "Story"]), 1000))
  # Hashed features hold 31-bit fingerprints; the model reduces them to the 1000 buckets.
  assert spec["title_words"].hashed and words[0] == files.encode.fingerprint("Toy")
  # Dense: standardised over the training period's items; the missing price (row 5) is 0.
  price = d.items["price"][:, 0]
  assert price[4] == 0.0 and abs(price).max() < 3
  # The same interactions as the ML-1M fixture (ISO times, the rating as weight): same split.
  ml = movielens.load(
    os.path.join(REPO, "tests", "fixtures", "ml-1m"),
    embed_dim=8,
    valid_fraction=_config().data.valid_fraction,
  )
  assert sorted(d.item_keys[d.train_item].astype(int)) == sorted(ml.item_keys[ml.train_item])
  assert sorted(d.item_keys[d.eval_item].astype(int)) == sorted(ml.item_keys[ml.eval_item])
  assert d.eval_seen_query.size == ml.eval_seen_query.size


def _write_parquet(dst):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  import datetime

  items, users, inter = _rows("items.csv"), _rows("users.csv"), _rows("interactions.csv")
  pq.write_table(
    pa.table(
      {
        "item_id": [int(r["item_id"]) for r in items],
        "title": [r["title"] for r in items],
        "genres": [r["genres"].split("|") for r in items],  # a list column
        "year": [int(r["year"]) for r in items],
        "price": [float(r["price"]) if r["price"] else None for r in items],
      }
    ),
    dst / "items.parquet",
  )
  pq.write_table(
    pa.table(
      {
        "user_id": [int(r["user_id"]) for r in users],
        "country": [r["country"] for r in users],
        "age": [int(r["age"]) for r in users],
      }
    ),
    dst / "users.parquet",
  )
  pq.write_table(
    pa.table(
      {
        "user_id": [int(r["user_id"]) for r in inter],
        "item_id": [int(r["item_id"]) for r in inter],
        "timestamp": pa.array(
          [datetime.datetime.fromisoformat(r["timestamp"]) for r in inter], pa.timestamp("s")
        ),
        "rating": [float(r["rating"]) for r in inter],
      }
    ),
    dst / "interactions.parquet",
  )


def test_parquet_matches_csv(tmp_path):
  _write_parquet(tmp_path)
  c = _config(tmp_path)
  c.data.files.interactions = "interactions.parquet"
  c.data.files.item_table = "items.parquet"
  c.data.files.query_table = "users.parquet"
  pq_data = sources.load(c)
  csv_data = sources.load(_config())
  np.testing.assert_array_equal(pq_data.item_keys.astype(str), csv_data.item_keys)
  for name in ("genres", "title_words", "price"):
    np.testing.assert_allclose(pq_data.items[name], csv_data.items[name], rtol=1e-6)
  np.testing.assert_array_equal(pq_data.queries["country"], csv_data.queries["country"])
  # Keys are numbers in Parquet, text in CSV: the same histories, other vocabulary order.
  decode = lambda d: [
    [str(d.vocabularies["history"][i]) for i in row if i >= 0]  # noqa: E731
    for row in d.queries["history"]
  ]
  assert decode(pq_data) == decode(csv_data)
  np.testing.assert_array_equal(pq_data.train_item, csv_data.train_item)
  np.testing.assert_array_equal(pq_data.eval_item, csv_data.eval_item)
  assert pq_data.vocabularies["genres"] == csv_data.vocabularies["genres"]


def test_without_query_table_the_key_is_the_only_query_column(tmp_path):
  c = _config()
  c.data.files.query_table = ""
  c.data.files.query_features = ml_collections.ConfigDict(
    {"user": {"kind": "id", "column": "user_id"}, "history": {"kind": "history"}}
  )
  d = sources.load(c)
  assert d.query_spec.names == ("user", "history") and d.num_train > 0
  c.data.files.query_features = ml_collections.ConfigDict({"country": {"kind": "id"}})
  with pytest.raises(
    table.DataError,
    match=r"no column 'country' .*only query column is the "
    r"query key 'user_id'",
  ):
    sources.load(c)


def test_item_to_item_tables(tmp_path):
  """Links between items (page -> linked page): the query is an item, tables shared."""
  dst = _copy(tmp_path)
  rng = np.random.default_rng(0)
  with open(dst / "links.csv", "w") as f:
    f.write("from,to\n")
    for _ in range(200):
      a = int(rng.integers(1, 13))
      f.write(f"{a},{(a % 12) + 1 if rng.random() < 0.8 else int(rng.integers(1, 14))}\n")
  c = _config(dst)
  c.data.query_mode = "item"
  c.model.share_item_tables = True
  c.data.files.interactions = "links.csv"
  c.data.files.query_key, c.data.files.item_key = "from", "to"
  c.data.files.timestamp = c.data.files.weight = ""
  c.data.files.item_table = "items.csv"
  c.data.files.item_features = ml_collections.ConfigDict({"item": {"kind": "id", "column": "to"}})
  with pytest.raises(
    table.DataError,
    match=r"items\.csv: no column 'to' .*columns found: "
    r"\['item_id', 'title'",
  ):
    sources.load(c)
  c.data.files.item_key = "to"
  c.data.files.item_features.item.column = "item_id"
  with pytest.raises(
    table.DataError,
    match=r"items\.csv: no column 'to' \(config\.data\.files"
    r"\.item_key\)",
  ):
    sources.load(c)
  c.data.files.item_key = "item_id"
  with pytest.raises(table.DataError, match=r"links\.csv: no column 'item_id'"):
    sources.load(c)
  with open(dst / "links.csv") as f:
    text = f.read().replace("from,to", "from,item_id")
  with open(dst / "links.csv", "w") as f:
    f.write(text)
  d = sources.load(c)
  assert d.query_spec.share_tables_with == "item" and d.num_queries == d.num_items
  # Eval excludes each query item's training links.
  # Test queries: their links of the training and validation periods (known before the test).
  seen = set(zip(d.eval_seen_query, d.eval_seen_item))
  before = set(zip(d.train_query, d.train_item)) | set(zip(d.valid_query, d.valid_item))
  assert seen == {(q, i) for q, i in before if q in set(d.eval_query)}
  seen = set(zip(d.valid_seen_query, d.valid_seen_item))
  assert seen == {(q, i) for q, i in zip(d.train_query, d.train_item) if q in set(d.valid_query)}


# ----------------------------------------------------------------------------------------------
# Bad input and bad schemas.


def _edit(path, old, new):
  with open(path, encoding="utf-8") as f:
    text = f.read()
  assert old in text
  with open(path, "w", encoding="utf-8") as f:
    f.write(text.replace(old, new, 1))


@pytest.mark.parametrize(
  "file,old,new,expect",
  [
    (
      "interactions.csv",
      "7,4,1997-09-23T09:35:00,4\n",
      "7,4,1997-09-23T09:35:00\n",
      r"interactions\.csv:3: expected 4 fields \(','-separated\), found 3: "
      r"'7,4,1997-09-23T09:35:00'",
    ),
    (
      "interactions.csv",
      "7,4,1997-09-23T09:35:00,4",
      "7,4,yesterday,4",
      r"interactions\.csv:3: timestamp 'yesterday' is not a number or an ISO-8601 time: "
      r"'7,4,yesterday,4'",
    ),
    (
      "interactions.csv",
      "7,4,1997-09-23T09:35:00,4",
      "7,4,1997-09-23T09:35:00,good",
      r"interactions\.csv:3: rating 'good' is not a number",
    ),
    (
      "interactions.csv",
      "7,4,1997-09-23T09:35:00,4",
      "7,4,,4",
      r"interactions\.csv:3: empty timestamp",
    ),
    (
      "interactions.csv",
      "7,4,1997-09-23T09:35:00,4",
      "7,4,875000000,4",
      r"interactions\.csv:3: timestamp '875000000' is a number in a column of ISO-8601 times",
    ),
    (
      "items.csv",
      ",1995,10.99",
      ",1995,1e308",
      r"items\.csv:3: dense feature 'price' \(column 'price'\) is 1e\+308; allowed: finite",
    ),
    ("items.csv", ",1995,10.99", ",1995,inf", r"items\.csv:3: dense feature 'price' .* is inf"),
    ("items.csv", '2,"GoldenEye"', '1,"GoldenEye"', r"items\.csv:3: item key '1' appears twice"),
    ("items.csv", ",1995,10.99", ",1995,cheap", r"items\.csv:3: price 'cheap' is not a number"),
    (
      "users.csv",
      "user_id,country,age",
      "uid,country,age",
      r"users\.csv: no column 'user_id' \(config\.data\.files\.query_key\); columns found: "
      r"\['uid', 'country', 'age'\]",
    ),
  ],
)
def test_bad_files_name_file_line_and_text(tmp_path, file, old, new, expect):
  dst = _copy(tmp_path)
  _edit(dst / file, old, new)
  with pytest.raises(table.DataError, match=expect):
    sources.load(_config(dst))


def test_csv_with_a_utf8_bom_reads_as_without(tmp_path):
  dst = _copy(tmp_path)
  for name in ("interactions.csv", "items.csv", "users.csv"):
    (dst / name).write_bytes(b"\xef\xbb\xbf" + (dst / name).read_bytes())
  a, b = sources.load(_config()), sources.load(_config(dst))
  assert a.item_spec == b.item_spec and list(a.item_keys) == list(b.item_keys)
  np.testing.assert_array_equal(a.train_item, b.train_item)


def test_missing_and_unsupported_files(tmp_path):
  dst = _copy(tmp_path)
  c = _config(dst)
  c.data.files.item_table = "nope.csv"
  with pytest.raises(table.DataError, match=r"nope\.csv: no such file"):
    sources.load(c)
  c.data.files.item_table = "items.json"
  with pytest.raises(
    table.DataError,
    match=r"items\.json: unsupported file type '\.json'; "
    r"allowed: \.csv, \.parquet",
  ):
    sources.load(c)
  (dst / "bad.parquet").write_text("not parquet")
  c.data.files.item_table = "bad.parquet"
  pytest.importorskip("pyarrow")
  with pytest.raises(table.DataError, match=r"bad\.parquet: cannot read as Parquet"):
    sources.load(c)
  with pytest.raises(table.DataError, match="no such folder"):
    sources.load(_config(tmp_path / "absent"))


def test_unknown_items_dropped_or_error(tmp_path, caplog):
  dst = _copy(tmp_path)
  with open(dst / "interactions.csv", "a") as f:
    f.write("1,404,1997-09-23T09:35:01,5\n9,1,1997-09-23T09:35:02,5\n")
  d = sources.load(_config(dst))
  assert "1 of 68 interactions have item keys absent from items.csv (e.g. 404)" in caplog.text
  assert "1 of 68 interactions have query keys absent from users.csv (e.g. 9)" in caplog.text
  assert d.num_train + d.num_eval == sources.load(_config()).num_train + 10
  c = _config(dst)
  c.data.unknown_items = "error"
  with pytest.raises(
    table.DataError,
    match=r"interactions\.csv: 1 of 68 interactions have item "
    r"keys absent from items\.csv \(e\.g\. 404\)",
  ):
    sources.load(c)


def test_empty_eval_split_is_a_clear_error():
  c = _config()
  c.data.min_rating = 5.5
  with pytest.raises(
    table.DataError,
    match=r"files: no positive interactions \(.*interactions"
    r"\.csv.*data\.min_rating=5\.5",
  ):
    sources.load(c)
  c.data.min_rating = 4.0
  c.data.split = "user"
  c.data.eval_fraction = 0.01  # floor(0.01 * n) = 0 for every user: no eval period
  with pytest.raises(
    table.DataError,
    match=r"the test period has no positive interactions "
    r"\(.*data\.split='user', data\.eval_fraction=0\.01",
  ):
    sources.load(c)


@pytest.mark.parametrize(
  "entry,expect",
  [
    (
      {"kind": "bag"},
      r"config\.data\.files\.item_features\.x\.kind='bag' is invalid; allowed: "
      r"one of \('id', 'multi', 'dense'\)",
    ),
    ({"kind": "id", "size": 3}, r"config\.data\.files\.item_features\.x: unknown entry 'size'"),
    ({"kind": "multi", "max_len": 0}, r"item_features\.x\.max_len=0 is invalid"),
    ({"kind": "history"}, r"item_features\.x\.kind='history' is invalid"),
  ],
)
def test_bad_schema_is_a_config_error(entry, expect):
  c = _config()
  c.data.files.item_features.x = ml_collections.ConfigDict(entry)
  with pytest.raises(configuration.ConfigError, match=expect):
    sources.load(c)


def test_config_fields_are_validated():
  c = _config()
  configuration.validate(c)
  for field, value, expect in (
    (
      "data.split",
      "random",
      "config.data.split='random' is invalid; allowed: one of ('global', 'user')",
    ),
    (
      "data.train_fraction",
      0.0,
      "config.data.train_fraction=0.0 is invalid; allowed: a number in (0, 1]",
    ),
    ("data.unknown_items", "keep", "config.data.unknown_items='keep'"),
    ("data.path", "", "config.data.path='' is invalid; allowed: the data folder"),
    ("model.share_item_tables", True, "True only with data.query_mode='item'"),
    ("data.history_length", -1, "config.data.history_length=-1"),
  ):
    bad = _config()
    section, name = field.split(".")
    bad[section][name] = value
    with pytest.raises(configuration.ConfigError, match=None) as e:
      configuration.validate(bad)
    assert expect in str(e.value), str(e.value)


def test_train_export_retrieve_with_a_hashed_item_feature(tmp_path):
  """End to end on the configs/files.py fixture, whose ``title_words`` is hashed (1000 buckets):
  the MI statistics read the buckets the model looks up (the 31-bit fingerprints used as values
  crashed them), the run trains and tests, the export serves a raw query."""
  from sslrec import export, serving, train
  from sslrec.data import stats

  c = _config()
  c.train.num_epochs = 0.0  # num_steps, not epochs
  c.train.num_steps = 6
  c.train.batch_size = 16
  c.ssl.batch_size = 8
  c.eval.ks = (1, 5)
  c.train.select_metric = "recall@5"
  c.train.eval_every_epochs = 0.0
  c.train.eval_every = 3
  d = sources.load(c)
  mi = stats.mutual_information(d.items, d.item_spec, estimator="permutation")
  assert mi.shape == (5, 5) and np.isfinite(mi).all()
  words = d.item_spec.names.index("title_words")
  assert 0 < mi[words, words] <= np.log(1000)  # an entropy over the buckets, not 2^31 values
  wd, out = str(tmp_path / "run"), str(tmp_path / "export")
  result = train.train_and_evaluate(c, wd)  # the test split's figures
  assert 0.0 <= result["recall@5"] <= 1.0
  export.export(wd, out, log=lambda _: None)
  retriever = serving.Retriever.load(out)
  got = retriever.search({"user": "1", "country": "US", "age": "25"}, k=3)
  assert len(got.keys[0]) == 3 and set(got.keys[0]) <= set(d.item_keys)
  assert np.all(np.diff(got.scores[0]) <= 0)


def test_a_fifo_is_refused_not_read(tmp_path):
  """A FIFO (or any non-regular file) would block the reader forever: refused before opening."""
  dst = _copy(tmp_path)
  os.remove(dst / "users.csv")
  os.mkfifo(dst / "users.csv")
  with pytest.raises(table.DataError, match=r"users\.csv: a FIFO, not a regular file"):
    sources.load(_config(dst))
  ml = tmp_path / "ml"
  shutil.copytree(os.path.join(REPO, "tests", "fixtures", "ml-100k"), ml)
  os.remove(ml / "u.data")
  os.mkfifo(ml / "u.data")
  with pytest.raises(table.DataError, match=r"u\.data: a FIFO"):
    movielens.load(str(ml))
