"""Device mesh, sharding rules, multi-host initialisation and sharded top-K.

Sharding rules (the train and eval steps are compiled with these explicit in/out shardings):
  * batches: leading (batch) dimension on the 'data' axis;
  * embedding tables (parameters named ``*_table``, ``[rows, dim]``) and their optimizer state:
    replicated below ``model.replicate_table_rows`` rows, otherwise row-sharded on the 'model'
    axis when the mesh has one of size > 1, otherwise over *all* mesh
    axes (with the default 1-D mesh: over every device). Rows are padded to a multiple of
    ``model.table_row_multiple`` so any shard count dividing it works;
  * every other parameter (MLPs, default embeddings) and optimizer state: replicated.

The losses see the global batch: the query tower output ``q [B, D]`` and item tower output
``x [B, D]`` are sharded on 'data'; the logits ``q @ x.T [B, B]`` are computed row-sharded (XLA
all-gathers ``x``, ``B x D`` per device), so in-batch negatives span every device. Per device that
costs ``B/n x B`` logits of memory and ``B^2 D / n`` flops, plus an all-gather of ``B x D``:
quadratic in the global batch, linear in the number of devices saved.
"""

from __future__ import annotations

import functools
import math
import os
import socket
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sslrec import errors


class DistributedError(RuntimeError):
  """The distributed runtime could not be started; the message says why."""


def initialize_distributed(
  *,
  coordinator_address: str | None,
  num_processes: int | None,
  process_id: int | None,
  multihost: bool,
  timeout_s: int = 300,
) -> None:
  """Starts JAX's distributed runtime (no-op for a single-process run).

  ``coordinator_address`` (with ``num_processes`` and ``process_id``) for an explicit cluster, or
  ``multihost=True`` for environments where ``jax.distributed.initialize()`` finds everything
  itself (TPU pods, SLURM, ...). CPU collectives use gloo so that CPU-only clusters work too.
  """
  if coordinator_address is None and not multihost:
    if num_processes not in (None, 1) or process_id not in (None, 0):
      raise DistributedError(
        "--num_processes/--process_id need --coordinator_address (or --multihost)"
      )
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator_address is not None:
    if num_processes is None or num_processes < 1:
      raise DistributedError(f"--num_processes={num_processes}: must be an integer >= 1")
    if process_id is None or not 0 <= process_id < num_processes:
      raise DistributedError(
        f"--process_id={process_id} is out of range; allowed 0..{num_processes - 1} for "
        f"--num_processes={num_processes}"
      )
    if ":" not in coordinator_address:
      raise DistributedError(f"--coordinator_address={coordinator_address}: expected HOST:PORT")
    if process_id != 0:
      _wait_for_coordinator(coordinator_address, timeout_s)
    kwargs = dict(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
  else:
    kwargs = {}
  try:
    jax.distributed.initialize(initialization_timeout=timeout_s, **kwargs)
  except Exception as e:  # noqa: BLE001 -- the runtime raises several types; all mean "no cluster"
    where = f"the coordinator at {coordinator_address}" if coordinator_address else "the cluster"
    first = " ".join(str(e).split())[:300]
    raise DistributedError(
      f"could not join {where} within {timeout_s}s ({type(e).__name__}: {first})"
    ) from None


def _wait_for_coordinator(address: str, timeout_s: int) -> None:
  """Waits until the coordinator's port accepts TCP connections.

  XLA's client aborts the whole process (no Python exception) when it cannot connect, so an
  unreachable coordinator is detected here first and reported as a DistributedError.
  """
  host, port = address.rsplit(":", 1)
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=1.0):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise DistributedError(
          f"could not join the coordinator at {address} within {timeout_s}s "
          f"({e.strerror or e}); is process 0 running?"
        ) from None
      time.sleep(0.5)


