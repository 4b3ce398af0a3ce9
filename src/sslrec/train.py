"""How the loop runs: ``Run`` (everything built before the first step), the metric window,
non-finite handling, and ``train_and_evaluate`` (checkpoints, metrics, evaluation).

What is trained (the state, the loss, the pure step) is ``step.py``; side effects (data,
checkpoints, metrics files) live here, outside the pure step.
"""

from __future__ import annotations

import os
import time

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from sslrec import configuration, parallel, sparse, tracking
from sslrec import evaluate as evaluate_lib
from sslrec import step as step_lib
from sslrec.data import device_input, pipeline, sources, stats
from sslrec.data import table as table_lib
from sslrec.model import augment
from sslrec.run import checkpointing, reliability
from sslrec.run import workdir as workdir_lib


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
    configuration.validate(config)
    self.config = config
    self._fingerprint = None
    self.dataset = (sources.load(config) if dataset is None else dataset).validate()
    configuration.validate_against_data(
      config,
      num_items=self.dataset.num_items,
      num_train=self.dataset.num_train,
      item_feature_names=self.dataset.item_spec.names,
      feature_groups=self.dataset.item_spec.groups,
    )
    if self.dataset.valid_item is None:
      raise table_lib.DataError(
        f"{self.dataset.name}: no validation split (periodic evaluations, checkpoint selection "
        "and early stopping run on it; the test split is scored once, at the end)"
      )
    self.num_steps = configuration.num_steps(config, self.dataset.num_train)
    self.eval_every = configuration.eval_interval(config, self.dataset.num_train)
    self.stats = stats.corpus_stats(
      self.dataset,
      head_fraction=config.eval.head_fraction,
      mi_estimator=config.ssl.mi_estimator,
      rank_ids=config.ssl.rank_ids,
    )
    self.mesh = parallel.make_mesh(config.mesh.shape, config.mesh.axes, devices)
    parallel.check_table_rows(self.mesh, config.model.table_row_multiple)
    if (
      config.optimizer.embedding_update == "sparse"
      and config.optimizer.embedding_routing == "owner"
    ):
      sparse.check_routable(self.mesh)
    pair_bs = parallel.local_batch_size(config.train.batch_size, self.mesh, "train.batch_size")
    self.uses_items = step_lib.uses_item_stream(config)
    pair_seed, item_seed = stream_seeds(config.seed)
    shard = dict(
      shard_index=jax.process_index(),
      shard_count=jax.process_count(),
      num_threads=config.data.num_threads,
      prefetch=config.data.prefetch,
    )
    self.pair_data = pipeline.pair_stream(
      self.dataset, self.stats.log_q, batch_size=pair_bs, seed=pair_seed, **shard
    )
    self.item_data = None
    if self.uses_items:
      item_bs = parallel.local_batch_size(config.ssl.batch_size, self.mesh, "ssl.batch_size")
      self.item_data = pipeline.item_stream(
        self.dataset, sampling=config.ssl.item_sampling, batch_size=item_bs, seed=item_seed, **shard
      )
    self.model = step_lib.create_model(config, self.dataset)
    self.tx = step_lib.create_optimizer(config, self.num_steps)
    self.emb_opt = step_lib.create_embedding_optimizer(config)
    init_rng, self.step_rng = jax.random.split(jax.random.key(config.seed))
    init = lambda r: step_lib.create_train_state(  # noqa: E731
      r, self.model, self.tx, self.dataset, self.emb_opt, config
    )
    abstract = jax.eval_shape(init, init_rng)
    rep = config.model.replicate_table_rows
    parallel.check_memory(
      abstract, self.mesh, dense_update=self.emb_opt is None, replicate_rows=rep
    )
    self.state_sharding = parallel.state_shardings(abstract, self.mesh, rep)
    self.state = jax.jit(init, out_shardings=self.state_sharding)(init_rng)
    self.step_fn = step_lib.compile_train_step(
      self.model,
      self.tx,
      config,
      self.stats.mi,
      self.mesh,
      self.state_sharding,
      self.emb_opt,
      total_steps=self.num_steps,
      log_q_table=self.stats.log_q,
    )
    self.pair_iter = iter(self.pair_data)
    self.item_iter = iter(self.item_data) if self.item_data is not None else None
    self._input = None  # device_input.DeviceInput, started by the first step()
    self._evaluators: dict[str, evaluate_lib.Evaluator] = {}

  def mask_summary(self, draws: int = 4000) -> str:
    """One line on what the SSL masking draws on this data (printed before training): distinct
    masks, how often the declared groups stay whole, each feature's masking frequency."""
    c, spec = self.config, self.dataset.item_spec
    s = augment.mask_statistics(
      c.ssl.masking,
      spec.num_features,
      mi=self.stats.mi,
      fraction=c.ssl.mask_fraction,
      groups=spec.group_indices or None,
      draws=draws,
      seed=c.seed,
    )
    whole = "" if s["groups_whole"] is None else f", declared groups whole {s['groups_whole']:.0%}"
    freq = " ".join(f"{n}={f:.2f}" for n, f in zip(spec.names, s["frequency"], strict=True))
    return (
      f"ssl masks ({c.ssl.masking}): {s['distinct']} distinct in {draws} draws{whole}; "
      f"masked by view 1: {freq}"
    )

  def next_batches(self):
    pairs = parallel.to_global(next(self.pair_iter), self.mesh)
    items = None
    if self.item_iter is not None:
      items = parallel.to_global(next(self.item_iter), self.mesh)
    return pairs, items

  def step(self):
    """One training step on the next batches, which a background thread has put on the devices
    ``data.device_prefetch`` steps ahead (``data/device_input.py``)."""
    if self._input is None:
      self._input = device_input.DeviceInput(
        self.pair_iter, self.item_iter, self.mesh, self.config.data.device_prefetch
      )
    pairs, items = next(self._input)
    if items is None:  # the step ignores items; keep the signature fixed
      items = {"item": pairs["item"], "item_id": pairs["item_id"]}
    self.state, metrics = self.step_fn(self.state, pairs, items, self.step_rng)
    return metrics

  def close_input(self) -> None:
    """Stops the device-input thread; the iterators are left at the last consumed batch."""
    if self._input is not None:
      self._input.close()
      self._input = None

  def evaluate(self, split: str = "valid", params=None, prior_weight=None) -> dict[str, float]:
    """Metrics of ``params`` (default: the current state's) on the 'valid' or 'test' split, with
    the popularity prior ``prior_weight`` (default: ``eval.popularity_prior``). One
    ``evaluate.Evaluator`` per split, built on first use: its jitted functions compile once per
    run and the references' figures are computed once."""
    if split not in self._evaluators:
      c = self.config
      self._evaluators[split] = evaluate_lib.Evaluator(
        self.model,
        self.dataset.for_split(split),
        self.stats.item_freq,
        self.stats.head,
        mesh=self.mesh,
        ks=c.eval.ks,
        batch_size=c.eval.batch_size,
        max_pairs=c.eval.max_queries,
        references=tuple(c.eval.references),
        popularity_prior=c.eval.popularity_prior,
        temperature=c.loss.temperature,
      )
    return self._evaluators[split](self.state.params if params is None else params, prior_weight)

  # Checkpoints: train state + both iterators' positions + config + corpus statistics + the loop's
  # metric sums since the last logged line (so a resumed run logs what an uninterrupted one would).
  def checkpoint_args(
    self,
    save: bool,
    loop: dict | None = None,
    restore_loop: bool = False,
    restore_meta: tuple[str, ...] = (),
  ):
    it = grain.checkpoint.CheckpointSave if save else grain.checkpoint.CheckpointRestore
    st = ocp.args.StandardSave if save else ocp.args.StandardRestore
    if not save:
      self.close_input()  # restoring: the batches read ahead belong to the old position
    feed = self._input  # saving: the positions of the last batches a step consumed
    pair_iter = feed.pair.snapshot() if feed is not None else self.pair_iter
    items = {"state": st(self.state), "pair_iter": it(pair_iter)}
    if self.item_iter is not None:
      items["item_iter"] = it(feed.item.snapshot() if feed is not None else self.item_iter)
    if save:
      items["config"] = ocp.args.JsonSave(configuration.to_dict(self.config))
      items["data"] = ocp.args.JsonSave(self.data_fingerprint())
      items["stats"] = ocp.args.StandardSave(
        {"mi": np.asarray(self.stats.mi), "item_freq": np.asarray(self.stats.item_freq)}
      )
      if loop is not None:
        items["loop"] = ocp.args.JsonSave(loop)
    else:
      if restore_loop:
        items["loop"] = ocp.args.JsonRestore()
      for name in restore_meta:
        items[name] = ocp.args.JsonRestore()
    return ocp.args.Composite(**items)

  def data_fingerprint(self) -> dict:
    if self._fingerprint is None:
      self._fingerprint = table_lib.fingerprint(self.dataset)
    return self._fingerprint

  def restore(self, manager, step: int, *, allow_config_change: bool = False) -> dict:
    """Restores checkpoint ``step`` (state and both streams' positions); returns its loop record
    (``{}`` for checkpoints without one). Raises ``checkpointing.CheckpointMismatch`` when the
    saved state does not have this run's structure and shapes, or (unless
    ``allow_config_change``) when the config stored in the checkpoint describes another model or
    its data fingerprint (``table.fingerprint``) differs from this run's data."""
    step_dir = os.path.join(str(manager.directory), str(step))
    has_loop = os.path.isdir(os.path.join(step_dir, "loop"))
    meta = tuple(n for n in ("config", "data") if os.path.isdir(os.path.join(step_dir, n)))
    restored = manager.restore(
      step, args=self.checkpoint_args(save=False, restore_loop=has_loop, restore_meta=meta)
    )
    if not allow_config_change:
      self._check_meta(restored)
    want = jax.tree_util.tree_structure(self.state)
    got = jax.tree_util.tree_structure(restored["state"])
    if want != got:
      raise checkpointing.CheckpointMismatch("the saved train state has another structure")
    for (path, a), b in zip(
      jax.tree_util.tree_leaves_with_path(self.state), jax.tree_util.tree_leaves(restored["state"])
    ):
      if a.shape != b.shape or a.dtype != b.dtype:
        raise checkpointing.CheckpointMismatch(
          f"{jax.tree_util.keystr(path)}: saved {b.dtype}{list(b.shape)}, this run "
          f"{a.dtype}{list(a.shape)}"
        )
    self.state = restored["state"]
    return dict(restored["loop"]) if has_loop else {}

  def _check_meta(self, restored) -> None:
    """The checkpoint's own record of its config and data against this run's (config.json is
    only a copy a user can edit)."""
    saved_config = restored.get("config") if "config" in restored else None
    if saved_config is not None:
      if not isinstance(saved_config, dict):
        raise checkpointing.CheckpointMismatch("its stored config is not a JSON object")
      diff = configuration.diff_model_fields(saved_config, configuration.to_dict(self.config))
      if diff:
        shown = "; ".join(diff[:4]) + (f"; ... ({len(diff)} fields)" if len(diff) > 4 else "")
        raise checkpointing.CheckpointMismatch(
          f"the config stored in it describes another model ({shown}); config.json was edited? "
          "pass --allow_config_change to continue it with this config"
        )
    saved_data = restored.get("data") if "data" in restored else None
    if saved_data is not None:
      if not isinstance(saved_data, dict):
        raise checkpointing.CheckpointMismatch("its stored data fingerprint is not a JSON object")
      diff = table_lib.fingerprint_diff(saved_data, self.data_fingerprint())
      if diff:
        shown = "; ".join(diff[:4]) + (f"; ... ({len(diff)} fields)" if len(diff) > 4 else "")
        raise checkpointing.CheckpointMismatch(
          f"the data changed since it was saved ({shown}): its embedding rows would belong to "
          "other items; pass --allow_config_change to continue it on this data anyway"
        )


