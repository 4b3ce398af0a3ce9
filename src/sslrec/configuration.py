"""Config validation and the run-compatibility rule for an existing workdir.

``validate`` runs before anything is built and raises ``ConfigError`` with one line naming the
field, its value and what is allowed. ``diff_model_fields`` tells whether a workdir's saved config
describes the same model as the requested one (only the run's length and its
log/eval/checkpoint intervals may change when resuming).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import ml_collections

from sslrec import errors, losses, references, sparse, step
from sslrec.data import pipeline, sources, stats
from sslrec.model import augment, towers

LOGQ_SOURCES = ("counts", "streaming")  # loss.logq_source

# Fields that may change between a run and its continuation in the same workdir.
RESUMABLE_FIELDS = frozenset(
  {
    "train.num_steps",
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.max_checkpoints",
    "eval.max_queries",
    "eval.batch_size",
    "data.num_threads",
    "data.prefetch",
    "data.device_prefetch",
    "ssl.view_encoding",
    "eval.exclude_train_items",
    "train.skip_nonfinite",
    "train.profile_steps",
    "train.num_epochs",
    "train.eval_every_epochs",
    "train.early_stopping_patience",
  }
)

# Choice fields whose allowed values are the registries of the modules that own them: a new
# masking strategy, optimizer or data source is one function plus one registry line there.
MASKINGS = tuple(augment.MASKS)
ITEM_SAMPLINGS = tuple(pipeline.ITEM_POOLS)
OPTIMIZERS = tuple(step.OPTIMIZERS)
EMBEDDING_OPTIMIZERS = tuple(sparse.OPTIMIZERS)
DATA_SOURCES = tuple(sources.SOURCES)
REFERENCES = tuple(references.REFERENCES)
SSL_SHARING = ("all", "all_but_last", "none")
DTYPES = ("float32", "bfloat16")
SPLITS = ("global", "user")
QUERY_MODES = ("user", "item")
UNKNOWN_ITEMS = ("drop", "error")


INT_LIMIT = 2**31  # integers of the config stay below this magnitude (int32 on the device)


ConfigError = errors.ConfigError  # raised by validate(); defined apart so owners can raise it


def _get(config, path: str) -> Any:
  node = config
  for part in path.split("."):
    try:
      node = node[part]
    except (KeyError, AttributeError):
      raise ConfigError(f"config field {path!r} is missing (see configs/base.py)") from None
  return node


def _check(cond: bool, field: str, value: Any, allowed: str):
  if not cond:
    raise ConfigError(f"config.{field}={value!r} is invalid; allowed: {allowed}")


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every field the library reads. Raises ConfigError on the first bad one."""
  g = lambda p: _get(config, p)  # noqa: E731
  _check(_is_int(g("seed")), "seed", g("seed"), "an integer")
  _check(0 <= g("seed") < INT_LIMIT, "seed", g("seed"), "an integer in [0, 2**31)")
  _check(
    _is_int(g("data.seed")) and -1 <= g("data.seed") < INT_LIMIT,
    "data.seed",
    g("data.seed"),
    "an integer in [0, 2**31), or -1 (the data follows seed)",
  )
  _check(g("data.name") in DATA_SOURCES, "data.name", g("data.name"), f"one of {DATA_SOURCES}")
  for f in ("data.num_items", "data.num_queries", "data.num_train_pairs", "data.num_eval_pairs"):
    _check(_is_int(g(f)) and g(f) >= 1, f, g(f), "an integer >= 1")
  _check(
    _is_num(g("data.popularity_exponent")) and g("data.popularity_exponent") >= 0,
    "data.popularity_exponent",
    g("data.popularity_exponent"),
    "a number >= 0",
  )
  _check(
    _is_num(g("data.feature_noise")) and 0 <= g("data.feature_noise") <= 1,
    "data.feature_noise",
    g("data.feature_noise"),
    "a number in [0, 1]",
  )
  _check(
    _is_int(g("data.nuisance_values")) and g("data.nuisance_values") >= 1,
    "data.nuisance_values",
    g("data.nuisance_values"),
    "an integer >= 1 (1 = no nuisance)",
  )
  _check(
    _is_int(g("data.embed_dim")) and g("data.embed_dim") >= 1,
    "data.embed_dim",
    g("data.embed_dim"),
    "an integer >= 1",
  )
  _check(
    _is_int(g("data.num_threads")) and g("data.num_threads") >= 0,
    "data.num_threads",
    g("data.num_threads"),
    "an integer >= 0",
  )
  _check(
    _is_int(g("data.prefetch")) and g("data.prefetch") >= 0,
    "data.prefetch",
    g("data.prefetch"),
    "an integer >= 0",
  )
  _check(
    _is_int(g("mesh.cpu_devices")) and 0 <= g("mesh.cpu_devices") <= 4096,
    "mesh.cpu_devices",
    g("mesh.cpu_devices"),
    "0 (the platform's default) or a number of CPU devices 1..4096",
  )
  _check(
    _is_int(g("data.device_prefetch")) and g("data.device_prefetch") >= 1,
    "data.device_prefetch",
    g("data.device_prefetch"),
    "an integer >= 1 (batches on the devices ahead of the step)",
  )
  _validate_real_data(g)

  for f in ("model.query_hidden", "model.item_hidden"):
    v = g(f)
    _check(
      isinstance(v, (tuple, list)) and all(_is_int(h) and h >= 1 for h in v),
      f,
      v,
      "a tuple of integers >= 1 (may be empty)",
    )
  _check(
    _is_int(g("model.output_dim")) and g("model.output_dim") >= 1,
    "model.output_dim",
    g("model.output_dim"),
    "an integer >= 1",
  )
  _check(
    _is_int(g("model.table_row_multiple")) and g("model.table_row_multiple") >= 1,
    "model.table_row_multiple",
    g("model.table_row_multiple"),
    "an integer >= 1",
  )
  _check(
    _is_num(g("eval.popularity_prior")) and g("eval.popularity_prior") >= 0,
    "eval.popularity_prior",
    g("eval.popularity_prior"),
    "a number >= 0",
  )
  cands = g("eval.popularity_prior_candidates")
  _check(
    isinstance(cands, (tuple, list)) and all(_is_num(w) and w >= 0 for w in cands),
    "eval.popularity_prior_candidates",
    cands,
    "a tuple of numbers >= 0 (empty: no choice, eval.popularity_prior is used)",
  )
  _check(
    _is_num(g("model.query_feature_dropout")) and 0 <= g("model.query_feature_dropout") < 1,
    "model.query_feature_dropout",
    g("model.query_feature_dropout"),
    "a number in [0, 1)",
  )
  _check(g("model.dtype") in DTYPES, "model.dtype", g("model.dtype"), f"one of {DTYPES}")
  _check(
    isinstance(g("model.share_item_tables"), bool),
    "model.share_item_tables",
    g("model.share_item_tables"),
    "True or False",
  )
  _check(
    not g("model.share_item_tables")
    or (g("data.name") != "synthetic" and g("data.query_mode") == "item"),
    "model.share_item_tables",
    g("model.share_item_tables"),
    "True only with data.query_mode='item' on movielens / files data (the query is an item)",
  )

  for f in ("loss.temperature", "ssl.temperature"):
    _check(_is_num(g(f)) and g(f) > 0, f, g(f), "a number > 0")
  _check(
    isinstance(g("loss.logq_correction"), bool),
    "loss.logq_correction",
    g("loss.logq_correction"),
    "True or False",
  )
  _check(
    isinstance(g("loss.remove_accidental_hits"), bool),
    "loss.remove_accidental_hits",
    g("loss.remove_accidental_hits"),
    "True or False",
  )
  _check(
    g("loss.logq_source") in LOGQ_SOURCES,
    "loss.logq_source",
    g("loss.logq_source"),
    f"one of {LOGQ_SOURCES}",
  )
  for f in ("loss.frequency_buckets", "loss.frequency_hashes"):
    _check(_is_int(g(f)) and 1 <= g(f) < INT_LIMIT, f, g(f), "an integer in [1, 2**31)")
  _check(
    _is_num(g("loss.frequency_learning_rate")) and 0 < g("loss.frequency_learning_rate") <= 1,
    "loss.frequency_learning_rate",
    g("loss.frequency_learning_rate"),
    "a number in (0, 1]",
  )
  _check(
    isinstance(g("loss.mixed_negatives"), bool),
    "loss.mixed_negatives",
    g("loss.mixed_negatives"),
    "True or False (the D_item batch, ssl.batch_size items, as extra negatives)",
  )
  _check(
    g("loss.logq_mode") in losses.LOGQ_MODES,
    "loss.logq_mode",
    g("loss.logq_mode"),
    f"one of {losses.LOGQ_MODES}",
  )
  _check(
    g("loss.logq_mode") == "standard" or g("loss.logq_correction"),
    "loss.logq_mode",
    g("loss.logq_mode"),
    "'standard' when loss.logq_correction=False (the corrected mode corrects the negatives' logQ)",
  )

  _check(
    _is_num(g("ssl.alpha")) and g("ssl.alpha") >= 0,
    "ssl.alpha",
    g("ssl.alpha"),
    "a number >= 0 (0 turns SSL off)",
  )
  _check(g("ssl.masking") in MASKINGS, "ssl.masking", g("ssl.masking"), f"one of {MASKINGS}")
  _check(
    g("ssl.mi_estimator") in stats.MI_ESTIMATORS,
    "ssl.mi_estimator",
    g("ssl.mi_estimator"),
    f"one of {stats.MI_ESTIMATORS}",
  )
  _check(isinstance(g("ssl.rank_ids"), bool), "ssl.rank_ids", g("ssl.rank_ids"), "True or False")
  _check(
    _is_num(g("ssl.mask_fraction")) and 0 < g("ssl.mask_fraction") < 1,
    "ssl.mask_fraction",
    g("ssl.mask_fraction"),
    "a number in (0, 1)",
  )
  _check(
    _is_num(g("ssl.dropout_rate")) and 0 <= g("ssl.dropout_rate") < 1,
    "ssl.dropout_rate",
    g("ssl.dropout_rate"),
    "a number in [0, 1)",
  )
  _check(
    g("ssl.item_sampling") in ITEM_SAMPLINGS,
    "ssl.item_sampling",
    g("ssl.item_sampling"),
    f"one of {ITEM_SAMPLINGS}",
  )
  _check(
    _is_int(g("ssl.batch_size")) and g("ssl.batch_size") >= 2,
    "ssl.batch_size",
    g("ssl.batch_size"),
    "an integer >= 2",
  )
  _check(
    g("ssl.encoder_sharing") in SSL_SHARING,
    "ssl.encoder_sharing",
    g("ssl.encoder_sharing"),
    f"one of {SSL_SHARING}",
  )
  _check(
    g("ssl.view_encoding") in towers.SSL_VIEW_ENCODINGS,
    "ssl.view_encoding",
    g("ssl.view_encoding"),
    f"one of {towers.SSL_VIEW_ENCODINGS}",
  )
  _check(
    _is_num(g("reg.spread_out_weight")) and g("reg.spread_out_weight") >= 0,
    "reg.spread_out_weight",
    g("reg.spread_out_weight"),
    "a number >= 0",
  )

  _check(
    g("optimizer.name") in OPTIMIZERS, "optimizer.name", g("optimizer.name"), f"one of {OPTIMIZERS}"
  )
  _check(
    _is_num(g("optimizer.learning_rate")) and g("optimizer.learning_rate") > 0,
    "optimizer.learning_rate",
    g("optimizer.learning_rate"),
    "a number > 0",
  )
  _check(
    _is_int(g("optimizer.warmup_steps")) and g("optimizer.warmup_steps") >= 0,
    "optimizer.warmup_steps",
    g("optimizer.warmup_steps"),
    "an integer >= 0",
  )
  _check(
    g("optimizer.embedding_update") in ("dense", "sparse"),
    "optimizer.embedding_update",
    g("optimizer.embedding_update"),
    "one of ('dense', 'sparse')",
  )
  _check(
    g("optimizer.embedding_optimizer") in EMBEDDING_OPTIMIZERS,
    "optimizer.embedding_optimizer",
    g("optimizer.embedding_optimizer"),
    f"one of {EMBEDDING_OPTIMIZERS}",
  )
  _check(
    _is_num(g("optimizer.embedding_initial_accumulator"))
    and g("optimizer.embedding_initial_accumulator") >= 0,
    "optimizer.embedding_initial_accumulator",
    g("optimizer.embedding_initial_accumulator"),
    "a number >= 0 (0 = batch-aware: 400 / train.batch_size**2)",
  )
  _check(
    _is_num(g("optimizer.embedding_learning_rate")) and g("optimizer.embedding_learning_rate") > 0,
    "optimizer.embedding_learning_rate",
    g("optimizer.embedding_learning_rate"),
    "a number > 0",
  )
  _check(
    _is_int(g("model.replicate_table_rows")) and g("model.replicate_table_rows") >= 0,
    "model.replicate_table_rows",
    g("model.replicate_table_rows"),
    "an integer >= 0 (0 = every table row-sharded)",
  )
  _check(
    g("optimizer.embedding_routing") in sparse.ROUTINGS,
    "optimizer.embedding_routing",
    g("optimizer.embedding_routing"),
    f"one of {sparse.ROUTINGS}",
  )
  _check(
    _is_num(g("optimizer.routing_capacity")) and g("optimizer.routing_capacity") >= 1,
    "optimizer.routing_capacity",
    g("optimizer.routing_capacity"),
    "a number >= 1",
  )
  _check(
    _is_int(g("optimizer.sparse_min_rows")) and g("optimizer.sparse_min_rows") >= 0,
    "optimizer.sparse_min_rows",
    g("optimizer.sparse_min_rows"),
    "an integer >= 0",
  )
  _check(
    _is_num(g("optimizer.grad_clip_norm")) and g("optimizer.grad_clip_norm") >= 0,
    "optimizer.grad_clip_norm",
    g("optimizer.grad_clip_norm"),
    "a number >= 0 (0 = off)",
  )

  _check(
    _is_int(g("train.num_steps")) and g("train.num_steps") >= 1,
    "train.num_steps",
    g("train.num_steps"),
    "an integer >= 1",
  )
  _check(
    _is_int(g("train.batch_size")) and g("train.batch_size") >= 2,
    "train.batch_size",
    g("train.batch_size"),
    "an integer >= 2",
  )
  for f in (
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.max_checkpoints",
  ):
    _check(_is_int(g(f)) and g(f) >= 1, f, g(f), "an integer >= 1")
  _check(
    isinstance(g("train.skip_nonfinite"), bool),
    "train.skip_nonfinite",
    g("train.skip_nonfinite"),
    "True or False",
  )
  _check(
    _is_num(g("train.num_epochs")) and g("train.num_epochs") >= 0,
    "train.num_epochs",
    g("train.num_epochs"),
    "a number >= 0 (0 = train.num_steps steps)",
  )
  _check(
    _is_num(g("train.eval_every_epochs")) and g("train.eval_every_epochs") >= 0,
    "train.eval_every_epochs",
    g("train.eval_every_epochs"),
    "a number >= 0 (0 = every train.eval_every steps)",
  )
  _check(
    _is_int(g("train.early_stopping_patience")) and g("train.early_stopping_patience") >= 0,
    "train.early_stopping_patience",
    g("train.early_stopping_patience"),
    "an integer >= 0 (0 = off)",
  )

  ks = g("eval.ks")
  _check(
    isinstance(ks, (tuple, list)) and len(ks) > 0 and all(_is_int(k) and k >= 1 for k in ks),
    "eval.ks",
    ks,
    "a non-empty tuple of integers >= 1",
  )
  _check(
    _is_num(g("eval.head_fraction")) and 0 < g("eval.head_fraction") < 1,
    "eval.head_fraction",
    g("eval.head_fraction"),
    "a number in (0, 1)",
  )
  _check(
    _is_int(g("eval.batch_size")) and g("eval.batch_size") >= 1,
    "eval.batch_size",
    g("eval.batch_size"),
    "an integer >= 1",
  )
  _check(
    _is_int(g("eval.max_queries")) and g("eval.max_queries") >= 0,
    "eval.max_queries",
    g("eval.max_queries"),
    "an integer >= 0 (0 = all)",
  )
  _check(
    isinstance(g("eval.exclude_train_items"), bool),
    "eval.exclude_train_items",
    g("eval.exclude_train_items"),
    "True or False",
  )
  refs = g("eval.references")
  _check(
    isinstance(refs, (tuple, list))
    and all(r in REFERENCES for r in refs)
    and len(set(refs)) == len(refs),
    "eval.references",
    refs,
    f"a tuple of distinct names from {REFERENCES}",
  )
  metrics = selectable_metrics(ks)
  _check(
    g("train.select_metric") in metrics,
    "train.select_metric",
    g("train.select_metric"),
    f"a validation metric the evaluation computes: one of {metrics}",
  )

  shape, axes = g("mesh.shape"), g("mesh.axes")
  _check(
    isinstance(shape, (tuple, list))
    and all(_is_int(s) and (s >= 1 or s == -1) for s in shape)
    and sum(s == -1 for s in shape) <= 1,
    "mesh.shape",
    shape,
    "a tuple of positive integers with at most one -1",
  )
  _check(
    isinstance(axes, (tuple, list)) and len(axes) == len(shape) and "data" in axes,
    "mesh.axes",
    axes,
    f"{len(shape)} axis names including 'data'",
  )
  _check_numbers(config)


