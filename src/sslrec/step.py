"""What is trained: the train state, its creation, and the pure, jit-compiled train step.

    loss = L_main + alpha * L_self + reg.spread_out_weight * L_spread_out

``train_step(state, pair_batch, item_batch, rng) -> (state, metrics)`` is a pure function,
jit-compiled once with explicit shardings over the mesh (see ``compile_train_step``). The step's
randomness (the CFM seed feature, RFM split, value dropout) is ``fold_in(rng, state.step)``, so a
resumed run draws exactly what an uninterrupted run would. The loop around it is ``train.py``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sslrec import frequency, losses, parallel, sparse
from sslrec.data import table as table_lib
from sslrec.model import augment, embeddings, towers

Array = jax.Array
PyTree = Any


@flax.struct.dataclass
class TrainState:
  """``params``: the model's parameters; ``opt_state``: the optax state of the parameters it
  updates (all of them, or all but the embedding tables with sparse updates); ``emb_state``:
  the row-wise optimizer state of each table (``{"<scope>/<table>": ...}``, sparse updates);
  ``freq``: the streaming frequency estimator's state (``loss.logq_source='streaming'``,
  ``sslrec.frequency``), else None."""

  step: Array
  params: PyTree
  opt_state: PyTree
  emb_state: PyTree = None
  freq: PyTree = None


def uses_item_stream(config: ml_collections.ConfigDict) -> bool:
  """Whether the run draws the D_item stream: SSL, the spread-out regulariser or mixed negatives
  is on."""
  return config.ssl.alpha > 0 or config.reg.spread_out_weight > 0 or config.loss.mixed_negatives


def create_model(config: ml_collections.ConfigDict, dataset) -> towers.TwoTower:
  return towers.TwoTower(
    query_spec=dataset.query_spec,
    item_spec=dataset.item_spec,
    query_hidden=tuple(config.model.query_hidden),
    item_hidden=tuple(config.model.item_hidden),
    output_dim=config.model.output_dim,
    ssl_sharing=config.ssl.encoder_sharing,
    ssl_view_encoding=config.ssl.view_encoding,
    dtype=jnp.dtype(config.model.dtype),
    table_row_multiple=config.model.table_row_multiple,
  )


WARMUP_MAX_FRACTION = 0.1  # the warmup never takes more than this fraction of a run


def warmup_steps(config, total_steps: int | None = None) -> int:
  """``optimizer.warmup_steps``, at most ``WARMUP_MAX_FRACTION`` of a run of ``total_steps``: a
  run measured in epochs can be shorter than a fixed warmup (ML-100k at data.train_fraction=0.1:
  8 epochs are 64 steps) and would never reach its learning rate. Like any schedule that
  depends on the run's length, a run resumed with another ``train.num_steps`` / ``num_epochs``
  follows another warmup while the cap binds (never once the cap is above the configured one)."""
  w = int(config.optimizer.warmup_steps)
  if total_steps is not None:
    w = min(w, int(WARMUP_MAX_FRACTION * total_steps))
  return max(w, 0)


def learning_rate(config, total_steps: int | None = None) -> optax.Schedule:
  oc = config.optimizer
  warmup = warmup_steps(config, total_steps)
  if warmup > 0:
    return optax.warmup_constant_schedule(0.0, oc.learning_rate, warmup)
  return optax.constant_schedule(oc.learning_rate)


# The optax optimizers of the dense parameters by ``optimizer.name`` (configuration reads the
# allowed names from here): a new one is one line.
OPTIMIZERS: dict[str, Callable[[optax.Schedule], optax.GradientTransformation]] = {
  "adagrad": lambda lr: optax.adagrad(lr, initial_accumulator_value=0.1),
  "adam": optax.adam,
}


def create_optimizer(
  config: ml_collections.ConfigDict, total_steps: int | None = None
) -> optax.GradientTransformation:
  """The optax optimizer of the dense parameters (and of the tables with dense updates)."""
  return OPTIMIZERS[config.optimizer.name](learning_rate(config, total_steps))


def create_embedding_optimizer(config: ml_collections.ConfigDict):
  """The row-wise optimizer of the tables with sparse updates, or None with dense updates. With
  owner routing, tables replicated by ``model.replicate_table_rows`` take the dense optimizer
  (their gradient is one all-reduce of the small table)."""
  oc = config.optimizer
  if oc.embedding_update != "sparse":
    return None
  min_rows = oc.sparse_min_rows
  if oc.embedding_routing == "owner":  # replicated tables are not routed: the dense optimizer
    min_rows = max(min_rows, config.model.replicate_table_rows)
  return sparse.make_optimizer(
    oc.embedding_optimizer,
    oc.embedding_learning_rate,
    min_rows=min_rows,
    initial_accumulator_value=oc.embedding_initial_accumulator
    or sparse.batch_aware_accumulator(config.train.batch_size),
  )


def example_inputs(dataset, n: int = 2):
  """A tiny (query batch, item batch) from the dataset's first rows, for ``init``."""
  rows = np.arange(n)
  return table_lib.take(dataset.queries, rows), table_lib.take(dataset.items, rows)


