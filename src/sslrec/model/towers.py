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
# How the SSL encoder's first layer sees the two views (one lookup of each feature either way):
#   'stacked': both views' masked inputs stacked, one [2N, F] x [F, H] product (fastest measured
#              on CPU, where one large matmul beats many small ones);
#   'blocks':  each feature block multiplied once, by the view that keeps it (half the first
#              layer's FLOPs; MLP.two_views_first_layer gathers each view's kept blocks into one
#              product; on 2 CPU cores no faster than 'stacked': its smaller products leave a core
#              idle, measured in docs/performance.md).
SSL_VIEW_ENCODINGS = ("stacked", "blocks")


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

  def two_views_first_layer(
    self,
    emb: Array,
    defaults: Array,
    widths: Sequence[int],
    m1: Array,
    m2: Array,
    num_masked: int | None = None,
  ) -> Array:
    """The first hidden layer's activations ``[2N, hidden[0]]`` of two views of one batch:
    view ``v`` feeds feature ``f``'s embedding where ``m_v[f]`` is False, its default where True
    (``emb [N, F]``, ``defaults [F]``, ``widths``: the feature blocks of ``F``).

    By linearity each view's pre-activation is a sum over the feature blocks of either
    ``emb_f @ W_f`` (the block kept) or ``default_f @ W_f`` (a per-view constant). With
    complementary masks each block is kept by one view: the matmuls cost one view's (``N`` rows),
    not two views' (``2N``).

    ``num_masked``: the static number of features ``m1`` masks, with ``m2 = ~m1`` (the SSL
    views, ``step.Views``). Where every block has the same width, the blocks are then reordered
    so that each view's kept blocks are contiguous and each view's pre-activation is *one*
    product of ``[N, kept * width]`` rows (two products of half the stacked pass's FLOPs, fast
    where many small products are slow, as on CPU). A draw whose count or complement differs
    (``lax.cond``, checked on the device) takes the per-block sums, which hold for any masks."""
    first = self.layers[0]
    if not first.has_variable("params", "kernel"):  # init: create the layer's parameters
      first(emb[:1])
    kernel = first.get_variable("params", "kernel").astype(self.dtype)
    bias = first.get_variable("params", "bias").astype(self.dtype)
    emb, defaults = emb.astype(self.dtype), defaults.astype(self.dtype)

    def per_block(emb, defaults, kernel, m1, m2):
      pre1 = pre2 = bias
      offset = 0
      for i, w in enumerate(widths):
        k = kernel[offset : offset + w]
        kept = emb[:, offset : offset + w] @ k  # [N, H]
        const = defaults[offset : offset + w] @ k  # [H]
        pre1 = pre1 + jnp.where(m1[i], const[None, :], kept)
        pre2 = pre2 + jnp.where(m2[i], const[None, :], kept)
        offset += w
      return jnp.concatenate([pre1, pre2], axis=0)

    f = len(widths)
    if num_masked is None or len(set(widths)) != 1 or not 0 < num_masked < f:
      return nn.relu(per_block(emb, defaults, kernel, m1, m2))
    n, d, h, keep = emb.shape[0], widths[0], kernel.shape[1], f - num_masked

    def gathered(emb, defaults, kernel, m1, m2):
      del m2  # = ~m1 (checked)
      order = jnp.argsort(m1, stable=True)  # the blocks view 1 keeps, then those it masks
      a, c = order[:keep], order[keep:]
      e, w, dflt = emb.reshape(n, f, d), kernel.reshape(f, d, h), defaults.reshape(f, d)
      wa, wc = w[a].reshape(keep * d, h), w[c].reshape(num_masked * d, h)
      pre1 = e[:, a].reshape(n, keep * d) @ wa + dflt[c].reshape(-1) @ wc
      pre2 = e[:, c].reshape(n, num_masked * d) @ wc + dflt[a].reshape(-1) @ wa
      return jnp.concatenate([pre1, pre2], axis=0) + bias

    exact = (m1.sum() == num_masked) & jnp.all(m2 == ~m1)
    return nn.relu(jax.lax.cond(exact, gathered, per_block, emb, defaults, kernel, m1, m2))

  def after_first_layer(self, x: Array, *, trunk_only: bool = False) -> Array:
    """The rest of the MLP from the first hidden layer's activations."""
    for layer in self.layers[1:]:
      x = nn.relu(layer(x))
    return x if trunk_only else self.out(x)


