"""Query tower, item tower and the SSL encoders H and G.

    query_tower(q)            = normalize(MLP_q(Input_q(q)))
    item_tower(x)             = normalize(MLP_x(Input_x(x)))
    ssl_encoder(view, mask)   = normalize(MLP_ssl(Input_x(view, mask)))     (H = G)

``Input_x`` (embedding tables and default embeddings) is always shared by the item tower and the
SSL encoder. ``ssl_sharing`` says how much of the item tower's MLP the SSL encoder reuses:
  * 'all'           the SSL encoder *is* the item tower (same MLP);
  * 'all_but_last'  hidden layers shared, the SSL encoder has its own output layer (a projection
                    head, as in SimCLR), so the contrastive task can shape the last layer freely;
  * 'none'          the SSL encoder has its own MLP; only the tables are shared.
H and G share all parameters: both views are produced by the same (symmetric) augmentation family.

Item-to-item retrieval: when ``query_spec.share_tables_with`` names the item tower (the query is
itself an item, ``model.share_item_tables``), the query tower reads ``Input_x`` too (same tables and
default embeddings; its MLP stays its own) and owns no ``query_input`` parameters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sslrec import features as features_lib
from sslrec import losses
from sslrec.model import embeddings

Array = jax.Array
SSL_SHARING = ("all", "all_but_last", "none")


class MLP(nn.Module):
  """ReLU MLP: ``hidden`` layers then a linear output layer of ``out_dim``."""

  hidden: Sequence[int]
  out_dim: int
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.layers = [
      nn.Dense(h, dtype=self.dtype, name=f"hidden_{i}") for i, h in enumerate(self.hidden)
    ]
    self.out = nn.Dense(self.out_dim, dtype=self.dtype, name="out")

  def trunk(self, x: Array) -> Array:
    for layer in self.layers:
      x = nn.relu(layer(x))
    return x

  def __call__(self, x: Array) -> Array:
    return self.out(self.trunk(x))


class TwoTower(nn.Module):
  """The two-tower retrieval model with its SSL encoder."""

  query_spec: features_lib.TowerSpec
  item_spec: features_lib.TowerSpec
  query_hidden: Sequence[int] = (256,)
  item_hidden: Sequence[int] = (256,)
  output_dim: int = 64
  ssl_sharing: str = "all_but_last"
  dtype: jnp.dtype = jnp.float32
  table_row_multiple: int = 1  # embedding-table rows padded to a multiple of this

  def setup(self):
    if self.ssl_sharing not in SSL_SHARING:
      raise ValueError(f"ssl_sharing={self.ssl_sharing!r}; allowed: {SSL_SHARING}")
    if self.shares_item_tables:
      if self.query_spec.features != self.item_spec.features:
        raise ValueError(
          "the query tower shares the item tower's tables but its features differ: "
          f"{self.query_spec.names} vs {self.item_spec.names}"
        )
    else:
      self.query_input = embeddings.InputLayer(self.query_spec, self.dtype, self.table_row_multiple)
    self.item_input = embeddings.InputLayer(self.item_spec, self.dtype, self.table_row_multiple)
    self.query_mlp = MLP(self.query_hidden, self.output_dim, self.dtype)
    self.item_mlp = MLP(self.item_hidden, self.output_dim, self.dtype)
    if self.ssl_sharing == "all_but_last":
      self.ssl_head = nn.Dense(self.output_dim, dtype=self.dtype)
    elif self.ssl_sharing == "none":
      self.ssl_mlp = MLP(self.item_hidden, self.output_dim, self.dtype)

  @property
  def shares_item_tables(self) -> bool:
    """Whether the query tower reads the item tower's input layer (item-to-item retrieval)."""
    other = self.query_spec.share_tables_with
    if other and other != self.item_spec.name:
      raise ValueError(
        f"query tower shares tables with {other!r}; only the item tower "
        f"({self.item_spec.name!r}) is possible"
      )
    return bool(other)

  @property
  def query_input_spec(self) -> features_lib.TowerSpec:
    """The schema of the input layer the query tower reads (the item tower's when shared)."""
    return self.item_spec if self.shares_item_tables else self.query_spec

  @property
  def query_input_name(self) -> str:
    """The input layer (parameter scope) the query tower reads."""
    return "item_input" if self.shares_item_tables else "query_input"

  def query_tower(
    self, query: Mapping[str, Array], feature_mask: Array | None = None, ids=None
  ) -> Array:
    """``[B, output_dim]`` L2-normalised query embeddings (``feature_mask``, ``ids``: see
    InputLayer; training masks query features with ``model.query_feature_dropout``)."""
    inputs = self.item_input if self.shares_item_tables else self.query_input
    h = inputs(query, feature_mask, ids=ids)
    return losses.l2_normalize(self.query_mlp(h).astype(jnp.float32))

  def item_tower(
    self, item: Mapping[str, Array], feature_mask: Array | None = None, ids=None
  ) -> Array:
    """``[B, output_dim]`` L2-normalised item embeddings."""
    h = self.item_input(item, feature_mask, ids=ids)
    return losses.l2_normalize(self.item_mlp(h).astype(jnp.float32))

  def ssl_encoder(
    self, view: Mapping[str, Array], feature_mask: Array, ids=None, second_mask=None
  ) -> Array:
    """H = G: ``[N, output_dim]`` L2-normalised embedding of one augmented view
    (``second_mask``: ``[2N, output_dim]``, the view under ``feature_mask`` then under
    ``second_mask``, from one lookup of each feature; see InputLayer)."""
    h = self.item_input(view, feature_mask, ids=ids, second_mask=second_mask)
    if self.ssl_sharing == "all":
      z = self.item_mlp(h)
    elif self.ssl_sharing == "all_but_last":
      z = self.ssl_head(self.item_mlp.trunk(h))
    else:
      z = self.ssl_mlp(h)
    return losses.l2_normalize(z.astype(jnp.float32))

  def __call__(self, query, item):
    """Touches every parameter (used by ``init``)."""
    mask = jnp.zeros((self.item_spec.num_features,), bool)
    return self.query_tower(query), self.item_tower(item), self.ssl_encoder(item, mask)
