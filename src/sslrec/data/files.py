"""Generic tables: interactions, item features and query features as Parquet or CSV files.

The tables and the feature schema are declared in the config (``config.data.files``, see
``configs/files.py`` and docs/data.md):

* interactions: one row per interaction with a query key, an item key, optionally a time
  (``timestamp``: numbers or ISO-8601 strings; without it the row order is the time order) and a
  weight (``weight``: a row is a positive pair when its weight ``>= data.min_rating``; without it
  every row is). Non-positive rows still count as seen (history, evaluation exclusions).
* items: one row per catalogue item (the item key and its feature columns).
* queries (optional): one row per query key. Without it the only query column is the key itself.

Each declared feature is ``{kind, column, buckets, max_len, separator, second_hash}``: kind 'id' |
'multi' |
'dense' (| 'history' for queries: the key's latest items, built from the interactions);
``column`` defaults to the feature name (a 'dense' feature may list several, comma-separated);
``buckets`` 0 builds a vocabulary from the training period with an OOV id, > 0 hashes into that
many buckets (``second_hash``: a second bucket's embedding is added, see features.py); ``max_len``
values are kept per row of a 'multi' / 'history' feature; a 'multi'
string column holds ``separator``-joined values (Parquet list columns need none).

With ``data.query_mode='item'`` the interactions' query key is an item key (e.g. a page linking to
another): the query reads the item features and the query table is not used.

``.parquet`` files need pyarrow (``pip install 'sslrec[files]'``); ``.csv`` files are read with the
standard library (UTF-8, a header row).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re

import numpy as np

from sslrec import errors
from sslrec.data import encode, interactions
from sslrec.data import table as table_lib

DataError = table_lib.DataError
ConfigError = errors.ConfigError
ENTRY_FIELDS = ("kind", "column", "buckets", "max_len", "separator", "second_hash")
DEFAULT_MAX_LEN = 8  # values kept per row of a 'multi' / 'history' feature unless max_len is set
DEFAULT_SEPARATOR = "|"  # separator of a 'multi' string column unless separator is set
_MAX_SHOWN = 120  # characters of an offending line quoted in an error


@dataclasses.dataclass(frozen=True)
class Feature:
  """A declared feature: how to build it (``decl``) and from which columns."""

  decl: encode.Decl
  columns: tuple[str, ...]
  separator: str


@dataclasses.dataclass
class Column:
  """One column read from a file: ``values [N]`` and ``present [N]``, or for a list column
  (Parquet) the flattened ``values [T]`` with ``rows [T]``. ``lines [N]`` are the rows' line
  numbers in a CSV file (for errors); None for Parquet."""

  values: np.ndarray
  present: np.ndarray
  rows: np.ndarray | None = None
  lines: np.ndarray | None = None


def parse_schema(node, field: str, *, history_ok: bool) -> list[Feature]:
  """The declared features of ``config.<field>``; ConfigError naming the bad entry."""
  kinds = encode.KINDS if history_ok else tuple(k for k in encode.KINDS if k != "history")
  out = []
  for name in node:
    spec = node[name]
    where = f"config.{field}.{name}"
    if not hasattr(spec, "keys"):
      raise ConfigError(f"{where}={spec!r} is invalid; allowed: a mapping with keys {ENTRY_FIELDS}")
    unknown = sorted(set(spec.keys()) - set(ENTRY_FIELDS))
    if unknown:
      raise ConfigError(f"{where}: unknown entry {unknown[0]!r}; allowed: {ENTRY_FIELDS}")
    kind = spec.get("kind")
    if kind not in kinds:
      raise ConfigError(f"{where}.kind={kind!r} is invalid; allowed: one of {kinds}")
    buckets = spec.get("buckets", 0)
    max_len = spec.get("max_len", DEFAULT_MAX_LEN if kind in ("multi", "history") else 1)
    column = spec.get("column", name)
    separator = spec.get("separator", DEFAULT_SEPARATOR)
    second_hash = spec.get("second_hash", False)
    for key, value, ok, allowed in (
      (
        "second_hash",
        second_hash,
        isinstance(second_hash, bool)
        and (not second_hash or (isinstance(buckets, int) and buckets > 0)),
        "True or False; True needs buckets > 0",
      ),
      (
        "buckets",
        buckets,
        isinstance(buckets, int) and buckets >= 0,
        "an integer >= 0 (0 = vocabulary with an OOV id)",
      ),
      ("max_len", max_len, isinstance(max_len, int) and max_len >= 1, "an integer >= 1"),
      ("column", column, isinstance(column, str) and bool(column), "a column name"),
      ("separator", separator, isinstance(separator, str), "a string"),
    ):
      if not ok:
        raise ConfigError(f"{where}.{key}={value!r} is invalid; allowed: {allowed}")
    columns = tuple(c.strip() for c in column.split(",")) if kind == "dense" else (column,)
    if kind == "history":
      columns = ()
    out.append(
      Feature(
        encode.Decl(
          name, kind, buckets, max_len if kind in ("multi", "history") else 1, second_hash
        ),
        columns,
        separator,
      )
    )
  if sum(f.decl.kind == "history" for f in out) > 1:
    raise ConfigError(f"config.{field}: at most one feature of kind 'history'")
  return out


# --------------------------------------------------------------------------------------------
# Reading tables.


def _shown(text: str) -> str:
  return repr(text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "...")


def _missing_columns(path: str, found: list[str], wanted: dict[str, str]):
  for col, why in wanted.items():
    if col not in found:
      raise DataError(f"{path}: no column {col!r} ({why}); columns found: {found}")


def _read_csv(path: str, wanted: dict[str, str], separator: str) -> dict[str, Column]:
  try:
    fh = open(path, newline="", encoding="utf-8-sig")  # a UTF-8 BOM (Excel's CSV) is dropped
  except FileNotFoundError:
    raise DataError(f"{path}: no such file") from None
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e.strerror})") from None
  with fh:
    reader = csv.reader(fh, delimiter=separator)
    try:
      header = next(reader, None)
      if header is None:
        raise DataError(f"{path}: empty file; expected a header row naming the columns")
      header = [h.strip() for h in header]
      _missing_columns(path, header, wanted)
      index = [header.index(c) for c in wanted]
      cols = [[] for _ in wanted]
      lines = []
      for row in reader:
        if not row or (len(row) == 1 and not row[0].strip()):
          continue
        if len(row) != len(header):
          raise DataError(
            f"{path}:{reader.line_num}: expected {len(header)} fields "
            f"({separator!r}-separated), found {len(row)}: "
            f"{_shown(separator.join(row))}"
          )
        for c, j in zip(cols, index):
          c.append(row[j].strip())
        lines.append(reader.line_num)
    except csv.Error as e:
      raise DataError(f"{path}:{reader.line_num}: {e}") from None
    except UnicodeDecodeError as e:
      raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
  out = {}
  for name, values in zip(wanted, cols):
    arr = np.array(values, dtype=str) if values else np.zeros(0, str)
    out[name] = Column(arr, arr != "", lines=np.array(lines, np.int64))
  return out


def _read_parquet(path: str, wanted: dict[str, str]) -> dict[str, Column]:
  try:  # pyarrow is an optional extra ('sslrec[files]'): imported only when a Parquet is read
    import pyarrow as pa
    import pyarrow.parquet as pq
  except ImportError:
    raise DataError(f"{path}: reading Parquet needs pyarrow: pip install 'sslrec[files]'") from None
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such file")
  try:
    found = list(pq.read_schema(path).names)
    _missing_columns(path, found, wanted)
    tab = pq.read_table(path, columns=list(wanted))
  except (pa.ArrowException, OSError) as e:
    raise DataError(f"{path}: cannot read as Parquet ({' '.join(str(e).split())})") from None
  out = {}
  for name in wanted:
    arr = tab.column(name).combine_chunks()
    present = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False), bool)
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
      lengths = np.asarray(
        arr.value_lengths().fill_null(0).to_numpy(zero_copy_only=False), np.int64
      )
      values = _plain(arr.flatten(), pa)
      out[name] = Column(values, present, rows=np.repeat(np.arange(len(arr)), lengths))
    else:
      out[name] = Column(_plain(arr, pa), present)
  return out


def _plain(arr, pa) -> np.ndarray:
  """An arrow array -> numpy (strings as str, times as int64, nulls as '' / 0)."""
  if pa.types.is_timestamp(arr.type) or pa.types.is_date(arr.type):
    arr = (
      arr.cast(pa.int64())
      if pa.types.is_timestamp(arr.type)
      else arr.cast(pa.timestamp("s")).cast(pa.int64())
    )
  if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
    return np.array(arr.fill_null("").to_pylist(), dtype=str)
  if (
    pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type) or pa.types.is_boolean(arr.type)
  ):
    return np.asarray(arr.fill_null(0).to_numpy(zero_copy_only=False))
  return np.array([str(v) if v is not None else "" for v in arr.to_pylist()], dtype=str)


def read_table(path: str, wanted: dict[str, str], *, separator: str = ",") -> dict[str, Column]:
  """The ``wanted`` columns (``{column: what it is for}``) of a .csv or .parquet file."""
  table_lib.check_regular_file(path)
  ext = os.path.splitext(path)[1].lower()
  if ext == ".parquet":
    return _read_parquet(path, wanted)
  if ext == ".csv":
    return _read_csv(path, wanted, separator)
  raise DataError(f"{path}: unsupported file type {ext!r}; allowed: .csv, .parquet")


def _where(path: str, col: Column, row: int) -> str:
  return f"{path}:{col.lines[row]}" if col.lines is not None else f"{path}: row {row + 1}"


def _line_text(path: str, lineno: int) -> str:
  with open(path, encoding="utf-8-sig", errors="replace") as fh:
    for i, line in enumerate(fh, start=1):
      if i == lineno:
        return line.rstrip("\n")
  return ""


def numbers(
  path: str, name: str, col: Column, *, times: bool = False, required: bool = False
) -> np.ndarray:
  """A column as float64 (``times``: or ISO-8601 date-times, as int64 seconds); DataError with
  file:line and the offending text at the first value that is neither (or, ``required``, empty);
  missing values are NaN otherwise."""
  if required and not col.present.all():
    row = int(np.flatnonzero(~col.present)[0])
    raise DataError(f"{_where(path, col, row)}: empty {name}")
  if col.values.dtype.kind in "iufb":
    return col.values.astype(np.int64 if col.values.dtype.kind in "iub" else np.float64)
  values = np.where(col.present, col.values, "nan")
  try:
    return values.astype(np.float64)
  except ValueError:
    pass
  if times:
    # numpy reads a bare number as a year ("875000000" is year 875,000,000): in a column of
    # ISO-8601 times, a number is refused (a column of numbers only is epoch seconds, above).
    numeric = np.array([_NUMBER.fullmatch(v.strip()) is not None for v in values.tolist()])
    numeric &= col.present
    if numeric.any():
      row = int(np.flatnonzero(numeric)[0])
      text = f": {_shown(_line_text(path, int(col.lines[row])))}" if col.lines is not None else ""
      raise DataError(
        f"{_where(path, col, row)}: {name} {str(values[row])!r} is a number in a column of "
        f"ISO-8601 times; write every {name} as epoch seconds or every one as ISO-8601{text}"
      )
    try:
      return values.astype("datetime64[s]").astype(np.int64)
    except ValueError:
      pass
  for row, v in enumerate(values.tolist()):
    try:
      float(v)
    except ValueError:
      if times:
        try:
          np.datetime64(v, "s")
          continue
        except ValueError:
          pass
      kind = "a number or an ISO-8601 time" if times else "a number"
      text = f": {_shown(_line_text(path, int(col.lines[row])))}" if col.lines is not None else ""
      raise DataError(f"{_where(path, col, row)}: {name} {v!r} is not {kind}{text}") from None
  raise DataError(f"{path}: column {name!r} mixes numbers and times")


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
MAX_DENSE = (
  1e30  # |value| of a dense feature; beyond it standardising would overflow / mean nothing
)


def _raw(path: str, feature: Feature, cols: dict[str, Column]):
  """The raw values of one declared feature (``encode.Single / Bag / Dense``)."""
  d = feature.decl
  if d.kind == "dense":
    x = np.stack([numbers(path, c, cols[c]) for c in feature.columns], axis=1)
    present = np.all([cols[c].present for c in feature.columns], axis=0)
    for j, c in enumerate(feature.columns):
      with np.errstate(invalid="ignore"):
        bad = cols[c].present & ~(np.abs(x[:, j]) <= MAX_DENSE)  # inf, nan, or absurdly large
      if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(
          f"{_where(path, cols[c], row)}: dense feature {d.name!r} (column {c!r}) is "
          f"{float(x[row, j])!r}; allowed: finite numbers of magnitude at most {MAX_DENSE:g} "
          "(leave the cell empty for a missing value)"
        )
    return encode.Dense(x, present)
  col = cols[feature.columns[0]]
  if col.rows is not None:  # a Parquet list column
    if d.kind == "id":
      raise DataError(
        f"{path}: column {feature.columns[0]!r} holds lists; feature {d.name!r} needs kind 'multi'"
      )
    return encode.Bag(col.values, col.rows, col.present.size)
  if d.kind == "id":
    return encode.Single(col.values, col.present)
  if col.values.dtype.kind == "U":
    return encode.split_strings(col.values, col.present, feature.separator)
  rows = np.flatnonzero(col.present)
  return encode.Bag(col.values[rows], rows, col.present.size)


def _unique_keys(path: str, what: str, col: Column) -> np.ndarray:
  if not col.present.all():
    row = int(np.flatnonzero(~col.present)[0])
    raise DataError(f"{_where(path, col, row)}: empty {what}")
  dup = interactions.first_duplicate(col.values)
  if dup is not None:
    row, value = dup
    raise DataError(f"{_where(path, col, row)}: {what} {value!r} appears twice")
  return col.values


def _key_rows(table_keys, column, policy: str, what: str, table_path: str, source: str):
  """``(rows [E], known bool [E])``: the row of each key of an interactions ``column`` in the
  table whose distinct keys are ``table_keys`` (-1 where absent or missing); unknown keys are
  dropped with a warning or refused (``interactions.known``)."""
  table_keys, keys = _same_type(table_keys, column.values)
  rows = interactions.index_of(table_keys, keys)
  rows[~column.present] = -1
  known = interactions.known(
    rows, keys, policy, what=what, table=os.path.basename(table_path), source=source
  )
  return rows, known


def _same_type(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Keys comparable across two files: numbers stay numbers unless one side is text."""
  if a.dtype.kind in "iu" and b.dtype.kind in "iu":
    return a.astype(np.int64), b.astype(np.int64)
  if a.dtype.kind in "iuf" and b.dtype.kind in "iuf":
    return a.astype(np.float64), b.astype(np.float64)
  return a.astype(str), b.astype(str)


