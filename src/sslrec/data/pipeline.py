"""grain input pipelines: the D_train pair stream and the D_item item stream.

Both streams are ``grain.MapDataset`` graphs over *batches of indices* (``EpochBatches``: a new
seeded permutation every epoch, cut into static-size batches, endless), mapped by a vectorised
gather of every feature of the whole batch. Working per batch instead of per example keeps the
Python cost per step at a few numpy calls.

* pair stream:  index p over D_train -> {'query': {...}, 'item': {...}, 'item_id': [B],
                'log_q': [B]}
* item stream:  index over the SSL item pool -> {'item': {...}, 'item_id': [B]}. The pool is the
                catalogue (``item_sampling='uniform'``: every item equally often) or the item column
                of D_train (``'train'``: the power-law training marginal, for the ablation).

Each process reads only its own share (a contiguous slice of every global batch) of both streams,
so a multi-host run reads disjoint data without coordination and sees the same global batches as
a single-host run. Iterators are grain
``DatasetIterator``s whose position is saved with the checkpoint
(``grain.checkpoint.CheckpointSave``) and restored exactly.
"""

from __future__ import annotations

import grain
import numpy as np

from sslrec.data import table as table_lib


class _GatherPairs:
  """Index batch ``[B]`` -> pair batch (picklable, for grain worker processes)."""

  def __init__(self, dataset: table_lib.Dataset, log_q: np.ndarray):
    self.queries = dataset.queries
    self.items = dataset.items
    self.train_query = dataset.train_query
    self.train_item = dataset.train_item
    self.log_q = log_q.astype(np.float32)

  def __call__(self, idx: np.ndarray) -> dict:
    q = self.train_query[idx]
    i = self.train_item[idx]
    return {
      "query": table_lib.take(self.queries, q),
      "item": table_lib.take(self.items, i),
      "item_id": i.astype(np.int32),
      "log_q": self.log_q[i],
    }


class _GatherItems:
  """Index batch ``[B]`` into the item pool -> item batch."""

  def __init__(self, dataset: table_lib.Dataset, pool: np.ndarray):
    self.items = dataset.items
    self.pool = pool.astype(np.int32)

  def __call__(self, idx: np.ndarray) -> dict:
    i = self.pool[idx]
    return {"item": table_lib.take(self.items, i), "item_id": i}


class EpochBatches:
  """Random-access source of index batches: element ``i`` is this process's share of global batch
  ``i`` of an endless sequence of epochs, each a fresh seeded permutation of ``range(size)``.

  Every process computes the same permutation and takes its own contiguous slice
  (``shard_index``-th of ``shard_count``) of each global batch, so the global batch assembled on
  the mesh is the same whatever the number of processes (a 2-host run sees exactly the data of a
  1-host run), while each process gathers only its own rows. Shuffling and batching whole index
  arrays keeps grain's per-step cost to one Python call per batch. The last
  ``size % global_batch`` indices of each epoch's permutation are dropped (static shapes); they
  differ from epoch to epoch.
  """

  def __init__(
    self,
    size: int,
    global_batch: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    max_epochs: int = 10**9,
  ):
    if size < global_batch:
      raise table_lib.DataError(
        f"stream has {size} examples, fewer than its global batch size {global_batch}"
      )
    if global_batch % shard_count:
      raise table_lib.DataError(
        f"global batch {global_batch} is not divisible by {shard_count} processes"
      )
    self.size = size
    self.global_batch = global_batch
    self.batch_size = global_batch // shard_count
    self.offset = shard_index * self.batch_size
    self.seed = seed
    self.batches_per_epoch = size // global_batch
    self.max_epochs = max_epochs
    self._cache: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return self.batches_per_epoch * self.max_epochs

  def _perm(self, epoch: int) -> np.ndarray:
    perm = self._cache.get(epoch)
    if perm is None:
      perm = np.random.default_rng([self.seed, epoch]).permutation(self.size)
      self._cache = {epoch: perm, **{e: p for e, p in self._cache.items() if e >= epoch - 1}}
    return perm

  def __getitem__(self, i: int) -> np.ndarray:
    epoch, b = divmod(int(i), self.batches_per_epoch)
    start = b * self.global_batch + self.offset
    return self._perm(epoch)[start : start + self.batch_size]


def _stream(
  size: int,
  gather,
  *,
  batch_size: int,
  seed: int,
  shard_index: int,
  shard_count: int,
  num_threads: int,
  prefetch: int,
) -> grain.IterDataset:
  source = EpochBatches(size, batch_size * shard_count, seed, shard_index, shard_count)
  ds = grain.MapDataset.source(source).map(gather)
  read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  return ds.to_iter_dataset(read)


def pair_stream(
  dataset: table_lib.Dataset,
  log_q: np.ndarray,
  *,
  batch_size: int,
  seed: int,
  shard_index: int = 0,
  shard_count: int = 1,
  num_threads: int = 2,
  prefetch: int = 4,
) -> grain.IterDataset:
  """The D_train stream of (query, item) pair batches of ``batch_size`` (per process)."""
  return _stream(
    dataset.num_train,
    _GatherPairs(dataset, log_q),
    batch_size=batch_size,
    seed=seed,
    shard_index=shard_index,
    shard_count=shard_count,
    num_threads=num_threads,
    prefetch=prefetch,
  )


# The SSL item pools by ``ssl.item_sampling`` name: the catalogue ('uniform', the paper's D_item)
# or D_train's item column ('train', the ablation that follows the power-law marginal).
ITEM_POOLS = {
  "uniform": lambda dataset: np.arange(dataset.num_items, dtype=np.int32),
  "train": lambda dataset: dataset.train_item.astype(np.int32),
}


def item_pool(dataset: table_lib.Dataset, sampling: str) -> np.ndarray:
  """The SSL item pool named ``sampling`` (``ITEM_POOLS``)."""
  if sampling not in ITEM_POOLS:
    raise ValueError(f"item_sampling={sampling!r}; allowed: {tuple(ITEM_POOLS)}")
  return ITEM_POOLS[sampling](dataset)


def item_stream(
  dataset: table_lib.Dataset,
  *,
  sampling: str,
  batch_size: int,
  seed: int,
  shard_index: int = 0,
  shard_count: int = 1,
  num_threads: int = 2,
  prefetch: int = 4,
) -> grain.IterDataset:
  """The D_item stream of item batches of ``batch_size`` (per process)."""
  pool = item_pool(dataset, sampling)
  return _stream(
    len(pool),
    _GatherItems(dataset, pool),
    batch_size=batch_size,
    seed=seed,
    shard_index=shard_index,
    shard_count=shard_count,
    num_threads=num_threads,
    prefetch=prefetch,
  )