class TwoTower(nn.Module):
  """The two-tower retrieval model with its SSL encoder."""

  query_spec: features_lib.TowerSpec
  item_spec: features_lib.TowerSpec
  query_hidden: Sequence[int] = (256,)
  item_hidden: Sequence[int] = (256,)
  output_dim: int = 64
  ssl_sharing: str = "all_but_last"
  ssl_view_encoding: str = "stacked"  # ssl.view_encoding: 'stacked' | 'blocks' (SSL_VIEW_ENCODINGS)
  dtype: jnp.dtype = jnp.float32
  table_row_multiple: int = 1  # embedding-table rows padded to a multiple of this

  def setup(self):
    if self.ssl_sharing not in SSL_SHARING:
      raise ValueError(f"ssl_sharing={self.ssl_sharing!r}; allowed: {SSL_SHARING}")
    if self.ssl_view_encoding not in SSL_VIEW_ENCODINGS:
      raise ValueError(
        f"ssl_view_encoding={self.ssl_view_encoding!r}; allowed: {SSL_VIEW_ENCODINGS}"
      )
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
    self,
    view: Mapping[str, Array],
    feature_mask: Array,
    ids=None,
    second_mask=None,
    num_masked: int | None = None,
  ) -> Array:
    """H = G: ``[N, output_dim]`` L2-normalised embedding of one augmented view.

    ``second_mask``: two views of ``view`` in one pass, ``[2N, output_dim]`` (rows ``:N`` under
    ``feature_mask``, rows ``N:`` under ``second_mask``, both ``bool [k]``). Each feature is looked
    up once for ``N`` rows (with complementary masks every feature is real in one view: half the
    lookups of encoding the views apart); ``ssl_view_encoding='blocks'`` also multiplies each
    first-layer feature block once (``MLP.two_views_first_layer``; ``num_masked``: the static
    number of features ``feature_mask`` masks, ``second_mask`` its complement)."""
    if second_mask is not None:
      return self._two_views(view, feature_mask, second_mask, ids, num_masked)
    return self._ssl_mlp(self.item_input(view, feature_mask, ids=ids))

  def _ssl_mlp(self, h: Array) -> Array:
    if self.ssl_sharing == "all":
      z = self.item_mlp(h)
    elif self.ssl_sharing == "all_but_last":
      z = self.ssl_head(self.item_mlp.trunk(h))
    else:
      z = self.ssl_mlp(h)
    return losses.l2_normalize(z.astype(jnp.float32))

  def _two_views(self, view, m1, m2, ids, num_masked) -> Array:
    emb, defaults, widths = self.item_input(view, ids=ids, blocks=True)
    mlp = self.ssl_mlp if self.ssl_sharing == "none" else self.item_mlp
    if self.ssl_view_encoding == "stacked" or not mlp.hidden:  # one pass of 2N rows
      h = []
      for m in (m1, m2):
        cols = jnp.repeat(m, jnp.asarray(widths), total_repeat_length=emb.shape[1])
        h.append(jnp.where(cols[None, :], defaults[None, :], emb))
      return self._ssl_mlp(jnp.concatenate(h, axis=0))
    h = mlp.two_views_first_layer(emb, defaults, widths, m1, m2, num_masked)
    if self.ssl_sharing == "all_but_last":
      z = self.ssl_head(mlp.after_first_layer(h, trunk_only=True))
    else:
      z = mlp.after_first_layer(h)
    return losses.l2_normalize(z.astype(jnp.float32))

  def __call__(self, query, item):
    """Touches every parameter (used by ``init``)."""
    mask = jnp.zeros((self.item_spec.num_features,), bool)
    return self.query_tower(query), self.item_tower(item), self.ssl_encoder(item, mask)
