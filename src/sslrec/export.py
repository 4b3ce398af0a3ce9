"""Export a trained run for serving: item embeddings, the query tower as StableHLO, the schema.

``export(workdir, out)`` rebuilds the model of a run from its config (the dataset is rebuilt by
``sources.load``, which is deterministic), restores the ``state`` item of one orbax checkpoint and
writes (layout: docs/serving.md; reader: ``sslrec.serving``):

    OUT/item_embeddings.npy   float32 [N, D] item-tower outputs of the whole catalogue
    OUT/item_keys.npy         [N] item keys (int64, or unicode strings)
    OUT/item_names.npy        [N] item names (only when the dataset has them)
    OUT/query_tower.jax       jax.export artifact: f(params, features) -> [B, D], B symbolic
    OUT/query_params.npz      the query tower's parameters, {"module/.../leaf": array}
    OUT/item_tower.jax        jax.export artifact: f(params, item features) -> [B, D]: new items
    OUT/item_params.npz       the item tower's parameters
    OUT/item_vocabularies.json  {item feature: [raw value of id 0, ...]} (may be {})
    OUT/ann/BACKEND/          a persisted ANN index (with ``ann_backends``; serving.index_store)
    OUT/schema.json           both towers' feature schemas (+ oov ids)
    OUT/vocabularies.json     {feature: [raw value of id 0, id 1, ...]} for features that have one
    OUT/manifest.json         format version, config, step, eval metrics, versions, sha256s

The directory is written next to OUT under a temporary name and renamed into place when complete,
so OUT is never seen half-written; an existing non-empty OUT is refused unless ``overwrite``, and
even then only when it is itself an export (never an arbitrary directory).
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from sslrec import prior, serving
from sslrec import step as step_lib
from sslrec.data import sources, stats
from sslrec.data import table as table_lib
from sslrec.run import checkpointing
from sslrec.run import lock as lock_lib

DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")  # the query tower is lowered for each of these
EMBED_BATCH = 4096  # catalogue rows embedded per item-tower call
CHECK_ROWS = 64  # dataset query rows the exported tower is checked on against the model
CHECK_TOLERANCE = 1e-5  # max |exported - model| accepted by that check
VERSIONED_PACKAGES = (
  "sslrec",
  "jax",
  "jaxlib",
  "flax",
  "orbax-checkpoint",
  "numpy",
  "ml_collections",
  "flatbuffers",
)


class ExportError(ValueError):
  """A run that cannot be exported, or an output directory that must not be written."""


# ----------------------------------------------------------------------------------------------
# Reading the run.


def open_checkpoints(workdir: str) -> ocp.CheckpointManager:
  """A read-only orbax manager of the run's checkpoints (a context manager: close it)."""
  return ocp.CheckpointManager(
    checkpointing.directory(workdir),
    options=ocp.CheckpointManagerOptions(create=False, read_only=True),
  )


def load_config(
  workdir: str, step: int, defaults: ml_collections.ConfigDict | None = None
) -> ml_collections.ConfigDict:
  """The config the checkpoint at ``step`` was saved with (its ``config`` item, else the run's
  ``config.json``).

  Fields missing from the saved config (a run from an older version) take ``defaults``' values.
  """
  try:
    with open_checkpoints(workdir) as manager:
      restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    saved = restored["config"]
  except Exception:  # noqa: BLE001 -- no such checkpoint or item, unreadable JSON: use config.json
    saved = None
    try:
      with open(os.path.join(workdir, "config.json")) as f:
        saved = json.load(f)
    except (OSError, ValueError):
      pass
  if not isinstance(saved, dict):
    raise ExportError(f"{workdir}: no readable config.json")
  if defaults is None:
    return ml_collections.ConfigDict(saved)
  config = ml_collections.ConfigDict(defaults.to_dict())
  _merge(config, saved)
  return config


def _merge(config: ml_collections.ConfigDict, saved: dict):
  with config.unlocked():
    for key, value in saved.items():
      if isinstance(value, dict) and isinstance(config.get(key), ml_collections.ConfigDict):
        _merge(config[key], value)
      else:
        config[key] = value


