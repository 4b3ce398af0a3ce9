"""The train state, the pure train step, and the loop (checkpoints, metrics, evaluation).

    loss = L_main + alpha * L_self + reg.spread_out_weight * L_spread_out

``train_step(state, pair_batch, item_batch, rng) -> (state, metrics)`` is a pure function,
jit-compiled once with explicit shardings over the mesh (see ``compile_train_step``). The step's
randomness (the CFM seed feature, RFM split, value dropout) is ``fold_in(rng, state.step)``, so a
resumed run draws exactly what an uninterrupted run would.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sslrec import losses
from sslrec.model import augment
from sslrec.model import towers

Array = jax.Array
PyTree = Any


@flax.struct.dataclass
class TrainState:
  """``params``: the model's parameters; ``opt_state``: the optax state of the parameters it
  updates (all of them, or all but the embedding tables with sparse updates); ``emb_state``:
  the row-wise optimizer state of each table (``{"<scope>/<table>": ...}``, sparse updates)."""

  step: Array
  params: PyTree
  opt_state: PyTree
  emb_state: PyTree = None


def create_model(config: ml_collections.ConfigDict, dataset) -> towers.TwoTower:
  return towers.TwoTower(
      query_spec=dataset.query_spec,
      item_spec=dataset.item_spec,
      query_hidden=tuple(config.model.query_hidden),
      item_hidden=tuple(config.model.item_hidden),
      output_dim=config.model.output_dim,
      ssl_sharing=config.ssl.encoder_sharing,
      dtype=jnp.dtype(config.model.dtype),
      table_row_multiple=config.model.table_row_multiple,
  )


def learning_rate(config) -> optax.Schedule:
  oc = config.optimizer
  if oc.warmup_steps > 0:
    return optax.warmup_constant_schedule(0.0, oc.learning_rate, oc.warmup_steps)
  return optax.constant_schedule(oc.learning_rate)


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The optax optimizer of the dense parameters (and of the tables with dense updates)."""
  oc = config.optimizer
  if oc.name == "adagrad":
    return optax.adagrad(learning_rate(config), initial_accumulator_value=0.1)
  return optax.adam(learning_rate(config))


def create_embedding_optimizer(config: ml_collections.ConfigDict):
  """The row-wise optimizer of the tables with sparse updates, or None with dense updates."""
  from sslrec import sparse
  oc = config.optimizer
  if oc.embedding_update != "sparse":
    return None
  return sparse.make_optimizer(oc.embedding_optimizer, oc.embedding_learning_rate,
                               min_rows=oc.sparse_min_rows)


def split_tables(params, min_rows: int = 0) -> tuple[dict, dict]:
  """``(dense, tables)``: params without the embedding tables of at least ``min_rows`` rows, and
  those tables as ``{(scope, name): table}``. Smaller tables stay with the dense parameters (a
  sparse update does not pay for a table a batch touches most of anyway)."""
  from flax import traverse_util
  flat = traverse_util.flatten_dict(params)
  is_sparse = lambda k, v: k[-1].endswith("_table") and v.shape[0] >= min_rows  # noqa: E731
  tables = {(k[-2], k[-1]): v for k, v in flat.items() if is_sparse(k, v)}
  dense = traverse_util.unflatten_dict({k: v for k, v in flat.items() if not is_sparse(k, v)})
  return dense, tables


def merge_tables(dense, tables) -> dict:
  from flax import traverse_util
  flat = traverse_util.flatten_dict(dense)
  for (scope, name), v in tables.items():
    flat[("params", scope, name)] = v
  return traverse_util.unflatten_dict(flat)


def example_inputs(dataset, n: int = 2):
  """A tiny (query batch, item batch) from the dataset's first rows, for ``init``."""
  from sslrec.data import table as table_lib
  rows = np.arange(n)
  return table_lib.take(dataset.queries, rows), table_lib.take(dataset.items, rows)


def create_train_state(rng: Array, model: towers.TwoTower, tx: optax.GradientTransformation,
                       dataset, emb_opt=None) -> TrainState:
  query, item = example_inputs(dataset)
  params = model.init(rng, query, item)
  if emb_opt is None:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  dense, tables = split_tables(params, emb_opt.min_rows)
  emb_state = {f"{scope}/{name}": emb_opt.init(t) for (scope, name), t in tables.items()}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(dense),
                    emb_state=emb_state)