def checkpoint_manager(workdir: str, config):
  return checkpointing.manager(workdir, config)


def batch_ids(dataset, config, step: int) -> dict[str, np.ndarray]:
  """The rows of the global batches of ``step`` (1-based; both streams advance once per step):
  ``pair_rows`` (D_train), ``query_rows``, ``item_ids``, ``ssl_item_ids`` (SSL / spread-out on)
  and, when the data has them, ``item_keys`` / ``ssl_item_keys`` (the items' original keys)."""
  d, c = dataset, config
  pair_seed, item_seed = stream_seeds(c.seed)
  rows = pipeline.EpochBatches(d.num_train, c.train.batch_size, pair_seed)[step - 1]
  out = {"pair_rows": rows, "query_rows": d.train_query[rows], "item_ids": d.train_item[rows]}
  if step_lib.uses_item_stream(c):
    pool = pipeline.item_pool(d, c.ssl.item_sampling)
    out["ssl_item_ids"] = pool[
      pipeline.EpochBatches(len(pool), c.ssl.batch_size, item_seed)[step - 1]
    ]
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


def _save_best(mgr, step: int, params, sealer: checkpointing.Sealer):
  """Saves the parameters of a new best validation, synchronously (never two orbax saves in
  flight at once, which processes of a multi-process run could interleave). A resumed run that
  replays an improvement overwrites that step's earlier save. A failed save stops the run
  (``checkpointing.SaveFailed``)."""
  sealer.flush()  # the train-state checkpoint's save, if one is in flight
  try:
    if step in mgr.all_steps():
      mgr.delete(step)
    mgr.save(step, args=checkpointing.best_args(params, save=True), force=True)
    mgr.wait_until_finished()
  except Exception as e:
    sealer.failed = True
    raise checkpointing.SaveFailed(
      f"saving the best parameters of step {step} to {mgr.directory} failed "
      f"({checkpointing.first_line(e)}); the run stopped; "
      + (
        f"the last good checkpoint is step {sealer.last_good}: rerun the same command to resume "
        "from it once the cause is fixed"
        if sealer.last_good is not None
        else "no checkpoint of this run was saved before it"
      )
    ) from None


