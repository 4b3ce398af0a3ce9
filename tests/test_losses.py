"""Tests of sslrec.losses against plain-numpy loop implementations of the formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslrec import losses

TOL = 1e-5

# Jitted once per module: one compilation per input signature instead of op-by-op dispatch.
_batch_softmax = jax.jit(losses.batch_softmax_loss)
_ssl = jax.jit(losses.ssl_loss)
_spread_out = jax.jit(losses.spread_out_loss)


def _np_normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def _np_batch_softmax(q, x, temperature, log_q=None, item_ids=None):
  q, x = _np_normalize(q), _np_normalize(x)
  b = q.shape[0]
  total = 0.0
  for i in range(b):
    logits = []
    for j in range(b):
      if item_ids is not None and j != i and item_ids[j] == item_ids[i]:
        continue
      logit = float(q[i] @ x[j]) / temperature
      if log_q is not None:
        logit -= log_q[j]
      logits.append((j, logit))
    m = max(l for _, l in logits)
    log_z = m + math.log(sum(math.exp(l - m) for _, l in logits))
    pos = dict(logits)[i]
    total += log_z - pos
  return total / b


def _np_ssl(z1, z2, temperature):
  return _np_batch_softmax(z1, z2, temperature)


def _np_spread_out(e):
  e = _np_normalize(e)
  n, d = e.shape
  s1 = s2 = 0.0
  for i in range(n):
    for j in range(n):
      if i != j:
        s = float(e[i] @ e[j])
        s1 += s
        s2 += s * s
  m1, m2 = s1 / (n * (n - 1)), s2 / (n * (n - 1))
  return m1**2 + max(0.0, m2 - 1.0 / d)


def _rand(seed, *shape):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_l2_normalize_unit_norm_and_zero_safe():
  x = _rand(0, 5, 7)
  x[2] = 0.0
  y = np.asarray(losses.l2_normalize(jnp.asarray(x)))
  norms = np.linalg.norm(y, axis=-1)
  np.testing.assert_allclose(np.delete(norms, 2), 1.0, atol=1e-6)
  assert np.all(y[2] == 0.0)
  g = jax.grad(lambda v: jnp.sum(losses.l2_normalize(v)))(jnp.zeros((3,)))
  assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("temperature", [0.05, 0.1, 1.0])
def test_batch_softmax_plain_matches_numpy(temperature):
  q, x = _rand(1, 8, 16), _rand(2, 8, 16)
  got = float(_batch_softmax(q, x, temperature=temperature))
  np.testing.assert_allclose(got, _np_batch_softmax(q, x, temperature), rtol=TOL, atol=TOL)


def test_batch_softmax_log_q_and_accidental_hits_match_numpy():
  q, x = _rand(3, 10, 12), _rand(4, 10, 12)
  # Duplicate items: rows 0, 3, 7 are item 5; rows 1 and 9 are item 2.
  ids = np.array([5, 2, 11, 5, 8, 6, 4, 5, 9, 2], np.int32)
  x[3] = x[0]
  x[7] = x[0]
  x[9] = x[1]
  log_q = np.log(np.random.default_rng(5).uniform(0.01, 0.5, size=10)).astype(np.float32)
  for kw in [dict(log_q=log_q), dict(item_ids=ids), dict(log_q=log_q, item_ids=ids)]:
    got = float(_batch_softmax(q, x, temperature=0.1, **kw))
    want = _np_batch_softmax(q, x, 0.1, **kw)
    np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL, err_msg=str(list(kw)))
  # Accidental hits change the loss (they are removed from the softmax).
  plain = float(_batch_softmax(q, x, temperature=0.1))
  dedup = float(_batch_softmax(q, x, temperature=0.1, item_ids=ids))
  assert dedup < plain


def test_batch_softmax_unique_ids_equal_plain():
  q, x = _rand(6, 6, 4), _rand(7, 6, 4)
  ids = np.arange(6, dtype=np.int32)
  a = _batch_softmax(q, x, temperature=0.2, item_ids=ids)
  b = _batch_softmax(q, x, temperature=0.2)
  np.testing.assert_allclose(float(a), float(b), rtol=1e-6)


def test_batch_softmax_temperature_scaling():
  # Scaling the embeddings does nothing (cosine); the temperature divides the cosines.
  q, x = _rand(8, 6, 5), _rand(9, 6, 5)
  a = float(_batch_softmax(q, x, temperature=0.5))
  b = float(_batch_softmax(3.0 * q, 0.2 * x, temperature=0.5))
  np.testing.assert_allclose(a, b, rtol=1e-5)
  # At tau -> inf every row is uniform: loss = log B.
  c = float(_batch_softmax(q, x, temperature=1e6))
  np.testing.assert_allclose(c, math.log(6), rtol=1e-5)
  assert float(_batch_softmax(q, x, temperature=0.1)) != pytest.approx(a)


def test_batch_softmax_grad_finite_with_duplicates_and_zero_vectors():
  q, x = _rand(10, 6, 4), _rand(11, 6, 4)
  x[1] = x[0]
  x[2] = x[0]
  q[4] = 0.0
  x[5] = 0.0
  ids = jnp.array([3, 3, 3, 1, 2, 0], jnp.int32)
  log_q = jnp.log(jnp.full((6,), 0.1))

  def f(q, x):
    return losses.batch_softmax_loss(q, x, temperature=0.05, log_q=log_q, item_ids=ids)

  val, (gq, gx) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(jnp.asarray(q), jnp.asarray(x))
  assert np.isfinite(float(val))
  assert np.all(np.isfinite(np.asarray(gq))) and np.all(np.isfinite(np.asarray(gx)))


def test_batch_softmax_bf16_and_jit():
  q, x = _rand(12, 8, 8), _rand(13, 8, 8)
  f = jax.jit(lambda q, x: losses.batch_softmax_loss(q, x, temperature=0.1))
  out = f(jnp.asarray(q, jnp.bfloat16), jnp.asarray(x, jnp.bfloat16))
  assert out.dtype == jnp.float32 and out.shape == ()
  want = _np_batch_softmax(
    np.asarray(jnp.asarray(q, jnp.bfloat16), np.float32),
    np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32),
    0.1,
  )
  np.testing.assert_allclose(float(out), want, rtol=1e-4)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_ssl_loss_matches_numpy(temperature):
  z1, z2 = _rand(14, 9, 6), _rand(15, 9, 6)
  got = float(_ssl(z1, z2, temperature=temperature))
  np.testing.assert_allclose(got, _np_ssl(z1, z2, temperature), rtol=TOL, atol=TOL)


def test_ssl_loss_identical_separated_views_near_zero():
  z = np.eye(6, dtype=np.float32) * 2.5  # orthogonal: off-diagonal cosines are 0
  assert float(_ssl(z, z, temperature=0.01)) < 1e-6
  # Mismatched views are penalised heavily.
  assert float(_ssl(z, z[::-1], temperature=0.01)) > 10.0


def test_spread_out_matches_numpy():
  for seed, (n, d) in enumerate([(7, 5), (12, 3), (2, 16)]):
    e = _rand(20 + seed, n, d)
    e[0] += 2.0  # make it non-trivial (M1 != 0)
    got = float(_spread_out(e))
    np.testing.assert_allclose(got, _np_spread_out(e), rtol=TOL, atol=TOL)


def test_spread_out_orthogonal_lower_than_clustered():
  ortho = np.eye(8, dtype=np.float32)
  clustered = np.ones((8, 8), np.float32) + 0.05 * _rand(30, 8, 8)
  lo = float(_spread_out(ortho))
  hi = float(_spread_out(clustered))
  assert lo == pytest.approx(0.0, abs=1e-7)
  assert hi > 0.5
  g = jax.jit(jax.grad(losses.spread_out_loss))(jnp.asarray(clustered))
  assert np.all(np.isfinite(np.asarray(g)))


def test_spread_out_needs_two_rows():
  with pytest.raises(ValueError):
    losses.spread_out_loss(jnp.ones((1, 4)))
