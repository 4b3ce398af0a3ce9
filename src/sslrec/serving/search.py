"""Exact top-K search by inner product (JAX: one matmul + top_k per query chunk)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

MAX_SCORES_PER_CHUNK = 1 << 26  # query-chunk x catalogue scores materialised at once (256 MiB)


def bucket(n: int) -> int:
  """Smallest power of two >= n (padded batch sizes keep the number of compilations small)."""
  return 1 << max(0, (n - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("k",))
def _exact_top_k(queries: jax.Array, items: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Exact maximum inner product: ``(scores [B, k], rows [B, k])`` of ``queries @ items.T``."""
  scores = jnp.matmul(queries, items.T, precision=jax.lax.Precision.HIGHEST)
  return jax.lax.top_k(scores, k)


def exact_search(queries: np.ndarray, items: jax.Array, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-``k`` by inner product: ``(scores float32 [B, k], rows int64 [B, k])``.

  Query chunks (padded to powers of two, at most 256 rows and ``MAX_SCORES_PER_CHUNK`` scores)
  are scored against every row of ``items [N, D]`` (a device array) with one matmul + top_k each.
  """
  n = int(items.shape[0])
  chunk = max(1, min(256, MAX_SCORES_PER_CHUNK // n))
  chunk = 1 << (chunk.bit_length() - 1)
  scores, rows = [], []
  for start in range(0, queries.shape[0], chunk):
    q = queries[start : start + chunk]
    b = q.shape[0]
    size = min(chunk, bucket(b))
    if size > b:
      q = np.concatenate([q, np.zeros((size - b, q.shape[1]), np.float32)])
    s, r = _exact_top_k(jnp.asarray(q), items, k)
    scores.append(np.asarray(s)[:b])
    rows.append(np.asarray(r)[:b])
  return np.concatenate(scores), np.concatenate(rows).astype(np.int64)