def checkpoint_steps(workdir: str) -> list[int]:
  """Steps with a committed checkpoint that holds a train state, ascending."""
  with open_checkpoints(workdir) as manager:
    return [step for step in manager.all_steps() if _has_state(manager, step)]


def _has_state(manager: ocp.CheckpointManager, step: int) -> bool:
  try:
    return "state" in manager.metadata(step).item_metadata
  except Exception:  # noqa: BLE001 -- unreadable metadata: restore_params will say what is wrong
    return True


def restore_params(workdir: str, step: int, model, dataset):
  """The model parameters of the train state saved at ``step``, as numpy arrays.

  Reads only ``state.params`` of the checkpoint (a partial restore of the ``state`` item: neither
  the optimizer state nor the input streams), whatever the shardings it was saved with, and checks
  every leaf against the parameters ``model`` has (``model.init``'s shapes and dtypes).
  """
  want = jax.eval_shape(model.init, jax.random.key(0), *step_lib.example_inputs(dataset))
  item = {"params": jax.tree.map(lambda a: np.zeros((), a.dtype), want)}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  manager = open_checkpoints(workdir)
  try:
    restored = manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
      ),
    )
    params = restored["state"]["params"]
  except Exception as e:  # noqa: BLE001 -- orbax raises many types; all mean "cannot restore"
    raise ExportError(
      f"{workdir}: the parameters of checkpoint {step} cannot be read "
      f"({type(e).__name__}: {' '.join(str(e).split())[:300]})"
    ) from None
  finally:
    manager.close()
  got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  for path, a in jax.tree_util.tree_flatten_with_path(want)[0]:
    leaf = got.get(path)
    if leaf is None or leaf.shape != a.shape or leaf.dtype != a.dtype:
      found = "missing" if leaf is None else f"{leaf.dtype}{list(leaf.shape)}"
      raise ExportError(
        f"{workdir}: checkpoint {step} does not hold the model its config describes: "
        f"parameter {_path_str(path)} is {found}, the model has {a.dtype}{list(a.shape)}"
      )
  return params


def _eval_records(workdir: str):
  """The object lines of the run's eval.jsonl, in order; damaged lines are skipped."""
  path = os.path.join(workdir, "eval.jsonl")
  if not os.path.isfile(path):
    return
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if isinstance(record, dict):
        yield record


def eval_record(workdir: str, step: int) -> dict | None:
  """The eval.jsonl line of ``step`` (else the last one before it; None if there is none)."""
  best = None
  for record in _eval_records(workdir):
    if (
      isinstance(record.get("step"), int)
      and record["step"] <= step
      and (best is None or record["step"] >= best["step"])
    ):
      best = record
  return best


def prior_weight(workdir: str, config) -> float:
  """The popularity prior's weight the run tested with (its last test line's, which
  ``eval.popularity_prior_candidates`` may have chosen on validation), else the config's."""
  weight = float(config.eval.get("popularity_prior", 0.0))
  for record in _eval_records(workdir):
    w = record.get("popularity_prior")
    if record.get("split") == "test" and isinstance(w, (int, float)) and w >= 0:
      weight = float(w)
  return weight


# ----------------------------------------------------------------------------------------------
# The query tower as a jax.export artifact.


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _tower_fn(model, params, method, spec, post=lambda x: x):
  """``(fn, used)``: ``fn(used_params, features) -> [B, D]``, ``post(model.method(features))``,
  reading only the parameter leaves the tower uses (``used``: {"a/b/leaf": array}); the others
  enter as zeros, which XLA removes, so an artifact and its params file hold that tower's weights
  alone."""
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  names = [_path_str(p) for p, _ in leaves_with_path]
  leaves = [x for _, x in leaves_with_path]
  shapes = [(x.shape, x.dtype) for x in leaves]

  def full(leaf_list, features):
    return post(
      model.apply(jax.tree_util.tree_unflatten(treedef, leaf_list), features, method=method)
    )

  example = {f.name: jnp.zeros((1,) + f.shape, f.dtype) for f in spec.features}
  jaxpr = jax.make_jaxpr(full)(leaves, example).jaxpr
  used_vars = {v for eqn in jaxpr.eqns for v in eqn.invars if not hasattr(v, "val")}
  used_vars |= {v for v in jaxpr.outvars if not hasattr(v, "val")}
  used = [i for i, v in enumerate(jaxpr.invars[: len(leaves)]) if v in used_vars]
  used_names = {names[i] for i in used}

  def fn(used_params, features):
    leaf_list = [
      used_params[n] if n in used_names else jnp.zeros(s, d) for n, (s, d) in zip(names, shapes)
    ]
    return full(leaf_list, features)

  return fn, {names[i]: np.asarray(leaves[i]) for i in used}


