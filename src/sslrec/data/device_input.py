"""Batches onto the devices ahead of the step: one packed transfer per step, from a background
thread, ``data.device_prefetch`` steps deep.

``Packer`` lays every 4-byte leaf of a step's batches (the pair batch and the SSL item batch:
ids, features, log-q) side by side in one ``int32`` buffer per data shard, sends it to the
devices in one transfer (``jax.make_array_from_process_local_data``) and splits it back into the
leaves on the devices (a jitted slice / bitcast / reshape, sharded like the batch: no data moves
between devices). The result equals ``parallel.to_global`` of each leaf, value for value and
sharding for sharding. Leaves of other widths (none in the project's batches) travel on their own.

``DeviceInput`` runs the grain iterators and the transfer in a thread, ``depth`` steps ahead of
the training loop, so the step never waits on grain or on the host. It records each stream's
position *after* every batch it hands out: a checkpoint saves the position of the last batch the
loop consumed (not of the batches still in the queue), so a resumed run continues exactly where
the interrupted one stopped. Errors raised while reading (a damaged data file) are re-raised in
the training thread, at the step that would have consumed the batch.
"""

from __future__ import annotations

import json
import queue
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sslrec import parallel

PACKABLE = (np.int32, np.uint32, np.float32)


def _local_data_shards(mesh) -> int:
  """How many distinct slices of the 'data' axis this process's devices hold."""
  n = parallel.data_size(mesh)
  sharding = NamedSharding(mesh, P("data"))
  rows = {idx[0].start for idx in sharding.addressable_devices_indices_map((n,)).values()}
  return len(rows)


class Packer:
  """Sends a batch pytree (per-process numpy arrays, batch-leading) to the mesh in one transfer.

  Built from one example batch: every later batch must have the same structure, shapes and dtypes
  (the grain streams' batches do)."""

  def __init__(self, mesh, example):
    self.mesh = mesh
    leaves, self.treedef = jax.tree.flatten(example)
    self.shards = _local_data_shards(mesh)
    self.global_shards = parallel.data_size(mesh)
    self.data = parallel.data_sharding(mesh)
    self.packed_sharding = NamedSharding(mesh, P("data", None))
    self.layout = []  # per leaf: (packed?, offset, words, dtype, per-process shape)
    offset = 0
    for x in leaves:
      x = np.asarray(x)
      packed = x.dtype in PACKABLE and x.ndim >= 1 and x.shape[0] % self.shards == 0
      words = x.size // self.shards if packed else 0
      self.layout.append((packed, offset, words, x.dtype, x.shape))
      offset += words
    self.words = offset
    self._unpack = jax.jit(
      self._unpack_fn,
      out_shardings=[self.data for packed, *_ in self.layout if packed],
    )

  def _unpack_fn(self, buf):
    out = []
    for packed, offset, words, dtype, shape in self.layout:
      if not packed:
        continue
      part = buf[:, offset : offset + words]
      if dtype != np.int32:
        part = jax.lax.bitcast_convert_type(part, jnp.dtype(dtype))
      global_rows = shape[0] // self.shards * self.global_shards
      out.append(part.reshape((global_rows,) + tuple(shape[1:])))
    return out

  def check(self, leaves) -> None:
    for x, (_, _, _, dtype, shape) in zip(leaves, self.layout, strict=True):
      if x.dtype != dtype or x.shape != shape:
        raise ValueError(
          f"batch leaf {x.dtype}{list(x.shape)} differs from the first batch's "
          f"{np.dtype(dtype)}{list(shape)}"
        )

  def __call__(self, batch):
    leaves = [np.asarray(x) for x in jax.tree.leaves(batch)]
    self.check(leaves)
    unpacked = []
    if self.words:
      buf = np.empty((self.shards, self.words), np.int32)
      for x, (packed, offset, words, _, _) in zip(leaves, self.layout, strict=True):
        if packed:
          buf[:, offset : offset + words] = (
            np.ascontiguousarray(x).reshape(self.shards, -1).view(np.int32)
          )
      device_buf = jax.make_array_from_process_local_data(
        self.packed_sharding, buf, (self.global_shards, self.words)
      )
      unpacked = iter(self._unpack(device_buf))
    out = []
    for x, (packed, *_) in zip(leaves, self.layout, strict=True):
      out.append(next(unpacked) if packed else parallel.to_global(x, self.mesh))
    return jax.tree.unflatten(self.treedef, out)


