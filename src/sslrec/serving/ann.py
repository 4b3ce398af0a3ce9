"""Approximate nearest-neighbour (maximum inner product) indexes over item embeddings.

Optional: the backends come with the ``ann`` extra (``pip install 'sslrec[ann]'``). Importing this
module never fails; ``available()`` says which backends are importable and ``build`` raises
``AnnUnavailable`` (an ``ImportError``) naming the missing package.

Two backends, both searching by inner product (the towers' outputs are L2-normalised, so this is
cosine similarity):

* ``scann`` (the default; chosen by measurement, see docs/serving.md): a k-means tree of
  ``num_leaves ~ sqrt(N)`` partitions, asymmetric hashing (anisotropic quantisation, 2 dims per
  4-bit code) to score the candidates of ``leaves_to_search`` partitions, then an exact re-scoring
  of the best ``reorder`` candidates.
* ``faiss``: an inverted file (``IndexIVFFlat``, ``nlist ~ sqrt(N)`` k-means cells) probing
  ``nprobe`` cells with exact inner products.

Catalogues smaller than ``MIN_PARTITIONED_ITEMS`` get an exact (brute-force) index from either
backend: partitioning them buys nothing.

How many partitions a query must visit for a given recall depends on the data, so ``calibrate``
doubles the search-time knob (``index.knob``: ScaNN ``leaves_to_search``, faiss ``nprobe``) until
Recall@k against exact answers reaches a target (``sslrec.serving`` does it on build, with a sample
of the catalogue's own embeddings as queries).

Every backend is one class implementing ``AnnIndex`` and one entry of ``BACKENDS``; ``available``,
``resolve`` and ``build`` know the backends only through that registry.
"""

from __future__ import annotations

import importlib
import math
import os
from typing import ClassVar, Protocol

import numpy as np

MIN_PARTITIONED_ITEMS = 10_000


class AnnUnavailable(ImportError):
  """The requested approximate-search backend is not installed."""


class AnnIndex(Protocol):
  """An approximate maximum-inner-product index over ``items [N, D]``, built by
  ``cls(items, **params)`` (``cls`` a value of ``BACKENDS``).

  Attributes:
    backend: its name in ``BACKENDS`` (results of ``method="ann"`` say ``ann:<backend>``).
    module: the Python module the backend imports; package: the pip package that installs it.
    knob: the name of the attribute holding the search-time knob (partitions searched per query)
      that ``calibrate`` doubles; it may be changed between searches.
    partitions: the number of partitions (0: an exact, brute-force index).
    calibration: what ``Retriever.build_ann_index`` calibrated (None when it did not).
  """

  backend: ClassVar[str]
  module: ClassVar[str]
  package: ClassVar[str]
  knob: ClassVar[str]
  partitions: int
  calibration: dict | None

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(scores float32 [B, k], rows int64 [B, k])``, best first; ``k <= N``."""
    ...

  def describe(self) -> str:
    """The index's structure in a few words (for benchmark reports)."""
    ...

  def state(self) -> dict:
    """The JSON-able settings ``load`` needs besides the saved files (sizes, knobs)."""
    ...

  def save(self, directory: str) -> None:
    """Writes the index's files into the existing, empty ``directory``."""
    ...

  @classmethod
  def load(cls, directory: str, state: dict) -> AnnIndex:
    """The index ``save`` wrote into ``directory``, with the settings of ``state()``."""
    ...


def _import(backend: str):
  """The module of ``backend``, imported now: lazily on purpose, since scann and faiss are heavy
  optional dependencies (the ``ann`` extra) that importing this module must never need."""
  try:
    cls = BACKENDS[backend]
  except (KeyError, TypeError):
    raise ValueError(f"ann backend {backend!r}; allowed: {tuple(BACKENDS)} or 'auto'") from None
  try:
    return importlib.import_module(cls.module)
  except ImportError:
    raise AnnUnavailable(
      f"approximate search with {backend!r} needs the optional package {cls.package!r}: "
      f"pip install 'sslrec[ann]' (or pip install {cls.package})"
    ) from None


def available() -> list[str]:
  """The importable backends, in order of preference."""
  out = []
  for b in BACKENDS:
    try:
      _import(b)
    except AnnUnavailable:
      continue
    out.append(b)
  return out


def resolve(backend: str = "auto") -> str:
  """``backend``, or the preferred installed one for 'auto'; raises AnnUnavailable."""
  if backend != "auto":
    _import(backend)
    return backend
  for b in BACKENDS:
    try:
      _import(b)
    except AnnUnavailable:
      continue
    return b
  preferred = next(iter(BACKENDS.values()))
  raise AnnUnavailable(
    "approximate search needs the optional 'ann' extra: pip install 'sslrec[ann]' "
    f"(installs {preferred.package!r})"
  )


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
  x = np.ascontiguousarray(x, dtype=np.float32)
  if x.ndim != 2 or x.shape[0] < 1:
    raise ValueError(f"{name} must be a non-empty [n, dim] matrix, got shape {x.shape}")
  return x


