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

Two ways to reach row-sharded tables (``optimizer.embedding_routing``):

  * ``'gather'`` (``Plan``): every device deduplicates the *global* id list and the partitioner
    all-reduces the gathered rows and their gradients at global size: per-device traffic grows
    with the device count;
  * ``'owner'`` (``RoutedPlan``, TorchRec / SparseCore style): inside ``jax.shard_map`` each
    device deduplicates its *own* ids, sends each to the shard that owns its row (all-to-all),
    gets the rows back (all-to-all), and after the backward pass sends each row's gradient to
    the owner (all-to-all), which sums what every device sent for that row and applies the
    row-wise optimizer to its own rows in place. Per-destination buffers hold
    ``ceil(routing_capacity * L / n)`` ids (``L`` = the device's id slots of the table, ``n``
    devices), so per-device traffic stays constant in ``n`` at a fixed per-device batch; a step
    in which some device has more distinct ids for one owner than that takes the exact
    full-capacity path instead (``lax.cond``, the same on every device; never wrong, only
    slower).

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
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.sharding import PartitionSpec as P

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
  if num_rows <= DENSE_DEDUPE_RATIO * flat.shape[0]:
    return _dedupe_by_presence(flat, ids, num_rows)
  return _dedupe_by_sort(flat, ids, num_rows)


# dedupe: tables of at most this many rows per id slot mark the ids present in a [rows] vector
# (O(rows + slots), no sort); larger ones sort the ids. Same output either way (tested).
DENSE_DEDUPE_RATIO = 32


def _dedupe_by_sort(flat, ids, num_rows):
  fill = jnp.int32(num_rows)
  uniq = jnp.unique(jnp.where(flat >= 0, flat, fill), size=flat.shape[0], fill_value=fill)
  local = [jnp.where(x >= 0, jnp.searchsorted(uniq, x).astype(jnp.int32), -1) for x in ids]
  return uniq, local


