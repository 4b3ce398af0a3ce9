"""MovieLens in its original GroupLens layouts (ML-100k, ML-1M), detected from the folder's files.

* ML-100k: ``u.data`` (user \\t item \\t rating \\t timestamp), ``u.item`` (``|``-separated,
latin-1:
  movie id, title, release date, video release date, IMDb URL, 19 genre flags), ``u.user``
  (``|``-separated: user id, age, gender, occupation, zip code).
* ML-1M: ``ratings.dat`` (UserID::MovieID::Rating::Timestamp), ``movies.dat``
  (MovieID::Title::Genres, genres ``|``-joined, latin-1), ``users.dat``
  (UserID::Gender::Age::Occupation::Zip-code).

Item features: ``movie_id``, ``title_words`` (multi: lower-cased words of the title without its
year), ``genres`` (multi), ``year`` (release year in ``YEAR_BUCKET``-year buckets). Query features
(``query_mode='user'``): ``user_id``, ``gender``, ``age`` (ML-1M's age groups; ML-100k ages are
mapped to them), ``occupation``, ``zip`` (first ``ZIP_PREFIX`` characters) and ``history`` (the
user's latest ``history_length`` rated movies strictly before the query's time). With
``query_mode='item'`` the query of a pair is the user's previous movie (item-to-item).

A rating ``>= min_rating`` is a positive pair; every rating counts as *seen* (history, evaluation
exclusions). The ratings files are parsed vectorised (one ``bytes.split`` and one numpy conversion;
a file that fails that fast path is re-read line by line to name the first bad line). See
``interactions.py`` for the split, the vocabularies and the query contexts.
"""

from __future__ import annotations

import logging
import os
import re

import numpy as np

from sslrec.data import encode, interactions
from sslrec.data import table as table_lib

LAYOUTS = {
  "100k": ("u.data", "u.item", "u.user"),
  "1m": ("ratings.dat", "movies.dat", "users.dat"),
}
GENRES_100K = (
  "unknown",
  "Action",
  "Adventure",
  "Animation",
  "Children's",
  "Comedy",
  "Crime",
  "Documentary",
  "Drama",
  "Fantasy",
  "Film-Noir",
  "Horror",
  "Musical",
  "Mystery",
  "Romance",
  "Sci-Fi",
  "Thriller",
  "War",
  "Western",
)
AGE_GROUPS = (1, 18, 25, 35, 45, 50, 56)  # ML-1M's age codes: lower bound of each group
TITLE_MAX_WORDS = 8  # title words kept per movie
GENRES_MAX_LEN = 6  # genres kept per movie (the most any MovieLens movie has)
YEAR_BUCKET = 5  # release years per bucket of the 'year' feature
ZIP_PREFIX = 2  # zip code characters kept by the 'zip' feature
_MAX_SHOWN = 120  # characters of an offending line quoted in an error

log = logging.getLogger(__name__)
DataError = table_lib.DataError


def expected_files() -> str:
  return (
    "a MovieLens folder holds the ML-100k layout (u.data, u.item, u.user) or the ML-1M "
    "layout (ratings.dat, movies.dat, users.dat)"
  )


def detect_layout(path: str) -> str:
  """'100k' or '1m' from the folder's files; DataError naming what is missing."""
  if not path:
    raise DataError(f"config.data.path is empty; {expected_files()}")
  if not os.path.isdir(path):
    raise DataError(f"{path}: no such folder (config.data.path); {expected_files()}")
  for layout, names in LAYOUTS.items():
    if os.path.exists(os.path.join(path, names[0])):
      for name in names[1:]:
        if not os.path.isfile(os.path.join(path, name)):
          raise DataError(
            f"{os.path.join(path, name)}: no such file; the ML-{layout} layout needs "
            f"{', '.join(names)} ({expected_files()})"
          )
      return layout
  found = sorted(os.listdir(path))
  raise DataError(
    f"{path}: no MovieLens ratings file (u.data or ratings.dat); {expected_files()}; "
    f"found {found[:10]}{' ...' if len(found) > 10 else ''}"
  )