def make_views(rng, items, *, model, config, mi):
  """The two augmented views of the SSL item batch: ``(v1, m1, v2, m2, mask)``."""
  mask_rng, view_rng = jax.random.split(rng)
  k = model.item_spec.num_features
  mask = augment.make_mask(mask_rng, config.ssl.masking, k, mi=mi,
                           fraction=config.ssl.mask_fraction)
  v1, m1, v2, m2 = augment.two_views(view_rng, items["item"], model.item_spec, mask,
                                     config.ssl.dropout_rate)
  return v1, m1, v2, m2, mask


def loss_fn(params, pairs, items, views, rows=None, *, model: towers.TwoTower, config,
            local_ids=None) -> tuple[Array, dict]:
  """The joint loss of one step and its parts.

  ``views``: ``make_views``'s output (SSL on) or None. Sparse updates: ``rows``
  ``{(scope, table): [U, D]}`` gathered table rows and ``local_ids`` ``{call: {table: ids}}``
  positions into them, per model call ('pq', 'pi', 'v1', 'v2', 'si'); the params then hold no
  tables. Dense updates: both None.
  """
  def ids(call, scope):
    if rows is None:
      return None
    return {t: (loc, rows[(scope, t)]) for t, loc in local_ids[call].items()}

  item_scope, query_scope = "item_input", model.query_input_name
  q = model.apply(params, pairs["query"], ids=ids("pq", query_scope), method=model.query_tower)
  x = model.apply(params, pairs["item"], ids=ids("pi", item_scope), method=model.item_tower)
  main = losses.batch_softmax_loss(
      q, x, temperature=config.loss.temperature,
      log_q=pairs["log_q"] if config.loss.logq_correction else None,
      item_ids=pairs["item_id"] if config.loss.remove_accidental_hits else None)
  total = main
  metrics = {"loss/main": main}
  if config.ssl.alpha > 0:
    # Both views in one encoder pass of 2N rows (per-row feature masks): half the dispatches.
    v1, m1, v2, m2, mask = views
    n = jax.tree.leaves(v1)[0].shape[0]
    both = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), v1, v2)
    rows_mask = jnp.concatenate([jnp.broadcast_to(m1, (n,) + m1.shape),
                                 jnp.broadcast_to(m2, (n,) + m2.shape)], axis=0)
    both_ids = None
    if rows is not None:
      i1, i2 = ids("v1", item_scope), ids("v2", item_scope)
      both_ids = {t: (jnp.concatenate([i1[t][0], i2[t][0]], axis=0), i1[t][1]) for t in i1}
    z = model.apply(params, both, rows_mask, ids=both_ids, method=model.ssl_encoder)
    z1, z2 = z[:n], z[n:]
    ssl = losses.ssl_loss(z1, z2, temperature=config.ssl.temperature)
    total = total + config.ssl.alpha * ssl
    metrics["loss/ssl"] = ssl
    metrics["ssl/masked_features"] = mask.sum().astype(jnp.float32)
  if config.reg.spread_out_weight > 0:
    e = model.apply(params, items["item"], ids=ids("si", item_scope), method=model.item_tower)
    reg = losses.spread_out_loss(e)
    total = total + config.reg.spread_out_weight * reg
    metrics["loss/spread_out"] = reg
  metrics["loss"] = total
  return total, metrics


def _model_batches(pairs, items, views, model, config) -> dict:
  """``{call name: (tower batch, input scope, spec)}`` of every model call of the step."""
  out = {"pq": (pairs["query"], model.query_input_name,
                model.item_spec if model.shares_item_tables else model.query_spec),
         "pi": (pairs["item"], "item_input", model.item_spec)}
  if views is not None:
    out["v1"] = (views[0], "item_input", model.item_spec)
    out["v2"] = (views[2], "item_input", model.item_spec)
  if config.reg.spread_out_weight > 0:
    out["si"] = (items["item"], "item_input", model.item_spec)
  return out


def _clip(grads, max_norm: float):
  norm = optax.tree.norm(grads)
  if max_norm <= 0:
    return grads, norm
  scale = jnp.minimum(1.0, max_norm / (norm + 1e-12))
  return jax.tree.map(lambda g: g * scale, grads), norm


