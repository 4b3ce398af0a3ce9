"""Tests of sslrec.model.augment: feature masks (RFM, CFM), multi-value dropout, two views."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslrec import features as features_lib
from sslrec.model import augment

NUM_DRAWS = 4000


# Shared jitted samplers over a fixed batch of keys: one compilation per (k,) signature.
_KEYS = jax.random.split(jax.random.PRNGKey(0), NUM_DRAWS)
_many_rfm = jax.jit(jax.vmap(augment.rfm_mask, in_axes=(0, None)), static_argnums=1)
_many_cfm = jax.jit(jax.vmap(augment.cfm_mask, in_axes=(0, None)))


def _block_mi(diag: float) -> np.ndarray:
  """k=8 in two blocks {0..3}, {4..7}: high MI within a block, low across."""
  rng = np.random.default_rng(0)
  mi = rng.uniform(0.01, 0.1, size=(8, 8))
  for blk in (slice(0, 4), slice(4, 8)):
    mi[blk, blk] = rng.uniform(0.5, 0.9, size=(4, 4))
  mi = (mi + mi.T) / 2
  np.fill_diagonal(mi, diag)
  return mi.astype(np.float32)


# ----------------------------------------------------------------------------- num_masked


def test_num_masked():
  assert augment.num_masked(2) == 1
  assert augment.num_masked(7) == 4
  assert augment.num_masked(8) == 4
  assert augment.num_masked(10, 0.3) == 3  # no float round-up (10 * 0.3 = 3.0000000000000004)
  assert augment.num_masked(4, 0.01) == 1  # clipped to >= 1
  assert augment.num_masked(4, 0.99) == 3  # clipped to <= k - 1
  for bad_k in (0, 1):
    with pytest.raises(ValueError):
      augment.num_masked(bad_k)
  with pytest.raises(ValueError):
    augment.num_masked(4, 1.5)


# ----------------------------------------------------------------------------- RFM


@pytest.mark.parametrize("k", [2, 7, 8])
def test_rfm_sizes_variation_and_uniformity(k):
  n = augment.num_masked(k)
  masks = np.asarray(_many_rfm(_KEYS, k))
  assert masks.shape == (NUM_DRAWS, k) and masks.dtype == bool
  assert np.all(masks.sum(axis=1) == n)
  assert np.all((~masks).sum(axis=1) == k - n)
  assert len({m.tobytes() for m in masks}) > 1
  freq = masks.mean(axis=0)
  np.testing.assert_allclose(freq, n / k, atol=0.04)


def test_rfm_deterministic_given_rng():
  a = np.asarray(_many_rfm(_KEYS, 8))
  b = np.asarray(_many_rfm(_KEYS, 8))
  np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- CFM


@pytest.mark.parametrize("diag", [0.0, 5.0])
def test_cfm_block_structure_masks_seed_block(diag):
  mi = jnp.asarray(_block_mi(diag))
  masks = np.asarray(_many_cfm(_KEYS, mi))
  block_a = np.array([True] * 4 + [False] * 4)
  is_a = np.all(masks == block_a, axis=1)
  is_b = np.all(masks == ~block_a, axis=1)
  assert np.all(is_a | is_b)
  assert 0.45 < is_a.mean() < 0.55  # seed uniform over the features


def test_cfm_seed_counts_among_masked():
  # Feature 0's row: features 1, 2 highest; the others lower; odd k=5 -> n=3.
  mi = np.full((5, 5), 0.1, np.float32)
  mi[0, 1] = mi[1, 0] = 0.9
  mi[0, 2] = mi[2, 0] = 0.8
  mi[1, 2] = mi[2, 1] = 0.7
  masks = np.asarray(_many_cfm(_KEYS, jnp.asarray(mi)))
  assert np.all(masks.sum(axis=1) == 3)
  # Whichever of 0, 1, 2 is the seed, the two others are its top-2: mask {0, 1, 2}.
  want = np.array([True, True, True, False, False])
  assert np.mean(np.all(masks == want, axis=1)) == pytest.approx(0.6, abs=0.04)  # 3 of 5 seeds


@pytest.mark.parametrize("k", [2, 7, 8])
def test_cfm_sizes_and_equal_mi_ties_uniform(k):
  mi = jnp.full((k, k), 0.3, jnp.float32)
  n = augment.num_masked(k)
  masks = np.asarray(_many_cfm(_KEYS, mi))
  assert np.all(masks.sum(axis=1) == n)
  assert len({m.tobytes() for m in masks}) > 1
  np.testing.assert_allclose(masks.mean(axis=0), n / k, atol=0.04)


def test_cfm_matches_numpy_reference_on_random_mi():
  # Distinct MI values (no ties): the mask is determined by the seed alone.
  k = 9
  rng = np.random.default_rng(1)
  a = rng.uniform(size=(k, k))
  mi = ((a + a.T) / 2).astype(np.float32)
  n = augment.num_masked(k)
  expected = set()
  for seed in range(k):
    row = mi[seed].copy()
    row[seed] = -np.inf
    top = np.argsort(-row)[: n - 1]
    m = np.zeros(k, bool)
    m[seed] = True
    m[top] = True
    expected.add(m.tobytes())
  masks = np.asarray(_many_cfm(_KEYS, mi))
  got = {m.tobytes() for m in masks}
  assert got == expected  # every seed drawn, and nothing else produced
  assert np.all(masks.any(axis=0))  # every feature gets masked sometimes


def test_cfm_rejects_non_square():
  with pytest.raises(ValueError):
    augment.cfm_mask(jax.random.PRNGKey(0), jnp.zeros((3, 4)))


# ----------------------------------------------------------------------------- dropout


def _multi_ids(seed=0, b=200, l=10, vocab=50):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab, size=(b, l)).astype(np.int32)
  lengths = rng.integers(0, l + 1, size=b)
  ids[np.arange(l)[None, :] >= lengths[:, None]] = features_lib.PAD
  return jnp.asarray(ids)


def test_dropout_rate_zero_is_identity():
  ids = _multi_ids()
  out = augment.multi_value_dropout(jax.random.PRNGKey(0), ids, 0.0)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ids))


@pytest.mark.parametrize("rate", [0.2, 0.5])
def test_dropout_rate_and_padding(rate):
  ids = _multi_ids()
  f = jax.jit(functools.partial(augment.multi_value_dropout, rate=rate))
  out = np.asarray(f(jax.random.PRNGKey(1), ids))
  ids = np.asarray(ids)
  assert out.dtype == np.int32 and out.shape == ids.shape
  pad = ids < 0
  assert np.all(out[pad] == -1)
  kept = out[~pad] >= 0
  np.testing.assert_array_equal(out[~pad][kept], ids[~pad][kept])  # unchanged or -1
  np.testing.assert_allclose(1.0 - kept.mean(), rate, atol=0.04)


def test_dropout_rejects_bad_rate():
  with pytest.raises(ValueError):
    augment.multi_value_dropout(jax.random.PRNGKey(0), _multi_ids(), 1.5)


# ----------------------------------------------------------------------------- two_views


def _spec():
  return features_lib.TowerSpec(
    "item",
    (
      features_lib.FeatureSpec("item_id", "id", vocab_size=100),
      features_lib.FeatureSpec("genres", "multi", vocab_size=50, max_len=10),
      features_lib.FeatureSpec("tags", "multi", vocab_size=50, max_len=10),
      features_lib.FeatureSpec("stats", "dense", dense_dim=3),
    ),
  )


def _batch():
  ids = _multi_ids(seed=2)
  return {
    "item_id": jnp.arange(200, dtype=jnp.int32) % 100,
    "genres": ids,
    "tags": ids,  # identical inputs: the per-feature dropout must still differ
    "stats": jnp.asarray(np.random.default_rng(3).normal(size=(200, 3)), jnp.float32),
  }


def test_two_views_dropout_differs_per_view_and_feature():
  spec, batch = _spec(), _batch()
  mask = jnp.array([True, False, True, False])
  f = jax.jit(lambda r, b, m: augment.two_views(r, b, spec, m, 0.3))
  b1, m1, b2, m2 = f(jax.random.PRNGKey(0), batch, mask)
  np.testing.assert_array_equal(np.asarray(m1), np.asarray(mask))
  np.testing.assert_array_equal(np.asarray(m2), ~np.asarray(mask))
  for name in ("item_id", "stats"):
    np.testing.assert_array_equal(np.asarray(b1[name]), np.asarray(batch[name]))
    np.testing.assert_array_equal(np.asarray(b2[name]), np.asarray(batch[name]))
  for name in ("genres", "tags"):
    assert not np.array_equal(np.asarray(b1[name]), np.asarray(b2[name]))
    assert not np.array_equal(np.asarray(b1[name]), np.asarray(batch[name]))
  assert not np.array_equal(np.asarray(b1["genres"]), np.asarray(b1["tags"]))
  present = np.asarray(batch["genres"]) >= 0
  for b in (b1, b2):
    dropped = (np.asarray(b["genres"]) < 0) & present
    np.testing.assert_allclose(dropped.sum() / present.sum(), 0.3, atol=0.06)


def test_two_views_rate_zero_and_bad_mask():
  spec, batch = _spec(), _batch()
  mask = jnp.zeros((4,), bool)
  b1, _, b2, m2 = augment.two_views(jax.random.PRNGKey(0), batch, spec, mask, 0.0)
  for name in spec.names:
    np.testing.assert_array_equal(np.asarray(b1[name]), np.asarray(b2[name]))
  assert np.all(np.asarray(m2))
  with pytest.raises(ValueError):
    augment.two_views(jax.random.PRNGKey(0), batch, spec, jnp.zeros((3,), bool), 0.1)


# ----------------------------------------------------------------------------- make_mask


def test_make_mask_dispatch():
  rng = _KEYS[0]
  mi = jnp.asarray(_block_mi(1.0))
  f = jax.jit(augment.make_mask, static_argnums=(1, 2))
  np.testing.assert_array_equal(
    np.asarray(f(rng, "cfm", 8, mi)), np.asarray(_many_cfm(_KEYS, mi))[0]
  )
  np.testing.assert_array_equal(np.asarray(f(rng, "rfm", 8)), np.asarray(_many_rfm(_KEYS, 8))[0])
  none = np.asarray(f(rng, "none", 8))
  assert none.shape == (8,) and none.dtype == bool and not none.any()


def test_make_mask_errors():
  rng = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="mi"):
    augment.make_mask(rng, "cfm", 8)
  with pytest.raises(ValueError):
    augment.make_mask(rng, "cfm", 8, mi=jnp.zeros((7, 7)))
  with pytest.raises(ValueError, match="cfm.*rfm.*none"):
    augment.make_mask(rng, "random", 8)
