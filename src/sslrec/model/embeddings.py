"""The input layer: embedding tables, multi-valued pooling, learned default (mask) embeddings.

One ``InputLayer`` per tower schema. The item tower and the SSL encoders H and G call the *same*
``InputLayer`` instance, so they share every embedding table and default embedding (PAPER.md:
"the embedding tables are shared between H and G and with the item tower").

Per feature ``f`` the layer owns:
  * ``{f}_table``   ``[rows, embed_dim]`` embedding table (id / multi; ``rows`` = vocab_size + 1
    (the OOV row, where ids >= vocab_size go), or the hash buckets of a hashed feature, rounded up
    to ``row_multiple`` so the table splits evenly into row shards); a hashed feature with
    ``second_hash`` also owns ``{f}_hash2_table``, whose embedding is added; or a
    ``{f}_dense`` projection ``[dense_dim, embed_dim]`` (dense);
  * ``{f}_default`` ``[embed_dim]`` learned default embedding, used where the feature is masked by
    an SSL view, where an id is missing (-1), or where a bag has no present value (empty, or every
    value dropped by augmentation).
The output is the concatenation of every feature's embedding in schema order: ``[B,
sum(embed_dim)]``.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from sslrec import features as features_lib

Array = jax.Array


def pooled_lookup(table: Array, ids: Array, looked_up: bool = False) -> tuple[Array, Array]:
  """Mean of the rows of ``table`` at the present (>= 0) ``ids``.

  Args:
    table: ``[V, D]``, or with ``looked_up`` the rows already looked up, ``ids.shape + (D,)``
      (the owner-routed sparse path, ``sparse.RoutedPlan``).
    ids: ``int32 [B]`` (single-valued) or ``[B, L]`` (multi-valued, -1 padded).

  Returns:
    ``(emb [B, D], present bool [B])``; ``emb`` is 0 where nothing is present.
  """
  valid = ids >= 0
  if looked_up:
    rows = table
  else:
    rows = jnp.take(table, jnp.where(valid, ids, 0), axis=0)  # [B, (L,) D]
  if ids.ndim == 1:
    return jnp.where(valid[:, None], rows, 0.0), valid
  w = valid.astype(rows.dtype)
  count = w.sum(axis=1)  # [B]
  emb = jnp.einsum("bld,bl->bd", rows, w) / jnp.maximum(count, 1.0)[:, None]
  return emb, count > 0


def table_ids(f: features_lib.FeatureSpec, x: Array) -> dict[str, Array]:
  """Row ids of each of ``f``'s tables for the feature values ``x`` (``-1`` stays ``-1``).

  Plain ids ``>= vocab_size`` go to the OOV row ``vocab_size``; hashed fingerprints go to bucket
  ``x % vocab_size`` (and ``(x // vocab_size) % vocab_size`` in the second table).
  Returns ``{table param name: ids}``.
  """
  valid = x >= 0
  v = f.vocab_size
  if not f.hashed:
    return {f"{f.name}_table": jnp.where(valid, jnp.minimum(x, v), -1)}
  out = {f"{f.name}_table": jnp.where(valid, x % v, -1)}
  if f.second_hash:
    out[f"{f.name}_hash2_table"] = jnp.where(valid, (x // v) % v, -1)
  return out


def oov_count(spec: features_lib.TowerSpec, batch: Mapping[str, Array]) -> Array:
  """Number of non-hashed id values ``>= vocab_size`` in a batch (they use the OOV row)."""
  total = jnp.zeros((), jnp.int32)
  for f in spec.features:
    if f.kind != "dense" and not f.hashed:
      total = total + jnp.sum(batch[f.name] >= f.vocab_size).astype(jnp.int32)
  return total


def all_table_ids(spec: features_lib.TowerSpec, batch: Mapping[str, Array]) -> dict[str, Array]:
  """``table_ids`` of every feature of a tower batch, merged: ``{table param name: ids}``."""
  out = {}
  for f in spec.features:
    if f.kind != "dense":
      out.update(table_ids(f, batch[f.name]))
  return out


def blockwise_normal(stddev: float, max_block_rows: int = 65536):
  """Normal(0, stddev) initializer for ``[rows, dim]`` tables that draws them in row blocks
  (``lax.map``), so initialising a 10^7-row table needs the table plus one block of memory, not
  several table-sized temporaries of the random-bit generator."""

  def init(key, shape, dtype=jnp.float32):
    rows, dim = shape
    if rows <= max_block_rows:
      return stddev * jax.random.normal(key, shape, dtype)
    block = max(d for d in range(1, max_block_rows + 1) if rows % d == 0)  # no ragged tail
    keys = jax.random.split(key, rows // block)
    out = jax.lax.map(lambda k: stddev * jax.random.normal(k, (block, dim), dtype), keys)
    return out.reshape(rows, dim)

  return init


class InputLayer(nn.Module):
  """Embeds one tower's feature dict into ``[B, sum(embed_dim)]``."""

  spec: features_lib.TowerSpec
  dtype: jnp.dtype = jnp.float32
  row_multiple: int = 1  # table rows padded to a multiple of this (row sharding needs it)

  @nn.compact
  def __call__(
    self,
    batch: Mapping[str, Array],
    feature_mask: Array | None = None,
    ids: Mapping[str, Array] | None = None,
    blocks: bool = False,
  ):
    """Args:
    batch: ``{name: array}`` as in features.py.
    feature_mask: ``bool [k]`` (whole batch) or ``[B, k]`` (per row) or ``None``; True where
      the feature is replaced by its default embedding (an SSL view's mask).
    ids: optional ``{table param name: (row ids [B(, L)], rows [U, D])}``: look up ``row ids``
      in ``rows`` instead of ``table_ids(batch)`` in the table parameter. The sparse update path
      passes each table's gathered rows and the batch's positions into them here (the table
      parameter is then not read at all); the owner-routed path passes the rows already looked
      up, as ``(row ids, rows [B(, L), D], True)`` (only the ids' ``>= 0`` is read).
    blocks: return ``(embeddings [B, sum(embed_dim)], defaults [sum(embed_dim)], widths)``
      instead: every feature's embedding (its default where the row has no value), the default
      embeddings, and each feature's width, for a caller that masks per view itself
      (``TwoTower.ssl_encoder`` with two complementary masks); ``feature_mask`` must be None.

    Returns ``[B, sum(embed_dim)]`` (or the ``blocks`` tuple).
    """
    if blocks and feature_mask is not None:
      raise ValueError("InputLayer: blocks=True masks nothing itself (feature_mask must be None)")
    outs, defaults = [], []
    for idx, f in enumerate(self.spec.features):
      default = self.param(f"{f.name}_default", nn.initializers.normal(0.1), (f.embed_dim,))
      x = batch[f.name]
      if f.kind == "dense":
        emb = nn.Dense(f.embed_dim, name=f"{f.name}_dense", dtype=self.dtype)(x)
        present = jnp.ones(x.shape[:1], bool)
      else:
        own = table_ids(f, x)
        emb, present = 0.0, None
        for (_suffix, rows), name in zip(f.tables, own):
          if ids is not None and name in ids:  # sparse path: gathered rows, positions into them
            row_ids, table, *looked_up = ids[name]
          else:
            rows = -(-rows // self.row_multiple) * self.row_multiple
            table = self.param(
              name, blockwise_normal(1.0 / (f.embed_dim**0.5)), (rows, f.embed_dim)
            )
            row_ids, looked_up = own[name], ()
          e, p = pooled_lookup(table, row_ids, bool(looked_up))
          emb = emb + e
          present = p if present is None else present
      use_default = ~present
      defaults.append(default.astype(self.dtype))
      if feature_mask is not None:  # [k] for the whole batch, or [B, k] per row
        use_default = use_default | feature_mask[..., idx]
      outs.append(jnp.where(use_default[:, None], default[None, :], emb).astype(self.dtype))
    if blocks:
      widths = tuple(f.embed_dim for f in self.spec.features)
      return jnp.concatenate(outs, axis=-1), jnp.concatenate(defaults), widths
    return jnp.concatenate(outs, axis=-1)