def train_step(state: TrainState, pairs, items, rng: Array, *, model, tx, config, mi,
               emb_opt=None) -> tuple[TrainState, dict]:
  """One optimisation step on a global pair batch and a global SSL item batch.

  Dense updates: gradients of every parameter, one optax update. Sparse updates (``emb_opt``):
  per table, the rows the step's batches use are deduplicated and gathered, the loss is
  differentiated with respect to those rows, and the row-wise optimizer writes them back
  (``sparse.py``); every other parameter takes the optax update. With
  ``train.skip_nonfinite``, a step whose loss or gradient norm is not finite leaves the
  parameters and optimizer state as they were (only ``step`` advances).
  """
  from sslrec import sparse
  from sslrec.model import embeddings
  step_rng = jax.random.fold_in(rng, state.step)
  views = make_views(step_rng, items, model=model, config=config, mi=mi) \
      if config.ssl.alpha > 0 else None
  calls = _model_batches(pairs, items, views, model, config)
  oov = sum(embeddings.oov_count(spec, batch) for batch, _, spec in calls.values())
  grad_fn = jax.value_and_grad(functools.partial(loss_fn, model=model, config=config),
                               has_aux=True)
  if emb_opt is None:
    (_, metrics), grads = grad_fn(state.params, pairs, items, views)
    grads, metrics["grad_norm"] = _clip(grads, config.optimizer.grad_clip_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state)
  else:
    dense, tables = split_tables(state.params, emb_opt.min_rows)
    # The SSL views hold the SSL items' ids with some values dropped (-1): they reuse the
    # positions of the SSL item batch ('si') instead of being deduplicated again.
    dedupe_calls = dict(calls)
    if views is not None:
      dedupe_calls.pop("v1"), dedupe_calls.pop("v2")
      dedupe_calls["si"] = (items["item"], "item_input", model.item_spec)
    raw = {name: embeddings.all_table_ids(spec, batch)
           for name, (batch, _, spec) in dedupe_calls.items()}
    view_raw = {v: embeddings.all_table_ids(model.item_spec, calls[v][0])
                for v in ("v1", "v2") if v in calls}
    local_ids = {name: {} for name in set(calls) | set(dedupe_calls)}
    uniqs, gathered = {}, {}
    for (scope, tname), table in tables.items():
      users = [n for n, (_, sc, _) in dedupe_calls.items() if sc == scope and tname in raw[n]]
      if not users:
        continue
      uniq, locs = sparse.dedupe([raw[n][tname] for n in users], table.shape[0])
      for n, loc in zip(users, locs):
        local_ids[n][tname] = loc
      for v, vr in view_raw.items():
        if scope == "item_input" and tname in vr:
          local_ids[v][tname] = jnp.where(vr[tname] >= 0, local_ids["si"][tname], -1)
      uniqs[(scope, tname)] = uniq
      gathered[(scope, tname)] = sparse.gather_rows(table, uniq)
    grad_fn = jax.value_and_grad(
        functools.partial(loss_fn, model=model, config=config, local_ids=local_ids),
        argnums=(0, 4), has_aux=True)
    (_, metrics), grads = grad_fn(dense, pairs, items, views, gathered)
    (dense_grads, row_grads), metrics["grad_norm"] = _clip(grads, config.optimizer.grad_clip_norm)
    updates, opt_state = tx.update(dense_grads, state.opt_state, dense)
    dense = optax.apply_updates(dense, updates)
    warm = jnp.minimum(1.0, (state.step + 1) / max(config.optimizer.warmup_steps, 1))
    new_tables, emb_state = dict(tables), dict(state.emb_state)
    for key, uniq in uniqs.items():
      skey = f"{key[0]}/{key[1]}"
      new_tables[key], emb_state[skey] = emb_opt.update(
          tables[key], state.emb_state[skey], uniq, row_grads[key] * warm, state.step)
    new_state = state.replace(step=state.step + 1, params=merge_tables(dense, new_tables),
                              opt_state=opt_state, emb_state=emb_state)
  metrics["data/oov_ids"] = oov.astype(jnp.float32)
  if config.train.skip_nonfinite:  # a non-finite loss or gradient: keep params and optimizer state
    ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state,
                             state.replace(step=new_state.step))
  return new_state, metrics


