"""The Python API: ``sslrec.fit``, ``sslrec.load`` (and ``sslrec.Retriever`` for an export).

    import sslrec

    run = sslrec.fit("smoke", "runs/smoke", overrides={"train.num_steps": 200})
    run.metrics["recall@50"]              # the test metrics of the selected checkpoint
    run.params                            # its model parameters (numpy), for run.model.apply

    run = sslrec.load("runs/smoke")       # the same, from a finished run's workdir

``fit`` is ``sslrec-train`` without the command line: the same workdir layout, resume, checkpoints
and errors (it raises them, ``sslrec.errors.ConfigError`` and the others of ``sslrec.cli``,
instead of printing one line).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections


@dataclasses.dataclass
class TrainedRun:
  """A trained run: its config, model, data and the parameters of its selected checkpoint."""

  workdir: str
  config: ml_collections.ConfigDict  # the resolved config the run was trained with
  step: int  # the selected checkpoint's step (best validation)
  params: Any  # that checkpoint's model parameters, numpy arrays (a flax params tree)
  metrics: dict[str, float]  # its test metrics as in eval.jsonl ("recall@50", ...); {} if none
  model: Any  # the flax TwoTower module: model.apply({"params": params}, ...)
  dataset: Any  # the run's sslrec.data.table.Dataset (catalogue, features, splits)


def resolve_config(
  config: str | ml_collections.ConfigDict, overrides: Mapping[str, Any] | None = None
) -> ml_collections.ConfigDict:
  """A config from a ConfigDict, a shipped name (``"smoke"``, ``"movielens:cfm"``) or a file path
  (``"configs/base.py"``, ``"my.py:arg"``), with ``overrides`` (``{"train.num_steps": 100}``)
  applied. Raises ConfigError for an unknown name or field."""
  from sslrec import shipped
  from sslrec.errors import ConfigError

  if isinstance(config, str):
    config = shipped.load(config)
  else:
    config = ml_collections.ConfigDict(config.to_dict())
  for key, value in (overrides or {}).items():
    node, *_ = config, None
    parts = key.split(".")
    for part in parts[:-1]:
      if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
        raise ConfigError(f"override {key!r}: no such config field; see configs/base.py")
      node = node[part]
    if parts[-1] not in node:
      raise ConfigError(f"override {key!r}: no such config field; see configs/base.py")
    node[parts[-1]] = value
  return config


def fit(
  config: str | ml_collections.ConfigDict,
  workdir: str,
  *,
  overrides: Mapping[str, Any] | None = None,
  allow_config_change: bool = False,
) -> TrainedRun:
  """Trains and evaluates ``config`` in ``workdir`` (resuming a run already there) and returns the
  trained run: ``.params`` of the checkpoint selected by validation, ``.metrics`` its test
  metrics. ``config``: a ConfigDict, a shipped config's name or a config file's path."""
  from sslrec import configuration, train

  config = resolve_config(config, overrides)
  configuration.validate(config)
  metrics = train.train_and_evaluate(config, workdir, allow_config_change=allow_config_change)
  run = load(workdir)
  run.metrics = {k: float(v) for k, v in metrics.items()}
  return run


def load(workdir: str, *, step: int | None = None) -> TrainedRun:
  """The trained run in ``workdir`` (written by ``fit`` or ``sslrec-train``): the parameters of
  its selected checkpoint (or of checkpoint ``step``), rebuilt model and data. Raises
  ``sslrec.export.ExportError`` (one line) for a workdir without a usable checkpoint."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp

  from sslrec import export, shipped
  from sslrec import step as step_lib
  from sslrec.data import sources
  from sslrec.run import checkpointing
  from sslrec.run import workdir as workdir_lib

  records = workdir_lib.read_jsonl(f"{workdir}/eval.jsonl")
  tests = [r for r in records if r.get("split") == "test"]
  selected = tests[-1].get("selected_step") if tests else None
  steps = export.checkpoint_steps(workdir) if epath_isdir(checkpointing.directory(workdir)) else []
  if step is None:
    step = selected if selected is not None else (steps[-1] if steps else None)
  if step is None:
    raise export.ExportError(f"{workdir}: no checkpoint to load (train first: sslrec.fit)")
  config = export.load_config(workdir, steps[-1] if steps else step, shipped.load("base"))
  dataset = sources.load(config).validate()
  model = step_lib.create_model(config, dataset)
  params = None
  if epath_isdir(checkpointing.best_directory(workdir)):
    mgr = ocp.CheckpointManager(
      checkpointing.best_directory(workdir),
      options=ocp.CheckpointManagerOptions(create=False, read_only=True),
    )
    try:
      if step in mgr.all_steps():
        want = jax.eval_shape(model.init, jax.random.key(0), *step_lib.example_inputs(dataset))
        item = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), want)
        params = mgr.restore(step, args=checkpointing.best_args(item, save=False))["params"]
        params = jax.tree.map(np.asarray, params)
    finally:
      mgr.close()
  if params is None:
    if step not in steps:
      raise export.ExportError(
        f"{workdir}: no checkpoint at step {step}; available: {', '.join(map(str, steps))}"
      )
    params = export.restore_params(workdir, step, model, dataset)
  metrics = {}
  for r in tests:
    if r.get("selected_step") == step:
      metrics = {k: v for k, v in r.items() if isinstance(v, float)}
  return TrainedRun(
    workdir=str(workdir),
    config=config,
    step=int(step),
    params=params,
    metrics=metrics,
    model=model,
    dataset=dataset,
  )


def epath_isdir(path: str) -> bool:
  from sslrec import paths

  return paths.path(path).is_dir()