def selectable_metrics(ks) -> tuple[str, ...]:
  """The validation metrics a run can select its checkpoint by (higher is better)."""
  return tuple(
    f"{m}@{k}{part}"
    for m in ("recall", "ndcg", "map")
    for k in ks
    for part in (("", "/head", "/tail") if m != "map" else ("",))
  )


def eval_interval(config, num_train: int) -> int:
  """Steps between validations: ``train.eval_every_epochs`` epochs of D_train when set (so that
  a recipe transfers across dataset sizes), else ``train.eval_every``."""
  if config.train.eval_every_epochs > 0:
    return max(1, round(config.train.eval_every_epochs * num_train / config.train.batch_size))
  return int(config.train.eval_every)


def num_steps(config, num_train: int) -> int:
  """The run's length in steps: ``train.num_epochs`` epochs of D_train when set, else
  ``train.num_steps``."""
  if config.train.num_epochs > 0:
    return max(1, math.ceil(config.train.num_epochs * num_train / config.train.batch_size))
  return int(config.train.num_steps)


def _check_numbers(node, prefix: str = "") -> None:
  """Every number of the config is finite, every integer of magnitude below 2**31 (steps, sizes
  and ids are int32 on the device)."""
  for key, v in node.items():
    path = f"{prefix}{key}"
    if isinstance(v, (Mapping, ml_collections.ConfigDict)):
      _check_numbers(v, path + ".")
      continue
    for x in v if isinstance(v, (tuple, list)) else (v,):
      if _is_int(x):
        _check(-INT_LIMIT < x < INT_LIMIT, path, v, "integers of magnitude below 2**31")
      elif isinstance(x, float):
        _check(math.isfinite(x), path, v, "finite numbers")