def compile_train_step(model, tx, config, mi: np.ndarray, mesh, state_sharding, emb_opt=None
                       ) -> Callable[..., tuple[TrainState, dict]]:
  """``train_step`` jit-compiled with explicit in/out shardings (state donated)."""
  from sslrec import parallel
  data = parallel.data_sharding(mesh)
  rep = parallel.replicated(mesh)
  step = functools.partial(train_step, model=model, tx=tx, config=config,
                           mi=jnp.asarray(mi, jnp.float32), emb_opt=emb_opt)
  return jax.jit(step, in_shardings=(state_sharding, data, data, rep),
                 out_shardings=(state_sharding, rep), donate_argnums=(0,))


# ----------------------------------------------------------------------------------------------
# The loop: side effects (data, checkpoints, metrics files) live here, outside the pure step.


def _log(msg: str):
  if jax.process_index() == 0:
    print(msg, flush=True)


def _fmt_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def stream_seeds(seed: int) -> tuple[int, int]:
  """Independent shuffle seeds for the pair stream and the item stream."""
  a, b = np.random.SeedSequence(seed).generate_state(2)
  return int(a), int(b)


class Run:
  """Everything ``train_and_evaluate`` builds before the first step (also used by tests/bench)."""

  def __init__(self, config: ml_collections.ConfigDict, devices=None, dataset=None):
    from sslrec import configuration, parallel
    from sslrec.data import pipeline, sources, stats
    configuration.validate(config)
    self.config = config
    self.dataset = (sources.load(config) if dataset is None else dataset).validate()
    configuration.validate_against_data(
        config, num_items=self.dataset.num_items, num_train=self.dataset.num_train,
        item_feature_names=self.dataset.item_spec.names)
    self.stats = stats.corpus_stats(self.dataset, head_fraction=config.eval.head_fraction)
    self.mesh = parallel.make_mesh(config.mesh.shape, config.mesh.axes, devices)
    parallel.check_table_rows(self.mesh, config.model.table_row_multiple)
    pair_bs = parallel.local_batch_size(config.train.batch_size, self.mesh, "train.batch_size")
    self.uses_items = config.ssl.alpha > 0 or config.reg.spread_out_weight > 0
    pair_seed, item_seed = stream_seeds(config.seed)
    shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count(),
                 num_threads=config.data.num_threads, prefetch=config.data.prefetch)
    self.pair_data = pipeline.pair_stream(self.dataset, self.stats.log_q, batch_size=pair_bs,
                                          seed=pair_seed, **shard)
    self.item_data = None
    if self.uses_items:
      item_bs = parallel.local_batch_size(config.ssl.batch_size, self.mesh, "ssl.batch_size")
      self.item_data = pipeline.item_stream(self.dataset, sampling=config.ssl.item_sampling,
                                            batch_size=item_bs, seed=item_seed, **shard)
    self.model = create_model(config, self.dataset)
    self.tx = create_optimizer(config)
    self.emb_opt = create_embedding_optimizer(config)
    init_rng, self.step_rng = jax.random.split(jax.random.key(config.seed))
    init = lambda r: create_train_state(r, self.model, self.tx, self.dataset, self.emb_opt)  # noqa: E731
    abstract = jax.eval_shape(init, init_rng)
    parallel.check_memory(abstract, self.mesh, dense_update=self.emb_opt is None)
    self.state_sharding = parallel.state_shardings(abstract, self.mesh)
    self.state = jax.jit(init, out_shardings=self.state_sharding)(init_rng)
    self.step_fn = compile_train_step(self.model, self.tx, config, self.stats.mi, self.mesh,
                                      self.state_sharding, self.emb_opt)
    self.pair_iter = iter(self.pair_data)
    self.item_iter = iter(self.item_data) if self.item_data is not None else None

  def next_batches(self):
    from sslrec import parallel
    pairs = parallel.to_global(next(self.pair_iter), self.mesh)
    items = None
    if self.item_iter is not None:
      items = parallel.to_global(next(self.item_iter), self.mesh)
    return pairs, items

  def step(self):
    pairs, items = self.next_batches()
    if items is None:  # the step ignores items; keep the signature fixed
      items = {"item": pairs["item"], "item_id": pairs["item_id"]}
    self.state, metrics = self.step_fn(self.state, pairs, items, self.step_rng)
    return metrics

  def evaluate(self) -> dict[str, float]:
    from sslrec import evaluate as evaluate_lib
    c = self.config
    return evaluate_lib.evaluate(self.state.params, self.model, self.dataset,
                                 self.stats.item_freq, self.stats.head, mesh=self.mesh,
                                 ks=c.eval.ks,
                                 batch_size=c.eval.batch_size, max_pairs=c.eval.max_queries)

  # Checkpoints: train state + both iterators' positions + config + corpus statistics + the loop's
  # metric sums since the last logged line (so a resumed run logs what an uninterrupted one would).
  def checkpoint_args(self, save: bool, loop: dict | None = None, restore_loop: bool = False):
    import grain
    import orbax.checkpoint as ocp
    from sslrec import configuration
    it = grain.checkpoint.CheckpointSave if save else grain.checkpoint.CheckpointRestore
    st = ocp.args.StandardSave if save else ocp.args.StandardRestore
    items = {"state": st(self.state), "pair_iter": it(self.pair_iter)}
    if self.item_iter is not None:
      items["item_iter"] = it(self.item_iter)
    if save:
      items["config"] = ocp.args.JsonSave(configuration.to_dict(self.config))
      items["stats"] = ocp.args.StandardSave({"mi": np.asarray(self.stats.mi),
                                              "item_freq": np.asarray(self.stats.item_freq)})
      if loop is not None:
        items["loop"] = ocp.args.JsonSave(loop)
    elif restore_loop:
      items["loop"] = ocp.args.JsonRestore()
    return ocp.args.Composite(**items)

  def restore(self, manager, step: int) -> dict:
    """Restores checkpoint ``step`` (state and both streams' positions); returns its loop record
    (``{}`` for checkpoints without one). Raises ``checkpointing.CheckpointMismatch`` when the
    saved state does not have this run's structure and shapes."""
    from sslrec.run import checkpointing
    has_loop = os.path.isdir(os.path.join(str(manager.directory), str(step), "loop"))
    restored = manager.restore(step, args=self.checkpoint_args(save=False, restore_loop=has_loop))
    want = jax.tree_util.tree_structure(self.state)
    got = jax.tree_util.tree_structure(restored["state"])
    if want != got:
      raise checkpointing.CheckpointMismatch("the saved train state has another structure")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(self.state),
                            jax.tree_util.tree_leaves(restored["state"])):
      if a.shape != b.shape or a.dtype != b.dtype:
        raise checkpointing.CheckpointMismatch(
            f"{jax.tree_util.keystr(path)}: saved {b.dtype}{list(b.shape)}, this run "
            f"{a.dtype}{list(a.shape)}")
    self.state = restored["state"]
    return dict(restored["loop"]) if has_loop else {}


