"""Serving an export: raw query features -> query tower -> top-K catalogue items.

``Retriever.load(EXPORT_DIR)`` reads a directory written by ``launch/export.py`` (layout in
docs/serving.md), checks it (format version, files, sha256 checksums) and serves it:

    r = Retriever.load("exports/base")
    res = r.search({"q_topic": 3, "q_style": 5, "q_history": [1, 2, 3]}, k=10)
    res.keys[0], res.scores[0]            # the 10 best items of the first query, best first
    r.similar_items(1234, k=10)           # item-to-item: the items closest to item key 1234
    r.search(q, k=10, exclude=[1, 2])     # filters: never items 1, 2 (e.g. the user's seen ones)
    r.add_items(["new-1"], [{"category": 3, "tags": [4, 5]}])  # embed new items, add them

The query tower is a ``jax.export`` artifact (StableHLO) called with its parameters from
``query_params.npz``, the item tower (for new items) likewise; raw values become ids as
``sslrec.serving.query`` describes, exact search is ``sslrec.serving.search``, approximate search
``sslrec.serving.ann`` (its indexes persisted by ``sslrec.serving.index_store``) and the query-time
filters ``sslrec.serving.filters``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sslrec.serving import ann, filters, index_store
from sslrec.serving import format as format_lib
from sslrec.serving import query as query_lib
from sslrec.serving import search as search_lib
from sslrec.serving.format import ExportDirError, Feature, QueryError, ServingError, ServingWarning


def _check_tower_inputs(export_dir: str, tower, features, query_params) -> None:
  """The schema's features and the saved parameters against the inputs the exported tower was
  lowered for (a schema.json or query_params.npz that does not belong to the tower is refused)."""
  try:
    (params_avals, feature_avals), _ = jax.tree_util.tree_unflatten(tower.in_tree, tower.in_avals)
  except Exception as e:  # noqa: BLE001 -- an unexpected signature: not an sslrec tower
    raise ExportDirError(
      f"{export_dir}: the query tower has an unexpected signature ({e})"
    ) from None
  want = {k: (tuple(a.shape[1:]), np.dtype(a.dtype)) for k, a in feature_avals.items()}
  got = {f.name: (tuple(f.shape), np.dtype(f.dtype)) for f in features}
  if want != got:
    raise ExportDirError(
      f"{export_dir}/{format_lib.SCHEMA}: the query features {sorted(got.items())} do not match "
      f"the inputs the query tower was exported for {sorted(want.items())}"
    )
  pwant = {k: (tuple(a.shape), np.dtype(a.dtype)) for k, a in params_avals.items()}
  pgot = {k: (tuple(v.shape), v.dtype) for k, v in query_params.items()}
  if pwant != pgot:
    raise ExportDirError(
      f"{export_dir}/{format_lib.QUERY_PARAMS}: the parameters do not match the ones the query "
      "tower was exported for (a file from another export?)"
    )


@dataclasses.dataclass
class Results:
  """The top-K items of a batch of queries, best first.

  Attributes:
    scores: ``float32 [B, K]`` inner products of the L2-normalised embeddings (cosine), plus the
      popularity prior when the export carries one (manifest ``popularity_prior``, sslrec.prior).
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