def _validate_real_data(g) -> None:
  """The data.* fields of the file readers (checked whatever the source, as every field is)."""
  _check(isinstance(g("data.path"), str), "data.path", g("data.path"), "a folder path (string)")
  if g("data.name") in ("movielens", "files"):
    _check(
      bool(g("data.path")),
      "data.path",
      g("data.path"),
      f"the data folder (required for data.name={g('data.name')!r})",
    )
  _check(_is_num(g("data.min_rating")), "data.min_rating", g("data.min_rating"), "a number")
  _check(g("data.split") in SPLITS, "data.split", g("data.split"), f"one of {SPLITS}")
  _check(
    _is_num(g("data.eval_fraction")) and 0 < g("data.eval_fraction") < 1,
    "data.eval_fraction",
    g("data.eval_fraction"),
    "a number in (0, 1)",
  )
  _check(
    _is_num(g("data.valid_fraction"))
    and 0 < g("data.valid_fraction")
    and g("data.eval_fraction") + g("data.valid_fraction") < 1,
    "data.valid_fraction",
    g("data.valid_fraction"),
    f"a number in (0, {1 - g('data.eval_fraction'):g}) (with data.eval_fraction, below 1: "
    "training keeps the rest)",
  )
  _check(
    _is_int(g("data.history_length")) and g("data.history_length") >= 0,
    "data.history_length",
    g("data.history_length"),
    "an integer >= 0 (0 = no history)",
  )
  _check(
    g("data.query_mode") in QUERY_MODES,
    "data.query_mode",
    g("data.query_mode"),
    f"one of {QUERY_MODES}",
  )
  _check(
    g("data.unknown_items") in UNKNOWN_ITEMS,
    "data.unknown_items",
    g("data.unknown_items"),
    f"one of {UNKNOWN_ITEMS}",
  )
  _check(
    _is_num(g("data.train_fraction")) and 0 < g("data.train_fraction") <= 1,
    "data.train_fraction",
    g("data.train_fraction"),
    "a number in (0, 1]",
  )
  for f in (
    "interactions",
    "item_table",
    "query_table",
    "query_key",
    "item_key",
    "timestamp",
    "weight",
    "item_name",
    "csv_separator",
  ):
    _check(
      isinstance(g(f"data.files.{f}"), str), f"data.files.{f}", g(f"data.files.{f}"), "a string"
    )
  for f in ("item_features", "query_features"):
    _check(
      isinstance(g(f"data.files.{f}"), (Mapping, ml_collections.ConfigDict)),
      f"data.files.{f}",
      g(f"data.files.{f}"),
      "a mapping {feature name: {kind, column, buckets, max_len, separator}}",
    )