def checkpoint_manager(workdir: str, config):
  from sslrec.run import checkpointing
  return checkpointing.manager(workdir, config)


def batch_ids(dataset, config, step: int) -> dict[str, np.ndarray]:
  """The rows of the global batches of ``step`` (1-based; both streams advance once per step):
  ``pair_rows`` (D_train), ``query_rows``, ``item_ids``, ``ssl_item_ids`` (SSL / spread-out on)
  and, when the data has them, ``item_keys`` / ``ssl_item_keys`` (the items' original keys)."""
  from sslrec.data import pipeline
  d, c = dataset, config
  pair_seed, item_seed = stream_seeds(c.seed)
  rows = pipeline.EpochBatches(d.num_train, c.train.batch_size, pair_seed)[step - 1]
  out = {"pair_rows": rows, "query_rows": d.train_query[rows], "item_ids": d.train_item[rows]}
  if c.ssl.alpha > 0 or c.reg.spread_out_weight > 0:
    pool = pipeline.item_pool(d, c.ssl.item_sampling)
    out["ssl_item_ids"] = pool[pipeline.EpochBatches(len(pool), c.ssl.batch_size,
                                                     item_seed)[step - 1]]
  if d.item_keys is not None:
    keys = np.asarray(d.item_keys)
    out["item_keys"] = keys[out["item_ids"]]
    if "ssl_item_ids" in out:
      out["ssl_item_keys"] = keys[out["ssl_item_ids"]]
  return out