def _dedupe_by_presence(flat, ids, num_rows):
  """The present rows in ascending order (``nonzero`` of a presence vector) and each id's
  position among them (the running count of present rows): XLA's CPU sort of a few thousand
  ids costs 3-10x this for the small tables of a schema (measured in docs/performance.md)."""
  present = jnp.zeros((num_rows + 1,), bool).at[jnp.where(flat >= 0, flat, num_rows)].set(True)
  present = present[:num_rows]
  uniq = jnp.nonzero(present, size=flat.shape[0], fill_value=num_rows)[0].astype(jnp.int32)
  rank = (jnp.cumsum(present) - 1).astype(jnp.int32)
  return uniq, [jnp.where(x >= 0, rank[jnp.maximum(x, 0)], -1).astype(jnp.int32) for x in ids]


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
    with jax.named_scope("embeddings"):
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

  def take(self, rows: Mapping[TableKey, Array], *calls: TowerCall) -> dict[str, dict]:
    """The rows each of ``calls`` reads, looked up in *one* gather per table, so that the
    backward pass is one scatter-add into one zero buffer per table, not one per call (the
    item tables serve the training pairs' items and the SSL views): ``{call name: {table:
    (positions, rows [positions shape..., D])}}``, for ``lookup_taken``."""
    out = {c.name: {} for c in calls}
    for (scope, t), r in rows.items():
      users = [c for c in calls if c.scope == scope and t in self._local[c.name]]
      if not users:
        continue
      pos = [self._local[c.name][t] for c in users]
      got = jnp.take(r, jnp.maximum(jnp.concatenate([p.reshape(-1) for p in pos]), 0), axis=0)
      start = 0
      for c, p in zip(users, pos, strict=True):
        out[c.name][t] = (p, got[start : start + p.size].reshape(p.shape + r.shape[1:]))
        start += p.size
    return out

  @staticmethod
  def lookup_taken(taken: Mapping[str, dict], *calls: TowerCall) -> dict[str, Any]:
    """The ``ids`` argument of the model for ``calls`` from ``take``'s rows (several calls:
    concatenated along the batch axis): ``{table: (positions, rows looked up, True)}``."""
    got = [taken[c.name] for c in calls]
    return {
      t: (
        jnp.concatenate([g[t][0] for g in got], 0) if len(got) > 1 else got[0][t][0],
        jnp.concatenate([g[t][1] for g in got], 0) if len(got) > 1 else got[0][t][1],
        True,
      )
      for t in got[0]
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
    with jax.named_scope("embeddings"):
      for key, uniq in self.uniq.items():
        skey = state_key(key)
        new_tables[key], new_state[skey] = opt.update(
          tables[key], emb_state[skey], uniq, row_grads[key], step, lr_scale
        )
    return new_tables, new_state


ROUTINGS = ("gather", "owner")  # optimizer.embedding_routing


def check_routable(mesh) -> None:
  """Owner routing needs the tables' rows and the batches split over the same devices: every
  mesh axis other than 'data' of size 1. Raises ConfigError naming the fields otherwise."""
  other = {a: mesh.shape[a] for a in mesh.axis_names if a != "data" and mesh.shape[a] > 1}
  if other:
    from sslrec import errors

    raise errors.ConfigError(
      f"config.optimizer.embedding_routing='owner' cannot route on config.mesh.axes="
      f"{tuple(mesh.axis_names)} / config.mesh.shape={tuple(mesh.devices.shape)}: the tables "
      f"are split over {other} but the batches over 'data'; use a mesh whose only axis of size "
      "> 1 is 'data', or embedding_routing='gather'"
    )


def _unique(flat: Array, fill: int) -> tuple[Array, Array]:
  """``(uniq [L], inverse [L])`` of the ``>= 0`` entries of ``flat`` (others -> ``fill``)."""
  flat = jnp.where(flat >= 0, flat, fill).astype(jnp.int32)
  uniq, inv = jnp.unique(flat, size=flat.shape[0], fill_value=jnp.int32(fill), return_inverse=True)
  return uniq, inv.reshape(-1).astype(jnp.int32)


class RoutedPlan:
  """The owner-routed sparse plan of one step (``optimizer.embedding_routing='owner'``; module
  docstring). Built inside the jitted step, like ``Plan``; the step differentiates with respect
  to the rows every call looks up (``gather``: ``{(call, scope, table): [ids..., D]}``, sharded
  with the call's batch) and hands their gradients to ``apply``, which routes them to the rows'
  owners, clips and applies the row-wise optimizer there:

    rows = plan.gather(tables)
    model.apply(..., ids=plan.lookup(rows, call))
    tables, emb_state, grad_norm = plan.apply(opt, tables, emb_state, row_grads, step, ...)
  """

  def __init__(
    self,
    tables: Mapping[TableKey, Array],
    calls: Sequence[TowerCall],
    mesh,
    capacity: float = 2.0,
  ):
    check_routable(mesh)
    self.mesh, self.capacity = mesh, capacity
    self.axes = tuple(mesh.axis_names)
    self.n = mesh.size
    self.raw = {c.name: embeddings.all_table_ids(c.spec, c.batch) for c in calls}
    self.calls = {c.name: c for c in calls}
    deduped = [c for c in calls if c.ids_from is None]
    self.users: dict[TableKey, list[str]] = {}
    for (scope, tname), _ in tables.items():
      users = [c.name for c in deduped if c.scope == scope and tname in self.raw[c.name]]
      if users:
        self.users[(scope, tname)] = users
    self._aux: dict[TableKey, tuple] = {}

  # -- per-device pieces (inside shard_map) --

  def _buckets(self, uniq: Array, rows: int, cap: int) -> tuple[Array, Array]:
    """Each local unique id's owner and slot in that owner's send buffer (ids sorted, so the
    owners are non-decreasing); fill ids get owner ``n`` (dropped)."""
    owner = jnp.minimum(uniq // rows, self.n).astype(jnp.int32)
    first = jnp.searchsorted(owner, jnp.arange(self.n, dtype=jnp.int32), method="sort")
    slot = jnp.arange(uniq.shape[0], dtype=jnp.int32) - first[jnp.minimum(owner, self.n - 1)]
    return owner, slot.astype(jnp.int32)

  def _forward(self, shard: Array, uniq: Array, owner: Array, slot: Array, cap: int):
    axis = self.axes
    rows = shard.shape[0]
    send = jnp.full((self.n, cap), rows, jnp.int32)
    send = send.at[owner, slot].set(uniq - owner * rows, mode="drop")
    recv = jax.lax.all_to_all(send, axis, 0, 0, tiled=True)  # [n, cap]: requests from device i
    got = shard.at[recv].get(mode="fill", fill_value=0)  # [n, cap, D]
    back = jax.lax.all_to_all(got, axis, 0, 0, tiled=True)  # rows from owner i
    return back.at[owner, slot].get(mode="fill", fill_value=0), recv

  def _backward(self, grads: Array, owner: Array, slot: Array, recv: Array, cap: int):
    axis = self.axes
    d = grads.shape[-1]
    send = jnp.zeros((self.n, cap, d), grads.dtype).at[owner, slot].set(grads, mode="drop")
    got = jax.lax.all_to_all(send, axis, 0, 0, tiled=True)  # [n, cap, D] for my rows
    rows_uniq, inv = _unique(recv[:, :cap].reshape(-1), fill=self._rows)
    summed = jnp.zeros((rows_uniq.shape[0], d), grads.dtype).at[inv].add(got.reshape(-1, d))
    return rows_uniq, summed

  def _cap(self, slots: int) -> int:
    return max(1, min(slots, math.ceil(self.capacity * slots / self.n)))

  # -- the plan's interface --

  def gather(self, tables: Mapping[TableKey, Array]) -> dict[tuple, Array]:
    """The rows each deduplicated call looks up, per table: ``{(call, scope, table): [ids
    shape..., D]}`` (zeros where an id is -1)."""
    out = {}
    spec = P(self.axes)
    for key, users in self.users.items():
      ids = [self.raw[u][key[1]] for u in users]
      rows_per_shard = tables[key].shape[0] // self.n
      self._rows = rows_per_shard

      def local(shard, *ids):
        flat = jnp.concatenate([x.reshape(-1) for x in ids])
        slots = flat.shape[0]
        cap = self._cap(slots)
        uniq, inv = _unique(flat, fill=self.n * shard.shape[0])
        owner, slot = self._buckets(uniq, shard.shape[0], cap)
        over = jnp.any((owner < self.n) & (slot >= cap))
        over = jax.lax.pmax(over.astype(jnp.int32), self.axes) > 0

        def small(_):
          r, recv = self._forward(shard, uniq, owner, slot, cap)
          return r, jnp.pad(recv, ((0, 0), (0, slots - cap)), constant_values=shard.shape[0])

        def full(_):
          with jax.named_scope("overflow"):
            return self._forward(shard, uniq, owner, slot, slots)

        urows, recv = small(None) if cap == slots else jax.lax.cond(over, full, small, None)
        valid = jnp.concatenate([x.reshape(-1) for x in ids]) >= 0
        rows = jnp.where(valid[:, None], urows[inv], 0)
        parts, start = [], 0
        for x in ids:
          parts.append(rows[start : start + x.size].reshape(x.shape + (rows.shape[-1],)))
          start += x.size
        return (*parts, inv, owner, slot, recv, over[None])

      with jax.named_scope("embeddings"):
        res = jax.shard_map(
          local,
          mesh=self.mesh,
          in_specs=(P(self.axes, None),) + (spec,) * len(ids),
          out_specs=(spec,) * (len(ids) + 5),
          check_vma=False,
        )(tables[key], *ids)
      for u, r in zip(users, res[: len(ids)]):
        out[(u, *key)] = r
      self._aux[key] = res[len(ids) :]
    return out

  def overflowed(self) -> Array:
    """Whether this step took the full-capacity path for some table (after ``gather``)."""
    flags = [aux[-1].any() for aux in self._aux.values()]
    return jnp.any(jnp.stack(flags)) if flags else jnp.zeros((), bool)

  def lookup(self, rows: Mapping[tuple, Array], *calls: TowerCall) -> dict[str, Any]:
    """The ``ids`` argument of the model for ``calls`` (several: concatenated along the batch
    axis): ``{table: (ids, rows looked up [ids shape..., D], True)}``."""
    scope = calls[0].scope
    out = {}
    for tname in self.raw[calls[0].name]:
      if (scope, tname) not in self.users:
        continue
      ids = [self.raw[c.name][tname] for c in calls]
      got = [rows[((c.ids_from or c).name, scope, tname)] for c in calls]
      if len(calls) == 1:
        out[tname] = (ids[0], got[0], True)
      else:
        out[tname] = (jnp.concatenate(ids, 0), jnp.concatenate(got, 0), True)
    return out

  def apply(
    self,
    opt,
    tables: Mapping[TableKey, Array],
    emb_state: Mapping[str, Any],
    row_grads: Mapping[tuple, Array],
    step: Array,
    lr_scale: Array | float = 1.0,
    *,
    dense_sq_norm: Array | float = 0.0,
    max_norm: float = 0.0,
  ) -> tuple[dict[TableKey, Array], dict[str, Any], Array]:
    """Routes the row gradients to their owners (duplicates over devices summed), clips them
    with the dense gradients (``dense_sq_norm``: their squared norm; ``max_norm`` <= 0: off)
    by the global norm, and applies ``opt`` on each owner's rows. Returns the new tables, their
    optimizer state and the global gradient norm (dense and rows, as ``Plan``'s path)."""
    spec = P(self.axes)
    keys = list(self.users)
    if not keys:
      return dict(tables), dict(emb_state), jnp.sqrt(dense_sq_norm)
    routed = {}
    for key in keys:
      users = self.users[key]
      grads = [row_grads[(u, *key)] for u in users]
      self._rows = tables[key].shape[0] // self.n

      def local(inv, owner, slot, recv, over, *grads):
        d = grads[0].shape[-1]
        flat = jnp.concatenate([g.reshape(-1, d) for g in grads]).astype(jnp.float32)
        slots = flat.shape[0]
        cap = self._cap(slots)
        ug = jnp.zeros((slots, d), jnp.float32).at[inv].add(flat)

        def small(_):
          u, g = self._backward(ug, owner, slot, recv, cap)
          pad = self.n * (slots - cap)
          return (
            jnp.pad(u, (0, pad), constant_values=self._rows),
            jnp.pad(g, ((0, pad), (0, 0))),
          )

        def full(_):
          with jax.named_scope("overflow"):
            return self._backward(ug, owner, slot, recv, slots)

        if cap == slots:
          return small(None)
        return jax.lax.cond(over[0], full, small, None)

      with jax.named_scope("embeddings"):
        aux = self._aux[key]
        routed[key] = jax.shard_map(
          local,
          mesh=self.mesh,
          in_specs=(spec,) * (5 + len(grads)),
          out_specs=(spec, spec),
          check_vma=False,
        )(*aux, *grads)
    sq = dense_sq_norm + sum(jnp.sum(jnp.square(g)) for _, g in routed.values())
    norm = jnp.sqrt(sq)
    scale = jnp.minimum(1.0, max_norm / (norm + 1e-12)) if max_norm > 0 else 1.0
    new_tables, new_state = dict(tables), dict(emb_state)
    for key in keys:
      uniq, g = routed[key]
      skey = state_key(key)

      scale_arr = jnp.asarray(scale, jnp.float32)
      state_spec = jax.tree.map(lambda _: P(self.axes), emb_state[skey])
      with jax.named_scope("embeddings"):
        new_tables[key], new_state[skey] = jax.shard_map(
          lambda t, st, u, g, c, w, sc: opt.update(t, st, u, g * sc, c, w),
          mesh=self.mesh,
          in_specs=(P(self.axes, None), state_spec, spec, spec, P(), P(), P()),
          out_specs=(P(self.axes, None), state_spec),
          check_vma=False,
        )(
          tables[key], emb_state[skey], uniq, g, step, jnp.asarray(lr_scale, jnp.float32), scale_arr
        )
    return new_tables, new_state, norm


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
