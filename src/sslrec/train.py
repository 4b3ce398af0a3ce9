"""The train state, the pure train step, and the loop (checkpoints, metrics, evaluation).

    loss = L_main + alpha * L_self + reg.spread_out_weight * L_spread_out

``train_step(state, pair_batch, item_batch, rng) -> (state, metrics)`` is a pure function,
jit-compiled once with explicit shardings over the mesh (see ``compile_train_step``). The step's
randomness (the CFM seed feature, RFM split, value dropout) is ``fold_in(rng, state.step)``, so a
resumed run draws exactly what an uninterrupted run would.
"""

from __future__ import annotations

import functools
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
  step: Array
  params: PyTree
  opt_state: PyTree


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


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  oc = config.optimizer
  lr = optax.warmup_constant_schedule(0.0, oc.learning_rate, max(oc.warmup_steps, 1)) \
      if oc.warmup_steps > 0 else oc.learning_rate
  if oc.name == "adagrad":
    opt = optax.adagrad(lr, initial_accumulator_value=0.1)
  else:
    opt = optax.adam(lr)
  if oc.grad_clip_norm > 0:
    opt = optax.chain(optax.clip_by_global_norm(oc.grad_clip_norm), opt)
  return opt


def example_inputs(dataset, n: int = 2):
  """A tiny (query batch, item batch) from the dataset's first rows, for ``init``."""
  from sslrec.data import table as table_lib
  rows = np.arange(n)
  return table_lib.take(dataset.queries, rows), table_lib.take(dataset.items, rows)


def create_train_state(rng: Array, model: towers.TwoTower, tx: optax.GradientTransformation,
                       dataset) -> TrainState:
  query, item = example_inputs(dataset)
  params = model.init(rng, query, item)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def loss_fn(params, pairs, items, rng, *, model: towers.TwoTower, config, mi) -> tuple[Array, dict]:
  """The joint loss of one step and its parts."""
  q = model.apply(params, pairs["query"], method=model.query_tower)
  x = model.apply(params, pairs["item"], method=model.item_tower)
  main = losses.batch_softmax_loss(
      q, x, temperature=config.loss.temperature,
      log_q=pairs["log_q"] if config.loss.logq_correction else None,
      item_ids=pairs["item_id"] if config.loss.remove_accidental_hits else None)
  total = main
  metrics = {"loss/main": main}
  if config.ssl.alpha > 0:
    mask_rng, view_rng = jax.random.split(rng)
    k = model.item_spec.num_features
    mask = augment.make_mask(mask_rng, config.ssl.masking, k, mi=mi,
                             fraction=config.ssl.mask_fraction)
    v1, m1, v2, m2 = augment.two_views(view_rng, items["item"], model.item_spec, mask,
                                       config.ssl.dropout_rate)
    z1 = model.apply(params, v1, m1, method=model.ssl_encoder)
    z2 = model.apply(params, v2, m2, method=model.ssl_encoder)
    ssl = losses.ssl_loss(z1, z2, temperature=config.ssl.temperature)
    total = total + config.ssl.alpha * ssl
    metrics["loss/ssl"] = ssl
    metrics["ssl/masked_features"] = mask.sum().astype(jnp.float32)
  if config.reg.spread_out_weight > 0:
    e = model.apply(params, items["item"], method=model.item_tower)
    reg = losses.spread_out_loss(e)
    total = total + config.reg.spread_out_weight * reg
    metrics["loss/spread_out"] = reg
  metrics["loss"] = total
  return total, metrics


def train_step(state: TrainState, pairs, items, rng: Array, *, model, tx, config, mi
               ) -> tuple[TrainState, dict]:
  """One optimisation step on a global pair batch and a global SSL item batch."""
  step_rng = jax.random.fold_in(rng, state.step)
  grad_fn = jax.value_and_grad(
      functools.partial(loss_fn, model=model, config=config, mi=mi), has_aux=True)
  (_, metrics), grads = grad_fn(state.params, pairs, items, step_rng)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics["grad_norm"] = optax.tree.norm(grads)
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def compile_train_step(model, tx, config, mi: np.ndarray, mesh, state_sharding
                       ) -> Callable[..., tuple[TrainState, dict]]:
  """``train_step`` jit-compiled with explicit in/out shardings (state donated)."""
  from sslrec import parallel
  data = parallel.data_sharding(mesh)
  rep = parallel.replicated(mesh)
  step = functools.partial(train_step, model=model, tx=tx, config=config,
                           mi=jnp.asarray(mi, jnp.float32))
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

  def __init__(self, config: ml_collections.ConfigDict, devices=None):
    from sslrec import configuration, parallel
    from sslrec.data import pipeline, sources, stats
    configuration.validate(config)
    self.config = config
    self.dataset = sources.load(config).validate()
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
    init_rng, self.step_rng = jax.random.split(jax.random.key(config.seed))
    abstract = jax.eval_shape(
        lambda r: create_train_state(r, self.model, self.tx, self.dataset), init_rng)
    self.state_sharding = parallel.state_shardings(abstract, self.mesh)
    self.state = jax.jit(lambda r: create_train_state(r, self.model, self.tx, self.dataset),
                         out_shardings=self.state_sharding)(init_rng)
    self.step_fn = compile_train_step(self.model, self.tx, config, self.stats.mi, self.mesh,
                                      self.state_sharding)
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

  # Checkpoints: train state + both iterators' positions + config + corpus statistics.
  def checkpoint_args(self, save: bool):
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
    return ocp.args.Composite(**items)

  def restore(self, manager, step: int):
    restored = manager.restore(step, args=self.checkpoint_args(save=False))
    self.state = restored["state"]