def query_tower_fn(model, params, prior_weight: float = 0.0):
  """``(fn, used)`` of the query tower (``_tower_fn``). With a popularity prior (``prior.py``) the
  vectors get its column of ones: ``[B, D + 1]``."""
  return _tower_fn(
    model,
    params,
    model.query_tower,
    model.query_spec,
    lambda q: prior.with_queries(q, prior_weight),
  )


def item_tower_fn(model, params):
  """``(fn, used)`` of the item tower: ``[B, D]`` item embeddings, without the popularity prior's
  column (a new item has no training frequency; ``serving.Retriever.embed_items`` adds it)."""
  return _tower_fn(model, params, model.item_tower, model.item_spec)


def _serialize(fn, used, spec, platforms: Sequence[str]) -> bytes:
  (b,) = jax.export.symbolic_shape("b")
  features = {f.name: jax.ShapeDtypeStruct((b,) + f.shape, f.dtype) for f in spec.features}
  params_spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in used.items()}
  exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(params_spec, features)
  return bytes(exported.serialize())


def export_item_tower(model, params, platforms: Sequence[str] = DEFAULT_PLATFORMS):
  """``(serialized bytes, used params)`` of the item tower with a symbolic batch dimension."""
  fn, used = item_tower_fn(model, params)
  return _serialize(fn, used, model.item_spec, platforms), used


def export_query_tower(
  model, params, platforms: Sequence[str] = DEFAULT_PLATFORMS, prior_weight: float = 0.0
):
  """``(serialized bytes, used params)`` of the query tower with a symbolic batch dimension."""
  fn, used = query_tower_fn(model, params, prior_weight)
  return _serialize(fn, used, model.query_spec, platforms), used


# ----------------------------------------------------------------------------------------------
# Writing.


def _check_out(out: str, overwrite: bool) -> bool:
  """Whether ``out`` holds something to replace; raises ExportError when it must not be written."""
  if not os.path.exists(out):
    return False
  if not os.path.isdir(out):
    raise ExportError(f"--out={out} exists and is not a directory")
  if not os.listdir(out):
    return False
  if not overwrite:
    raise ExportError(
      f"--out={out} exists and is not empty; choose another directory or pass "
      "--overwrite to replace the export in it"
    )
  if not os.path.isfile(os.path.join(out, serving.MANIFEST)):
    raise ExportError(
      f"--out={out} is not empty and is not an sslrec export (no "
      f"{serving.MANIFEST}); refusing to replace it even with --overwrite"
    )
  return True


def _versions() -> dict[str, str]:
  out = {"python": platform.python_version()}
  for name in VERSIONED_PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def _feature_json(f) -> dict[str, Any]:
  d = {
    "name": f.name,
    "kind": f.kind,
    "vocab_size": f.vocab_size,
    "max_len": f.max_len,
    "dense_dim": f.dense_dim,
  }
  if getattr(f, "hashed", False):
    d["hashed"] = True
  return d


def _query_feature_json(f, vocabulary: list | None) -> dict[str, Any]:
  """A query feature's schema entry, with the id unknown raw values take: the vocabulary's OOV id
  0 when the reader built one (entry ``None``), else -1 (missing: the default embedding)."""
  oov = 0 if vocabulary and vocabulary[0] is None else serving.OOV_ID
  return dict(_feature_json(f), oov_id=oov)