def _warn_if_flat(scalars: dict, config) -> bool:
  """Warns (once) when the main loss is still near ``log(train.batch_size)`` a quarter into the
  run: with logQ correction that is the loss of a model that ranks by popularity only (every
  in-batch item as likely), i.e. the towers have not learned to personalise. Returns whether it
  warned."""
  main = scalars.get("loss/main")
  flat = np.log(config.train.batch_size)
  if main is None or not config.loss.logq_correction or main < 0.95 * flat:
    return False
  _log(
    f"warning: loss/main {main:.3f} is still near log(train.batch_size) = {flat:.3f}, the "
    "loss of a model that learned nothing beyond popularity; the towers are not "
    "personalising: raise optimizer.embedding_learning_rate (or lower "
    "optimizer.embedding_initial_accumulator), train longer, or check the query features"
  )
  return True


def _format_eval(split: str, step: int, metrics: dict, config) -> str:
  keys = [f"recall@{k}" for k in config.eval.ks] + [config.train.select_metric]
  return f"eval ({split}) step {step}: " + ", ".join(
    f"{k} {metrics[k]:.4f}" for k in dict.fromkeys(keys) if k in metrics
  )


class _Selection:
  """Checkpoint selection on the validation split and early stopping.

  After each validation the best value of ``train.select_metric`` so far (higher is better; NaN
  never wins) and its step are kept; an improvement saves the parameters to the workdir's
  ``best`` checkpoint (``checkpointing.best_manager``), so the test evaluation at the end scores
  the selected model. ``train.early_stopping_patience`` validations in a row without improvement
  stop the run. The record travels in every checkpoint's loop state, so a resumed run goes on
  selecting where it stopped.
  """

  def __init__(self, loop: dict, metric: str, patience: int):
    rec = loop.get("selection", {})
    self.metric, self.patience = metric, patience
    self.best_step = rec.get("best_step")
    self.best_value = rec.get("best_value")
    self.bad_evals = int(rec.get("bad_evals", 0))
    self.stopped_early = bool(rec.get("stopped_early", False))

  def update(self, step: int, metrics: dict) -> bool:
    """Records a validation; returns whether it is the best so far."""
    value = float(metrics[self.metric])
    improved = np.isfinite(value) and (self.best_value is None or value > self.best_value)
    if improved:
      self.best_step, self.best_value, self.bad_evals = step, value, 0
    else:
      self.bad_evals += 1
      if self.patience and self.bad_evals >= self.patience:
        self.stopped_early = True
    return improved

  def state(self) -> dict:
    return {
      "best_step": self.best_step,
      "best_value": self.best_value,
      "bad_evals": self.bad_evals,
      "stopped_early": self.stopped_early,
    }