class _Window:
  """The steps since the last finiteness check, and the host sums of the metrics since the last
  logged line. Each step's metrics stay on device until a check (no per-step sync)."""

  def __init__(self, loop: dict):
    self.pending: list[tuple[int, dict]] = []
    self.sums: dict[str, float] = dict(loop.get("sums", {}))
    self.count = int(loop.get("count", 0))  # finite steps in the sums
    self.skipped = int(loop.get("skipped", 0))  # all steps skipped so far (skip_nonfinite)

  def add(self, step: int, metrics: dict):
    self.pending.append((step, metrics))

  def check(self) -> list[tuple[int, dict]]:
    """Moves the pending steps into the sums; returns the non-finite ones (step, scalars)."""
    values = jax.device_get([m for _, m in self.pending])
    bad = []
    for (step, _), m in zip(self.pending, values):
      m = {k: float(v) for k, v in m.items()}
      if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
        bad.append((step, m))
        continue
      for k, v in m.items():
        self.sums[k] = self.sums.get(k, 0.0) + v
      self.count += 1
    self.pending = []
    return bad

  def means(self) -> dict[str, float]:
    out = {k: v / self.count if self.count else float("nan") for k, v in self.sums.items()}
    self.sums, self.count = {}, 0
    return out

  def state(self) -> dict:
    return {"sums": dict(self.sums), "count": self.count, "skipped": self.skipped}


def _handle_nonfinite(run: Run, bad, window: _Window, *, workdir: str, last_saved, skip: bool,
                      is_main: bool):
  """Stops the run on the first non-finite step (NonFiniteError), or, with
  ``train.skip_nonfinite``, counts and reports the skipped steps."""
  from sslrec.run import reliability
  max_reports = 10  # skipped steps whose batch ids are written
  for step, scalars in bad:
    path = os.path.join(workdir, f"nonfinite_step_{step}.json")
    write = is_main and (not skip or window.skipped < max_reports)
    if write:
      reliability.write_nonfinite_report(workdir, step, scalars,
                                         batch_ids(run.dataset, run.config, step), last_saved)
    if not skip:
      kept = (f"checkpoint {last_saved} is the last good one" if last_saved
              else "no checkpoint was saved before it")
      raise reliability.NonFiniteError(
          f"non-finite loss or gradient at step {step} ({reliability.format_parts(scalars)}); "
          f"stopped, {kept}; the batch's ids are in {path}. Lower optimizer.learning_rate, "
          "or set train.skip_nonfinite=True to skip such steps")
    window.skipped += 1
    _log(f"step {step}: non-finite loss or gradient ({reliability.format_parts(scalars)}); "
         f"update skipped ({window.skipped} so far)" + (f"; batch ids in {path}" if write else ""))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_config_change: bool = False) -> dict[str, float]:
  """Trains (resuming from the workdir's latest good checkpoint), evaluates; returns final eval.

  SIGTERM / SIGINT: saves a checkpoint at the next step boundary (the same on every process) and
  raises ``reliability.Stopped``. A non-finite loss or gradient raises
  ``reliability.NonFiniteError`` (or, with ``train.skip_nonfinite``, the step's update is skipped).
  """
  from sslrec import configuration
  from sslrec.run import reliability
  from sslrec.run import workdir as workdir_lib

  configuration.validate(config)
  # Checks only: config.json is written once the data has loaded (a run that fails on its data
  # leaves no config behind that a corrected rerun would be compared against).
  workdir_lib.prepare(workdir, configuration.to_dict(config),
                      allow_config_change=allow_config_change)
  workdir_lib.check_free_space(workdir, 0, 0)  # a full disk, before the data is even loaded
  stop = reliability.StopRequest()  # from here on, SIGTERM / SIGINT wait for a step boundary
  try:
    return _train(config, workdir, stop)
  finally:
    stop.close()