def _item_keys(dataset: table_lib.Dataset) -> np.ndarray:
  keys = dataset.item_keys
  if keys is None:
    return np.arange(dataset.num_items, dtype=np.int64)
  keys = np.asarray(keys)
  if np.issubdtype(keys.dtype, np.integer):
    return keys.astype(np.int64)
  return np.asarray([str(k) for k in keys.tolist()])


def _json_value(v):
  if isinstance(v, np.generic):
    return v.item()
  if isinstance(v, (str, int, float, bool)) or v is None:
    return v
  return str(v)


def item_embeddings(
  model, params, dataset: table_lib.Dataset, batch_size: int = EMBED_BATCH
) -> np.ndarray:
  """``float32 [N, D]`` item-tower outputs for every catalogue row (fixed-size chunks)."""
  fn = jax.jit(lambda p, b: model.apply(p, b, method=model.item_tower))
  n = dataset.num_items
  size = min(batch_size, n)
  out = []
  for start in range(0, n, size):
    rows = np.arange(start, min(start + size, n))
    rows = np.concatenate([rows, np.zeros(size - rows.size, rows.dtype)])  # pad: static shape
    out.append(np.asarray(fn(params, table_lib.take(dataset.items, rows)))[: min(size, n - start)])
  return np.concatenate(out).astype(np.float32)


def export(
  workdir: str,
  out: str,
  *,
  step: int | None = None,
  overwrite: bool = False,
  defaults: ml_collections.ConfigDict | None = None,
  platforms: Sequence[str] = DEFAULT_PLATFORMS,
  ann_backends: Sequence[str] = (),
  log=print,
) -> dict[str, Any]:
  """Exports checkpoint ``step`` (default: the latest) of the run in ``workdir`` to ``out``.

  Returns a summary: step, num_items, files, the exported tower's max deviation from the model.
  Raises ExportError (one line) for a run that cannot be exported or an ``out`` that must not be
  written; nothing is left behind then.
  """
  if not os.path.isdir(workdir):
    raise ExportError(f"--workdir={workdir}: no such directory")
  steps = checkpoint_steps(workdir)
  if not steps:
    raise ExportError(f"--workdir={workdir} has no checkpoints (train first: launch/main.py)")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ExportError(
      f"--step={step}: no checkpoint at that step in {workdir}; available: "
      f"{', '.join(map(str, steps))}"
    )
  with own(out, log=log):
    _check_out(os.path.abspath(out), overwrite)  # before the slow part; again when writing
    for backend in ann_backends:  # a backend that cannot be built fails now, not later
      try:
        serving.ann.resolve(backend)
      except (ValueError, ImportError) as e:
        raise ExportError(f"--ann={backend}: {e}") from None
    t0 = time.time()
    config = load_config(workdir, step, defaults)
    dataset = sources.load(config).validate()
    model = step_lib.create_model(config, dataset)
    params = restore_params(workdir, step, model, dataset)
    log(
      f"restored step {step} of {workdir} ({dataset.name}: {dataset.num_items} items) in "
      f"{time.time() - t0:.1f}s"
    )
    return write_export(
      out,
      model=model,
      params=params,
      dataset=dataset,
      config=config,
      step=step,
      workdir=workdir,
      eval_metrics=eval_record(workdir, step),
      popularity_prior=prior_weight(workdir, config),
      overwrite=overwrite,
      platforms=platforms,
      ann_backends=ann_backends,
      log=log,
      _owned=True,
    )