class Position:
  """A stream's position as of the last batch the training loop consumed. A checkpoint saves its
  ``snapshot()`` through grain's orbax handler (which accepts any object with
  ``get_state() -> bytes``); a restore goes to the iterator itself, after ``DeviceInput.close``."""

  def __init__(self, iterator):
    self.iterator = iterator
    self.state = iterator.get_state()

  def snapshot(self) -> Snapshot:
    """The position now, frozen (an asynchronous save may read it after more steps ran)."""
    return Snapshot(json.dumps(self.state, indent=4).encode())


class Snapshot:
  """A frozen stream position, for grain's orbax save handler."""

  def __init__(self, state: bytes):
    self._state = state

  def get_state(self) -> bytes:
    return self._state


_DONE = object()


class DeviceInput:
  """``next()`` -> ``(pairs, items)`` as global device arrays (``items`` is None without an SSL
  stream), produced ``depth`` steps ahead by a background thread."""

  def __init__(self, pair_iter, item_iter, mesh, depth: int):
    if not (isinstance(depth, int) and depth >= 1):
      raise ValueError(f"device prefetch depth {depth!r}: must be an integer >= 1")
    self.mesh = mesh
    self.depth = depth
    self.pair = Position(pair_iter)
    self.item = Position(item_iter) if item_iter is not None else None
    self._packer = None
    self._thread = None
    self._queue = None
    self._stop = None

  def _read(self):
    pairs = next(self.pair.iterator)
    pair_state = self.pair.iterator.get_state()
    items = item_state = None
    if self.item is not None:
      items = next(self.item.iterator)
      item_state = self.item.iterator.get_state()
    if self._packer is None:
      self._packer = Packer(self.mesh, (pairs, items))
    return self._packer((pairs, items)), pair_state, item_state

  def _work(self, q: queue.Queue, stop: threading.Event):
    while not stop.is_set():
      try:
        entry = self._read()
      except StopIteration:
        entry = _DONE
      except BaseException as e:  # noqa: BLE001 -- handed to the training thread, raised there
        entry = e
      while not stop.is_set():
        try:
          q.put(entry, timeout=0.1)
          break
        except queue.Full:
          continue
      if entry is _DONE or isinstance(entry, BaseException):
        return

  def _start(self):
    self._queue = queue.Queue(maxsize=self.depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(
      target=self._work, args=(self._queue, self._stop), name="sslrec-device-input", daemon=True
    )
    self._thread.start()

  def __iter__(self):
    return self

  def __next__(self):
    if self._thread is None:
      self._start()
    entry = self._queue.get()
    if entry is _DONE:
      self._thread = None
      raise StopIteration
    if isinstance(entry, BaseException):
      self._thread = None
      raise entry
    (pairs, items), pair_state, item_state = entry
    self.pair.state = pair_state
    if self.item is not None:
      self.item.state = item_state
    return pairs, items

  def close(self) -> None:
    """Stops the thread and rewinds the iterators to the consumed position (the batches read
    ahead are dropped; the next ``next()`` starts a new thread from there)."""
    if self._thread is None:
      return
    self._stop.set()
    self._thread.join(timeout=60)
    if self._thread.is_alive():
      raise RuntimeError("the device-input thread did not stop within 60 s (a read that hangs)")
    self._thread = None
    self.pair.iterator.set_state(self.pair.state)
    if self.item is not None:
      self.item.iterator.set_state(self.item.state)