def frequency_buckets(config) -> int:
  """``loss.frequency_buckets`` rounded up to ``model.table_row_multiple`` (the estimator's
  arrays are sharded on their buckets like a table's rows)."""
  m = config.model.table_row_multiple
  return -(-config.loss.frequency_buckets // m) * m


def create_frequency_state(config):
  """The streaming estimator's empty state, or None (``loss.logq_source='counts'``)."""
  if config.loss.logq_source != "streaming":
    return None
  return frequency.init(frequency_buckets(config), config.loss.frequency_hashes)


def create_train_state(
  rng: Array,
  model: towers.TwoTower,
  tx: optax.GradientTransformation,
  dataset,
  emb_opt=None,
  config=None,
) -> TrainState:
  query, item = example_inputs(dataset)
  params = model.init(rng, query, item)
  freq = None if config is None else create_frequency_state(config)
  if emb_opt is None:
    return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), freq=freq
    )
  dense, tables = sparse.split_tables(params, emb_opt.min_rows)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(dense),
    emb_state=sparse.init_state(emb_opt, tables),
    freq=freq,
  )


@dataclasses.dataclass(frozen=True)
class Views:
  """The two augmented views of the SSL item batch and the mask drawn. ``shared``: the masks are
  complementary (every strategy but 'none'), so each feature is real in exactly one view and
  both views are one dropped-out batch (``v1 is v2``, ``augment.one_view``) under ``m1`` and
  ``m2``: the encoder looks each feature up once, for N rows, and the dropout draws its random
  numbers once. 'none' masks nothing in either view: two batches (``augment.two_views``)."""

  v1: PyTree
  m1: Array
  v2: PyTree
  m2: Array
  mask: Array
  shared: bool = False
  num_masked: int | None = None  # shared: the static count of m1's masked features (the draw's
  # usual count, augment.num_masked; a draw that differs takes the encoder's general path)


def query_feature_mask(rng, pairs, *, model, config) -> Array | None:
  """``bool [B, k_query]``: each query feature of each training pair is replaced by its learned
  default embedding with probability ``model.query_feature_dropout`` (feature dropout: a query
  cannot be memorised through its id alone, and the tower learns to rank from whatever subset of
  its features a query has; evaluation and serving use every feature). None when off."""
  p = config.model.query_feature_dropout
  if p <= 0:
    return None
  b = jax.tree.leaves(pairs["query"])[0].shape[0]
  return jax.random.bernoulli(rng, p, (b, model.query_input_spec.num_features))


def make_views(rng, items, *, model, config, mi) -> Views:
  """The two augmented views of the SSL item batch."""
  mask_rng, view_rng = jax.random.split(rng)
  k = model.item_spec.num_features
  mask = augment.make_mask(
    mask_rng,
    config.ssl.masking,
    k,
    mi=mi,
    fraction=config.ssl.mask_fraction,
    groups=model.item_spec.group_indices,
  )
  if config.ssl.masking == "none":  # both views keep every feature, differ by their dropout
    v1, m1, v2, _ = augment.two_views(
      view_rng, items["item"], model.item_spec, mask, config.ssl.dropout_rate
    )
    return Views(v1, m1, v2, m1, mask)
  kept = augment.one_view(view_rng, items["item"], model.item_spec, config.ssl.dropout_rate)
  n = augment.num_masked(k, config.ssl.mask_fraction)
  return Views(kept, mask, kept, ~mask, mask, shared=True, num_masked=n)


@dataclasses.dataclass(frozen=True)
class StepCalls:
  """Every model call of one step (``sparse.TowerCall``s); None where the config has none."""

  query: sparse.TowerCall
  item: sparse.TowerCall
  ssl_items: sparse.TowerCall | None  # the D_item batch (spread-out; SSL: the views' ids)
  view1: sparse.TowerCall | None
  view2: sparse.TowerCall | None

  def all(self) -> list[sparse.TowerCall]:
    return [
      c for c in (self.query, self.item, self.ssl_items, self.view1, self.view2) if c is not None
    ]