@contextlib.contextmanager
def own(out: str, *, log=print):
  """Holds ``.<out>.lock`` beside ``out`` (one export per ``--out`` at a time; ExportError naming
  the other one), and first tidies what an export to ``out`` killed by SIGKILL left behind: its
  temporary folders are removed, and a previous export moved aside for a replacement that never
  came is put back."""
  out = os.path.abspath(out)
  parent, base = os.path.dirname(out), os.path.basename(out)
  try:
    os.makedirs(parent, exist_ok=True)
    held = lock_lib.acquire(os.path.join(parent, f".{base}.lock"), f"--out={out}")
  except lock_lib.Busy as e:
    raise ExportError(str(e)) from None
  except OSError as e:
    raise ExportError(f"--out={out}: cannot write beside it ({e.strerror or e})") from None
  try:
    for name in sorted(os.listdir(parent)):
      path = os.path.join(parent, name)
      if name.startswith(f".{base}.old-") and os.path.isdir(os.path.join(path, "export")):
        if not os.path.exists(out):
          os.rename(os.path.join(path, "export"), out)
          log(f"restored the previous export of {out}, which an interrupted replacement had moved")
        shutil.rmtree(path, ignore_errors=True)
      elif name.startswith((f".{base}.tmp-", f".{base}.old-")):
        shutil.rmtree(path, ignore_errors=True)
    yield held
  finally:
    held.release()