def checkpoint_manager(workdir: str, config):
  import os
  import orbax.checkpoint as ocp
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.train.max_checkpoints, create=True))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_config_change: bool = False) -> dict[str, float]:
  """Trains (resuming from the workdir's latest checkpoint), evaluates; returns final eval."""
  import time
  from sslrec import configuration, evaluate as evaluate_lib, workdir as workdir_lib

  configuration.validate(config)
  is_main = jax.process_index() == 0
  workdir_lib.prepare(workdir, configuration.to_dict(config),
                      allow_config_change=allow_config_change, write=is_main)
  t0 = time.time()
  run = Run(config)
  d = run.dataset
  _log(f"data: {d.name}: {d.num_items} items ({d.item_spec.num_features} features), "
       f"{d.num_train} train pairs, {d.num_eval} eval pairs; built in {time.time() - t0:.1f}s; "
       f"mesh {dict(run.mesh.shape)}")
  manager = checkpoint_manager(workdir, config)
  writer = workdir_lib.MetricsWriter(workdir, enabled=is_main)
  start = 0
  if manager.latest_step() is not None:
    start = int(manager.latest_step())
    run.restore(manager, start)
    _log(f"resumed from checkpoint at step {start}")
  num_steps = config.train.num_steps
  tc = config.train
  last_eval = None
  acc, acc_n = None, 0
  t_window, n_window = time.time(), 0
  t_start = time.time()
  try:
    for step in range(start + 1, num_steps + 1):
      metrics = run.step()
      acc = metrics if acc is None else jax.tree.map(jnp.add, acc, metrics)
      acc_n += 1
      n_window += 1
      if step % tc.log_every == 0 or step == num_steps:
        scalars = {k: float(v) / acc_n for k, v in jax.device_get(acc).items()}
        dt = time.time() - t_window
        scalars["examples_per_sec"] = n_window * tc.batch_size / max(dt, 1e-9)
        scalars["steps_per_sec"] = n_window / max(dt, 1e-9)
        if not all(np.isfinite(v) for v in scalars.values()):
          raise FloatingPointError(f"non-finite metrics at step {step}: {scalars}")
        writer.write("metrics.jsonl", step, scalars)
        eta = (num_steps - step) / max(scalars["steps_per_sec"], 1e-9)
        parts = ", ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in sorted(scalars.items())
                          if k.startswith("loss/"))
        _log(f"step {step}/{num_steps} | loss {scalars['loss']:.4f} ({parts}) | "
             f"{scalars['examples_per_sec']:,.0f} ex/s | eta {_fmt_duration(eta)}")
        acc, acc_n = None, 0
        t_window, n_window = time.time(), 0
      if step % tc.eval_every == 0 or step == num_steps:
        last_eval = run.evaluate()
        writer.write("eval.jsonl", step, last_eval)
        _log(f"eval step {step}: " + ", ".join(
            f"{k} {last_eval[k]:.4f}" for k in (f"recall@{kk}" for kk in config.eval.ks)))
        t_window = time.time()
      if step % tc.checkpoint_every == 0 or step == num_steps:
        manager.save(step, args=run.checkpoint_args(save=True))
        t_window = time.time()
    if last_eval is None:  # resumed at or past the end: evaluate the restored model
      last_eval = run.evaluate()
    manager.wait_until_finished()
  finally:
    manager.close()
    writer.close()
  _log(f"done: {num_steps - start} steps in {_fmt_duration(time.time() - t_start)}\n"
       + evaluate_lib.format_table(last_eval, config.eval.ks))
  return last_eval