def validate_against_data(
  config, *, num_items: int, num_train: int, item_feature_names, feature_groups=()
) -> None:
  """Checks that depend on the loaded data (sizes, declared feature groups)."""
  if config.ssl.alpha > 0 and augment.MASKS[config.ssl.masking][1] == "groups":
    _check(
      bool(feature_groups),
      "ssl.masking",
      config.ssl.masking,
      "a masking the data supports: this dataset declares no feature groups (only the embedded "
      "datasets do: data.name='synthetic' | 'mechanism'); use 'cfm', 'anti_cfm', 'rfm' or 'none'",
    )
  _check(
    config.train.batch_size <= num_train,
    "train.batch_size",
    config.train.batch_size,
    f"at most the number of training pairs ({num_train})",
  )
  if config.ssl.alpha > 0 or config.reg.spread_out_weight > 0:
    pool = num_items if config.ssl.item_sampling == "uniform" else num_train
    _check(
      config.ssl.batch_size <= pool,
      "ssl.batch_size",
      config.ssl.batch_size,
      f"at most the size of the SSL item pool ({pool})",
    )
  _check(
    max(config.eval.ks) <= num_items,
    "eval.ks",
    tuple(config.eval.ks),
    f"cut-offs at most the catalogue size ({num_items})",
  )
  del item_feature_names


def to_dict(config) -> dict:
  """A JSON-able dict of a ConfigDict (tuples become lists)."""
  return json.loads(config.to_json())


def flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flatten(v, key + "."))
    else:
      out[key] = v
  return out


def diff_model_fields(saved: Mapping, requested: Mapping) -> list[str]:
  """Fields (dotted) whose values differ between two config dicts, ignoring RESUMABLE_FIELDS.

  Returns lines like ``"ssl.alpha: 1.0 -> 0.3"``.
  """
  a, b = flatten(saved), flatten(requested)
  lines = []
  for key in sorted(set(a) | set(b)):
    if key in RESUMABLE_FIELDS:
      continue
    if a.get(key, "<absent>") != b.get(key, "<absent>"):
      lines.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
  return lines