class ScannIndex:
  """ScaNN: tree partitioning + asymmetric hashing + exact re-ordering."""

  backend = "scann"
  module = "scann"
  package = "scann"
  knob = "leaves_to_search"
  calibration = None

  def __init__(
    self,
    items: np.ndarray,
    *,
    num_leaves: int | None = None,
    leaves_to_search: int | None = None,
    reorder: int = 100,
    training_sample_size: int = 250_000,
    num_threads: int | None = None,
  ):
    """Args:
    items: ``float32 [N, D]``.
    num_leaves: k-means partitions (default ``round(sqrt(N))``); 0 = brute force.
    leaves_to_search: partitions scored per query (default ``max(10, num_leaves // 20)``, 5%;
      may be changed between searches).
    reorder: candidates re-scored exactly per query (at least ``k``; may be changed too).
    training_sample_size: items the partitioner and quantiser are trained on.
    num_threads: search threads (default: the CPUs this process may use).
    """
    scann = _import(self.backend)
    items = _as_matrix(items, "items")
    n = items.shape[0]
    self.num_items, self.dim = items.shape
    if num_leaves is None:
      num_leaves = int(round(math.sqrt(n))) if n >= MIN_PARTITIONED_ITEMS else 0
    self.num_leaves = self.partitions = int(num_leaves)
    self.leaves_to_search = int(leaves_to_search or max(10, self.num_leaves // 20))
    self.reorder = int(reorder)
    builder = scann.scann_ops_pybind.builder(items, 10, "dot_product")
    if self.num_leaves > 0:
      builder = builder.tree(
        num_leaves=self.num_leaves,
        num_leaves_to_search=min(self.leaves_to_search, self.num_leaves),
        training_sample_size=min(training_sample_size, n),
      )
      builder = builder.score_ah(2, anisotropic_quantization_threshold=0.2).reorder(self.reorder)
    else:
      builder = builder.score_brute_force()
    self._searcher = builder.build()
    self._searcher.set_num_threads(num_threads or len(os.sched_getaffinity(0)))

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(scores float32 [B, k], rows int64 [B, k])``, best first; ``k <= N``."""
    queries = _as_matrix(queries, "queries")
    kwargs = {}
    if self.num_leaves > 0:
      kwargs = dict(
        leaves_to_search=min(self.leaves_to_search, self.num_leaves),
        pre_reorder_num_neighbors=max(self.reorder, k),
      )
    rows, scores = self._searcher.search_batched_parallel(queries, final_num_neighbors=k, **kwargs)
    return np.asarray(scores, np.float32), np.asarray(rows, np.int64)

  def describe(self) -> str:
    return f"num_leaves={self.num_leaves}, AH 2 dims/block, reorder={self.reorder}"

  def state(self) -> dict:
    return {
      "num_items": self.num_items,
      "dim": self.dim,
      "num_leaves": self.num_leaves,
      "leaves_to_search": self.leaves_to_search,
      "reorder": self.reorder,
    }

  def save(self, directory: str) -> None:
    self._searcher.serialize(directory, relative_path=True)  # the directory may move

  @classmethod
  def load(cls, directory: str, state: dict, num_threads: int | None = None) -> ScannIndex:
    scann = _import(cls.backend)
    self = cls.__new__(cls)
    self.num_items, self.dim = int(state["num_items"]), int(state["dim"])
    self.num_leaves = self.partitions = int(state["num_leaves"])
    self.leaves_to_search = int(state["leaves_to_search"])
    self.reorder = int(state["reorder"])
    self._searcher = scann.scann_ops_pybind.load_searcher(directory)
    self._searcher.set_num_threads(num_threads or len(os.sched_getaffinity(0)))
    return self


class FaissIndex:
  """faiss: inverted file with exact inner products in the probed cells."""

  backend = "faiss"
  module = "faiss"
  package = "faiss-cpu"
  knob = "nprobe"
  calibration = None

  def __init__(
    self,
    items: np.ndarray,
    *,
    nlist: int | None = None,
    nprobe: int | None = None,
    training_sample_size: int = 262_144,
    num_threads: int | None = None,
    seed: int = 0,
  ):
    """Args:
    items: ``float32 [N, D]``.
    nlist: k-means cells (default ``round(sqrt(N))``, as ScaNN's leaves); 0 = brute force.
    nprobe: cells searched per query (default ``max(10, nlist // 20)``, 5%; may be changed
      between searches).
    training_sample_size: items k-means is trained on.
    num_threads: OpenMP threads (default: the CPUs this process may use).
    seed: picks the training sample.
    """
    faiss = _import(self.backend)
    items = _as_matrix(items, "items")
    n, d = items.shape
    self.num_items, self.dim = n, d
    faiss.omp_set_num_threads(num_threads or len(os.sched_getaffinity(0)))
    if nlist is None:
      nlist = int(round(math.sqrt(n))) if n >= MIN_PARTITIONED_ITEMS else 0
    self.nlist = self.partitions = int(nlist)
    self.nprobe = int(nprobe or max(10, self.nlist // 20))
    if self.nlist > 0:
      self._quantizer = faiss.IndexFlatIP(d)
      index = faiss.IndexIVFFlat(self._quantizer, d, self.nlist, faiss.METRIC_INNER_PRODUCT)
      rng = np.random.default_rng(seed)
      sample = (
        items
        if n <= training_sample_size
        else items[np.sort(rng.choice(n, training_sample_size, replace=False))]
      )
      index.train(sample)
      index.nprobe = min(self.nprobe, self.nlist)
    else:
      index = faiss.IndexFlatIP(d)
    index.add(items)
    self._index = index

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(scores float32 [B, k], rows int64 [B, k])``, best first; ``k <= N``."""
    if self.nlist > 0:
      self._index.nprobe = min(self.nprobe, self.nlist)
    scores, rows = self._index.search(_as_matrix(queries, "queries"), k)
    return np.asarray(scores, np.float32), np.asarray(rows, np.int64)

  def describe(self) -> str:
    return f"IVFFlat nlist={self.nlist}"

  FILE = "index.faiss"

  def state(self) -> dict:
    return {
      "num_items": self.num_items,
      "dim": self.dim,
      "nlist": self.nlist,
      "nprobe": self.nprobe,
    }

  def save(self, directory: str) -> None:
    _import(self.backend).write_index(self._index, os.path.join(directory, self.FILE))

  @classmethod
  def load(cls, directory: str, state: dict, num_threads: int | None = None) -> FaissIndex:
    faiss = _import(cls.backend)
    faiss.omp_set_num_threads(num_threads or len(os.sched_getaffinity(0)))
    self = cls.__new__(cls)
    self.num_items, self.dim = int(state["num_items"]), int(state["dim"])
    self.nlist = self.partitions = int(state["nlist"])
    self.nprobe = int(state["nprobe"])
    self._index = faiss.read_index(os.path.join(directory, cls.FILE))
    return self


# The backends by name, in order of preference for backend='auto'.
BACKENDS: dict[str, type[AnnIndex]] = {"scann": ScannIndex, "faiss": FaissIndex}


def build(items: np.ndarray, backend: str = "auto", **params) -> AnnIndex:
  """An index over ``items [N, D]`` with the given (or preferred installed) backend."""
  return BACKENDS[resolve(backend)](items, **params)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
  """Mean fraction of each row of ``truth [B, k]`` found in the same row of ``found [B, >=k]``."""
  k = truth.shape[1]
  return float(
    np.mean([len(set(a[:k].tolist()) & set(b.tolist())) / k for a, b in zip(found, truth)])
  )


def calibrate(
  index: AnnIndex,
  queries: np.ndarray,
  truth: np.ndarray,
  target: float = 0.95,
  *,
  exclude_rows: np.ndarray | None = None,
) -> tuple[int, float]:
  """Doubles ``index``'s search-time knob until Recall@k of ``queries`` reaches ``target``.

  Args:
    index: a partitioned index (a brute-force one is returned as is).
    queries: ``float32 [B, D]`` sample queries.
    truth: ``int [B, k]`` their exact top-k rows.
    target: the Recall@k to reach (or every partition searched).
    exclude_rows: ``int [B]``: a row per query left out of its answer (the query item itself,
      when the queries are catalogue embeddings; ``truth`` must leave it out too).

  Returns:
    ``(knob value, recall at it)``; the knob is left at that value.
  """
  if index.partitions <= 0:
    return 0, 1.0
  k = truth.shape[1]
  while True:
    value = getattr(index, index.knob)
    if exclude_rows is None:
      _, found = index.search(queries, k)
    else:
      _, found = index.search(queries, k + 1)
      found = [[r for r in f if r != x][:k] for f, x in zip(found.tolist(), exclude_rows)]
      found = np.asarray(found)
    r = recall_at_k(found, truth)
    if r >= target or value >= index.partitions:
      return value, r
    setattr(index, index.knob, min(2 * value, index.partitions))
