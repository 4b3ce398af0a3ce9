"""Device mesh, sharding rules and host-to-device transfer.

The train step is compiled once with explicit shardings over a ``jax.sharding.Mesh``:
  * batches: leading (batch) dimension on the 'data' axis;
  * parameters and optimizer state: replicated (row-sharding of the embedding tables plugs in
    here through ``state_sharding``).
With the default ``mesh.shape=(-1,)`` every device is on 'data'. The losses see the *global*
batch: in-batch negatives span every device.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from sslrec import configuration


def make_mesh(shape, axes) -> Mesh:
  """A mesh of all devices with ``shape`` (one -1 entry = the remaining devices)."""
  n = jax.device_count()
  shape = list(shape)
  if -1 in shape:
    rest = math.prod(s for s in shape if s != -1)
    if n % rest:
      raise configuration.ConfigError(
          f"config.mesh.shape={tuple(shape)} does not divide the {n} devices")
    shape[shape.index(-1)] = n // rest
  if math.prod(shape) != n:
    raise configuration.ConfigError(
        f"config.mesh.shape={tuple(shape)} needs {math.prod(shape)} devices; {n} are available")
  return jax.make_mesh(tuple(shape), tuple(axes), axis_types=(AxisType.Auto,) * len(shape))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading dimension on 'data', the rest replicated."""
  return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_size(mesh: Mesh) -> int:
  return mesh.shape["data"]


def local_batch_size(global_batch: int, mesh: Mesh, field: str) -> int:
  """The per-process share of a global batch; checks divisibility."""
  if global_batch % data_size(mesh):
    raise configuration.ConfigError(
        f"config.{field}={global_batch} is not divisible by the mesh's 'data' axis "
        f"({data_size(mesh)} devices)")
  if global_batch % jax.process_count():
    raise configuration.ConfigError(
        f"config.{field}={global_batch} is not divisible by the {jax.process_count()} processes")
  return global_batch // jax.process_count()


def to_global(batch, mesh: Mesh):
  """Per-process numpy batch pytree -> global ``jax.Array``s sharded on 'data'."""
  sharding = data_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