def step_calls(pairs, items, views: Views | None, model, config) -> StepCalls:
  item = functools.partial(sparse.TowerCall, scope="item_input", spec=model.item_spec)
  ssl_items = item("ssl_items", items["item"]) if uses_item_stream(config) else None
  return StepCalls(
    query=sparse.TowerCall("query", pairs["query"], model.query_input_name, model.query_input_spec),
    item=item("item", pairs["item"]),
    ssl_items=ssl_items,
    view1=None if views is None else item("view1", views.v1, ids_from=ssl_items),
    view2=None if views is None or views.shared else item("view2", views.v2, ids_from=ssl_items),
  )


def loss_fn(
  params,
  pairs,
  items,
  views: Views | None,
  rows=None,
  *,
  model: towers.TwoTower,
  config,
  plan: sparse.Plan | None = None,
  query_mask: Array | None = None,
) -> tuple[Array, dict]:
  """The joint loss of one step and its parts.

  ``views``: ``make_views``'s output (SSL on) or None. Sparse updates: ``rows`` are the gathered
  table rows of ``plan`` (the params then hold no such tables); dense updates: both None.
  ``query_mask``: ``bool [B, k_query]``, query features replaced by their learned default
  (``query_feature_mask``), or None.
  """
  calls = step_calls(pairs, items, views, model, config)
  extra_on = config.loss.mixed_negatives or config.reg.spread_out_weight > 0
  taken = None
  if isinstance(plan, sparse.Plan):  # one gather per table for every call below (Plan.take)
    used = [calls.query, calls.item] + ([calls.ssl_items] if extra_on else [])
    used += [c for c in (calls.view1, calls.view2) if c is not None and config.ssl.alpha > 0]
    taken = plan.take(rows, *used)

  def ids(*c):
    if taken is not None:
      return plan.lookup_taken(taken, *c)
    return None if plan is None else plan.lookup(rows, *c)

  q = model.apply(
    params, pairs["query"], query_mask, ids=ids(calls.query), method=model.query_tower
  )
  x = model.apply(params, pairs["item"], ids=ids(calls.item), method=model.item_tower)
  extra = None  # the D_item batch through the item tower (mixed negatives, spread-out)
  if extra_on:
    extra = model.apply(params, items["item"], ids=ids(calls.ssl_items), method=model.item_tower)
  mixed = config.loss.mixed_negatives
  logq, hits = config.loss.logq_correction, config.loss.remove_accidental_hits
  main = losses.batch_softmax_loss(
    q,
    x,
    temperature=config.loss.temperature,
    log_q=pairs["log_q"] if logq else None,
    item_ids=pairs["item_id"] if hits else None,
    extra_emb=extra if mixed else None,
    extra_log_q=items.get("log_q") if mixed and logq else None,
    extra_ids=items["item_id"] if mixed and hits else None,
    logq_mode=config.loss.logq_mode,
  )
  total = main
  metrics = {"loss/main": main}
  if config.ssl.alpha > 0:
    n = jax.tree.leaves(views.v1)[0].shape[0]
    if views.shared:  # one lookup per feature, both views stacked: [2N] rows from N lookups
      z = model.apply(
        params,
        views.v1,
        views.m1,
        ids=ids(calls.view1),
        second_mask=views.m2,
        num_masked=views.num_masked,
        method=model.ssl_encoder,
      )
    else:  # both views in one encoder pass of 2N rows (per-row feature masks)
      both = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), views.v1, views.v2)
      rows_mask = jnp.concatenate(
        [
          jnp.broadcast_to(views.m1, (n,) + views.m1.shape),
          jnp.broadcast_to(views.m2, (n,) + views.m2.shape),
        ],
        axis=0,
      )
      z = model.apply(
        params, both, rows_mask, ids=ids(calls.view1, calls.view2), method=model.ssl_encoder
      )
    ssl = losses.ssl_loss(
      z[:n], z[n:], temperature=config.ssl.temperature, item_ids=items["item_id"]
    )
    total = total + config.ssl.alpha * ssl
    metrics["loss/ssl"] = ssl
    metrics["ssl/masked_features"] = views.mask.sum().astype(jnp.float32)
  if config.reg.spread_out_weight > 0:
    reg = losses.spread_out_loss(extra)
    total = total + config.reg.spread_out_weight * reg
    metrics["loss/spread_out"] = reg
  metrics["loss"] = total
  return total, metrics


