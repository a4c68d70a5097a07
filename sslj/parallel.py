"""The device mesh, shardings, multi-host start-up and device-resident data.

Every device of every host forms one mesh axis, `data`. Batches are sharded
over it (`P('data')`) and the training state is replicated (`P()`); `jax.jit`
over these global arrays is the data parallelism (the form that replaces
`pmap`). Datasets that fit are copied once to the devices, sharded over the
same axis, and each step gathers its batch there, so no step waits on the host.
"""

from __future__ import annotations

import dataclasses

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from sslj.errors import UserError

DATA_AXIS = 'data'


def initialize_distributed(coordinator_address: str | None,
                           num_processes: int | None,
                           process_id: int | None) -> None:
  """Starts `jax.distributed` when this run spans several processes.

  Only with `coordinator_address`: every process of a multi-host run is
  given the coordinator, the process count and its own index (a cluster's
  launcher variables are not read). Without it the run is one process, which
  needs no set-up at all.
  """
  if coordinator_address:
    if jax.config.jax_platforms in (None, '', 'cpu') and not _has_accelerator_plugin():
      # CPU processes exchange collectives over gloo (TCP); without it a
      # CPU-only multi-process run cannot reduce across processes.
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id)
    logging.info('Process %d of %d joined %s.', jax.process_index(),
                 jax.process_count(), coordinator_address)


def _has_accelerator_plugin() -> bool:
  """Whether a GPU/TPU plugin is installed (checked without starting a backend)."""
  import importlib.util
  return any(importlib.util.find_spec(name) is not None
             for name in ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'libtpu'))


def make_mesh() -> jax.sharding.Mesh:
  """One `data` axis over every device of every process."""
  # Auto axes: XLA propagates shardings from the inputs we annotate, so the
  # model code needs no sharding annotations of its own.
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_divisible(batch_size: int, what: str) -> None:
  """A global batch must split evenly over the devices; say how to fix it."""
  n = jax.device_count()
  if batch_size % n:
    raise UserError(
        f'{what}={batch_size} does not divide over {n} devices; use a multiple '
        f'of {n} (e.g. --config.batch_size={max(n, batch_size - batch_size % n)}).')


def to_global(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A host array that every process holds in full, as one global jax.Array.

  Each process copies only the shards of its own devices, so this is the same
  call on one host and on many.
  """
  return jax.make_array_from_callback(array.shape, sharding,
                                      lambda index: array[index])


@dataclasses.dataclass(frozen=True)
class ResidentImages:
  """A uint8 image set on the devices, rows padded to a multiple of devices.

  `count` is the number of real rows; rows past it are zero padding that
  sampling never picks.
  """
  images: jax.Array
  count: int


jax.tree_util.register_dataclass(ResidentImages, data_fields=['images'],
                                 meta_fields=['count'])


def put_resident(images: np.ndarray, mesh) -> ResidentImages:
  """Copies `images` to the devices once, sharded by rows over `data`."""
  n = len(images)
  devices = mesh.devices.size
  padded = max(-(-n // devices) * devices, devices)
  if padded != n:
    pad = np.zeros((padded - n,) + images.shape[1:], images.dtype)
    images = np.concatenate([images, pad])
  return ResidentImages(to_global(images, batch_sharded(mesh)), n)


def gather_rows(mesh, table: jax.Array, indices: jax.Array) -> jax.Array:
  """`table[indices]` for a row-sharded table, the result sharded over `data`.

  Each device gathers the requested rows that live in its own shard (zeros
  elsewhere) and a reduce-scatter sums the pieces, so every device ends with
  its slice of the batch. The batch is the same whatever the number of devices,
  which keeps runs on 1 and on N devices identical. Inside `jit`.
  """
  if mesh.devices.size == 1:
    return jax.lax.with_sharding_constraint(table[indices], batch_sharded(mesh))

  def local_gather(local_table, idx):
    rows = local_table.shape[0]
    local = idx - jax.lax.axis_index(DATA_AXIS) * rows
    inside = (local >= 0) & (local < rows)
    picked = local_table[jnp.clip(local, 0, rows - 1)]
    mask = inside.reshape((-1,) + (1,) * (picked.ndim - 1))
    picked = jnp.where(mask, picked, jnp.zeros_like(picked))
    return jax.lax.psum_scatter(picked, DATA_AXIS, scatter_dimension=0,
                                tiled=True)

  return jax.shard_map(local_gather, mesh=mesh,
                       in_specs=(P(DATA_AXIS), P()),
                       out_specs=P(DATA_AXIS))(table, indices)


def uniform_rows(resident: ResidentImages, key: jax.Array, num_samples: int) -> jax.Array:
  """`num_samples` row indices, uniform (with replacement) over the real rows."""
  return jax.random.randint(key, (num_samples,), 0, resident.count)


def sample_rows(mesh, resident: ResidentImages, key: jax.Array,
                num_samples: int, labels: jax.Array | None = None):
  """Uniformly samples `num_samples` rows (with replacement) on the devices.

  Returns the gathered images and, if `labels` (replicated, one per real row)
  are given, their labels, both sharded over `data`.
  """
  idx = uniform_rows(resident, key, num_samples)
  images = gather_rows(mesh, resident.images, idx)
  if labels is None:
    return images, None
  return images, jax.lax.with_sharding_constraint(labels[idx],
                                                  batch_sharded(mesh))