def _handle_nonfinite(
  run: Run, bad, window: _Window, *, workdir: str, last_saved, skip: bool, is_main: bool
):
  """Stops the run on the first non-finite step (NonFiniteError), or, with
  ``train.skip_nonfinite``, counts and reports the skipped steps."""
  max_reports = 10  # skipped steps whose batch ids are written
  for step, scalars in bad:
    path = os.path.join(workdir, f"nonfinite_step_{step}.json")
    write = is_main and (not skip or window.skipped < max_reports)
    if write:
      reliability.write_nonfinite_report(
        workdir, step, scalars, batch_ids(run.dataset, run.config, step), last_saved
      )
    if not skip:
      kept = (
        f"checkpoint {last_saved} is the last good one"
        if last_saved
        else "no checkpoint was saved before it"
      )
      raise reliability.NonFiniteError(
        f"non-finite loss or gradient at step {step} ({reliability.format_parts(scalars)}); "
        f"stopped, {kept}; the batch's ids are in {path}. Lower optimizer.learning_rate, "
        "or set train.skip_nonfinite=True to skip such steps"
      )
    window.skipped += 1
    _log(
      f"step {step}: non-finite loss or gradient ({reliability.format_parts(scalars)}); "
      f"update skipped ({window.skipped} so far)" + (f"; batch ids in {path}" if write else "")
    )


