"""Raw query features -> the query tower's input ids (``encode``), and the command-line syntax.

Per query feature of the schema:

* a feature with a vocabulary (``vocabularies.json``: the raw value of id 0, 1, ...) maps a raw
  value to its index; a raw value given as a string also matches a vocabulary value whose ``str``
  is equal (so ``"25"`` from a command line finds ``25``);
* a feature without one takes its raw integer value as the id (ints, or strings of digits), valid
  in ``[0, vocab_size)``;
* a hashed feature (``hashed`` in the schema) takes the fingerprint ``crc32(str(value)) &
  0x7fffffff`` of any raw value (the model buckets it); it has no OOV;
* anything else is out of vocabulary (OOV) and maps to the schema's ``oov_id``: the vocabulary's
  OOV id 0 where the reader built one (its entry 0 is ``None``), else -1, the *missing* value, for
  which the model uses the feature's learned default embedding (in a multi-valued feature such a
  value is dropped from the bag, which is mean-pooled over its known values; a bag with none uses
  the default embedding);
* a feature not given is missing (``id``: default embedding; ``multi``: empty bag; ``dense``: zeros,
  the standardised mean).
OOV values and features not given are reported in the returned notes, never silently.
"""

from __future__ import annotations

import difflib
import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sslrec.serving.format import Feature, QueryError

_INT_RE = re.compile(r"[+-]?\d+")

# {feature name: ({raw value: id}, {str(raw value): id})}: the first id of each value wins.
Lookups = Mapping[str, tuple[dict, dict]]


def vocabulary_lookups(vocabularies: Mapping[str, list]) -> dict[str, tuple[dict, dict]]:
  """The lookup tables ``raw_id`` reads, built once from ``vocabularies.json``."""
  lookups = {}
  for name, values in vocabularies.items():
    exact, by_str = {}, {}
    for i, v in enumerate(values):
      exact.setdefault(v, i)
      by_str.setdefault(str(v), i)
    lookups[name] = (exact, by_str)
  return lookups


def raw_id(f: Feature, value, lookups: Lookups, notes: list[str], where: str) -> int:
  """The id of one raw value of feature ``f`` (``f.oov_id`` when unknown, noted in ``notes``)."""
  if f.hashed:
    return zlib.crc32(str(value).encode("utf-8")) & 0x7FFFFFFF
  lookup = lookups.get(f.name)
  if lookup is not None:
    exact, by_str = lookup
    try:
      if value in exact:
        return exact[value]
    except TypeError:  # unhashable
      pass
    if str(value) in by_str:
      return by_str[str(value)]
  else:
    v = value
    if isinstance(v, str) and _INT_RE.fullmatch(v.strip()):
      v = int(v.strip())
    elif isinstance(v, (float, np.floating)) and float(v).is_integer():
      v = int(v)
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v < f.vocab_size:
      return int(v)
  if f.oov_id >= 0:
    notes.append(
      f"{where}{f.name}: value {value!r} is out of vocabulary (-> the OOV id {f.oov_id})"
    )
  elif f.kind == "id":
    notes.append(f"{where}{f.name}={value!r} is out of vocabulary (-> default embedding)")
  else:
    notes.append(f"{where}{f.name}: value {value!r} is out of vocabulary (dropped from the bag)")
  return f.oov_id


def dense_value(f: Feature, value, where: str) -> np.ndarray:
  """A dense feature's raw value as ``float32 [dense_dim]``; QueryError unless that many finite
  numbers."""
  try:
    x = np.asarray(value, dtype=np.float64).reshape(-1)
  except (TypeError, ValueError):
    raise QueryError(
      f"{where}{f.name} is a dense feature of {f.dense_dim} numbers; got {value!r}"
    ) from None
  if x.shape != (f.dense_dim,) or not np.all(np.isfinite(x)):
    raise QueryError(
      f"{where}{f.name} is a dense feature of {f.dense_dim} finite numbers; got {value!r}"
    )
  return x.astype(np.float32)


def encode(
  queries: Mapping[str, Any] | Sequence[Mapping[str, Any]],
  features: Sequence[Feature],
  lookups: Lookups,
  tower: str = "query",
) -> tuple[dict[str, np.ndarray], list[str]]:
  """Raw queries (or items, ``tower="item"``) -> the tower's input batch; see
  ``Retriever.encode``."""
  if isinstance(queries, Mapping):
    queries = [queries]
  queries = list(queries)
  if not queries:
    raise QueryError(f"no {'items' if tower == 'item' else 'queries'} given")
  known = tuple(f.name for f in features)
  for q in queries:
    if not isinstance(q, Mapping):
      raise QueryError(
        f"a {tower} must be a dict of feature name to value(s), got {type(q).__name__}"
      )
    unknown = [k for k in q if k not in known]
    if unknown:
      hints = [
        f"{u!r} (did you mean {m[0]!r}?)"
        if (m := difflib.get_close_matches(str(u), known, n=1))
        else repr(u)
        for u in unknown
      ]
      raise QueryError(
        f"unknown {tower} features: {', '.join(hints)}; the {tower} tower reads: {', '.join(known)}"
      )
  b = len(queries)
  batch = {
    f.name: np.full((b,) + f.shape, 0 if f.kind == "dense" else -1, f.dtype) for f in features
  }
  notes = []
  for i, q in enumerate(queries):
    where = f"{tower} {i}: " if b > 1 else ""
    absent = [f.name for f in features if q.get(f.name) is None]
    if absent:
      notes.append(
        f"{where}not given (missing -> default embedding; dense -> zeros): {', '.join(absent)}"
      )
    for f in features:
      value = q.get(f.name)
      if value is None:
        continue
      if f.kind == "id":
        if isinstance(value, (list, tuple, np.ndarray)):
          raise QueryError(f"{where}{f.name} is single-valued; got {len(value)} values")
        batch[f.name][i] = raw_id(f, value, lookups, notes, where)
      elif f.kind == "multi":
        values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
        ids = [j for j in (raw_id(f, v, lookups, notes, where) for v in values) if j >= 0]
        if len(ids) > f.max_len:
          notes.append(
            f"{where}{f.name}: {len(ids)} known values, the tower reads the first {f.max_len}"
          )
          ids = ids[: f.max_len]
        batch[f.name][i, : len(ids)] = ids
      else:
        batch[f.name][i] = dense_value(f, value, where)
  return batch, notes


def parse_query(text: str) -> dict[str, Any]:
  """The command-line query syntax: ``name=value,name=v1|v2|v3``.

  ``,`` separates features, ``=`` a feature from its value, ``|`` the values of a multi-valued
  (or dense) feature; spaces around each part are ignored. Values stay strings (``encode`` maps
  them). A feature with ``|`` is a list even with one value (``q_history=7|``).
  """
  out: dict[str, Any] = {}
  for part in text.split(","):
    if not part.strip():
      continue
    name, sep, value = part.partition("=")
    name = name.strip()
    if not sep or not name:
      raise QueryError(
        f"--query: {part.strip()!r} is not name=value (syntax: 'name=value,name=v1|v2|v3')"
      )
    if name in out:
      raise QueryError(f"--query: feature {name!r} given twice")
    if "|" in value:
      out[name] = [v.strip() for v in value.split("|") if v.strip()]
    else:
      out[name] = value.strip()
  if not out:
    raise QueryError("--query is empty (syntax: 'name=value,name=v1|v2|v3')")
  return out
