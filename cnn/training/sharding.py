"""Data parallelism: one `data` mesh axis over all devices (and hosts).

The batch is split over the axis, the train state replicated; `jax.jit`
partitions the one global computation, so BatchNorm statistics and the loss
are over the whole batch exactly as on one device. Multi-host runs call
`maybe_initialize_distributed()` first; the same code then spans machines.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cnn.errors import ConfigError

_DIST_VARS = ('JAX_COORDINATOR_ADDRESS', 'COORDINATOR_ADDRESS')


def maybe_initialize_distributed() -> None:
  """`jax.distributed.initialize()` when a multi-host environment is set."""
  if any(os.environ.get(v) for v in _DIST_VARS) and jax.process_count() == 1:
    jax.distributed.initialize()


def make_mesh(devices=None) -> Mesh:
  devices = np.asarray(devices if devices is not None else jax.devices())
  return Mesh(devices.reshape(-1), ('data',))


def check_batch_size(batch_size: int, mesh: Mesh, what: str = 'batch_size'):
  n = mesh.devices.size
  if batch_size % n:
    raise ConfigError(
        f'{what}={batch_size} does not divide across the {n} devices: use a '
        f'multiple of {n}')


def replicate(tree, mesh: Mesh):
  return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Puts a host batch on the devices, split along its leading axis."""
  sharding = NamedSharding(mesh, P('data'))
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  # Multi-host: each process holds its own slice of the global batch.
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
