"""Sparse (row-wise) embedding updates: touch only the rows a batch uses.

With a dense optimizer every step reads and writes every row of every table (and its optimizer
state), so the step slows down in proportion to the vocabulary. The sparse path instead:

  1. collects, per table, the row ids the step's batches look up and deduplicates them to a
     static-size set ``uniq [U]`` (``U`` = number of id slots in the batches; unused slots hold an
     out-of-range fill id);
  2. gathers those rows ``rows = table[uniq]  [U, D]`` and rewrites the batches' ids to positions
     in ``uniq``, so the model runs on the small gathered table;
  3. differentiates with respect to the gathered rows (duplicates in the batch sum up, as in the
     dense gradient);
  4. applies a row-wise optimizer to those rows and their optimizer state only, and scatters them
     back in place (the train state is donated, so XLA updates the buffers in place).

Step cost is then O(U * D), independent of the number of rows. Untouched rows and their optimizer
state stay bit-identical.

Tables with fewer than ``optimizer.sparse_min_rows`` rows stay with the dense parameters and their
optax optimizer: a batch touches most of a small table anyway, and deduplicating ids costs a sort.

Optimizers (``optimizer.embedding_optimizer``):
  * ``rowwise_adagrad`` (TPU embedding / FBGEMM style): one accumulator per row,
        acc_r += mean_d(g_rd^2);   w_r -= lr * g_r / (sqrt(acc_r) + eps)
  * ``lazy_adam``: Adam moments per element, updated only for touched rows; bias correction
        uses the global step count (as TF's LazyAdam).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from sslrec import features as features_lib
from sslrec.model import embeddings

Array = jax.Array
TableKey = tuple[str, str]  # (input scope, table param name), e.g. ("item_input", "genre_table")


def dedupe(ids: Sequence[Array], num_rows: int) -> tuple[Array, list[Array]]:
  """Deduplicates the (>= 0) ids of several arrays that index one table.

  Args:
    ids: int arrays of any shapes; ``-1`` = padding (ignored).
    num_rows: the table's row count; used as the fill id of unused slots (out of range).

  Returns:
    ``(uniq [U], local)``: ``uniq`` sorted unique ids followed by ``num_rows`` fill values
    (``U`` = total number of entries, static); ``local[i]`` has the shape of ``ids[i]`` and holds
    each id's position in ``uniq`` (``-1`` where the id was ``-1``).
  """
  flat = jnp.concatenate([x.reshape(-1) for x in ids]).astype(jnp.int32)
  fill = jnp.int32(num_rows)
  uniq = jnp.unique(jnp.where(flat >= 0, flat, fill), size=flat.shape[0], fill_value=fill)
  local = [jnp.where(x >= 0, jnp.searchsorted(uniq, x).astype(jnp.int32), -1) for x in ids]
  return uniq, local


def gather_rows(table: Array, uniq: Array) -> Array:
  """``table[uniq]`` with zeros for fill ids: ``[U, D]``."""
  return table.at[uniq].get(mode="fill", fill_value=0)


def scatter_rows(table: Array, uniq: Array, rows: Array) -> Array:
  """Writes ``rows`` back at ``uniq``; fill ids are dropped."""
  return table.at[uniq].set(rows.astype(table.dtype), mode="drop")


@dataclasses.dataclass(frozen=True)
class RowwiseAdagrad:
  learning_rate: float
  min_rows: int = 0  # tables with fewer rows stay on the dense optimizer
  initial_accumulator_value: float = 0.1
  eps: float = 1e-8

  def init(self, table: Array) -> dict:
    return {"acc": jnp.full(table.shape[:1], self.initial_accumulator_value, jnp.float32)}

  def update(
    self, table: Array, state: dict, uniq: Array, grads: Array, count: Array, lr_scale=1.0
  ) -> tuple[Array, dict]:
    """Updates the rows ``uniq`` of ``table`` with their gradients ``grads [U, D]``; the step
    is ``learning_rate * lr_scale`` (the warmup)."""
    del count
    acc = state["acc"].at[uniq].get(mode="fill", fill_value=1.0)
    g = grads.astype(jnp.float32)
    acc = acc + jnp.mean(g * g, axis=-1)
    rows = gather_rows(table, uniq).astype(jnp.float32)
    rows = rows - self.learning_rate * lr_scale * g / (jnp.sqrt(acc)[:, None] + self.eps)
    return (scatter_rows(table, uniq, rows), {"acc": state["acc"].at[uniq].set(acc, mode="drop")})


@dataclasses.dataclass(frozen=True)
class LazyAdam:
  learning_rate: float
  min_rows: int = 0  # tables with fewer rows stay on the dense optimizer
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8

  def init(self, table: Array) -> dict:
    return {"mu": jnp.zeros(table.shape, jnp.float32), "nu": jnp.zeros(table.shape, jnp.float32)}

  def update(
    self, table: Array, state: dict, uniq: Array, grads: Array, count: Array, lr_scale=1.0
  ) -> tuple[Array, dict]:
    g = grads.astype(jnp.float32)
    mu = self.b1 * state["mu"].at[uniq].get(mode="fill", fill_value=0) + (1 - self.b1) * g
    nu = self.b2 * state["nu"].at[uniq].get(mode="fill", fill_value=0) + (1 - self.b2) * g * g
    t = count.astype(jnp.float32) + 1.0
    mu_hat = mu / (1 - self.b1**t)
    nu_hat = nu / (1 - self.b2**t)
    rows = gather_rows(table, uniq).astype(jnp.float32)
    rows = rows - self.learning_rate * lr_scale * mu_hat / (jnp.sqrt(nu_hat) + self.eps)
    return (
      scatter_rows(table, uniq, rows),
      {
        "mu": state["mu"].at[uniq].set(mu, mode="drop"),
        "nu": state["nu"].at[uniq].set(nu, mode="drop"),
      },
    )


# The row-wise optimizers by ``optimizer.embedding_optimizer`` name (configuration reads the
# allowed names from here): a new one is a class with ``init`` / ``update`` plus one line.
OPTIMIZERS = {"rowwise_adagrad": RowwiseAdagrad, "lazy_adam": LazyAdam}


def batch_aware_accumulator(batch_size: int, scale: float = 400.0) -> float:
  """rowwise_adagrad's initial accumulator for a loss that is a mean over ``batch_size`` pairs.

  A row's gradient under a batch-mean loss scales as ``1 / B``, so the squared gradients its
  accumulator sums scale as ``1 / B**2``. A fixed start value (Keras' 0.1) then dominates the
  accumulator at large batches and Adagrad degenerates into SGD with tiny steps: on MovieLens at
  B = 512 a rare row's summed squared gradient over a whole run stays ~1e-5 << 0.1 and the row
  barely leaves its initialisation. ``scale / B**2`` keeps the start in the same ratio to the
  gradients at every batch size (0.1 at B = 63; 1.5e-3 at B = 512; docs/method.md).
  """
  return scale / float(batch_size) ** 2


def make_optimizer(
  name: str, learning_rate: float, min_rows: int = 0, initial_accumulator_value: float = 0.1
):
  """The row-wise optimizer ``name``; ``initial_accumulator_value``: rowwise_adagrad's start."""
  if name not in OPTIMIZERS:
    raise ValueError(f"embedding optimizer {name!r}; allowed: {tuple(OPTIMIZERS)}")
  if name == "rowwise_adagrad":
    return RowwiseAdagrad(
      learning_rate, min_rows=min_rows, initial_accumulator_value=initial_accumulator_value
    )
  return OPTIMIZERS[name](learning_rate, min_rows=min_rows)


# ----------------------------------------------------------------------------------------------
# The plan of one step: which rows of which table every model call reads.


def split_tables(params, min_rows: int = 0) -> tuple[dict, dict[TableKey, Array]]:
  """``(dense, tables)``: params without the embedding tables of at least ``min_rows`` rows, and
  those tables as ``{(scope, name): table}``. Smaller tables stay with the dense parameters (a
  sparse update does not pay for a table a batch touches most of anyway)."""
  flat = traverse_util.flatten_dict(params)
  is_sparse = lambda k, v: k[-1].endswith("_table") and v.shape[0] >= min_rows  # noqa: E731
  tables = {(k[-2], k[-1]): v for k, v in flat.items() if is_sparse(k, v)}
  dense = traverse_util.unflatten_dict({k: v for k, v in flat.items() if not is_sparse(k, v)})
  return dense, tables


def merge_tables(dense, tables: Mapping[TableKey, Array]) -> dict:
  """The inverse of ``split_tables``."""
  flat = traverse_util.flatten_dict(dense)
  for (scope, name), v in tables.items():
    flat[("params", scope, name)] = v
  return traverse_util.unflatten_dict(flat)


@dataclasses.dataclass(frozen=True)
class TowerCall:
  """One model call of a step: the tower batch it embeds and the input scope whose tables it reads.

  ``ids_from``: the call reads the same ids as another call, some dropped (-1): the SSL views of
  the SSL item batch. Its positions are that call's, masked, instead of being deduplicated again.
  ``name`` identifies the call in the plan (and in error messages).
  """

  name: str
  batch: Mapping[str, Array]
  scope: str
  spec: features_lib.TowerSpec
  ids_from: "TowerCall | None" = None


class Plan:
  """The sparse-update plan of one step, built inside the jitted step.

  ``Plan(tables, calls)`` deduplicates, per table, the ids every call (except ``ids_from`` ones)
  looks up (``uniq``) and each call's positions into them. Then:

    rows = plan.gather(tables)                 # {(scope, table): [U, D]}, differentiate these
    model.apply(..., ids=plan.lookup(rows, call))
    tables, emb_state = plan.apply(opt, tables, emb_state, row_grads, step)
  """

  def __init__(self, tables: Mapping[TableKey, Array], calls: Sequence[TowerCall]):
    raw = {c.name: embeddings.all_table_ids(c.spec, c.batch) for c in calls}
    deduped = [c for c in calls if c.ids_from is None]
    self.uniq: dict[TableKey, Array] = {}
    self._local: dict[str, dict[str, Array]] = {c.name: {} for c in calls}
    for (scope, tname), table in tables.items():
      users = [c for c in deduped if c.scope == scope and tname in raw[c.name]]
      if not users:
        continue
      uniq, locs = dedupe([raw[c.name][tname] for c in users], table.shape[0])
      for c, loc in zip(users, locs):
        self._local[c.name][tname] = loc
      for c in calls:
        if c.ids_from is not None and c.scope == scope and tname in raw[c.name]:
          self._local[c.name][tname] = jnp.where(
            raw[c.name][tname] >= 0, self._local[c.ids_from.name][tname], -1
          )
      self.uniq[(scope, tname)] = uniq

  def gather(self, tables: Mapping[TableKey, Array]) -> dict[TableKey, Array]:
    """The rows of every planned table the step reads: ``{(scope, table): [U, D]}``."""
    return {key: gather_rows(tables[key], uniq) for key, uniq in self.uniq.items()}

  def lookup(self, rows: Mapping[TableKey, Array], *calls: TowerCall) -> dict[str, Any]:
    """The ``ids`` argument of the model for ``calls`` (several: their batches concatenated
    along the batch axis, for one encoder pass): ``{table: (positions, rows [U, D])}``."""
    scope = calls[0].scope
    local = [self._local[c.name] for c in calls]
    return {
      t: (
        loc if len(calls) == 1 else jnp.concatenate([l[t] for l in local], axis=0),
        rows[(scope, t)],
      )
      for t, loc in local[0].items()
    }

  def apply(
    self,
    opt,
    tables: Mapping[TableKey, Array],
    emb_state: Mapping[str, Any],
    row_grads: Mapping[TableKey, Array],
    step: Array,
    lr_scale: Array | float = 1.0,
  ) -> tuple[dict[TableKey, Array], dict[str, Any]]:
    """The row-wise optimizer ``opt`` on the touched rows, its learning rate times ``lr_scale``
    (the warmup: a learning-rate scale, not a gradient scale, which Adam and the accumulator of
    Adagrad would undo); returns the new tables and their optimizer state
    (``{"<scope>/<table>": ...}``)."""
    new_tables, new_state = dict(tables), dict(emb_state)
    for key, uniq in self.uniq.items():
      skey = state_key(key)
      new_tables[key], new_state[skey] = opt.update(
        tables[key], emb_state[skey], uniq, row_grads[key], step, lr_scale
      )
    return new_tables, new_state


def state_key(key: TableKey) -> str:
  """The key of a table's row-wise optimizer state in ``TrainState.emb_state``."""
  return f"{key[0]}/{key[1]}"


def init_state(opt, tables: Mapping[TableKey, Array]) -> dict[str, Any]:
  return {state_key(key): opt.init(t) for key, t in tables.items()}


def dense_rowwise_adagrad_reference(table, acc, grads_full, learning_rate, eps=1e-8):
  """Row-wise Adagrad over *every* row with the full gradient (the dense reference the sparse path
  must reproduce on touched rows). Rows with zero gradient keep their value but, unlike the sparse
  path, are still rewritten."""
  acc = acc + jnp.mean(grads_full * grads_full, axis=-1)
  return table - learning_rate * grads_full / (jnp.sqrt(acc)[:, None] + eps), acc