def sampling_log_q(freq, pairs, items, step, *, config, log_q_table):
  """The logQ of every candidate column, and the estimator's new state.

  Returns ``(pairs, items, freq)`` with ``pairs["log_q"]`` (and, with mixed negatives,
  ``items["log_q"]``) set. Without mixed negatives a column's value is the log of its item's
  per-pair sampling probability ``p_j``: static D_train counts (``loss.logq_source='counts'``,
  the pipeline's ``log_q``) or the streaming estimate after this step's ids
  (``'streaming'``, ``sslrec.frequency``). With mixed negatives the negatives are a pool of the
  B in-batch items (drawn by ``p``) and M uniform ones (``1 / N`` each), and every column of
  item ``j`` gets the log of ``j``'s expected count in that pool, ``B p_j + M / N`` (the
  in-batch-only value ``B p_j`` differs from ``p_j`` by a constant, which the softmax ignores).
  """
  ids = pairs["item_id"]
  b = ids.shape[0]
  if config.loss.logq_source == "streaming":
    freq = frequency.update(freq, ids, step, learning_rate=config.loss.frequency_learning_rate)
    log_p = lambda x: frequency.log_q(freq, x, b)  # noqa: E731
    pairs = {**pairs, "log_q": log_p(ids)}
  else:
    table = jnp.asarray(log_q_table, jnp.float32)
    log_p = lambda x: table[x]  # noqa: E731
  if config.loss.mixed_negatives:
    m, n = items["item_id"].shape[0], log_q_table.shape[0]
    uniform = jnp.float32(np.log(m / n))

    def pool(lp):
      return jnp.logaddexp(jnp.log(jnp.float32(b)) + lp, uniform)

    pairs = {**pairs, "log_q": pool(pairs["log_q"])}
    items = {**items, "log_q": pool(log_p(items["item_id"]))}
  return pairs, items, freq


def _clip(grads, max_norm: float):
  norm = optax.tree.norm(grads)
  if max_norm <= 0:
    return grads, norm
  scale = jnp.minimum(1.0, max_norm / (norm + 1e-12))
  return jax.tree.map(lambda g: g * scale, grads), norm


