"""Input layer: pooling over present values, default embeddings, OOV row, hash buckets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslrec import features as F
from sslrec.model import embeddings


def _layer(*feats):
  spec = F.TowerSpec("t", tuple(feats))
  layer = embeddings.InputLayer(spec)
  batch = {f.name: jnp.zeros((2,) + f.shape, f.dtype) for f in feats}
  params = layer.init(jax.random.key(0), batch)
  return spec, layer, params


def test_multi_valued_pooling_ignores_padding_and_empty_bag_uses_default():
  spec, layer, params = _layer(
    F.FeatureSpec("tags", "multi", vocab_size=10, max_len=4, embed_dim=3)
  )
  t = params["params"]["tags_table"]
  d = params["params"]["tags_default"]
  x = jnp.array([[1, 2, -1, -1], [-1, -1, -1, -1], [5, -1, 5, -1]])
  out = layer.apply(params, {"tags": x})
  np.testing.assert_allclose(out[0], (t[1] + t[2]) / 2, rtol=1e-6)
  np.testing.assert_allclose(out[1], d, rtol=1e-6)
  np.testing.assert_allclose(out[2], t[5], rtol=1e-6)


def test_feature_mask_replaces_with_default():
  spec, layer, params = _layer(
    F.FeatureSpec("a", "id", vocab_size=5, embed_dim=2),
    F.FeatureSpec("b", "id", vocab_size=5, embed_dim=2),
  )
  out = layer.apply(params, {"a": jnp.array([1]), "b": jnp.array([2])}, jnp.array([True, False]))
  np.testing.assert_allclose(out[0, :2], params["params"]["a_default"])
  np.testing.assert_allclose(out[0, 2:], params["params"]["b_table"][2])


def test_out_of_vocabulary_ids_use_the_oov_row_not_a_clamped_row():
  f = F.FeatureSpec("a", "id", vocab_size=5, embed_dim=2)
  spec, layer, params = _layer(f)
  table = params["params"]["a_table"]
  assert table.shape[0] == 6  # + OOV row
  out = layer.apply(params, {"a": jnp.array([4, 5, 1000])})
  np.testing.assert_allclose(out[0], table[4])
  np.testing.assert_allclose(out[1], table[5])
  np.testing.assert_allclose(out[2], table[5])  # never table[4] (clamping) or another id's row
  assert int(embeddings.oov_count(spec, {"a": jnp.array([4, 5, 1000, -1])})) == 2


def test_hash_buckets_with_second_hash():
  f = F.FeatureSpec("h", "id", vocab_size=7, embed_dim=2, hashed=True, second_hash=True)
  spec, layer, params = _layer(f)
  t1, t2 = params["params"]["h_table"], params["params"]["h_hash2_table"]
  assert t1.shape[0] == t2.shape[0] == 7
  x = jnp.array([3, 3 + 7, 2**31 - 1])  # 3 and 10 collide in the first hash only
  out = layer.apply(params, {"h": x})
  np.testing.assert_allclose(out[0], t1[3] + t2[0], rtol=1e-6)
  np.testing.assert_allclose(out[1], t1[3] + t2[1], rtol=1e-6)
  assert not np.allclose(out[0], out[1])
  v = 2**31 - 1
  np.testing.assert_allclose(out[2], t1[v % 7] + t2[(v // 7) % 7], rtol=1e-6)
  assert int(embeddings.oov_count(spec, {"h": x})) == 0
  F.TowerSpec("t", (f,)).validate({"h": np.array([0, 2**31 - 1], np.int32)})


@pytest.mark.parametrize(
  "kw,msg",
  [
    (dict(kind="id", vocab_size=0), "vocab_size=0; must be >= 1"),
    (dict(kind="id", vocab_size=-3), "vocab_size=-3"),
    (dict(kind="id", vocab_size=5, second_hash=True), "second_hash needs hashed=True"),
    (dict(kind="multi", vocab_size=5, max_len=0), "max_len=0"),
  ],
)
def test_bad_sizes_are_refused(kw, msg):
  with pytest.raises(F.SchemaError, match=msg):
    F.FeatureSpec("x", **kw)


def test_table_too_big_for_memory_is_refused_before_allocation():
  import dataclasses

  from sslrec import configuration, parallel, train
  from sslrec.data import synthetic
  from tests.conftest import tiny_config

  d = synthetic.generate(0, num_items=200, num_queries=100, num_train_pairs=500, num_eval_pairs=50)
  huge = dataclasses.replace(d.item_spec["item_id"], vocab_size=2**30, embed_dim=64)
  spec = dataclasses.replace(
    d.item_spec, features=tuple(huge if f.name == "item_id" else f for f in d.item_spec.features)
  )
  d = dataclasses.replace(d, item_spec=spec)
  config = tiny_config()
  config.train.batch_size = config.ssl.batch_size = 64
  with pytest.raises(configuration.ConfigError, match=r"need \d+\.\d+ GiB"):
    train.Run(config, dataset=d)
  del parallel