def _read_bytes(path: str) -> bytes:
  table_lib.check_regular_file(path)
  try:
    with open(path, "rb") as f:
      return f.read().replace(b"\r\n", b"\n")
  except FileNotFoundError:
    raise DataError(f"{path}: no such file; {expected_files()}") from None
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e.strerror})") from None


def _shown(line: str) -> str:
  return repr(line if len(line) <= _MAX_SHOWN else line[:_MAX_SHOWN] + "...")


def _parse_lines(path: str, data: bytes, sep: str, names, floats) -> dict[str, np.ndarray]:
  """The slow path of ``read_numeric``: line by line; DataError naming the first bad line."""
  rows = []
  for lineno, line in enumerate(data.decode("latin-1").split("\n"), start=1):
    if not line:
      continue
    fields = line.split(sep)
    if len(fields) != len(names):
      raise DataError(
        f"{path}:{lineno}: expected {len(names)} fields ({', '.join(names)}) "
        f"separated by {sep!r}, found {len(fields)}: {_shown(line)}"
      )
    row = []
    for name, field in zip(names, fields):
      if name in floats:
        try:
          row.append(float(field))
        except ValueError:
          raise DataError(
            f"{path}:{lineno}: {name} {field!r} is not a number: {_shown(line)}"
          ) from None
      else:
        row.append(_int(path, lineno, line, name, field))
    rows.append(row)
  return {
    name: np.array([r[j] for r in rows], np.float64 if name in floats else np.int64)
    for j, name in enumerate(names)
  }


def read_numeric(path: str, sep: str, names: tuple[str, ...], floats=()) -> dict[str, np.ndarray]:
  """A file of ``sep``-separated numeric columns -> ``{name: int64 / float64 [rows]}``.

  Vectorised: the separators of every line are counted with numpy, the fields converted by one
  ``astype`` per column. Empty lines are skipped. A file the fast path cannot take (a wrong number
  of fields, an empty or non-numeric field, spaces) is parsed line by line, which raises DataError
  with file:line and the offending text at the first bad line.
  """
  data = _read_bytes(path)
  text = data.replace(sep.encode(), b"\t") if sep != "\t" else data
  buf = np.frombuffer(text, np.uint8)
  newlines = np.flatnonzero(buf == ord("\n"))
  starts = np.concatenate([[0], newlines + 1])
  ends = np.concatenate([newlines, [buf.size]])
  nonempty = ends > starts
  tabs = np.bincount(
    np.searchsorted(newlines, np.flatnonzero(buf == ord("\t"))), minlength=starts.size
  )
  # No stray separator character, no spaces: then split() yields exactly the fields.
  ok = (
    bool(np.all(tabs[nonempty] == len(names) - 1))
    and ord(" ") not in buf
    and (sep == "\t" or ord(sep[0]) not in buf)
  )
  if ok:
    tokens = text.split()
    ok = len(tokens) == len(names) * int(nonempty.sum())
  if ok:
    fields = np.array(tokens).reshape(-1, len(names)) if tokens else np.zeros((0, len(names)), "S1")
    del tokens
    try:
      return {
        name: fields[:, j].astype(np.float64 if name in floats else np.int64)
        for j, name in enumerate(names)
      }
    except (ValueError, OverflowError):  # not numbers, or beyond int64: named line by line
      pass
  return _parse_lines(path, data, sep, names, floats)


def _lines(path: str):
  """``(lineno, line)`` of the non-empty lines of a latin-1 text file."""
  for lineno, line in enumerate(_read_bytes(path).decode("latin-1").split("\n"), start=1):
    if line.strip():
      yield lineno, line


def _fields(path: str, lineno: int, line: str, sep: str, names: tuple[str, ...]) -> list[str]:
  fields = line.split(sep)
  if len(fields) != len(names):
    raise DataError(
      f"{path}:{lineno}: expected {len(names)} fields ({', '.join(names)}) "
      f"separated by {sep!r}, found {len(fields)}: {_shown(line)}"
    )
  return fields


_INT64 = (-(2**63), 2**63 - 1)


