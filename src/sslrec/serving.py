"""Serving an export: raw query features -> query tower -> top-K catalogue items.

``Retriever.load(EXPORT_DIR)`` reads a directory written by ``launch/export.py`` (layout in
docs/serving.md), checks it (format version, files, sha256 checksums) and serves it:

    r = Retriever.load("exports/base")
    res = r.search({"q_topic": 3, "q_style": 5, "q_history": [1, 2, 3]}, k=10)
    res.keys[0], res.scores[0]            # the 10 best items of the first query, best first
    r.similar_items(1234, k=10)           # item-to-item: the items closest to item key 1234

This module depends on numpy and jax only (plus, for ``method="ann"``, the optional ``ann`` extra);
it never imports flax, orbax or the training code: the query tower is a ``jax.export`` artifact
(StableHLO) called with its parameters from ``query_params.npz``.

Raw values -> ids (``encode``), per query feature of the schema:

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
OOV values and features not given are reported in ``Results.notes``, never silently.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import os
import re
import warnings
import zlib
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = "sslrec-export"
FORMAT_VERSION = 1  # bump on any change a reader of version 1 would misread
MANIFEST = "manifest.json"
ITEM_EMBEDDINGS = "item_embeddings.npy"
ITEM_KEYS = "item_keys.npy"
ITEM_NAMES = "item_names.npy"
QUERY_TOWER = "query_tower.jax"
QUERY_PARAMS = "query_params.npz"
SCHEMA = "schema.json"
VOCABULARIES = "vocabularies.json"
REQUIRED_FILES = (ITEM_EMBEDDINGS, ITEM_KEYS, QUERY_TOWER, QUERY_PARAMS, SCHEMA, VOCABULARIES)
OOV_ID = -1  # what an unknown raw value maps to: the missing id (learned default embedding)
MAX_SCORES_PER_CHUNK = 1 << 26  # query-chunk x catalogue scores materialised at once (256 MiB)
_INT_RE = re.compile(r"[+-]?\d+")


class ServingError(ValueError):
  """A user error while loading or querying an export; the message is one line."""


class ExportDirError(ServingError):
  """An export directory that cannot be served (missing files, other format, bad checksums)."""


class QueryError(ServingError):
  """A query that cannot be answered (unknown features, bad values, unknown item key, bad K)."""


class ServingWarning(UserWarning):
  """Something was adjusted to answer a query (e.g. K clamped to the catalogue size)."""


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


@dataclasses.dataclass
class Results:
  """The top-K items of a batch of queries, best first.

  Attributes:
    scores: ``float32 [B, K]`` inner products of the L2-normalised embeddings (cosine).
    rows: ``int64 [B, K]`` catalogue rows.
    keys: ``[B, K]`` item keys (the dataset's keys; ints, or strings).
    names: ``[B, K]`` item names, or None when the dataset has none.
    method: 'exact' or 'ann:<backend>'.
    notes: what the query encoding had to assume (OOV values, features not given, clamped K).
  """

  scores: np.ndarray
  rows: np.ndarray
  keys: np.ndarray
  names: np.ndarray | None
  method: str
  notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Feature:
  """One query-tower input as ``schema.json`` describes it."""

  name: str
  kind: str  # 'id' | 'multi' | 'dense'
  vocab_size: int = 0
  max_len: int = 1
  dense_dim: int = 0
  oov_id: int = OOV_ID
  hashed: bool = False  # values are fingerprints crc32(str(value)) & 0x7fffffff (features.py)

  @property
  def shape(self) -> tuple[int, ...]:
    return {"id": (), "multi": (self.max_len,), "dense": (self.dense_dim,)}[self.kind]

  @property
  def dtype(self):
    return np.float32 if self.kind == "dense" else np.int32


@functools.partial(jax.jit, static_argnames=("k",))
def _exact_top_k(queries: jax.Array, items: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Exact maximum inner product: ``(scores [B, k], rows [B, k])`` of ``queries @ items.T``."""
  scores = jnp.matmul(queries, items.T, precision=jax.lax.Precision.HIGHEST)
  return jax.lax.top_k(scores, k)


def exact_search(queries: np.ndarray, items: jax.Array, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-``k`` by inner product: ``(scores float32 [B, k], rows int64 [B, k])``.

  Query chunks (padded to powers of two, at most 256 rows and ``MAX_SCORES_PER_CHUNK`` scores)
  are scored against every row of ``items [N, D]`` (a device array) with one matmul + top_k each.
  """
  n = int(items.shape[0])
  chunk = max(1, min(256, MAX_SCORES_PER_CHUNK // n))
  chunk = 1 << (chunk.bit_length() - 1)
  scores, rows = [], []
  for start in range(0, queries.shape[0], chunk):
    q = queries[start:start + chunk]
    b = q.shape[0]
    size = min(chunk, _bucket(b))
    if size > b:
      q = np.concatenate([q, np.zeros((size - b, q.shape[1]), np.float32)])
    s, r = _exact_top_k(jnp.asarray(q), items, k)
    scores.append(np.asarray(s)[:b])
    rows.append(np.asarray(r)[:b])
  return np.concatenate(scores), np.concatenate(rows).astype(np.int64)


def _bucket(n: int) -> int:
  """Smallest power of two >= n (padded batch sizes keep the number of compilations small)."""
  return 1 << max(0, (n - 1).bit_length())


class Retriever:
  """A loaded export: query encoding, the query tower, exact and approximate top-K search."""

  def __init__(self, export_dir: str, manifest: dict, features: Sequence[Feature],
               vocabularies: Mapping[str, list], item_embeddings: np.ndarray,
               item_keys: np.ndarray, item_names: np.ndarray | None, query_tower,
               query_params: Mapping[str, np.ndarray]):
    self.export_dir = export_dir
    self.manifest = manifest
    self.features = tuple(features)
    self.item_embeddings = item_embeddings
    self.item_keys = item_keys
    self.item_names = item_names
    self._tower = query_tower
    self._params = {k: jnp.asarray(v) for k, v in query_params.items()}
    self._items = jax.device_put(item_embeddings)
    self._lookup = {}
    for name, values in vocabularies.items():
      exact, by_str = {}, {}
      for i, v in enumerate(values):
        exact.setdefault(v, i)
        by_str.setdefault(str(v), i)
      self._lookup[name] = (exact, by_str)
    self._ann = {}

  @functools.cached_property
  def _key_rows(self) -> tuple[dict, dict]:
    """``({key: row}, {str(key): row})``, built on the first item-to-item query."""
    by_key, by_str = {}, {}
    for row, key in enumerate(self.item_keys.tolist()):
      by_key.setdefault(key, row)
      by_str.setdefault(str(key), row)
    return by_key, by_str

  # -- Loading -----------------------------------------------------------------------------------

  @classmethod
  def load(cls, export_dir: str, *, verify: bool = True) -> "Retriever":
    """Reads and checks an export directory; raises ExportDirError with one line if unusable.

    Args:
      export_dir: a directory written by ``launch/export.py``.
      verify: check every file's sha256 against the manifest (reads every byte once).
    """
    manifest = read_manifest(export_dir, verify=verify)
    path = functools.partial(os.path.join, export_dir)
    try:
      with open(path(SCHEMA)) as f:
        schema = json.load(f)
      with open(path(VOCABULARIES)) as f:
        vocabularies = json.load(f)
      features = [Feature(**f) for f in schema["query"]]
      item_embeddings = np.load(path(ITEM_EMBEDDINGS), allow_pickle=False)
      item_keys = np.load(path(ITEM_KEYS), allow_pickle=False)
      item_names = (np.load(path(ITEM_NAMES), allow_pickle=False)
                    if ITEM_NAMES in manifest["files"] else None)
      with np.load(path(QUERY_PARAMS), allow_pickle=False) as z:
        query_params = {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise ExportDirError(f"{export_dir}: cannot read the export ({type(e).__name__}: "
                           f"{_one_line(e)})") from None
    try:
      with open(path(QUERY_TOWER), "rb") as f:
        tower = jax.export.deserialize(bytearray(f.read()))
    except Exception as e:  # noqa: BLE001 -- any failure means an unusable artifact
      raise ExportDirError(f"{path(QUERY_TOWER)}: cannot deserialize the query tower "
                           f"({type(e).__name__}: {_one_line(e)})") from None
    platform = jax.devices()[0].platform
    runs_on = {"gpu": ("cuda", "rocm")}.get(platform, (platform,))
    if not set(runs_on) & set(tower.platforms):
      raise ExportDirError(
          f"{path(QUERY_TOWER)} was lowered for {', '.join(tower.platforms)}; this process "
          f"computes on {platform}: re-export with --platforms={','.join(runs_on)} (or run with "
          "JAX_PLATFORMS=cpu)")
    n, d = manifest["num_items"], manifest["embedding_dim"]
    if (item_embeddings.dtype != np.float32 or item_embeddings.shape != (n, d)
        or item_keys.shape != (n,) or (item_names is not None and item_names.shape != (n,))):
      raise ExportDirError(
          f"{export_dir}: item arrays do not match the manifest ({n} items of dim {d}): "
          f"embeddings {item_embeddings.dtype}{list(item_embeddings.shape)}, keys "
          f"{list(item_keys.shape)}")
    unknown_vocab = sorted(set(vocabularies) - {f.name for f in features})
    if unknown_vocab:
      raise ExportDirError(f"{export_dir}: vocabularies for features the query tower does not "
                           f"read: {unknown_vocab}")
    return cls(export_dir, manifest, features, vocabularies, item_embeddings, item_keys,
               item_names, tower, query_params)

  # -- Properties --------------------------------------------------------------------------------

  @property
  def num_items(self) -> int:
    return int(self.item_embeddings.shape[0])

  @property
  def dim(self) -> int:
    return int(self.item_embeddings.shape[1])

  @property
  def feature_names(self) -> tuple[str, ...]:
    return tuple(f.name for f in self.features)

  @property
  def step(self) -> int:
    return int(self.manifest["step"])

  # -- Raw query features -> ids -----------------------------------------------------------------

  def _id(self, f: Feature, value, notes: list[str], where: str) -> int:
    """The id of one raw value of feature ``f`` (``f.oov_id`` when unknown)."""
    if f.hashed:
      return zlib.crc32(str(value).encode("utf-8")) & 0x7FFFFFFF
    lookup = self._lookup.get(f.name)
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
      notes.append(f"{where}{f.name}: value {value!r} is out of vocabulary (-> the OOV id "
                   f"{f.oov_id})")
    elif f.kind == "id":
      notes.append(f"{where}{f.name}={value!r} is out of vocabulary (-> default embedding)")
    else:
      notes.append(f"{where}{f.name}: value {value!r} is out of vocabulary (dropped from the bag)")
    return f.oov_id

  def encode(self, queries: Mapping[str, Any] | Sequence[Mapping[str, Any]]
             ) -> tuple[dict[str, np.ndarray], list[str]]:
    """Raw query features -> the query tower's input batch.

    Args:
      queries: one ``{feature name: raw value(s)}`` dict or a sequence of them. ``id``: one raw
        value; ``multi``: a list of raw values (a scalar counts as a one-value list); ``dense``: a
        list of ``dense_dim`` numbers. A value of None is missing.

    Returns:
      ``({name: array [B, ...]}, notes)``: int32 ids (-1 = missing) and float32 dense values, and
      what was assumed (OOV values, features not given, truncated bags), one line each.
    Raises:
      QueryError naming unknown features or values of the wrong shape.
    """
    if isinstance(queries, Mapping):
      queries = [queries]
    queries = list(queries)
    if not queries:
      raise QueryError("no queries given")
    known = self.feature_names
    for q in queries:
      if not isinstance(q, Mapping):
        raise QueryError("a query must be a dict of feature name to value(s), got "
                         f"{type(q).__name__}")
      unknown = [k for k in q if k not in known]
      if unknown:
        hints = [f"{u!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(
            str(u), known, n=1)) else repr(u) for u in unknown]
        raise QueryError(f"unknown query features: {', '.join(hints)}; the query tower reads: "
                         f"{', '.join(known)}")
    b = len(queries)
    batch = {f.name: np.full((b,) + f.shape, 0 if f.kind == "dense" else -1, f.dtype)
             for f in self.features}
    notes = []
    for i, q in enumerate(queries):
      where = f"query {i}: " if b > 1 else ""
      absent = [f.name for f in self.features if q.get(f.name) is None]
      if absent:
        notes.append(f"{where}not given (missing -> default embedding; dense -> zeros): "
                     f"{', '.join(absent)}")
      for f in self.features:
        value = q.get(f.name)
        if value is None:
          continue
        if f.kind == "id":
          if isinstance(value, (list, tuple, np.ndarray)):
            raise QueryError(f"{where}{f.name} is single-valued; got {len(value)} values")
          batch[f.name][i] = self._id(f, value, notes, where)
        elif f.kind == "multi":
          values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
          ids = [j for j in (self._id(f, v, notes, where) for v in values) if j >= 0]
          if len(ids) > f.max_len:
            notes.append(f"{where}{f.name}: {len(ids)} known values, the tower reads the first "
                         f"{f.max_len}")
            ids = ids[:f.max_len]
          batch[f.name][i, :len(ids)] = ids
        else:
          batch[f.name][i] = self._dense(f, value, where)
    return batch, notes

  @staticmethod
  def _dense(f: Feature, value, where: str) -> np.ndarray:
    try:
      x = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
      raise QueryError(f"{where}{f.name} is a dense feature of {f.dense_dim} numbers; got "
                       f"{value!r}") from None
    if x.shape != (f.dense_dim,) or not np.all(np.isfinite(x)):
      raise QueryError(f"{where}{f.name} is a dense feature of {f.dense_dim} finite numbers; "
                       f"got {value!r}")
    return x.astype(np.float32)

  # -- The query tower ---------------------------------------------------------------------------

  def embed_batch(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """The exported query tower on an encoded batch: ``float32 [B, D]`` (L2-normalised)."""
    b = int(next(iter(batch.values())).shape[0])
    size = _bucket(b)
    padded = {k: np.concatenate([v, np.repeat(v[:1], size - b, axis=0)]) if size > b else v
              for k, v in batch.items()}
    return np.asarray(self._tower.call(self._params, padded))[:b]

  def embed_queries(self, queries) -> tuple[np.ndarray, list[str]]:
    """Raw queries (as ``encode`` takes them) -> ``(float32 [B, D], notes)``."""
    batch, notes = self.encode(queries)
    return self.embed_batch(batch), notes

  # -- Search ------------------------------------------------------------------------------------

  def _clamp_k(self, k: int, available: int, notes: list[str]) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
      raise QueryError(f"k={k!r}; must be an integer >= 1")
    if k > available:
      msg = f"k={k} is larger than the {available} items that can be returned; using k={available}"
      warnings.warn(msg, ServingWarning, stacklevel=3)
      notes.append(msg)
      return available
    return int(k)

  def _exact(self, emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    return exact_search(emb, self._items, k)

  def ann_index(self, backend: str = "auto"):
    """The approximate index of ``backend`` ('auto': the preferred installed one) that
    ``method="ann"`` uses: the last one ``build_ann_index`` built, else one built now with the
    defaults. Raises ServingError naming what to install when the ``ann`` extra is missing."""
    backend = self._resolve(backend)
    if backend not in self._ann:
      self.build_ann_index(backend)
    return self._ann[backend]

  def build_ann_index(self, backend: str = "auto", *, target_recall: float | None = 0.95,
                      sample: int = 256, **params):
    """Builds (or rebuilds) the approximate index of ``backend`` and returns it.

    Unless ``params`` set the search-time knob (``leaves_to_search`` / ``nprobe``) or
    ``target_recall`` is None, the knob is calibrated (``sslrec.ann.calibrate``, doubling from 1%
    of the partitions): ``sample`` catalogue embeddings, as queries, must find ``target_recall``
    of their exact top-10 neighbours (themselves excluded); the result is in
    ``index.calibration``. Query-tower outputs may sit elsewhere than item embeddings, so check
    the recall of real queries (``launch/bench_serving.py`` shows how) before relying on it.

    Args:
      backend: 'auto' | 'scann' | 'faiss'.
      target_recall: Recall@10 to calibrate for, or None.
      sample: calibration queries.
      **params: index parameters (``sslrec.ann.ScannIndex`` / ``FaissIndex``).
    """
    from sslrec import ann
    backend = self._resolve(backend)
    index = ann.build(self.item_embeddings, backend, **params)
    index.calibration = None
    if target_recall is not None and index.knob not in params and index.partitions > 0:
      rows = np.random.default_rng(0).choice(self.num_items, min(sample, self.num_items),
                                             replace=False)
      k = min(10, self.num_items - 1)
      _, truth = self._exact(self.item_embeddings[rows], k + 1)
      truth = np.asarray([[r for r in t if r != row][:k] for t, row in zip(truth.tolist(), rows)])
      setattr(index, index.knob, max(1, index.partitions // 100))
      value, recall = ann.calibrate(index, self.item_embeddings[rows], truth, target_recall,
                                    exclude_rows=rows)
      index.calibration = {index.knob: value, "recall": recall, "queries": len(rows)}
    self._ann[backend] = index
    return index

  @staticmethod
  def _resolve(backend: str) -> str:
    from sslrec import ann
    try:
      return ann.resolve(backend)
    except ann.AnnUnavailable as e:
      raise ServingError(str(e)) from None
    except ValueError as e:
      raise QueryError(str(e)) from None

  def search_embeddings(self, emb: np.ndarray, k: int = 10, *, method: str = "exact",
                        backend: str = "auto", exclude_rows: np.ndarray | None = None,
                        notes: list[str] | None = None) -> Results:
    """Top-``k`` items for query embeddings ``emb [B, D]``.

    Args:
      emb: ``float32 [B, D]``.
      k: items per query; clamped (with a ServingWarning) to what the catalogue can return.
      method: 'exact' (JAX, every item scored) or 'ann' (the approximate index).
      backend: the ann backend ('auto' = the preferred installed one).
      exclude_rows: ``int [B]`` one catalogue row per query never returned (item-to-item).
      notes: notes so far (extended in place and attached to the result).
    """
    notes = [] if notes is None else notes
    emb = np.ascontiguousarray(emb, np.float32)
    if emb.ndim != 2 or emb.shape[1] != self.dim or emb.shape[0] < 1:
      raise QueryError(f"query embeddings must be [B, {self.dim}], got {list(emb.shape)}")
    k = self._clamp_k(k, self.num_items - (exclude_rows is not None), notes)
    want = k + (exclude_rows is not None)
    if method == "exact":
      scores, rows = self._exact(emb, want)
      label = "exact"
    elif method == "ann":
      index = self.ann_index(backend)
      scores, rows = index.search(emb, want)
      label = f"ann:{index.backend}"
      short = np.flatnonzero((rows < 0).any(axis=1))
      if short.size:  # a partitioned index found fewer than `want` items: answer those exactly
        scores[short], rows[short] = self._exact(emb[short], want)
    else:
      raise QueryError(f"method={method!r}; allowed: 'exact', 'ann'")
    if exclude_rows is not None:
      keep = rows != np.asarray(exclude_rows)[:, None]
      keep[keep.sum(axis=1) > k, -1] = False  # the excluded row was not found: drop the last
      scores = scores[keep].reshape(-1, k)
      rows = rows[keep].reshape(-1, k)
    names = self.item_names[rows] if self.item_names is not None else None
    return Results(scores=scores, rows=rows, keys=self.item_keys[rows], names=names,
                   method=label, notes=notes)

  def search(self, queries, k: int = 10, *, method: str = "exact", backend: str = "auto"
             ) -> Results:
    """The top-``k`` items for raw queries (one dict or a sequence of dicts; see ``encode``)."""
    emb, notes = self.embed_queries(queries)
    return self.search_embeddings(emb, k, method=method, backend=backend, notes=notes)

  def item_row(self, key) -> int:
    """The catalogue row of an item key (a string matches a key whose ``str`` is equal)."""
    by_key, by_str = self._key_rows
    try:
      if key in by_key:
        return by_key[key]
    except TypeError:  # unhashable
      pass
    row = by_str.get(str(key))
    if row is None:
      sample = ", ".join(str(k) for k in self.item_keys[:3].tolist())
      raise QueryError(f"no item with key {key!r} in the catalogue ({self.num_items} items; "
                       f"keys look like {sample}, ...)")
    return row

  def similar_items(self, keys, k: int = 10, *, method: str = "exact", backend: str = "auto"
                    ) -> Results:
    """Item-to-item: the ``k`` items closest to each given item (never the item itself).

    Args:
      keys: one item key or a sequence of them.
    """
    if isinstance(keys, (str, bytes)) or not isinstance(keys, (Sequence, np.ndarray)):
      keys = [keys]
    rows = np.asarray([self.item_row(key) for key in keys], np.int64)
    if rows.size == 0:
      raise QueryError("no item keys given")
    return self.search_embeddings(self.item_embeddings[rows], k, method=method, backend=backend,
                                  exclude_rows=rows)


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split())[:300]


def read_manifest(export_dir: str, *, verify: bool = True) -> dict:
  """The manifest of an export directory, after checking format, files and (optionally) sha256s."""
  if not os.path.isdir(export_dir):
    raise ExportDirError(f"{export_dir}: no such export directory")
  path = os.path.join(export_dir, MANIFEST)
  if not os.path.isfile(path):
    raise ExportDirError(f"{export_dir}: not an sslrec export (no {MANIFEST}); write one with "
                         "launch/export.py")
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise ExportDirError(f"{path}: unreadable ({_one_line(e)})") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise ExportDirError(f"{path}: not an sslrec export manifest (format != {FORMAT!r})")
  version = manifest.get("format_version")
  if version != FORMAT_VERSION:
    raise ExportDirError(
        f"{export_dir} was written in export format version {version!r}; this sslrec reads "
        f"version {FORMAT_VERSION}: re-export the run with this version (launch/export.py)")
  files = manifest.get("files")
  needed = ("step", "num_items", "embedding_dim")
  if not isinstance(files, dict) or any(k not in manifest for k in needed):
    raise ExportDirError(f"{path}: incomplete manifest (needs 'files', {', '.join(needed)})")
  missing = [n for n in sorted(set(files) | set(REQUIRED_FILES))
             if not os.path.isfile(os.path.join(export_dir, n))]
  if missing:
    raise ExportDirError(f"{export_dir}: missing files: {', '.join(missing)} (an incomplete copy? "
                         "copy the whole directory, or re-export)")
  unlisted = [n for n in REQUIRED_FILES if n not in files]
  if unlisted:
    raise ExportDirError(f"{path}: no checksum for {', '.join(unlisted)}")
  if verify:
    bad = [n for n, meta in sorted(files.items())
           if sha256_file(os.path.join(export_dir, n)) != meta.get("sha256")]
    if bad:
      raise ExportDirError(f"{export_dir}: checksum mismatch for {', '.join(bad)} (changed or "
                           "corrupted since export; re-export or copy it again)")
  return manifest


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
      raise QueryError(f"--query: {part.strip()!r} is not name=value (syntax: "
                       "'name=value,name=v1|v2|v3')")
    if name in out:
      raise QueryError(f"--query: feature {name!r} given twice")
    if "|" in value:
      out[name] = [v.strip() for v in value.split("|") if v.strip()]
    else:
      out[name] = value.strip()
  if not out:
    raise QueryError("--query is empty (syntax: 'name=value,name=v1|v2|v3')")
  return out


def format_results(results: Results, row: int = 0, *, digits: int = 4) -> str:
  """A markdown table of one query's results: rank, item key, name (if any), score."""
  has_names = results.names is not None
  header = "| rank | item | name | score |" if has_names else "| rank | item | score |"
  lines = [header, "|---:|---|---|---:|" if has_names else "|---:|---|---:|"]
  for j in range(results.rows.shape[1]):
    cells = [str(j + 1), str(results.keys[row, j])]
    if has_names:
      cells.append(str(results.names[row, j]).replace("|", "/"))
    cells.append(f"{results.scores[row, j]:.{digits}f}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


__all__ = ["Retriever", "Results", "ServingError", "ExportDirError", "QueryError",
           "ServingWarning", "parse_query", "format_results", "read_manifest", "FORMAT_VERSION"]