def write_export(
  out: str,
  *,
  model,
  params,
  dataset: table_lib.Dataset,
  config: ml_collections.ConfigDict,
  step: int,
  workdir: str | None = None,
  eval_metrics: dict | None = None,
  popularity_prior: float | None = None,
  overwrite: bool = False,
  platforms: Sequence[str] = DEFAULT_PLATFORMS,
  ann_backends: Sequence[str] = (),
  log=print,
  _owned: bool = False,
) -> dict[str, Any]:
  """Writes the export of ``model`` with ``params`` (the layout in the module docstring);
  ``popularity_prior``: the prior's weight folded into the vectors (None: the config's);
  ``ann_backends``: ANN indexes ('auto', 'scann', 'faiss') built, calibrated and persisted in
  ``OUT/ann/`` (``Retriever.save_ann_index``), so that servers load them instead of building.

  The directory is assembled under a temporary name next to ``out``, read back through
  ``serving.Retriever`` and checked against the model on the dataset's first queries, then renamed
  into place. Returns the summary ``export`` returns.
  """
  if not _owned:
    with own(out, log=log):
      return write_export(
        out,
        model=model,
        params=params,
        dataset=dataset,
        config=config,
        step=step,
        workdir=workdir,
        eval_metrics=eval_metrics,
        popularity_prior=popularity_prior,
        overwrite=overwrite,
        platforms=platforms,
        ann_backends=ann_backends,
        log=log,
        _owned=True,
      )
  out = os.path.abspath(out)
  replace = _check_out(out, overwrite)
  t0 = time.time()
  # The popularity prior the run was evaluated with, folded into the vectors (prior.py).
  weight = (
    float(config.eval.get("popularity_prior", 0.0))
    if popularity_prior is None
    else float(popularity_prior)
  )
  temperature = config.loss.temperature
  freq = stats.item_frequencies(dataset.train_item, dataset.num_items)
  items = prior.with_items(item_embeddings(model, params, dataset), freq, weight, temperature)
  blob, query_params = export_query_tower(model, params, platforms, weight)
  item_blob, item_params = export_item_tower(model, params, platforms)
  item_vocabularies = {
    name: [_json_value(v) for v in values]
    for name, values in (dataset.vocabularies or {}).items()
    if name in dataset.item_spec.names
  }
  vocabularies = {
    name: [_json_value(v) for v in values]
    for name, values in (dataset.vocabularies or {}).items()
    if name in dataset.query_spec.names
  }
  schema = {
    "query": [
      _query_feature_json(f, vocabularies.get(f.name)) for f in dataset.query_spec.features
    ],
    "item": [
      _query_feature_json(f, item_vocabularies.get(f.name)) for f in dataset.item_spec.features
    ],
  }

  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the export from its servers
  try:
    p = lambda name: os.path.join(tmp, name)  # noqa: E731
    np.save(p(serving.ITEM_EMBEDDINGS), items, allow_pickle=False)
    np.save(p(serving.ITEM_KEYS), _item_keys(dataset), allow_pickle=False)
    files = [serving.ITEM_EMBEDDINGS, serving.ITEM_KEYS]
    if dataset.item_names is not None:
      np.save(
        p(serving.ITEM_NAMES),
        np.asarray([str(x) for x in dataset.item_names.tolist()]),
        allow_pickle=False,
      )
      files.append(serving.ITEM_NAMES)
    with open(p(serving.QUERY_TOWER), "wb") as f:
      f.write(blob)
    np.savez(p(serving.QUERY_PARAMS), **query_params)
    with open(p(serving.SCHEMA), "w") as f:
      json.dump(schema, f, indent=2)
    with open(p(serving.VOCABULARIES), "w") as f:
      json.dump(vocabularies, f)
    files += [serving.QUERY_TOWER, serving.QUERY_PARAMS, serving.SCHEMA, serving.VOCABULARIES]
    with open(p(serving.ITEM_TOWER), "wb") as f:
      f.write(item_blob)
    np.savez(p(serving.ITEM_PARAMS), **item_params)
    with open(p(serving.ITEM_VOCABULARIES), "w") as f:
      json.dump(item_vocabularies, f)
    files += [serving.ITEM_TOWER, serving.ITEM_PARAMS, serving.ITEM_VOCABULARIES]
    manifest = {
      "format": serving.FORMAT,
      "format_version": serving.FORMAT_VERSION,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "workdir": os.path.abspath(workdir) if workdir else None,
      "step": int(step),
      "dataset": dataset.name,
      "num_items": int(items.shape[0]),
      "embedding_dim": int(items.shape[1]),
      "popularity_prior": float(weight),
      "query_features": list(dataset.query_spec.names),
      "item_features": list(dataset.item_spec.names),
      "platforms": list(platforms),
      "eval": eval_metrics,
      "config": json.loads(config.to_json()),
      "versions": _versions(),
      "files": {
        name: {"sha256": serving.sha256_file(p(name)), "bytes": os.path.getsize(p(name))}
        for name in files
      },
    }
    with open(p(serving.MANIFEST), "w") as f:
      json.dump(manifest, f, indent=2)

    # The artifact, read back through the serving path, must reproduce the training code.
    retriever = serving.Retriever.load(tmp)
    rows = np.arange(min(CHECK_ROWS, dataset.num_queries))
    batch = table_lib.take(dataset.queries, rows)
    want = np.asarray(
      prior.with_queries(model.apply(params, batch, method=model.query_tower), weight)
    )
    deviation = float(np.abs(retriever.embed_batch(batch) - want).max())
    if not deviation <= CHECK_TOLERANCE:
      raise ExportError(
        f"the exported query tower deviates from the model by {deviation:.3g} "
        f"(> {CHECK_TOLERANCE}); not writing {out}"
      )
    item_rows = np.arange(min(CHECK_ROWS, dataset.num_items))
    got = retriever.embed_item_batch(table_lib.take(dataset.items, item_rows))
    item_deviation = float(np.abs(got - items[item_rows, : got.shape[1]]).max())
    if not item_deviation <= CHECK_TOLERANCE:
      raise ExportError(
        f"the exported item tower deviates from the model by {item_deviation:.3g} "
        f"(> {CHECK_TOLERANCE}); not writing {out}"
      )
    for backend in ann_backends:
      index = retriever.save_ann_index(backend)
      log(f"built and saved the {index.backend} index ({index.describe()})")

    if replace:
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
      os.rename(out, os.path.join(old, "export"))
      try:
        os.rename(tmp, out)
      except BaseException:
        os.rename(os.path.join(old, "export"), out)  # the previous export stays in place
        raise
      shutil.rmtree(old)
    else:
      if os.path.isdir(out):
        os.rmdir(out)  # empty
      os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  log(
    f"exported {items.shape[0]} item embeddings (dim {items.shape[1]}), the item tower and the "
    "query tower "
    f"({len(blob) / 1024:.0f} KiB, platforms {', '.join(platforms)}) to {out} in "
    f"{time.time() - t0:.1f}s; exported tower vs model: max |diff| {deviation:.2g}"
    + (" (replaced the previous export)" if replace else "")
  )
  return {
    "step": int(step),
    "out": out,
    "num_items": int(items.shape[0]),
    "files": sorted(files + [serving.MANIFEST]),
    "max_abs_diff": deviation,
    "item_max_abs_diff": item_deviation,
    "replaced": replace,
  }
