"""Sparse row-wise embedding updates against a dense reference."""

import jax
import jax.numpy as jnp
import numpy as np

from sslrec import sparse


def _loss(table, ids, target):
  valid = (ids >= 0)[..., None]
  rows = jnp.take(table, jnp.where(ids >= 0, ids, 0), axis=0) * valid
  return jnp.sum((rows.sum(axis=1) - target) ** 2)


def test_dedupe_positions_and_fill():
  a = jnp.array([[3, 3, -1], [7, 0, -1]])
  b = jnp.array([7, 9])
  uniq, (la, lb) = sparse.dedupe([a, b], num_rows=10)
  assert uniq.shape == (8,)
  np.testing.assert_array_equal(uniq[:4], [0, 3, 7, 9])
  assert (uniq[4:] == 10).all()
  np.testing.assert_array_equal(uniq[jnp.where(la >= 0, la, 0)][a >= 0], a[a >= 0])
  assert (la[a < 0] == -1).all()
  np.testing.assert_array_equal(uniq[lb], b)


def test_rowwise_adagrad_matches_dense_reference_and_leaves_other_rows_untouched():
  rng = np.random.default_rng(0)
  table = jnp.asarray(rng.normal(size=(1000, 8)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, 50, size=(64, 4)) * 7, jnp.int32)  # many duplicates
  ids = ids.at[:, 3].set(-1)
  target = jnp.asarray(rng.normal(size=(64, 8)), jnp.float32)
  opt = sparse.RowwiseAdagrad(learning_rate=0.3)
  state = opt.init(table)

  # Sparse: gather, differentiate w.r.t. the gathered rows, update, scatter.
  uniq, (local,) = sparse.dedupe([ids], table.shape[0])
  rows = sparse.gather_rows(table, uniq)
  g_rows = jax.grad(_loss)(rows, local, target)
  new_table, new_state = jax.jit(opt.update)(table, state, uniq, g_rows, jnp.int32(0))

  # Dense reference on the full table.
  g_full = jax.grad(_loss)(table, ids, target)
  ref_table, ref_acc = sparse.dense_rowwise_adagrad_reference(table, state["acc"], g_full, 0.3)

  touched = np.unique(np.asarray(ids)[np.asarray(ids) >= 0])
  untouched = np.setdiff1d(np.arange(1000), touched)
  np.testing.assert_allclose(new_table[touched], ref_table[touched], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new_state["acc"][touched], ref_acc[touched], rtol=1e-5)
  assert not np.allclose(new_table[touched], table[touched])
  # Untouched rows and accumulators are bit-identical to before the step.
  np.testing.assert_array_equal(np.asarray(new_table)[untouched], np.asarray(table)[untouched])
  np.testing.assert_array_equal(np.asarray(new_state["acc"])[untouched],
                                np.asarray(state["acc"])[untouched])


def test_lazy_adam_updates_only_touched_rows_like_adam_on_them():
  rng = np.random.default_rng(1)
  table = jnp.asarray(rng.normal(size=(200, 4)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, 200, size=(16, 2)), jnp.int32)
  target = jnp.zeros((16, 4))
  opt = sparse.LazyAdam(learning_rate=0.01)
  state = opt.init(table)
  uniq, (local,) = sparse.dedupe([ids], 200)
  g_rows = jax.grad(_loss)(sparse.gather_rows(table, uniq), local, target)
  new_table, _ = opt.update(table, state, uniq, g_rows, jnp.int32(0))
  # First Adam step moves each touched element by lr * sign(g) (bias-corrected).
  g_full = np.asarray(jax.grad(_loss)(table, ids, target))
  touched = np.unique(np.asarray(ids))
  np.testing.assert_allclose(np.asarray(new_table - table)[touched],
                             -0.01 * np.sign(g_full[touched]), atol=1e-5)
  untouched = np.setdiff1d(np.arange(200), touched)
  np.testing.assert_array_equal(np.asarray(new_table)[untouched], np.asarray(table)[untouched])