def _int(path: str, lineno: int, line: str, name: str, value: str) -> int:
  try:
    v = int(value)
  except ValueError:
    raise DataError(
      f"{path}:{lineno}: {name} {value!r} is not an integer: {_shown(line)}"
    ) from None
  if not _INT64[0] <= v <= _INT64[1]:
    raise DataError(
      f"{path}:{lineno}: {name} {value} is out of range (ids must fit in 64-bit "
      f"integers, [{_INT64[0]}, {_INT64[1]}]): {_shown(line)}"
    )
  return v


_YEAR_IN_TITLE = re.compile(r"\((\d{4})\)\s*$")
_WORD = re.compile(r"\w+", re.UNICODE)


def _title_words(title: str) -> list[str]:
  """Lower-cased distinct words of a title without its trailing '(year)', in order."""
  words = _WORD.findall(_YEAR_IN_TITLE.sub("", title).lower())
  return list(dict.fromkeys(words))


def _year(title: str, date: str = "") -> int:
  """Release year from a '01-Jan-1995' date or a 'Title (1995)' title; -1 when unknown."""
  m = re.search(r"(\d{4})\s*$", date)
  if not m:
    m = _YEAR_IN_TITLE.search(title)
  return int(m.group(1)) if m else -1


def _read_movies(path: str, layout: str):
  """``(ids, titles, genre lists, years)`` of the movies file."""
  ids, titles, genres, years = [], [], [], []
  seen = {}
  for lineno, line in _lines(path):
    if layout == "100k":
      names = ("movie id", "title", "release date", "video release date", "IMDb URL") + tuple(
        f"genre flag {g}" for g in GENRES_100K
      )
      f = _fields(path, lineno, line, "|", names)
      flags = f[5:]
      bad = [x for x in flags if x.strip() not in ("0", "1")]
      if bad:
        raise DataError(f"{path}:{lineno}: genre flag {bad[0]!r} is not 0 or 1: {_shown(line)}")
      movie_genres = [g for g, x in zip(GENRES_100K, flags) if x.strip() == "1"]
      year = _year(f[1], f[2])
    else:
      f = _fields(path, lineno, line, "::", ("MovieID", "Title", "Genres"))
      movie_genres = [g for g in f[2].strip().split("|") if g]
      year = _year(f[1])
    movie = _int(path, lineno, line, "movie id", f[0])
    if movie in seen:
      raise DataError(f"{path}:{lineno}: movie id {movie} already on line {seen[movie]}")
    seen[movie] = lineno
    ids.append(movie)
    titles.append(f[1])
    genres.append(movie_genres)
    years.append(year)
  return np.array(ids, np.int64), titles, genres, np.array(years, np.int64)


def _age_group(age: np.ndarray) -> np.ndarray:
  groups = np.array(AGE_GROUPS)
  return groups[np.maximum(np.searchsorted(groups, age, side="right") - 1, 0)]


def _read_users(path: str, layout: str):
  """``{column: [U] array}`` of the users file (strings for categorical columns)."""
  cols = {"user": [], "age": [], "gender": [], "occupation": [], "zip": []}
  seen = {}
  for lineno, line in _lines(path):
    if layout == "100k":
      f = _fields(path, lineno, line, "|", ("user id", "age", "gender", "occupation", "zip code"))
      user, age, gender, occupation, zipcode = f
    else:
      f = _fields(path, lineno, line, "::", ("UserID", "Gender", "Age", "Occupation", "Zip-code"))
      user, gender, age, occupation, zipcode = f
    uid = _int(path, lineno, line, "user id", user)
    if uid in seen:
      raise DataError(f"{path}:{lineno}: user id {uid} already on line {seen[uid]}")
    seen[uid] = lineno
    cols["user"].append(uid)
    cols["age"].append(_int(path, lineno, line, "age", age))
    cols["gender"].append(gender.strip())
    cols["occupation"].append(occupation.strip())
    cols["zip"].append(zipcode.strip().upper()[:ZIP_PREFIX])
  out = {k: np.array(v, np.int64 if k in ("user", "age") else str) for k, v in cols.items()}
  if layout == "100k":
    out["age"] = _age_group(out["age"])
  return out


