"""grain streams: shuffling per epoch, static shapes, determinism, sharding, checkpointed
position."""

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sslrec.data import pipeline, stats, synthetic, table


@pytest.fixture(scope="module")
def data():
  d = synthetic.generate(
    0, num_items=500, num_queries=400, num_train_pairs=3000, num_eval_pairs=200, embed_dim=8
  )
  return d, stats.corpus_stats(d)


def test_epoch_batches_are_permutations_reshuffled_each_epoch():
  src = pipeline.EpochBatches(100, 10, seed=3)
  e0 = np.concatenate([src[i] for i in range(10)])
  e1 = np.concatenate([src[i] for i in range(10, 20)])
  assert sorted(e0) == list(range(100)) and sorted(e1) == list(range(100))
  assert not np.array_equal(e0, e1)
  assert np.array_equal(src[5], pipeline.EpochBatches(100, 10, seed=3)[5])
  assert not np.array_equal(src[5], pipeline.EpochBatches(100, 10, seed=4)[5])


def test_process_shares_assemble_the_single_process_batches():
  single = pipeline.EpochBatches(96, 12, seed=1)
  shards = [pipeline.EpochBatches(96, 12, seed=1, shard_index=i, shard_count=3) for i in range(3)]
  for b in range(single.batches_per_epoch * 2):
    parts = [s[b] for s in shards]
    assert all(len(p) == 4 for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), single[b])


def test_batch_larger_than_stream_is_a_clear_error():
  with pytest.raises(table.DataError, match="fewer than its global batch size 128"):
    pipeline.EpochBatches(100, 128, seed=0, shard_index=0, shard_count=2)


def test_pair_batches_static_shapes_and_log_q(data):
  d, st = data
  it = iter(pipeline.pair_stream(d, st.log_q, batch_size=32, seed=0, num_threads=1))
  b = next(it)
  assert b["item_id"].shape == (32,) and b["log_q"].dtype == np.float32
  for f in d.item_spec.features:
    assert b["item"][f.name].shape == (32,) + f.shape
  for f in d.query_spec.features:
    assert b["query"][f.name].shape == (32,) + f.shape
  np.testing.assert_array_equal(b["item"]["item_id"], b["item_id"])
  np.testing.assert_allclose(b["log_q"], st.log_q[b["item_id"]])


def test_item_stream_uniform_vs_train_marginal(data):
  d, st = data

  def counts(sampling):
    it = iter(pipeline.item_stream(d, sampling=sampling, batch_size=100, seed=0, num_threads=0))
    ids = np.concatenate([next(it)["item_id"] for _ in range(60)])  # 6000 draws
    return np.bincount(ids, minlength=d.num_items)

  uniform, train = counts("uniform"), counts("train")
  assert uniform.min() >= 10 and uniform.max() <= 13  # 12 epochs over 500 items (drop remainder)
  head = st.head  # top 20% items by D_train frequency
  assert train[head].sum() / train.sum() > 0.6 > uniform[head].sum() / uniform.sum()


def test_iterator_position_round_trips_through_orbax(data, tmp_path):
  d, st = data
  make = lambda: iter(pipeline.pair_stream(d, st.log_q, batch_size=16, seed=5, num_threads=2))
  it = make()
  for _ in range(7):
    next(it)
  mngr = ocp.CheckpointManager(tmp_path / "ckpt")
  mngr.save(7, args=ocp.args.Composite(it=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  expected = [next(it)["item_id"] for _ in range(3)]
  fresh = make()
  mngr.restore(7, args=ocp.args.Composite(it=grain.checkpoint.CheckpointRestore(fresh)))
  got = [next(fresh)["item_id"] for _ in range(3)]
  for a, b in zip(expected, got):
    np.testing.assert_array_equal(a, b)
  mngr.close()
