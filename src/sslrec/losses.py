"""Losses of the multi-task objective (pure ``jax.numpy``, jit-safe).

Relation to the paper (Yao et al., "Self-supervised Learning for Large-scale Item
Recommendations", CIKM 2021), with ``s`` the cosine similarity and ``tau`` a temperature:

* ``batch_softmax_loss`` is the main retrieval loss over in-batch negatives,

      L_main = -1/B * sum_i log( exp(s(q_i, x_i)/tau) / sum_j exp(s(q_i, x_j)/tau) ),

  optionally with the sampling-bias (logQ) correction of Yi et al. 2019 (every logit of
  column ``j`` gets ``- log Q_j``, the log of item ``j``'s in-batch sampling probability) and
  with accidental hits (another row of the batch holding the same item as the positive)
  removed from the row's softmax.
* ``ssl_loss`` is the contrastive self-supervised loss on two views of the same items,

      L_self = -1/N * sum_i log( exp(s(z_i, z'_i)/tau) / sum_j exp(s(z_i, z'_j)/tau) ).

* ``spread_out_loss`` is the spread-out (global orthogonal) regulariser of Zhang et al. 2017,
  the paper's baseline that corresponds to the special case h = g, H = G of L_self with a
  squared loss on pairwise similarities instead of a softmax.

All losses compute in float32 whatever the input dtype and return a scalar.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Logit given to accidental hits: large and negative, but finite so nothing turns into NaN.
_MASKED_LOGIT = -1e9


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-6) -> jax.Array:
  """Scales ``x`` to unit L2 norm along ``axis``; safe (finite value and gradient) at zero.

  Computes ``x / max(||x||, eps)``, so a zero vector stays zero.

  Args:
    x: array of any shape, e.g. ``[N, D]``.
    axis: the axis to normalise over.
    eps: lower bound of the norm that ``x`` is divided by.

  Returns:
    Array of ``x``'s shape and dtype.
  """
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, jnp.asarray(eps, sq.dtype) ** 2))


def _cosine_logits(a: jax.Array, b: jax.Array, temperature) -> jax.Array:
  """``[N, D] x [M, D] -> [N, M]`` float32 cosine similarities divided by ``temperature``."""
  a = l2_normalize(jnp.asarray(a, jnp.float32))
  b = l2_normalize(jnp.asarray(b, jnp.float32))
  sim = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
  return sim / jnp.asarray(temperature, jnp.float32)


def _diagonal_cross_entropy(logits: jax.Array) -> jax.Array:
  """Mean over rows of the softmax cross-entropy whose target of row ``i`` is column ``i``.

  Args:
    logits: ``[N, N]`` float32.

  Returns:
    Scalar float32.
  """
  log_z = jax.nn.logsumexp(logits, axis=1)  # [N]
  return jnp.mean(log_z - jnp.diagonal(logits))


LOGQ_MODES = ("standard", "corrected")  # loss.logq_mode


def batch_softmax_loss(
  query_emb: jax.Array,
  item_emb: jax.Array,
  *,
  temperature,
  log_q: jax.Array | None = None,
  item_ids: jax.Array | None = None,
  extra_emb: jax.Array | None = None,
  extra_log_q: jax.Array | None = None,
  extra_ids: jax.Array | None = None,
  logq_mode: str = "standard",
) -> jax.Array:
  """Batch softmax (in-batch negatives) retrieval loss, L_main of the paper.

  ``logits[i, j] = cos(q_i, x_j) / temperature - log_q[j]``; row ``i``'s positive is column
  ``i``. With ``item_ids``, every column ``j != i`` with ``item_ids[j] == item_ids[i]`` is left
  out of row ``i``'s softmax (accidental hit: the positive itself appearing as a negative).

  Mixed negatives (Yang et al. 2020): ``extra_emb [M, D]`` are more candidate columns (items of
  another stream, e.g. the uniform D_item batch), with their own ``extra_log_q`` and
  ``extra_ids`` (accidental hits are removed across both sets of columns).

  ``logq_mode``: 'standard' subtracts ``log_q`` from every logit, the positive's included (Yi et
  al. 2019). 'corrected' (Khrylchenko et al., RecSys 2025, "Correcting the LogQ Correction"):
  the positive is always in the softmax, not sampled, so only the negatives are corrected, the
  positive leaves the denominator, and the row is weighted by ``w_i = stop_gradient(1 - P_i)``,
  ``P_i = exp(s_p) / (exp(s_p) + mean_j exp(s_j - log_q_j))`` over row ``i``'s negatives:
  ``loss_i = w_i * (-s_p + log sum_j exp(s_j - log_q_j))`` (as the authors' code computes it).

  Args:
    query_emb: ``[B, D]`` query tower outputs (any float dtype; normalised here).
    item_emb: ``[B, D]`` item tower outputs of the paired items.
    temperature: positive scalar tau (Python float or array).
    log_q: optional ``[B]`` log of each item column's sampling probability (logQ correction).
    item_ids: optional ``[B]`` integer item identities for removing accidental hits. Equal
      ids are taken literally (two rows with id ``-1`` count as the same item), so pass
      unique ids for rows whose identity is unknown.
    extra_emb / extra_log_q / extra_ids: optional ``[M, D]`` / ``[M]`` / ``[M]`` extra negative
      columns (``extra_log_q`` is required with ``log_q``, ``extra_ids`` with ``item_ids``).
    logq_mode: one of ``LOGQ_MODES``.

  Returns:
    Scalar float32: mean over rows of the (weighted) cross-entropy.
  """
  if logq_mode not in LOGQ_MODES:
    raise ValueError(f"logq_mode={logq_mode!r}; allowed: {LOGQ_MODES}")
  logits = _cosine_logits(query_emb, item_emb, temperature)  # [B, B]
  b = logits.shape[0]
  ids, lq = item_ids, log_q
  if extra_emb is not None:
    logits = jnp.concatenate([logits, _cosine_logits(query_emb, extra_emb, temperature)], axis=1)
    if log_q is not None:
      lq = jnp.concatenate([jnp.asarray(log_q, jnp.float32), jnp.asarray(extra_log_q, jnp.float32)])
    if item_ids is not None:
      ids = jnp.concatenate([jnp.asarray(item_ids), jnp.asarray(extra_ids)])
  positive = jnp.eye(b, logits.shape[1], dtype=bool)  # [B, B (+ M)]
  hit = jnp.zeros_like(positive)
  if ids is not None:
    ids = jnp.asarray(ids)
    hit = (jnp.asarray(item_ids)[:, None] == ids[None, :]) & ~positive
  corrected = logits if lq is None else logits - jnp.asarray(lq, jnp.float32)[None, :]
  if logq_mode == "standard":
    z = jnp.where(hit, jnp.float32(_MASKED_LOGIT), corrected)
    return jnp.mean(jax.nn.logsumexp(z, axis=1) - jnp.sum(jnp.where(positive, z, 0.0), axis=1))
  s_p = jnp.diagonal(logits[:, :b])  # [B] the positive, not corrected
  negative = ~positive & ~hit
  z = jnp.where(negative, corrected, -jnp.inf)
  log_sum = jax.nn.logsumexp(z, axis=1)  # [B]
  num_neg = jnp.maximum(negative.sum(axis=1), 1).astype(jnp.float32)
  log_mean = log_sum - jnp.log(num_neg)
  p_hat = jax.nn.sigmoid(s_p - log_mean)  # exp(s_p) / (exp(s_p) + mean_j exp(z_j))
  w = jax.lax.stop_gradient(1.0 - p_hat)
  loss = jnp.where(negative.any(axis=1), w * (log_sum - s_p), 0.0)
  return jnp.mean(loss)


def _remove_same_items(logits: jax.Array, item_ids: jax.Array | None) -> jax.Array:
  """Leaves every column ``j != i`` with ``item_ids[j] == item_ids[i]`` out of row ``i``."""
  if item_ids is None:
    return logits
  item_ids = jnp.asarray(item_ids)
  same = item_ids[:, None] == item_ids[None, :]  # [B, B]
  hit = same & ~jnp.eye(logits.shape[0], dtype=bool)
  return jnp.where(hit, jnp.float32(_MASKED_LOGIT), logits)


def ssl_loss(
  z1: jax.Array, z2: jax.Array, *, temperature, item_ids: jax.Array | None = None
) -> jax.Array:
  """Contrastive SSL loss L_self between two views of the same ``N`` items.

  ``logits[i, j] = cos(z1_i, z2_j) / temperature``;
  ``loss = -1/N * sum_i log_softmax_j(logits[i])[i]``.

  With ``item_ids``, another row of the *same* item is not a negative: columns ``j != i`` with
  ``item_ids[j] == item_ids[i]`` leave row ``i``'s softmax (with ``ssl.item_sampling='train'``
  a batch drawn from the power-law marginal holds the same head item many times).

  Args:
    z1: ``[N, D]`` embeddings of view 1 (any float dtype).
    z2: ``[N, D]`` embeddings of view 2, row ``i`` the same item as ``z1``'s row ``i``.
    temperature: positive scalar tau.
    item_ids: optional ``[N]`` item identities of the rows.

  Returns:
    Scalar float32.
  """
  return _diagonal_cross_entropy(_remove_same_items(_cosine_logits(z1, z2, temperature), item_ids))


def spread_out_loss(emb: jax.Array) -> jax.Array:
  """Spread-out (global orthogonal) regulariser of Zhang et al. 2017.

  On L2-normalised embeddings ``e_i`` (``[N, D]``), with ``s_ij = <e_i, e_j>`` over the
  ``N (N - 1)`` ordered pairs ``i != j``:

      M1 = mean_{i != j} s_ij,    M2 = mean_{i != j} s_ij^2,
      loss = M1^2 + max(0, M2 - 1/D).

  For points spread uniformly on the unit sphere, ``E[s] = 0`` and ``E[s^2] = 1/D``, so the
  loss is zero there and grows as embeddings cluster.

  Args:
    emb: ``[N, D]`` embeddings, ``N >= 2`` (any float dtype; normalised here).

  Returns:
    Scalar float32.
  """
  n, d = emb.shape
  if n < 2:
    raise ValueError(f"spread_out_loss needs at least 2 embeddings, got shape {emb.shape}")
  e = l2_normalize(jnp.asarray(emb, jnp.float32))
  sim = jnp.matmul(e, e.T, precision=jax.lax.Precision.HIGHEST)  # [N, N]
  off = 1.0 - jnp.eye(n, dtype=jnp.float32)
  num_pairs = n * (n - 1)
  m1 = jnp.sum(sim * off) / num_pairs
  m2 = jnp.sum(jnp.square(sim) * off) / num_pairs
  return jnp.square(m1) + jax.nn.relu(m2 - 1.0 / d)