def choose_prior(run: Run, params, config) -> tuple[float, list[tuple[float, dict]]]:
  """The weight of the popularity prior (``prior.py``) among ``eval.popularity_prior_candidates``
  (and ``eval.popularity_prior``) that scores best on validation by ``train.select_metric`` with
  the selected parameters (the lowest weight on ties), and each candidate's validation metrics.
  The test split is never read: the prior is a hyperparameter, chosen like the checkpoint."""
  metric = config.train.select_metric
  weights = sorted(
    {float(w) for w in config.eval.popularity_prior_candidates}
    | {float(config.eval.popularity_prior)}
  )
  scored = [(w, run.evaluate("valid", params, prior_weight=w)) for w in weights]
  best = max(scored, key=lambda wv: (wv[1][metric], -wv[0]))[0]
  return best, scored


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False
) -> dict[str, float]:
  """Trains (resuming from the workdir's latest good checkpoint), evaluates; returns final eval.

  SIGTERM / SIGINT: saves a checkpoint at the next step boundary (the same on every process) and
  raises ``reliability.Stopped``. A non-finite loss or gradient raises
  ``reliability.NonFiniteError`` (or, with ``train.skip_nonfinite``, the step's update is skipped).
  """

  configuration.validate(config)
  # Checks only: config.json is written once the data has loaded (a run that fails on its data
  # leaves no config behind that a corrected rerun would be compared against).
  workdir_lib.prepare(
    workdir, configuration.to_dict(config), allow_config_change=allow_config_change
  )
  workdir_lib.check_free_space(workdir, 0, 0)  # a full disk, before the data is even loaded
  held = workdir_lib.hold(workdir, log=_log)  # one run per workdir: a second is refused here
  try:
    stop = reliability.StopRequest()  # from here on, SIGTERM / SIGINT wait for a step boundary
    try:
      return _train(config, workdir, stop, allow_config_change=allow_config_change)
    finally:
      stop.close()
  finally:
    if held is not None:
      held.release()