def _bag(lists: list[list[str]]) -> encode.Bag:
  counts = np.array([len(x) for x in lists], np.int64)
  values = np.array([v for x in lists for v in x], dtype=str) if counts.sum() else np.zeros(0, str)
  return encode.Bag(values, np.repeat(np.arange(len(lists)), counts), len(lists))


def _single(values: np.ndarray, present: np.ndarray | None = None) -> encode.Single:
  if present is None:
    present = np.ones(values.shape[0], bool) if values.dtype.kind != "U" else values != ""
  return encode.Single(values, present)


def load(
  path: str,
  *,
  min_rating: float = 4.0,
  split: str = "global",
  eval_fraction: float = 0.2,
  valid_fraction: float = 0.0,
  history_length: int = 20,
  query_mode: str = "user",
  unknown_items: str = "drop",
  share_tables: bool = False,
  seed: int = 0,
  embed_dim: int = 32,
) -> table_lib.Dataset:
  """The MovieLens folder at ``path`` as a Dataset (fields as in ``configs/base.py``'s data.*)."""
  layout = detect_layout(path)
  ratings_file, movies_file, users_file = (os.path.join(path, n) for n in LAYOUTS[layout])
  sep, names = (
    ("\t", ("user id", "item id", "rating", "timestamp"))
    if layout == "100k"
    else ("::", ("UserID", "MovieID", "Rating", "Timestamp"))
  )
  cols = read_numeric(ratings_file, sep, names, floats=(names[2],))
  user_key, movie_key, rating, time = (cols[n] for n in names)
  movie_ids, titles, genres, years = _read_movies(movies_file, layout)
  users = _read_users(users_file, layout)
  if movie_ids.size == 0:
    raise DataError(f"{movies_file}: no movies")
  if rating.size == 0:
    raise DataError(f"{ratings_file}: no ratings")

  item = interactions.index_of(movie_ids, movie_key)
  user = interactions.index_of(users["user"], user_key)
  keep = interactions.known(
    item,
    movie_key,
    unknown_items,
    what="movie ids",
    table=os.path.basename(movies_file),
    source=ratings_file,
  )
  keep &= interactions.known(
    user,
    user_key,
    unknown_items,
    what="user ids",
    table=os.path.basename(users_file),
    source=ratings_file,
  )
  lg = interactions.Log(
    key=user[keep], item=item[keep], time=time[keep], positive=rating[keep] >= min_rating
  )

  d = encode.Decl
  item_decls = (
    d("movie_id", "id"),
    d("title_words", "multi", max_len=TITLE_MAX_WORDS),
    d("genres", "multi", max_len=GENRES_MAX_LEN),
    d("year", "id"),
  )
  year_bucket = np.where(years >= 0, years // YEAR_BUCKET * YEAR_BUCKET, -1)
  item_raw = {
    "movie_id": _single(movie_ids),
    "title_words": _bag([_title_words(t) for t in titles]),
    "genres": _bag(genres),
    "year": _single(year_bucket, years >= 0),
  }
  items = interactions.Table(item_decls, item_raw, movie_ids.size)
  queries = None
  if query_mode == "user":
    query_decls = (
      d("user_id", "id"),
      d("gender", "id"),
      d("age", "id"),
      d("occupation", "id"),
      d("zip", "id"),
    )
    if history_length > 0:
      query_decls += (d("history", "history", max_len=history_length),)
    query_raw = {
      "user_id": _single(users["user"]),
      "gender": _single(users["gender"]),
      "age": _single(users["age"]),
      "occupation": _single(users["occupation"]),
      "zip": _single(users["zip"]),
    }
    queries = interactions.Table(query_decls, query_raw, users["user"].size)
  describe = (
    f"{path}, data.min_rating={min_rating}, data.split={split!r}, "
    f"data.eval_fraction={eval_fraction}, data.valid_fraction={valid_fraction}"
  )
  return interactions.build(
    f"movielens-{layout}",
    lg,
    items,
    queries,
    mode="user" if query_mode == "user" else "previous_item",
    split=split,
    eval_fraction=eval_fraction,
    valid_fraction=valid_fraction,
    seed=seed,
    embed_dim=embed_dim,
    item_keys=movie_ids,
    item_names=np.array(titles, dtype=object),
    share_tables=share_tables,
    describe=describe,
  )
