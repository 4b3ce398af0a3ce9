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

Each process reads only its own share (``shard_index::shard_count``) of both streams, so a
multi-host run reads disjoint data without coordination. Iterators are grain
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
  """Random-access source of index batches: element ``i`` is batch ``i`` of an endless sequence
  of epochs, each a fresh seeded permutation of this process's share of ``range(size)``.

  Shuffling and batching whole index arrays (one numpy permutation per epoch, one slice per
  batch) instead of element by element keeps grain's per-step cost to one Python call per batch.
  The last ``share % batch_size`` indices of each epoch's permutation are dropped (static shapes);
  they differ from epoch to epoch.
  """

  def __init__(self, size: int, batch_size: int, seed: int, shard_index: int = 0,
               shard_count: int = 1, max_epochs: int = 10**9):
    self.share = np.arange(shard_index, size, shard_count, dtype=np.int64)
    if len(self.share) < batch_size:
      raise table_lib.DataError(
          f"stream has {len(self.share)} examples for this process, fewer than its batch size "
          f"{batch_size}")
    self.batch_size = batch_size
    self.seed = seed
    self.batches_per_epoch = len(self.share) // batch_size
    self.max_epochs = max_epochs
    self._cache: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return self.batches_per_epoch * self.max_epochs

  def _perm(self, epoch: int) -> np.ndarray:
    perm = self._cache.get(epoch)
    if perm is None:
      perm = np.random.default_rng([self.seed, epoch]).permutation(self.share)
      self._cache = {epoch: perm, **{e: p for e, p in self._cache.items() if e >= epoch - 1}}
    return perm

  def __getitem__(self, i: int) -> np.ndarray:
    epoch, b = divmod(int(i), self.batches_per_epoch)
    return self._perm(epoch)[b * self.batch_size:(b + 1) * self.batch_size]


def _stream(size: int, gather, *, batch_size: int, seed: int, shard_index: int, shard_count: int,
            num_threads: int, prefetch: int) -> grain.IterDataset:
  source = EpochBatches(size, batch_size, seed, shard_index, shard_count)
  ds = grain.MapDataset.source(source).map(gather)
  read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  return ds.to_iter_dataset(read)


def pair_stream(dataset: table_lib.Dataset, log_q: np.ndarray, *, batch_size: int, seed: int,
                shard_index: int = 0, shard_count: int = 1, num_threads: int = 2,
                prefetch: int = 4) -> grain.IterDataset:
  """The D_train stream of (query, item) pair batches of ``batch_size`` (per process)."""
  return _stream(dataset.num_train, _GatherPairs(dataset, log_q), batch_size=batch_size,
                 seed=seed, shard_index=shard_index, shard_count=shard_count,
                 num_threads=num_threads, prefetch=prefetch)


def item_pool(dataset: table_lib.Dataset, sampling: str) -> np.ndarray:
  """The SSL item pool: the catalogue ('uniform') or D_train's item column ('train')."""
  if sampling == "uniform":
    return np.arange(dataset.num_items, dtype=np.int32)
  if sampling == "train":
    return dataset.train_item.astype(np.int32)
  raise ValueError(f"item_sampling={sampling!r}; allowed: 'uniform', 'train'")


def item_stream(dataset: table_lib.Dataset, *, sampling: str, batch_size: int, seed: int,
                shard_index: int = 0, shard_count: int = 1, num_threads: int = 2,
                prefetch: int = 4) -> grain.IterDataset:
  """The D_item stream of item batches of ``batch_size`` (per process)."""
  pool = item_pool(dataset, sampling)
  return _stream(len(pool), _GatherItems(dataset, pool), batch_size=batch_size, seed=seed,
                 shard_index=shard_index, shard_count=shard_count, num_threads=num_threads,
                 prefetch=prefetch)