class Retriever:
  """A loaded export: query encoding, the query tower, exact and approximate top-K search."""

  def __init__(
    self,
    export_dir: str,
    manifest: dict,
    features: Sequence[Feature],
    vocabularies: Mapping[str, list],
    item_embeddings: np.ndarray,
    item_keys: np.ndarray,
    item_names: np.ndarray | None,
    query_tower,
    query_params: Mapping[str, np.ndarray],
    item_tower=None,
    item_params: Mapping[str, np.ndarray] | None = None,
    item_features: Sequence[Feature] = (),
    item_vocabularies: Mapping[str, list] | None = None,
    verify: bool = True,
  ):
    self.export_dir = export_dir
    self.manifest = manifest
    self.features = tuple(features)
    self.item_embeddings = item_embeddings
    self.item_keys = item_keys
    self.item_names = item_names
    self._tower = query_tower
    self._params = {k: jnp.asarray(v) for k, v in query_params.items()}
    self._items = jax.device_put(item_embeddings)
    self._lookup = query_lib.vocabulary_lookups(vocabularies)
    self._item_tower = item_tower
    self._item_params = {k: jnp.asarray(v) for k, v in (item_params or {}).items()}
    self.item_features = tuple(item_features)
    self._item_lookup = query_lib.vocabulary_lookups(item_vocabularies or {})
    self._verify = verify
    self._added = 0  # items added since load (add_items): persisted indexes no longer match
    self._ann = {}
    self._lock = threading.RLock()  # index builds and catalogue changes, one at a time

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
    manifest = format_lib.read_manifest(export_dir, verify=verify)
    path = functools.partial(os.path.join, export_dir)
    features, vocabularies = format_lib.read_schema(export_dir)
    try:
      item_embeddings = np.load(path(format_lib.ITEM_EMBEDDINGS), allow_pickle=False)
      item_keys = np.load(path(format_lib.ITEM_KEYS), allow_pickle=False)
      item_names = (
        np.load(path(format_lib.ITEM_NAMES), allow_pickle=False)
        if format_lib.ITEM_NAMES in manifest["files"]
        else None
      )
      with np.load(path(format_lib.QUERY_PARAMS), allow_pickle=False) as z:
        query_params = {k: z[k] for k in z.files}
    except format_lib.READ_ERRORS as e:
      raise format_lib.cannot_read(export_dir, e) from None
    tower = _read_tower(path(format_lib.QUERY_TOWER), "query")
    _check_tower_inputs(export_dir, tower, features, query_params)
    item_tower, item_params, item_features, item_vocabularies = None, None, (), None
    if format_lib.ITEM_TOWER in manifest["files"]:  # exports before the item tower lack it
      item_tower = _read_tower(path(format_lib.ITEM_TOWER), "item")
      item_features, item_vocabularies = format_lib.read_item_schema(export_dir)
      try:
        with np.load(path(format_lib.ITEM_PARAMS), allow_pickle=False) as z:
          item_params = {k: z[k] for k in z.files}
      except format_lib.READ_ERRORS as e:
        raise format_lib.cannot_read(export_dir, e) from None
    n, d = manifest["num_items"], manifest["embedding_dim"]
    if (
      item_embeddings.dtype != np.float32
      or item_embeddings.shape != (n, d)
      or item_keys.shape != (n,)
      or (item_names is not None and item_names.shape != (n,))
    ):
      raise ExportDirError(
        f"{export_dir}: item arrays do not match the manifest ({n} items of dim {d}): "
        f"embeddings {item_embeddings.dtype}{list(item_embeddings.shape)}, keys "
        f"{list(item_keys.shape)}"
      )
    unknown_vocab = sorted(set(vocabularies) - {f.name for f in features})
    if unknown_vocab:
      raise ExportDirError(
        f"{export_dir}: vocabularies for features the query tower does not read: {unknown_vocab}"
      )
    return cls(
      export_dir,
      manifest,
      features,
      vocabularies,
      item_embeddings,
      item_keys,
      item_names,
      tower,
      query_params,
      item_tower,
      item_params,
      item_features,
      item_vocabularies,
      verify,
    )

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

  def encode(
    self, queries: Mapping[str, Any] | Sequence[Mapping[str, Any]]
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
    return query_lib.encode(queries, self.features, self._lookup)

  # -- The query tower ---------------------------------------------------------------------------

  def embed_batch(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """The exported query tower on an encoded batch: ``float32 [B, D]`` (L2-normalised)."""
    return _call_padded(self._tower, self._params, batch)

  def embed_queries(self, queries) -> tuple[np.ndarray, list[str]]:
    """Raw queries (as ``encode`` takes them) -> ``(float32 [B, D], notes)``."""
    batch, notes = self.encode(queries)
    return self.embed_batch(batch), notes

  # -- The item tower: new items ----------------------------------------------------------------

  @property
  def has_item_tower(self) -> bool:
    return self._item_tower is not None

  def _need_item_tower(self):
    if self._item_tower is None:
      raise ServingError(
        f"{self.export_dir} has no item tower (exported by an older sslrec); re-export the run "
        "to embed new items"
      )

  def encode_items(self, items) -> tuple[dict[str, np.ndarray], list[str]]:
    """Raw item features (one ``{feature: value(s)}`` dict or a sequence) -> the item tower's
    input batch and notes, by the rules of ``encode`` (``schema.json``'s ``item`` features)."""
    self._need_item_tower()
    return query_lib.encode(items, self.item_features, self._item_lookup, tower="item")

  def embed_item_batch(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """The exported item tower on an encoded batch: ``float32 [B, D]`` (L2-normalised, without
    the popularity prior's column)."""
    self._need_item_tower()
    return _call_padded(self._item_tower, self._item_params, batch)

  def embed_items(self, items) -> tuple[np.ndarray, list[str]]:
    """Raw item features -> ``(float32 [B, dim], notes)``, vectors like the catalogue's: with a
    popularity prior, its column is that of an item never seen in training (0)."""
    batch, notes = self.encode_items(items)
    emb = self.embed_item_batch(batch)
    if emb.shape[1] == self.dim - 1 and self.manifest.get("popularity_prior"):
      emb = np.concatenate([emb, np.zeros((emb.shape[0], 1), np.float32)], axis=1)
    return emb, notes

  def add_items(self, keys, items, names=None) -> np.ndarray:
    """Embeds new items from their raw features and appends them to the catalogue (in memory;
    the export on disk is unchanged). Returns their rows; they are searchable at once.

    Args:
      keys: ``[M]`` new item keys, of the catalogue's kind (ints or strings), not already in it.
      items: ``[M]`` raw item features, as ``encode_items`` takes them.
      names: ``[M]`` item names, where the catalogue has names (default: the keys as strings).
    Approximate indexes built so far are dropped (rebuilt on the next ``method="ann"`` search),
    and a persisted one is no longer used: it does not hold the new items.
    """
    keys = list(keys) if isinstance(keys, (list, tuple, np.ndarray)) else [keys]
    items = [items] if isinstance(items, Mapping) else list(items)
    if len(keys) != len(items) or not keys:
      raise QueryError(f"add_items: {len(keys)} keys for {len(items)} items; give one key each")
    if np.issubdtype(self.item_keys.dtype, np.integer):
      bad = [k for k in keys if isinstance(k, bool) or not isinstance(k, (int, np.integer))]
      if bad:
        raise QueryError(f"add_items: item keys of this catalogue are integers; got {bad[0]!r}")
    if len(set(map(str, keys))) != len(keys):
      raise QueryError("add_items: the same key is given twice")
    emb, _ = self.embed_items(items)  # its notes (OOV values, ...): embed_items / encode_items
    with self._lock:
      by_key, by_str = self._key_rows
      taken = [k for k in keys if k in by_key or str(k) in by_str]
      if taken:
        raise QueryError(f"add_items: item key {taken[0]!r} is already in the catalogue")
      rows = np.arange(self.num_items, self.num_items + len(keys))
      if self.item_keys.dtype.kind == "U":  # concatenate widens the strings as needed
        new_keys = np.asarray([str(k) for k in keys])
      else:
        new_keys = np.asarray(keys, self.item_keys.dtype)
      self.item_keys = np.concatenate([self.item_keys, new_keys])
      if self.item_names is not None:
        new_names = [str(k) for k in keys] if names is None else [str(n) for n in names]
        self.item_names = np.concatenate([self.item_names, np.asarray(new_names)])
      self.item_embeddings = np.concatenate([self.item_embeddings, emb])
      self._items = jax.device_put(self.item_embeddings)
      for row, key in zip(rows.tolist(), keys):
        by_key.setdefault(key, row)
        by_str.setdefault(str(key), row)
      self._added += len(keys)
      self._ann.clear()
    return rows

  # -- Search ------------------------------------------------------------------------------------

  def _clamp_k(self, k: int, available: int, notes: list[str]) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
      raise QueryError(f"k={k!r}; must be an integer >= 1")
    if available < 1:
      raise QueryError("the filters leave no item to return")
    if k > available:
      msg = f"k={k} is larger than the {available} items that can be returned; using k={available}"
      warnings.warn(msg, ServingWarning, stacklevel=4)
      notes.append(msg)
      return available
    return int(k)

  def _exact(self, emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    return search_lib.exact_search(emb, self._items, k)

  def ann_index(self, backend: str = "auto") -> ann.AnnIndex:
    """The approximate index of ``backend`` ('auto': the preferred installed one) that
    ``method="ann"`` uses: the last one ``build_ann_index`` built, else the one persisted in the
    export (``ann/<backend>/``, ``sslrec.serving.index_store``; ExportDirError if it does not
    match), else one built now with the defaults. Raises ServingError naming what to install
    when the ``ann`` extra is missing."""
    backend = self._resolve(backend)
    with self._lock:
      if backend not in self._ann:
        index = None
        if not self._added:
          index = index_store.load(
            self.export_dir, backend, self._items_sha256(), verify=self._verify
          )
        if index is None:
          self.build_ann_index(backend)
        else:
          self._ann[backend] = index
      return self._ann[backend]

  def _items_sha256(self) -> str:
    return self.manifest["files"][format_lib.ITEM_EMBEDDINGS]["sha256"]

  def save_ann_index(self, backend: str = "auto", **build_params) -> ann.AnnIndex:
    """Persists the approximate index of ``backend`` in the export (``ann/<backend>/``, replacing
    one there), so later loads read it instead of building it; builds it first (with
    ``build_params``, see ``build_ann_index``) unless it is already built and none are given."""
    backend = self._resolve(backend)
    with self._lock:
      if self._added:
        raise ServingError(
          f"{self._added} items were added since the export was loaded; a persisted index "
          "must hold the export's catalogue exactly (re-export to persist a larger one)"
        )
      if build_params or backend not in self._ann:
        index = self.build_ann_index(backend, **build_params)
      else:
        index = self._ann[backend]
      index_store.save(index, self.export_dir, self._items_sha256())
      return index

  def build_ann_index(
    self, backend: str = "auto", *, target_recall: float | None = 0.95, sample: int = 256, **params
  ) -> ann.AnnIndex:
    """Builds (or rebuilds) the approximate index of ``backend`` and returns it.

    Unless ``params`` set the search-time knob (``index.knob``: ``leaves_to_search`` /
    ``nprobe``) or ``target_recall`` is None, the knob is calibrated
    (``sslrec.serving.ann.calibrate``, doubling from 1% of the partitions): ``sample`` catalogue
    embeddings, as queries, must find ``target_recall`` of their exact top-10 neighbours
    (themselves excluded); the result is in ``index.calibration``. Query-tower outputs may sit
    elsewhere than item embeddings, so check the recall of real queries
    (``launch/bench_serving.py`` shows how) before relying on it.

    Args:
      backend: 'auto' or a name in ``ann.BACKENDS`` ('scann', 'faiss').
      target_recall: Recall@10 to calibrate for, or None.
      sample: calibration queries.
      **params: index parameters (``sslrec.serving.ann.ScannIndex`` / ``FaissIndex``).
    """
    backend = self._resolve(backend)
    index = ann.build(self.item_embeddings, backend, **params)
    index.calibration = None
    if target_recall is not None and index.knob not in params and index.partitions > 0:
      rows = np.random.default_rng(0).choice(
        self.num_items, min(sample, self.num_items), replace=False
      )
      k = min(10, self.num_items - 1)
      _, truth = self._exact(self.item_embeddings[rows], k + 1)
      truth = np.asarray([[r for r in t if r != row][:k] for t, row in zip(truth.tolist(), rows)])
      setattr(index, index.knob, max(1, index.partitions // 100))
      value, recall = ann.calibrate(
        index, self.item_embeddings[rows], truth, target_recall, exclude_rows=rows
      )
      index.calibration = {index.knob: value, "recall": recall, "queries": len(rows)}
    self._ann[backend] = index
    return index

  @staticmethod
  def _resolve(backend: str) -> str:
    try:
      return ann.resolve(backend)
    except ann.AnnUnavailable as e:
      raise ServingError(str(e)) from None
    except ValueError as e:
      raise QueryError(str(e)) from None

  def search_embeddings(
    self,
    emb: np.ndarray,
    k: int = 10,
    *,
    method: str = "exact",
    backend: str = "auto",
    exclude=None,
    allow=None,
    exclude_rows: np.ndarray | None = None,
    notes: list[str] | None = None,
  ) -> Results:
    """Top-``k`` items for query embeddings ``emb [B, D]``.

    Args:
      emb: ``float32 [B, D]``.
      k: items per query; clamped (with a ServingWarning) to what the catalogue can return.
      method: 'exact' (JAX, every item scored) or 'ann' (the approximate index).
      backend: the ann backend ('auto' = the preferred installed one).
      exclude: item keys never returned: one list for every query, or one list per query
        (``sslrec.serving.filters``); an unknown key is a QueryError naming it.
      allow: item keys that alone may be returned (same forms); scored exactly.
      exclude_rows: ``int [B]`` one catalogue row per query never returned (item-to-item).
      notes: notes so far (extended in place and attached to the result).
    """
    notes = [] if notes is None else notes
    emb = np.ascontiguousarray(emb, np.float32)
    if emb.ndim != 2 or emb.shape[1] != self.dim or emb.shape[0] < 1:
      raise QueryError(f"query embeddings must be [B, {self.dim}], got {list(emb.shape)}")
    if method not in ("exact", "ann"):
      raise QueryError(f"method={method!r}; allowed: 'exact', 'ann'")
    b = emb.shape[0]
    excluded = filters.rows_per_query("exclude", exclude, b, self.item_row)
    if exclude_rows is not None:
      own = [np.asarray([r], np.int64) for r in np.asarray(exclude_rows).reshape(-1)]
      excluded = filters.merge(excluded, own)
    allowed = filters.rows_per_query("allow", allow, b, self.item_row)
    if allowed is not None:
      candidates = filters.allowed(allowed, excluded)
      k = self._clamp_k(k, int(filters.sizes(candidates).min()), notes)
      scores, rows = filters.top_k_of_candidates(emb, self.item_embeddings, candidates, k)
      label = "exact"  # an allow-list is scored exactly, whatever the method
    else:
      most = 0 if excluded is None else int(filters.sizes(excluded).max())
      k = self._clamp_k(k, self.num_items - most, notes)
      want = k + most
      if method == "exact":
        scores, rows = self._exact(emb, want)
        label = "exact"
      else:
        index = self.ann_index(backend)
        scores, rows = index.search(emb, want)
        label = f"ann:{index.backend}"
      if excluded is not None:
        scores, rows, short = filters.drop_excluded(scores, rows, excluded, k)
      else:
        short = np.flatnonzero((rows < 0).any(axis=1))
      if short.size:  # a partitioned index found fewer than k items: answer those exactly
        s, r = self._exact(emb[short], want)
        if excluded is not None:
          s, r, _ = filters.drop_excluded(s, r, [excluded[i] for i in short], k)
        scores[short], rows[short] = s, r
    names = self.item_names[rows] if self.item_names is not None else None
    return Results(
      scores=scores, rows=rows, keys=self.item_keys[rows], names=names, method=label, notes=notes
    )

  def search(
    self,
    queries,
    k: int = 10,
    *,
    method: str = "exact",
    backend: str = "auto",
    exclude=None,
    allow=None,
  ) -> Results:
    """The top-``k`` items for raw queries (one dict or a sequence of dicts; see ``encode``);
    ``exclude`` / ``allow``: item-key filters (``search_embeddings``)."""
    emb, notes = self.embed_queries(queries)
    return self.search_embeddings(
      emb, k, method=method, backend=backend, exclude=exclude, allow=allow, notes=notes
    )

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
      raise QueryError(
        f"no item with key {key!r} in the catalogue ({self.num_items} items; "
        f"keys look like {sample}, ...)"
      )
    return row

  def similar_items(
    self,
    keys,
    k: int = 10,
    *,
    method: str = "exact",
    backend: str = "auto",
    exclude=None,
    allow=None,
  ) -> Results:
    """Item-to-item: the ``k`` items closest to each given item (never the item itself).

    Args:
      keys: one item key or a sequence of them.
      exclude, allow: item-key filters (``search_embeddings``).
    """
    if isinstance(keys, (str, bytes)) or not isinstance(keys, (Sequence, np.ndarray)):
      keys = [keys]
    rows = np.asarray([self.item_row(key) for key in keys], np.int64)
    if rows.size == 0:
      raise QueryError("no item keys given")
    query = self.item_embeddings[rows]
    if self.manifest.get("popularity_prior"):  # the last column is the prior (sslrec.prior):
      query = query.copy()  # as a query, an item carries the query side's column of ones
      query[:, -1] = 1.0
    return self.search_embeddings(
      query, k, method=method, backend=backend, exclude=exclude, allow=allow, exclude_rows=rows
    )


def _read_tower(tower_path: str, which: str):
  """A deserialized ``jax.export`` tower that runs on this process's platform; else one line."""
  try:
    with open(tower_path, "rb") as f:
      tower = jax.export.deserialize(bytearray(f.read()))
  except Exception as e:  # noqa: BLE001 -- any failure means an unusable artifact
    raise ExportDirError(
      f"{tower_path}: cannot deserialize the {which} tower "
      f"({type(e).__name__}: {format_lib.one_line(e)})"
    ) from None
  platform = jax.devices()[0].platform
  runs_on = {"gpu": ("cuda", "rocm")}.get(platform, (platform,))
  if not set(runs_on) & set(tower.platforms):
    raise ExportDirError(
      f"{tower_path} was lowered for {', '.join(tower.platforms)}; this process "
      f"computes on {platform}: re-export with --platforms={','.join(runs_on)} (or run with "
      "JAX_PLATFORMS=cpu)"
    )
  return tower


def _call_padded(tower, params, batch: Mapping[str, np.ndarray]) -> np.ndarray:
  """An exported tower on a batch padded to a power of two (few compilations): ``[B, D]``."""
  b = int(next(iter(batch.values())).shape[0])
  size = search_lib.bucket(b)
  padded = {
    k: np.concatenate([v, np.repeat(v[:1], size - b, axis=0)]) if size > b else v
    for k, v in batch.items()
  }
  return np.asarray(tower.call(params, padded))[:b]


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