def set_cpu_devices(n: int) -> None:
  """``mesh.cpu_devices``: 0 keeps the platform's default; on a CPU host that is one device on
  which XLA's intra-op thread pool spreads every op over all cores, measured 2.4x (baseline) and
  2.7x (CFM) faster per step on 2 cores than a data-parallel mesh of one device per core
  (docs/performance.md). ``n >= 1``: ``n`` CPU devices (``jax_num_cpu_devices``), e.g. one per
  core for a data-parallel mesh, or several to try a multi-device layout on one host. Must run
  before anything starts JAX's backends; accelerator platforms are not affected."""
  if not n:
    return
  try:
    jax.config.update("jax_num_cpu_devices", int(n))
  except RuntimeError:
    raise errors.ConfigError(
      f"config.mesh.cpu_devices={n}: JAX's backends are already running in this process; set it "
      "before JAX is used (the command line does), or use "
      "XLA_FLAGS=--xla_force_host_platform_device_count"
    ) from None


def make_mesh(shape, axes, devices=None) -> Mesh:
  """A mesh of ``devices`` (default: all) with ``shape`` (one -1 entry = the remaining devices)."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  shape = list(shape)
  if -1 in shape:
    rest = math.prod(s for s in shape if s != -1)
    if n % rest:
      raise errors.ConfigError(f"config.mesh.shape={tuple(shape)} does not divide the {n} devices")
    shape[shape.index(-1)] = n // rest
  if math.prod(shape) != n:
    raise errors.ConfigError(
      f"config.mesh.shape={tuple(shape)} needs {math.prod(shape)} devices; {n} are available"
    )
  return jax.make_mesh(
    tuple(shape), tuple(axes), axis_types=(AxisType.Auto,) * len(shape), devices=devices
  )


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading dimension on 'data', the rest replicated."""
  return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_size(mesh: Mesh) -> int:
  return mesh.shape["data"]


def table_axes(mesh: Mesh):
  """The mesh axes embedding-table rows are split over."""
  if "model" in mesh.axis_names and mesh.shape["model"] > 1:
    return "model"
  return tuple(mesh.axis_names)


def num_table_shards(mesh: Mesh) -> int:
  axes = table_axes(mesh)
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def check_table_rows(mesh: Mesh, row_multiple: int) -> None:
  shards = num_table_shards(mesh)
  if row_multiple % shards:
    raise errors.ConfigError(
      f"config.model.table_row_multiple={row_multiple} is not divisible by the {shards} "
      "embedding-table shards of this mesh; use a multiple of it"
    )


def _is_table(path) -> bool:
  return any(isinstance(k, jax.tree_util.DictKey) and str(k.key).endswith("_table") for k in path)


def state_shardings(state, mesh: Mesh, replicate_rows: int = 0):
  """Shardings for a pytree holding parameters and optimizer state (see the module rules):
  any array under a ``*_table`` key is split on its first (row) dimension, unless it has fewer
  than ``replicate_rows`` rows (``model.replicate_table_rows``: a small table is replicated, so
  its lookups need no communication)."""
  axes = table_axes(mesh)
  rep = replicated(mesh)

  def rule(path, x):
    nd = len(np.shape(x))
    if _is_table(path) and nd >= 1 and np.shape(x)[0] >= replicate_rows:
      return NamedSharding(mesh, P(axes, *([None] * (nd - 1))))
    return rep

  return jax.tree_util.tree_map_with_path(rule, state)


def _host_memory_bytes() -> int:
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(
  abstract_state, mesh: Mesh, *, dense_update: bool, fraction: float = 0.8, replicate_rows: int = 0
) -> None:
  """Refuses, before anything is allocated, a train state that cannot fit.

  Counts the bytes of every array of the state per device after sharding (dense updates also
  materialise a full gradient of the parameters), and compares with the device memory
  (``memory_stats()['bytes_limit']``) or, on CPU, where all devices share the host, the host's
  physical memory. Raises ConfigError with the bytes needed.
  """
  shardings = state_shardings(abstract_state, mesh, replicate_rows)

  def per_device(x, s):
    n = math.prod(x.shape) * np.dtype(x.dtype).itemsize
    return n // (num_table_shards(mesh) if s.spec and s.spec[0] is not None else 1)

  sizes = jax.tree.map(per_device, abstract_state, shardings)
  need = sum(jax.tree.leaves(sizes))
  if dense_update:
    need += sum(jax.tree.leaves(jax.tree.map(per_device, abstract_state.params, shardings.params)))
  dev = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())
  try:
    stats = dev.memory_stats()
  except Exception:  # noqa: BLE001 -- not every backend reports memory
    stats = None
  if dev.platform != "cpu" and stats and "bytes_limit" in stats:
    limit, where = int(stats["bytes_limit"]), f"a {dev.platform} device's memory"
  else:
    local = sum(1 for d in mesh.devices.flat if d.process_index == jax.process_index())
    need *= local
    limit, where = _host_memory_bytes(), "this host's memory"
  if need > fraction * limit:
    raise errors.ConfigError(
      f"the embedding tables and optimizer state need {need / 2**30:.2f} GiB on {where} "
      f"({limit / 2**30:.2f} GiB, at most {fraction:.0%} usable); reduce vocabulary / hash "
      "sizes or embedding dims, use sparse updates, or shard over more devices"
    )