def _train(config, workdir: str, stop) -> dict[str, float]:
  import time
  from sslrec import configuration, evaluate as evaluate_lib
  from sslrec.run import checkpointing
  from sslrec.run import reliability
  from sslrec.run import workdir as workdir_lib
  is_main = jax.process_index() == 0
  t0 = time.time()
  run = Run(config)
  d = run.dataset
  _log(f"data: {d.name}: {d.num_items} items ({d.item_spec.num_features} features), "
       f"{d.num_train} train pairs, {d.num_eval} eval pairs; built in {time.time() - t0:.1f}s; "
       f"mesh {dict(run.mesh.shape)}")
  if is_main:
    workdir_lib.save_config(workdir, configuration.to_dict(config))
  space = workdir_lib.check_free_space(
      workdir, checkpointing.estimate_bytes((run.state, run.stats.mi, run.stats.item_freq)),
      config.train.max_checkpoints)
  if space:
    _log(space)
  stop.bind(run.mesh)
  manager = checkpoint_manager(workdir, config)
  sealer = checkpointing.Sealer(manager, enabled=is_main)
  writer = None
  try:
    resumed = checkpointing.restore_latest(manager, lambda step: run.restore(manager, step),
                                           workdir=workdir, log=_log)
    start, loop = resumed if resumed is not None else (0, {})
    if resumed is not None:
      _log(f"resumed from checkpoint at step {start}")
    if is_main:
      dropped = workdir_lib.truncate_logs(workdir, start)
      if dropped:
        _log(f"dropped {dropped} metrics / eval lines the interrupted run wrote after step "
             f"{start}")
    writer = workdir_lib.MetricsWriter(workdir, enabled=is_main, purge_step=start + 1)
    num_steps = config.train.num_steps
    tc = config.train
    last_eval = None
    last_saved = start if resumed is not None else None
    window = _Window(loop)
    kill_at = reliability.kill_step()
    t_window, n_window = time.time(), 0
    t_start = time.time()
    for step in range(start + 1, num_steps + 1):
      window.add(step, run.step())
      n_window += 1
      sealer.flush_if_done()
      stopping = stop.should_stop(step) and step < num_steps
      log_now = step % tc.log_every == 0 or step == num_steps
      eval_now = (step % tc.eval_every == 0 and not stopping) or step == num_steps
      save_now = step % tc.checkpoint_every == 0 or step == num_steps or stopping
      if log_now or eval_now or save_now:  # never log, evaluate or save a non-finite state
        bad = window.check()
        if bad:
          _handle_nonfinite(run, bad, window, workdir=workdir, last_saved=last_saved,
                            skip=tc.skip_nonfinite, is_main=is_main)
      if log_now:
        scalars = window.means()
        if tc.skip_nonfinite:
          scalars["skipped_steps"] = window.skipped
        dt = time.time() - t_window
        scalars["examples_per_sec"] = n_window * tc.batch_size / max(dt, 1e-9)
        scalars["steps_per_sec"] = n_window / max(dt, 1e-9)
        writer.write("metrics.jsonl", step, scalars)
        eta = (num_steps - step) / max(scalars["steps_per_sec"], 1e-9)
        parts = ", ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in sorted(scalars.items())
                          if k.startswith("loss/"))
        skipped = f" | {window.skipped} skipped" if window.skipped else ""
        _log(f"step {step}/{num_steps} | loss {scalars.get('loss', float('nan')):.4f} "
             f"({parts}) | {scalars['examples_per_sec']:,.0f} ex/s | eta {_fmt_duration(eta)}"
             f"{skipped}")
        t_window, n_window = time.time(), 0
      if eval_now:
        last_eval = run.evaluate()
        writer.write("eval.jsonl", step, last_eval)
        _log(f"eval step {step}: " + ", ".join(
            f"{k} {last_eval[k]:.4f}" for k in (f"recall@{kk}" for kk in config.eval.ks)))
        t_window = time.time()
      if save_now:
        manager.save(step, args=run.checkpoint_args(save=True, loop=window.state()))
        sealer.saved(step)
        last_saved = step
        t_window = time.time()
      if step == kill_at:
        reliability.kill_now()
      if stopping:
        sealer.flush()
        raise reliability.Stopped(step, stop.signal_name,
                                  os.path.join(checkpointing.directory(workdir), str(step)))
    if last_eval is None:  # resumed at or past the end: evaluate the restored model
      last_eval = run.evaluate()
  finally:
    try:
      sealer.flush()  # an in-flight save completes (and is sealed) whatever stopped the loop
    finally:
      manager.close()
      if writer is not None:
        writer.close()
  _log(f"done: {num_steps - start} steps in {_fmt_duration(time.time() - t_start)}\n"
       + evaluate_lib.format_table(last_eval, config.eval.ks))
  return last_eval