def train_step(
  state: TrainState,
  pairs,
  items,
  rng: Array,
  *,
  model,
  tx,
  config,
  mi,
  emb_opt=None,
  warmup: int | None = None,
  log_q_table=None,
  mesh=None,
) -> tuple[TrainState, dict]:
  """One optimisation step on a global pair batch and a global SSL item batch.

  Dense updates: gradients of every parameter, one optax update. Sparse updates (``emb_opt``):
  the rows the step's batches use are deduplicated and gathered (``sparse.Plan``), the loss is
  differentiated with respect to those rows, and the row-wise optimizer writes them back; every
  other parameter takes the optax update. With ``train.skip_nonfinite``, a step whose loss or
  gradient norm is not finite leaves the parameters and optimizer state as they were (only
  ``step`` advances). ``warmup``: the table rows' warmup steps (``warmup_steps``; None: the
  config's). ``log_q_table``: ``[N]`` the static per-item log sampling probability
  (``stats.log_q``; mixed negatives read it, and ``N`` from its length). ``mesh``: the step's
  mesh (needed by ``optimizer.embedding_routing='owner'``, ``sparse.RoutedPlan``).
  """
  freq = state.freq
  if config.loss.logq_source == "streaming" or config.loss.mixed_negatives:
    if log_q_table is None:
      raise ValueError("train_step: mixed negatives / streaming logQ need log_q_table")
    pairs, items, freq = sampling_log_q(
      freq, pairs, items, state.step, config=config, log_q_table=np.asarray(log_q_table)
    )
  step_rng = jax.random.fold_in(rng, state.step)
  query_rng = jax.random.fold_in(step_rng, 0x51)  # its own stream; the views' draws unchanged
  views = (
    make_views(step_rng, items, model=model, config=config, mi=mi) if config.ssl.alpha > 0 else None
  )
  query_mask = query_feature_mask(query_rng, pairs, model=model, config=config)
  calls = step_calls(pairs, items, views, model, config)
  oov = sum(embeddings.oov_count(c.spec, c.batch) for c in calls.all())
  loss = functools.partial(loss_fn, model=model, config=config, query_mask=query_mask)
  clip = config.optimizer.grad_clip_norm
  if emb_opt is None:
    (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(state.params, pairs, items, views)
    grads, metrics["grad_norm"] = _clip(grads, clip)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(
      step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
    )
  elif config.optimizer.embedding_routing == "owner":
    if mesh is None:
      raise ValueError("train_step: embedding_routing='owner' needs the mesh")
    dense, tables = sparse.split_tables(state.params, emb_opt.min_rows)
    plan = sparse.RoutedPlan(tables, calls.all(), mesh, config.optimizer.routing_capacity)
    grad_fn = jax.value_and_grad(functools.partial(loss, plan=plan), argnums=(0, 4), has_aux=True)
    (_, metrics), (dense_grads, row_grads) = grad_fn(
      dense, pairs, items, views, plan.gather(tables)
    )
    w = warmup_steps(config) if warmup is None else warmup
    warm = jnp.minimum(1.0, (state.step + 1) / max(w, 1))
    dense_sq = sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(dense_grads))
    tables, emb_state, norm = plan.apply(
      emb_opt,
      tables,
      state.emb_state,
      row_grads,
      state.step,
      lr_scale=warm,
      dense_sq_norm=dense_sq,
      max_norm=clip,
    )
    metrics["grad_norm"] = norm
    metrics["sparse/routing_overflow"] = plan.overflowed().astype(jnp.float32)
    if clip > 0:
      scale = jnp.minimum(1.0, clip / (norm + 1e-12))
      dense_grads = jax.tree.map(lambda g: g * scale, dense_grads)
    updates, opt_state = tx.update(dense_grads, state.opt_state, dense)
    new_state = state.replace(
      step=state.step + 1,
      params=sparse.merge_tables(optax.apply_updates(dense, updates), tables),
      opt_state=opt_state,
      emb_state=emb_state,
    )
  else:
    dense, tables = sparse.split_tables(state.params, emb_opt.min_rows)
    plan = sparse.Plan(tables, calls.all())
    grad_fn = jax.value_and_grad(functools.partial(loss, plan=plan), argnums=(0, 4), has_aux=True)
    (_, metrics), grads = grad_fn(dense, pairs, items, views, plan.gather(tables))
    (dense_grads, row_grads), metrics["grad_norm"] = _clip(grads, clip)
    updates, opt_state = tx.update(dense_grads, state.opt_state, dense)
    w = warmup_steps(config) if warmup is None else warmup
    warm = jnp.minimum(1.0, (state.step + 1) / max(w, 1))
    tables, emb_state = plan.apply(
      emb_opt, tables, state.emb_state, row_grads, state.step, lr_scale=warm
    )
    new_state = state.replace(
      step=state.step + 1,
      params=sparse.merge_tables(optax.apply_updates(dense, updates), tables),
      opt_state=opt_state,
      emb_state=emb_state,
    )
  if freq is not None:
    new_state = new_state.replace(freq=freq)
  metrics["data/oov_ids"] = oov.astype(jnp.float32)
  if config.train.skip_nonfinite:  # a non-finite loss or gradient: keep params and optimizer state
    ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    new_state = jax.tree.map(
      lambda new, old: jnp.where(ok, new, old), new_state, state.replace(step=new_state.step)
    )
  return new_state, metrics


def compile_train_step(
  model,
  tx,
  config,
  mi: np.ndarray,
  mesh,
  state_sharding,
  emb_opt=None,
  total_steps=None,
  log_q_table=None,
) -> Callable[..., tuple[TrainState, dict]]:
  """``train_step`` jit-compiled with explicit in/out shardings (state donated); ``total_steps``:
  the run's length, which caps the warmup (``warmup_steps``); ``log_q_table``: ``stats.log_q``
  (streaming logQ and mixed negatives)."""
  data = parallel.data_sharding(mesh)
  rep = parallel.replicated(mesh)
  step = functools.partial(
    train_step,
    model=model,
    tx=tx,
    config=config,
    mi=jnp.asarray(mi, jnp.float32),
    emb_opt=emb_opt,
    warmup=warmup_steps(config, total_steps),
    log_q_table=None if log_q_table is None else np.asarray(log_q_table, np.float32),
    mesh=mesh,
  )
  return jax.jit(
    step,
    in_shardings=(state_sharding, data, data, rep),
    out_shardings=(state_sharding, rep),
    donate_argnums=(0,),
  )