def _train(config, workdir: str, stop, *, allow_config_change: bool = False) -> dict[str, float]:
  is_main = jax.process_index() == 0
  t0 = time.time()
  run = Run(config)
  d = run.dataset
  _log(
    f"data: {d.name}: {d.num_items} items ({d.item_spec.num_features} features), "
    f"{d.num_train} train pairs, {d.num_eval} eval pairs; built in {time.time() - t0:.1f}s; "
    f"mesh {dict(run.mesh.shape)}"
  )
  if config.ssl.alpha > 0:
    _log(run.mask_summary())
  if is_main:
    workdir_lib.save_config(workdir, configuration.to_dict(config))
  space = workdir_lib.check_free_space(
    workdir,
    checkpointing.estimate_bytes((run.state, run.stats.mi, run.stats.item_freq)),
    config.train.max_checkpoints,
  )
  if space:
    _log(space)
  stop.bind(run.mesh)
  manager = checkpoint_manager(workdir, config)
  best_manager = checkpointing.best_manager(workdir)
  sealer = checkpointing.Sealer(manager, enabled=is_main)  # saves, and stops on a failed one
  writer = profiler = None
  try:
    resumed = checkpointing.restore_latest(
      manager,
      lambda step: run.restore(manager, step, allow_config_change=allow_config_change),
      workdir=workdir,
      log=_log,
    )
    start, loop = resumed if resumed is not None else (0, {})
    sealer.last_good = start if resumed is not None else None
    if resumed is not None:
      _log(f"resumed from checkpoint at step {start}")
    if is_main:
      dropped = workdir_lib.truncate_logs(workdir, start)
      if dropped:
        _log(f"dropped {dropped} metrics / eval lines the interrupted run wrote after step {start}")
    writer = workdir_lib.MetricsWriter(workdir, enabled=is_main, purge_step=start + 1)
    writer.start(configuration.to_dict(config), references=config.eval.references)
    num_steps = run.num_steps
    tc = config.train
    lr = step_lib.learning_rate(config, num_steps)  # logged as train/learning_rate
    eta = tracking.Eta(num_steps, run.eval_every)  # compilation left out, evaluation counted
    profiler = tracking.Profiler(config, os.path.join(workdir, "profile"), enabled=is_main)
    last_saved = start if resumed is not None else None
    window = _Window(loop)
    selection = _Selection(loop, tc.select_metric, tc.early_stopping_patience)
    kill_at = reliability.kill_step()
    t_window, n_window = time.time(), 0
    t_start = time.time()
    first = start + 1 if not selection.stopped_early else num_steps + 1
    warned_flat = False
    for step in range(first, num_steps + 1):
      profiler.before(step)
      window.add(step, run.step())
      eta.stepped(step)
      profiler.after(step, log=_log)
      n_window += 1
      sealer.flush_if_done()
      stopping = stop.should_stop(step) and step < num_steps
      log_now = step % tc.log_every == 0 or step == num_steps
      eval_now = (step % run.eval_every == 0 and not stopping) or step == num_steps
      save_now = step % tc.checkpoint_every == 0 or step == num_steps or stopping
      if log_now or eval_now or save_now:  # never log, evaluate or save a non-finite state
        bad = window.check()
        if bad:
          _handle_nonfinite(
            run,
            bad,
            window,
            workdir=workdir,
            last_saved=last_saved,
            skip=tc.skip_nonfinite,
            is_main=is_main,
          )
      if log_now:
        scalars = window.means()
        if tc.skip_nonfinite:
          scalars["skipped_steps"] = window.skipped
        dt = time.time() - t_window
        scalars["examples_per_sec"] = n_window * tc.batch_size / max(dt, 1e-9)
        scalars["steps_per_sec"] = n_window / max(dt, 1e-9)
        scalars["learning_rate"] = float(lr(step - 1))  # the rate of this step's update
        if eta.step_seconds(step) is not None:
          scalars["step_time_ms"] = 1000 * eta.step_seconds(step)
        writer.write("metrics.jsonl", step, scalars)
        if not warned_flat and step >= num_steps // 4:
          warned_flat = _warn_if_flat(scalars, config)
        parts = ", ".join(
          f"{k.split('/')[1]} {v:.4f}" for k, v in sorted(scalars.items()) if k.startswith("loss/")
        )
        skipped = f" | {window.skipped} skipped" if window.skipped else ""
        _log(
          f"step {step}/{num_steps} | loss {scalars.get('loss', float('nan')):.4f} "
          f"({parts}) | {scalars['examples_per_sec']:,.0f} ex/s | "
          f"{tracking.format_eta(eta.seconds(step), _fmt_duration)}"
          f"{skipped}"
        )
        t_window, n_window = time.time(), 0
      if eval_now:
        t_eval = time.time()
        valid = run.evaluate("valid")
        eta.evaluated(time.time() - t_eval)
        writer.write("eval.jsonl", step, valid, tags={"split": "valid"})
        if selection.update(step, valid):
          _save_best(best_manager, step, run.state.params, sealer)
        _log(
          _format_eval("valid", step, valid, config)
          + (
            f" | best {selection.best_value:.4f} at step {selection.best_step}"
            if selection.best_step is not None
            else ""
          )
        )
        if selection.stopped_early:
          _log(
            f"early stopping at step {step}: {tc.select_metric} has not improved for "
            f"{selection.bad_evals} validations (train.early_stopping_patience)"
          )
          save_now = True
        t_window = time.time()
      if save_now:
        t_save = time.time()
        loop_state = dict(window.state(), selection=selection.state())
        sealer.save(step, run.checkpoint_args(save=True, loop=loop_state))
        eta.paused(time.time() - t_save)
        last_saved = step
        t_window = time.time()
      if step == kill_at:
        reliability.kill_now()
      if stopping:
        sealer.flush()
        raise reliability.Stopped(
          step, stop.signal_name, os.path.join(checkpointing.directory(workdir), str(step))
        )
      if selection.stopped_early:
        break
    last_step = int(jax.device_get(run.state.step))
    if selection.best_step is None:  # resumed at or past the end of a run that never validated
      valid = run.evaluate("valid")
      selection.update(last_step, valid)
      _save_best(best_manager, last_step, run.state.params, sealer)
    params = run.state.params  # every best save has completed (_save_best waits)
    selected = selection.best_step
    if selected != last_step:
      params = best_manager.restore(selected, args=checkpointing.best_args(params, save=False))
      params = params["params"]
    weight = config.eval.popularity_prior
    if config.eval.popularity_prior_candidates:  # the prior's weight, chosen on validation
      weight, scored = choose_prior(run, params, config)
      for w, valid in scored:
        writer.write(
          "eval.jsonl",
          last_step,
          valid,
          tags={"split": "valid", "selected_step": int(selected), "popularity_prior": w},
        )
      _log(
        f"popularity prior chosen on validation: {weight} ("
        + ", ".join(f"{w}: {tc.select_metric} {v[tc.select_metric]:.4f}" for w, v in scored)
        + ")"
      )
    last_eval = run.evaluate("test", params, prior_weight=weight)
    if selection.best_value is not None:  # the HParams dashboard's best validation column
      writer.tensorboard("eval", last_step, {tc.select_metric: selection.best_value}, "valid_best")
    writer.write(
      "eval.jsonl",
      last_step,
      last_eval,
      tags={"split": "test", "selected_step": int(selected), "popularity_prior": float(weight)},
    )
    # The run is over: only the selected parameters are needed from here on (a rerun of this
    # workdir resumes at the end and tests them again). Until now every improvement was kept, as
    # any checkpoint a resume may fall back to refers to the best step it had seen.
    sealer.flush()
    checkpointing.prune_best(best_manager, keep=selected)
    _log(
      _format_eval("test", last_step, last_eval, config)
      + f" | checkpoint of step {selected}, selected by validation {tc.select_metric}"
    )
  finally:
    try:
      run.close_input()
    except RuntimeError as e:  # a read that hangs: report it, still flush and close the rest
      _log(f"warning: {e}")
    if profiler is not None:
      profiler.stop()
    try:
      sealer.flush()  # an in-flight save completes (and is sealed) whatever stopped the loop
    finally:
      try:
        manager.close()
      except Exception:
        if not sealer.failed:  # else: orbax re-raises the failed save, already reported
          raise
      best_manager.close()
      if writer is not None:
        writer.close()
  _log(
    f"done: {max(last_step - start, 0)} steps in {_fmt_duration(time.time() - t_start)}; "
    f"test split, checkpoint of step {selected}:\n"
    + evaluate_lib.format_table(last_eval, config.eval.ks)
  )
  return last_eval