def load(config) -> table_lib.Dataset:
  """The dataset the config's ``data.files`` tables and schema describe."""
  d, fc = config.data, config.data.files
  base = d.path

  def path_of(name):
    return name if os.path.isabs(name) else os.path.join(base, name)

  if not os.path.isdir(base):
    raise DataError(f"{base}: no such folder (config.data.path)")
  item_schema = parse_schema(fc.item_features, "data.files.item_features", history_ok=False)
  if not item_schema:
    raise ConfigError(
      "config.data.files.item_features is empty; declare the item features, e.g. "
      "{'item_id': {'kind': 'id'}} (see configs/files.py)"
    )
  item_mode = d.query_mode == "item"
  query_schema = (
    []
    if item_mode
    else parse_schema(fc.query_features, "data.files.query_features", history_ok=True)
  )
  if not item_mode and not query_schema:
    raise ConfigError(
      "config.data.files.query_features is empty; declare the query features, "
      f"e.g. {{'user': {{'kind': 'id', 'column': {fc.query_key!r}}}}}"
    )

  # Interactions.
  inter_path = path_of(fc.interactions)
  wanted = {fc.query_key: "config.data.files.query_key", fc.item_key: "config.data.files.item_key"}
  for col, field in ((fc.timestamp, "timestamp"), (fc.weight, "weight")):
    if col:
      wanted[col] = f"config.data.files.{field}"
  inter = read_table(inter_path, wanted, separator=fc.csv_separator)
  num = inter[fc.item_key].present.size
  if num == 0:
    raise DataError(f"{inter_path}: no interactions")
  time = (
    numbers(inter_path, fc.timestamp, inter[fc.timestamp], times=True, required=True)
    if fc.timestamp
    else np.arange(num)
  )
  positive = np.ones(num, bool)
  if fc.weight:
    positive = numbers(inter_path, fc.weight, inter[fc.weight], required=True) >= d.min_rating

  # Items.
  items_path = path_of(fc.item_table)
  wanted = {fc.item_key: "config.data.files.item_key"}
  for f in item_schema:
    for c in f.columns:
      wanted.setdefault(c, f"config.data.files.item_features.{f.decl.name}")
  if fc.item_name:
    wanted.setdefault(fc.item_name, "config.data.files.item_name")
  item_cols = read_table(items_path, wanted, separator=fc.csv_separator)
  item_keys = _unique_keys(items_path, "item key", item_cols[fc.item_key])
  if item_keys.size == 0:
    raise DataError(f"{items_path}: no items")
  item_row, keep = _key_rows(
    item_keys, inter[fc.item_key], d.unknown_items, "item keys", items_path, inter_path
  )
  items = interactions.Table(
    tuple(f.decl for f in item_schema),
    {f.decl.name: _raw(items_path, f, item_cols) for f in item_schema},
    item_keys.size,
  )

  # Queries.
  queries = None
  qcol = inter[fc.query_key]
  if item_mode:
    key_row, known = _key_rows(
      item_keys, qcol, d.unknown_items, "query item keys", items_path, inter_path
    )
    keep &= known
  else:
    if fc.query_table:
      q_path = path_of(fc.query_table)
      wanted = {fc.query_key: "config.data.files.query_key"}
      for f in query_schema:
        for c in f.columns:
          wanted.setdefault(c, f"config.data.files.query_features.{f.decl.name}")
      q_cols = read_table(q_path, wanted, separator=fc.csv_separator)
      q_keys = _unique_keys(q_path, "query key", q_cols[fc.query_key])
      key_row, known = _key_rows(q_keys, qcol, d.unknown_items, "query keys", q_path, inter_path)
      keep &= known
    else:  # the distinct query keys of the interactions are the query table
      q_path = inter_path
      present = qcol.present
      q_keys, key_row = np.unique(qcol.values, return_inverse=True)
      key_row = np.where(present, key_row.ravel(), -1)
      keep &= interactions.known(
        key_row,
        qcol.values,
        d.unknown_items,
        what="empty query keys",
        table="the interactions",
        source=inter_path,
      )
      q_cols = {fc.query_key: Column(q_keys, np.ones(q_keys.size, bool))}
      for f in query_schema:
        for c in f.columns:
          if c not in q_cols:
            raise DataError(
              f"{inter_path}: no column {c!r} (config.data.files.query_features."
              f"{f.decl.name}): without a query table (config.data.files.query_table="
              f"'') the only query column is the query key {fc.query_key!r}"
            )
    queries = interactions.Table(
      tuple(f.decl for f in query_schema),
      {f.decl.name: _raw(q_path, f, q_cols) for f in query_schema if f.decl.kind != "history"},
      q_keys.size,
    )

  lg = interactions.Log(
    key=key_row[keep], item=item_row[keep], time=time[keep], positive=positive[keep]
  )
  names = item_cols[fc.item_name].values.astype(object) if fc.item_name else None
  describe = (
    f"{inter_path}, data.split={d.split!r}, data.eval_fraction={d.eval_fraction}, "
    f"data.valid_fraction={d.valid_fraction}"
    + (f", data.min_rating={d.min_rating}" if fc.weight else "")
  )
  return interactions.build(
    "files",
    lg,
    items,
    queries,
    mode="item" if item_mode else "user",
    split=d.split,
    eval_fraction=d.eval_fraction,
    valid_fraction=d.valid_fraction,
    seed=table_lib.data_seed(config),
    embed_dim=d.embed_dim,
    item_keys=item_keys,
    item_names=names,
    share_tables=config.model.share_item_tables,
    describe=describe,
  )
