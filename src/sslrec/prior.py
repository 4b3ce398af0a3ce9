"""The popularity prior of retrieval (post-hoc logit adjustment, Menon et al. 2021):

    score(q, i) = <query_tower(q), item_tower(i)> + weight * temperature * log(1 + f_i)

with ``f_i`` item i's D_train frequency, ``weight`` = ``eval.popularity_prior`` and ``temperature``
the main loss's (so that in the loss's logit space, ``score / temperature``, the prior adds
``weight * log(1 + f_i)``). The towers are trained with the logQ-corrected batch softmax, whose
optimum ranks by ``log p(i | q)`` and so already holds popularity; a model stopped early (selected
on validation) holds less of it than the data does, and the prior gives it back. ``weight`` is a
hyperparameter chosen on validation (docs/method.md, "Popularity prior"); 0 turns it off.

The prior is folded into the vectors, so every dot-product retriever (the evaluation's exact top-K,
an exported model's ``serving.Retriever`` and its ANN backends) serves it unchanged: item vectors
get one more column ``weight * temperature * log(1 + f_i)``, query vectors a column of ones.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def item_column(item_freq: np.ndarray, weight: float, temperature: float) -> np.ndarray:
  """``float32 [N]``: the prior of every item, in the towers' (dot-product) score units."""
  freq = np.asarray(item_freq, np.float64)
  if freq.ndim != 1 or (freq.size and freq.min() < 0):
    raise ValueError(f"item_freq: need non-negative counts [N], got shape {freq.shape}")
  return (float(weight) * float(temperature) * np.log1p(freq)).astype(np.float32)


def with_items(
  item_emb: np.ndarray, item_freq: np.ndarray, weight: float, temperature: float
) -> np.ndarray:
  """``[N, D + 1]`` item vectors carrying the prior (``[N, D]`` unchanged when ``weight`` is 0)."""
  if not weight:
    return item_emb
  col = item_column(item_freq, weight, temperature)
  if col.shape[0] != item_emb.shape[0]:
    raise ValueError(f"item_freq has {col.shape[0]} items, the embeddings {item_emb.shape[0]}")
  return np.concatenate([np.asarray(item_emb, np.float32), col[:, None]], axis=1)


def with_queries(q, weight: float):
  """``[B, D + 1]`` query vectors matching ``with_items`` (a column of ones); unchanged at 0."""
  if not weight:
    return q
  return jnp.concatenate([q, jnp.ones(q.shape[:-1] + (1,), q.dtype)], axis=-1)