def local_batch_size(global_batch: int, mesh: Mesh, field: str) -> int:
  """The per-process share of a global batch; checks divisibility."""
  if global_batch % data_size(mesh):
    raise errors.ConfigError(
      f"config.{field}={global_batch} is not divisible by the mesh's 'data' axis "
      f"({data_size(mesh)} devices)"
    )
  if global_batch % jax.process_count():
    raise errors.ConfigError(
      f"config.{field}={global_batch} is not divisible by the {jax.process_count()} processes"
    )
  return global_batch // jax.process_count()


def to_global(batch, mesh: Mesh):
  """Per-process numpy batch pytree -> global ``jax.Array``s sharded on 'data'."""
  sharding = data_sharding(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
  )


def all_devices_rows(mesh: Mesh) -> NamedSharding:
  """Rows over every device of the mesh (for the catalogue's embeddings at evaluation)."""
  return NamedSharding(mesh, P(tuple(mesh.axis_names), None))


def shard_rows(host_array: np.ndarray, mesh: Mesh, row_multiple: int = 1) -> tuple[jax.Array, int]:
  """A host array ``[N, D]`` (same on every process) -> rows over all devices, zero-padded so each
  device holds a multiple of ``row_multiple`` rows. Returns ``(array [N_pad, D], N)``."""
  n = host_array.shape[0]
  block = mesh.size * row_multiple
  pad = (-n) % block
  if pad:
    host_array = np.concatenate(
      [host_array, np.zeros((pad,) + host_array.shape[1:], host_array.dtype)]
    )
  sharding = all_devices_rows(mesh)
  arr = jax.make_array_from_callback(host_array.shape, sharding, lambda idx: host_array[idx])
  return arr, n


def _top_k_group(rows: int, k: int) -> int:
  """Group size of ``block_top_k``'s two-stage selection over ``rows`` scores (1: one top-k).

  The selection runs ``top_k`` over ``rows / g`` group maxima, then over the ``k * g`` scores of
  the ``k`` winning groups, ``rows / g + k * g`` elements per query instead of ``rows`` (smallest
  at ``g`` near ``sqrt(rows / k)``). Worth it from ``g = 4`` on; ``g`` is a power of two dividing
  ``rows``."""
  if k < 1 or rows < 16 * k:
    return 1
  g = 1 << int(math.log2(math.sqrt(rows / k)))
  while g > 1 and rows % g:
    g //= 2
  return g if g >= 4 else 1


