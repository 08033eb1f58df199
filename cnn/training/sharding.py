"""Data parallelism: one `data` mesh axis over all devices (and hosts).

The batch is split over the axis, the train state replicated; `jax.jit`
partitions the one global computation, so BatchNorm statistics and the loss
are over the whole batch exactly as on one device.

Multi-host: every process runs the same command with

  JAX_COORDINATOR_ADDRESS=HOST0:PORT JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i

(i = 0..N-1; HOST0 runs process 0). `maybe_initialize_distributed()` then
calls `jax.distributed.initialize` (CPU hosts exchange through gloo), every
process reads the same global batch and feeds its slice, and the one global
computation spans the machines. Process 0 writes the run folder's records
(config.json, metrics.jsonl, TensorBoard); orbax writes each checkpoint
once and every process restores it.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cnn.errors import ConfigError

_ADDRESS_VARS = ('JAX_COORDINATOR_ADDRESS', 'COORDINATOR_ADDRESS')


def _address() -> str | None:
  return next((os.environ[v] for v in _ADDRESS_VARS if os.environ.get(v)),
              None)


def process_id() -> int:
  """This process's index in a multi-host run (0 alone); known before
  `jax.distributed.initialize`, from the launch environment."""
  return int(os.environ.get('JAX_PROCESS_ID', '0')) if _address() else 0


def is_primary() -> bool:
  """The process that writes the run folder's records."""
  return process_id() == 0


def maybe_initialize_distributed() -> None:
  """`jax.distributed.initialize` when the multi-host variables are set.

  Raises:
    ConfigError: the coordinator is set but not the process count or index.
  """
  address = _address()
  if not address or jax.distributed.is_initialized():
    return
  missing = [v for v in ('JAX_NUM_PROCESSES', 'JAX_PROCESS_ID')
             if not os.environ.get(v, '').isdigit()]
  if missing:
    raise ConfigError(
        f'JAX_COORDINATOR_ADDRESS={address} is set but '
        f'{" and ".join(missing)} {"are" if len(missing) > 1 else "is"} not: '
        'launch process i of N with JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i')
  # Cross-process collectives of the CPU backend (no effect on GPU / TPU).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
      coordinator_address=address,
      num_processes=int(os.environ['JAX_NUM_PROCESSES']),
      process_id=int(os.environ['JAX_PROCESS_ID']))


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
  """The same value on every device of the mesh (every process holds it)."""
  sharding = NamedSharding(mesh, P())
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(
          sharding, np.asarray(jax.device_get(x))), tree)


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Puts a host batch on the devices, split along its leading axis."""
  sharding = NamedSharding(mesh, P('data'))
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  # Multi-host: each process holds its own slice of the global batch.
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
