"""ssl.masking='cfm_ids_random': CFM with per-item id features out of the MI ranking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslrec.data import stats, synthetic
from sslrec.model import augment

_KEYS = jax.random.split(jax.random.PRNGKey(1), 3000)
_many = jax.jit(jax.vmap(augment.cfm_ids_random_mask, in_axes=(0, None)))


@pytest.fixture(scope="module")
def catalogue_mi():
  d = synthetic.generate(
    0, num_items=20_000, num_queries=100, num_train_pairs=100, num_eval_pairs=10
  )
  return d.item_spec.names, stats.mutual_information(d.items, d.item_spec)


def test_item_id_is_the_only_id_like_feature(catalogue_mi):
  names, mi = catalogue_mi
  flags = np.asarray(augment.id_like_features(mi))
  assert [n for n, f in zip(names, flags) if f] == ["item_id"]


def test_near_unique_id_is_flagged():
  # An id shared by a few items (OOV) no longer attains MI = H(f), but still tops every row.
  mi = np.array(
    [[7.0, 5.9, 1.7, 1.4], [5.9, 6.9, 1.2, 0.9], [1.7, 1.2, 2.2, 0.1], [1.4, 0.9, 0.1, 1.5]],
    np.float32,
  )
  assert np.asarray(augment.id_like_features(mi)).tolist() == [True, False, False, False]


def test_block_matrix_without_id_has_no_id_like_feature():
  mi = np.full((6, 6), 0.05, np.float32)
  mi[:3, :3] = mi[3:, 3:] = 0.6
  np.fill_diagonal(mi, 2.0)
  assert not np.asarray(augment.id_like_features(mi)).any()
  # Two features only: each is the other's top partner; nothing is flagged.
  assert not np.asarray(augment.id_like_features(np.array([[1.0, 0.5], [0.5, 1.0]]))).any()


def test_id_goes_to_a_random_side_and_groups_stay_together(catalogue_mi):
  names, mi = catalogue_mi
  masks = np.asarray(_many(_KEYS, jnp.asarray(mi)))
  k = len(names)
  assert (masks.sum(axis=1) == augment.num_masked(k)).all()
  assert 0.45 < masks[:, names.index("item_id")].mean() < 0.55
  plain = np.asarray(jax.vmap(augment.cfm_mask, in_axes=(0, None))(_KEYS, jnp.asarray(mi)))
  assert plain[:, names.index("item_id")].mean() > 0.95  # what the fix is for
  # The seed's whole group is on view 1's masked side (on the default catalogue size; with few
  # items the MI estimator's bias across high-cardinality features can outrank group mates).
  groups = [[names.index(f) for f in g] for g in synthetic.planted_groups()]
  whole = np.stack([masks[:, g].all(axis=1) for g in groups], axis=1)
  assert whole.any(axis=1).all()


def test_without_ids_it_is_cfm():
  mi = np.full((6, 6), 0.05, np.float32)
  mi[:3, :3] = mi[3:, 3:] = 0.6
  np.fill_diagonal(mi, 2.0)
  masks = np.asarray(_many(_KEYS, jnp.asarray(mi)))
  # n = 3: the seed's block, always.
  blocks = masks[:, :3].all(axis=1) ^ masks[:, 3:].all(axis=1)
  assert blocks.all() and (masks.sum(axis=1) == 3).all()


def test_make_mask_dispatch_and_config():
  mi = jnp.eye(4) + 0.1
  m = augment.make_mask(jax.random.PRNGKey(0), "cfm_ids_random", 4, mi=mi)
  assert m.shape == (4,) and int(m.sum()) == 2
  with pytest.raises(ValueError, match="cfm_ids_random"):
    augment.make_mask(jax.random.PRNGKey(0), "cfm_ids_random", 4, mi=None)
  from sslrec import configuration
  from tests.conftest import tiny_config

  c = tiny_config()
  c.ssl.masking = "cfm_ids_random"
  configuration.validate(c)