def block_top_k(q, x, start, k: int, num_valid: int, *, exclude=None, precision=None):
  """Top ``k`` of the scores ``q @ x.T`` of catalogue rows ``start .. start + c`` (``x [c, D]``):
  ``(scores, ids) [B, k]``, exactly ``jax.lax.top_k``'s (ties: the lower id first). Rows with id
  >= ``num_valid`` (padding) and the pairs ``exclude = (ex_query [M], ex_item [M])`` that fall in
  the block (``ex_query >= B`` is padding) score -inf.

  Two-stage when ``c`` allows (``_top_k_group``): the rows are split into ``c / g`` contiguous
  groups of ``g``; the ``k`` groups with the largest maxima hold the top ``k`` (fewer than ``k``
  groups can have a maximum ahead of the k-th score, each holding a distinct score ahead of it),
  so a top-k over the group maxima and one over the ``k * g`` scores of the winning groups (taken
  in id order, so ties still go to the lower id) select exactly what one top-k over all ``c``
  scores does, for a fraction of its comparisons (XLA's CPU top-k is one sequential pass per
  query; the group maxima are a vectorised reduction). The catalogue block is permuted so that a
  group's ``g`` scores lie ``c / g`` apart in the score row: the maxima reduce over a major axis.
  One caveat: ``lax.top_k`` ranks +0.0 above -0.0, a maximum need not; among scores that are
  exactly zero with both signs the two may keep different (equal-scoring) items.
  """
  c, d = x.shape
  b = q.shape[0]
  g = _top_k_group(c, min(k, c))
  ids = start + jnp.arange(c, dtype=jnp.int32)
  m = c // g
  if g > 1:  # position j * m + r holds row r * g + j
    x = x.reshape(m, g, d).transpose(1, 0, 2).reshape(c, d)
    ids = ids.reshape(m, g).T.reshape(c)
  s = jnp.matmul(q, x.T, precision=precision)  # [B, c]
  s = jnp.where(ids[None, :] < num_valid, s, -jnp.inf)
  if exclude is not None:
    ex_q, ex_i = exclude
    local = ex_i - start
    ok = (local >= 0) & (local < c)
    pos = (local % g) * m + local // g if g > 1 else local
    s = s.at[jnp.where(ok, ex_q, b), jnp.where(ok, pos, 0)].set(-jnp.inf, mode="drop")
  if g == 1:
    v, i = jax.lax.top_k(s, min(k, c))
    return v, jnp.take(ids, i)
  s3 = s.reshape(b, g, m)  # s3[:, j, r]: row r * g + j
  _, groups = jax.lax.top_k(s3.max(axis=1), k)
  groups = -jax.lax.top_k(-groups, k)[0]  # ascending: candidates in id order
  cand = jnp.take_along_axis(s3, groups[:, None, :], axis=2)  # [B, g, k]
  cand = cand.transpose(0, 2, 1).reshape(b, k * g)
  v, j = jax.lax.top_k(cand, k)
  return v, start + jnp.take_along_axis(groups, j // g, axis=1) * g + j % g


def make_sharded_top_k(
  mesh: Mesh,
  k: int,
  num_valid: int,
  chunk: int | None = None,
  *,
  exclude: bool = False,
  precision=None,
):
  """``fn(query [Bq, D] replicated, items [N_pad, D] row-sharded) -> (scores, ids) [Bq, k]``;
  with ``exclude``, ``fn(query, items, ex_query [M], ex_item [M])`` (replicated): the pairs
  ``(ex_query[m], ex_item[m])`` score -inf (``block_top_k``).

  Each device scores its own rows — in blocks of ``chunk`` rows when given, keeping a running
  top-k (a top-k over a short block is much cheaper than over all rows at once) — and keeps its
  local top-k (global row ids, ``block_top_k``); the per-device candidates are all-gathered
  (``n_devices * k`` per query) and merged by a final top-k. Padding rows (id >= num_valid) never
  win. Ties: the lower id first.
  """
  axes = tuple(mesh.axis_names)

  def local(q, x, *ex):
    rows = x.shape[0]
    base = (jax.lax.axis_index(axes) * rows).astype(jnp.int32)
    top = functools.partial(
      block_top_k, k=k, num_valid=num_valid, exclude=ex or None, precision=precision
    )
    if chunk is None or rows <= chunk:
      v, i = top(q, x, base)
    else:
      xs = x.reshape(rows // chunk, chunk, x.shape[1])

      def body(carry, xc_c):
        bv, bi = carry
        xc, c = xc_c
        v, i = top(q, xc, base + c * chunk)
        v, i = jnp.concatenate([bv, v], 1), jnp.concatenate([bi, i], 1)
        best, j = jax.lax.top_k(v, k)
        return (best, jnp.take_along_axis(i, j, axis=1)), None

      init = (jnp.full((q.shape[0], k), -jnp.inf, q.dtype), jnp.zeros((q.shape[0], k), jnp.int32))
      (v, i), _ = jax.lax.scan(body, init, (xs, jnp.arange(rows // chunk, dtype=jnp.int32)))
    v = jax.lax.all_gather(v, axes, axis=1, tiled=True)
    i = jax.lax.all_gather(i, axes, axis=1, tiled=True)
    best, j = jax.lax.top_k(v, k)
    return best, jnp.take_along_axis(i, j, axis=1)

  in_specs = (P(), P(axes, None)) + ((P(), P()) if exclude else ())
  fn = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=(P(), P()), check_vma=False)
  return jax.jit(fn)
