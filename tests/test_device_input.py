"""Batches to the devices ahead of the step: the packed transfer equals the per-leaf one, the
background thread hands out the streams' batches in order with the consumed positions, and a
checkpoint taken while batches are queued resumes at the consumed batch."""

import json

import jax
import numpy as np
import pytest

from sslrec import configuration, parallel, train
from sslrec.data import device_input
from tests.conftest import tiny_config


def _batch(rng, rows):
  return {
    "ids": rng.integers(0, 1000, (rows,), dtype=np.int32),
    "bag": rng.integers(0, 50, (rows, 3), dtype=np.int32),
    "dense": rng.normal(size=(rows, 2)).astype(np.float32),
    "flag": rng.random(rows) < 0.5,  # 1 byte: not packed, sent on its own
  }


@pytest.mark.parametrize("shape,axes", [((8,), ("data",)), ((4, 2), ("data", "model"))])
def test_packed_transfer_equals_per_leaf_transfer(shape, axes):
  mesh = parallel.make_mesh(shape, axes)
  rng = np.random.default_rng(0)
  batch = (_batch(rng, 16), _batch(rng, 24))
  packer = device_input.Packer(mesh, batch)
  assert packer.words == (16 + 24) * (1 + 3 + 2) // shape[0]  # 4-byte words per data shard
  for _ in range(2):  # the same packer serves every later batch
    batch = (_batch(rng, 16), _batch(rng, 24))
    got, want = packer(batch), parallel.to_global(batch, mesh)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      assert g.dtype == w.dtype and g.shape == w.shape
      assert g.sharding.is_equivalent_to(w.sharding, g.ndim)
      np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  with pytest.raises(ValueError, match="differs from the first batch"):
    packer((_batch(rng, 8), _batch(rng, 24)))


class _Counter:
  """A checkpointable iterator over 0, 1, 2, ... (batches of one int32 row per device)."""

  def __init__(self, stop=None, fail_at=None):
    self.i, self.stop, self.fail_at = 0, stop, fail_at

  def __next__(self):
    if self.i == self.fail_at:
      raise OSError(f"read failed at batch {self.i}")
    if self.i == self.stop:
      raise StopIteration
    self.i += 1
    return {"x": np.full((8,), self.i - 1, np.int32)}

  def get_state(self):
    return {"i": self.i}

  def set_state(self, state):
    self.i = state["i"]


def test_device_input_order_positions_and_rewind():
  mesh = parallel.make_mesh((8,), ("data",))
  pairs, items = _Counter(stop=6), _Counter()
  feed = device_input.DeviceInput(pairs, items, mesh, depth=2)
  p, i = next(feed)
  assert int(p["x"][0]) == 0 and int(i["x"][0]) == 0
  p, i = next(feed)
  assert int(p["x"][0]) == 1
  # the thread has read ahead; the saved positions are those of the consumed batches
  assert feed.pair.snapshot().get_state() == b'{\n    "i": 2\n}'
  assert feed.item.state == {"i": 2}
  feed.close()  # rewinds the iterators to the consumed position
  assert pairs.i == 2 and items.i == 2
  assert [int(p["x"][0]) for p, _ in feed] == [2, 3, 4, 5]  # a new thread, then the end
  with pytest.raises(ValueError, match="integer >= 1"):
    device_input.DeviceInput(pairs, None, mesh, depth=0)


def test_device_input_reraises_read_errors_in_the_training_thread():
  mesh = parallel.make_mesh((8,), ("data",))
  feed = device_input.DeviceInput(_Counter(fail_at=1), None, mesh, depth=3)
  p, items = next(feed)
  assert items is None and int(p["x"][0]) == 0
  with pytest.raises(OSError, match="read failed at batch 1"):
    next(feed)


def test_config_refuses_a_device_prefetch_below_one():
  config = tiny_config()
  config.data.device_prefetch = 0
  with pytest.raises(configuration.ConfigError, match=r"data\.device_prefetch=0.*integer >= 1"):
    configuration.validate(config)


def test_steps_with_prefetch_equal_steps_on_batches_sent_in_the_loop():
  """The prefetched, packed batches give the same training as to_global in the loop, and a
  checkpoint's stream positions are those of the consumed batches."""
  config = tiny_config()
  a = train.Run(config)
  b = train.Run(config)
  for _ in range(3):
    ma = a.step()
    pairs, items = b.next_batches()
    b.state, mb = b.step_fn(b.state, pairs, items, b.step_rng)
    assert float(ma["loss"]) == float(mb["loss"])
  args = a.checkpoint_args(save=True, loop={})
  assert json.loads(args["pair_iter"].item.get_state()) == b.pair_iter.get_state()
  a.close_input()
  assert a.pair_iter.get_state() == b.pair_iter.get_state()
  assert a.item_iter.get_state() == b.item_iter.get_state()
