"""Streaming item-frequency estimation (Yi et al. 2019, "Sampling-bias-corrected neural modeling
for large corpus item recommendations", RecSys, Algorithms 2 and 3).

The logQ correction needs each item's probability of appearing in a training batch. The static
estimate (``stats.log_q``) counts the whole training set once, before training: wrong for a
stream whose popularity drifts, and unavailable for an unbounded stream. This estimator learns it
online from the ids the train step sees, in fixed memory, with hashing:

* per hash function ``h``: ``A[h, b]`` the global step bucket ``b`` was last seen at and
  ``B[h, b]`` a moving average of the number of steps between its sightings;
* at step ``t``, for every bucket ``b`` the batch's ids hit (``c`` hits in the batch):
  ``B <- (1 - a) B + a (t - A) / c``, then ``A <- t`` (the gap is read *before* ``A`` moves:
  writing ``A`` first, the classic slip, makes every gap 0);
* an item's estimate is ``1 / B``, its expected sightings per step; with several hash functions
  the most conservative one is used, the *largest* ``B`` (collisions only shorten gaps).

A bucket's first sighting sets ``B`` to its gap since the start (``A`` starts at -1), so the
estimate has no ``1 / a`` start-up bias. Everything is keyed by the global step and fed the
global batch, so every host of a pod computes the same state. Pure functions: the state is a
pytree in the train state (checkpointed with it, sharded like a table), ``update`` runs inside the
jitted train step.

Functional API: ``init(num_buckets, num_hashes) -> state``; ``update(state, ids, step) -> state``;
``estimate(state, ids) -> float32 [B]`` sightings per step (a per-step probability when below 1).
The arrays are bucket-major, ``[num_buckets, num_hashes]``, under ``*_table`` keys, so the train
state shards them on their buckets like an embedding table's rows (``parallel.state_shardings``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_LEARNING_RATE = 0.05  # a in B <- (1 - a) B + a gap (launch/frequency_check.py)
_GOLDEN = np.uint32(0x9E3779B1)  # multiplicative hashing constants (Knuth), one per hash
_MIX = np.uint32(0x85EBCA6B)


def init(num_buckets: int, num_hashes: int = 2) -> dict:
  """The empty state: ``{"last_table": int32 [N, H] (-1: never seen), "gap_table": float32
  [N, H]}``."""
  if int(num_buckets) < 1 or int(num_hashes) < 1:
    raise ValueError(
      f"frequency.init: num_buckets={num_buckets}, num_hashes={num_hashes}; both must be >= 1"
    )
  shape = (int(num_buckets), int(num_hashes))
  return {"last_table": jnp.full(shape, -1, jnp.int32), "gap_table": jnp.zeros(shape, jnp.float32)}


def buckets(ids: jax.Array, num_hashes: int, num_buckets: int) -> jax.Array:
  """``int32 [H, B]``: each id's bucket under each hash function (seeded multiplicative hashing
  of the 32-bit id, a different odd multiplier and mix per function)."""
  x = jnp.asarray(ids).astype(jnp.uint32)
  rows = []
  for h in range(num_hashes):
    mult = jnp.uint32((int(_GOLDEN) + 2 * h * int(_MIX)) % (1 << 32) | 1)
    y = (x ^ jnp.uint32((h * 0x27D4EB2F) % (1 << 32))) * mult
    y = y ^ (y >> jnp.uint32(15))
    y = y * jnp.uint32(int(_MIX))
    y = y ^ (y >> jnp.uint32(13))
    rows.append((y % jnp.uint32(num_buckets)).astype(jnp.int32))
  return jnp.stack(rows)


def update(
  state: dict,
  ids: jax.Array,
  step: jax.Array | int,
  *,
  learning_rate: float = DEFAULT_LEARNING_RATE,
  valid: jax.Array | None = None,
) -> dict:
  """The state after the global step ``step`` saw ``ids`` (``int32 [B]``; ``valid``: optional
  ``bool [B]``, False for padding rows, which touch nothing).

  Work and memory per step are ``O(B log B)`` per hash, whatever the number of buckets: only
  the buckets the batch hits are read and written (a bucket hit ``c`` times computes one new
  value, written by each of its ``c`` rows alike).
  """
  last, gap = state["last_table"], state["gap_table"]  # [N, H]
  num_buckets, num_hashes = last.shape
  t = jnp.asarray(step, jnp.int32)
  b = buckets(ids, num_hashes, num_buckets)  # [H, B]
  ok = jnp.ones(b.shape[1], bool) if valid is None else jnp.asarray(valid, bool)
  key = jnp.where(ok[None, :], b, num_buckets)  # padding rows: an out-of-range bucket
  ordered = jnp.sort(key, axis=1)
  count = jax.vmap(
    lambda o, k: jnp.searchsorted(o, k, side="right") - jnp.searchsorted(o, k, side="left")
  )(ordered, key).astype(jnp.float32)  # [H, B] hits of each row's bucket in this batch
  cols = jnp.broadcast_to(jnp.arange(num_hashes)[:, None], b.shape)
  prev_last, prev_gap = last[b, cols], gap[b, cols]  # [H, B] read A before it moves
  observed = (t - prev_last).astype(jnp.float32) / count
  a = jnp.float32(learning_rate)
  new_gap = jnp.where(prev_last < 0, observed, (1.0 - a) * prev_gap + a * observed)
  rows = jnp.where(ok[None, :], b, num_buckets)  # dropped by the scatter (out of range)
  return {
    "last_table": last.at[rows, cols].set(jnp.broadcast_to(t, b.shape), mode="drop"),
    "gap_table": gap.at[rows, cols].set(new_gap, mode="drop"),
  }


def estimate(state: dict, ids: jax.Array) -> jax.Array:
  """``float32 [B]``: each id's expected sightings per step, ``1 / max_h B[h, bucket]`` (0 for an
  id none of whose buckets was seen)."""
  last, gap = state["last_table"], state["gap_table"]  # [N, H]
  num_buckets, num_hashes = last.shape
  b = buckets(ids, num_hashes, num_buckets)  # [H, B]
  cols = jnp.broadcast_to(jnp.arange(num_hashes)[:, None], b.shape)
  g = gap[b, cols]  # [H, B]
  seen = last[b, cols] >= 0
  g = jnp.where(seen, g, jnp.inf).max(axis=0)  # the most conservative hash
  return jnp.where(jnp.isfinite(g), 1.0 / jnp.maximum(g, 1e-6), 0.0)


def log_q(state: dict, ids: jax.Array, batch_size: int) -> jax.Array:
  """``float32 [B]``: ``log`` of each id's per-pair sampling probability (its sightings per step
  over the batch size), the quantity ``stats.log_q`` estimates from static counts."""
  p = estimate(state, ids) / float(batch_size)
  return jnp.log(jnp.maximum(p, 1e-12))
