"""How k-means lays its points out over devices and chunks of rows.

The points are sharded by rows over the mesh's `data` axis (padded to a
multiple of the devices), and each device walks its rows in equal chunks
(padded to whole chunks) so that no n x k distance matrix ever exists. These
helpers hold that bookkeeping: the layout, the masks of real rows, gathers of
global rows from sharded points, and running a per-device function with or
without a mesh. `sslj.ops.kmeans` is the algorithm on top.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from sslj.errors import UserError


class Layout(NamedTuple):
  """n points over `devices` shards of `rows` each, cut into chunks."""
  n: int
  devices: int
  rows: int  # per device, including the rows that pad n to the devices
  num_chunks: int
  chunk: int


def make_layout(n: int, devices: int, chunk_size: int) -> Layout:
  rows = -(-n // devices)
  # Spread the rows evenly over the chunks so that the local padding stays
  # below 8 rows per chunk instead of up to a whole chunk.
  num_chunks = max(1, -(-rows // chunk_size))
  chunk = -(-rows // num_chunks)
  return Layout(n, devices, rows, num_chunks, -(-chunk // 8) * 8)


def reducer(axis_name):
  return lambda v: v if axis_name is None else jax.lax.psum(v, axis_name)


def start(layout, axis_name):
  """Global index of this device's first row."""
  return 0 if axis_name is None else jax.lax.axis_index(axis_name) * layout.rows


def local_mask(layout, length, axis_name):
  """1 for this device's rows that are real points, 0 for padding."""
  idx = jnp.arange(length)
  return ((idx < layout.rows) & (start(layout, axis_name) + idx < layout.n)
         ).astype(jnp.float32)


def local_rows(x, layout, axis_name, shift):
  """Shifted rows padded with zeros to whole chunks, their norms and mask."""
  length = layout.num_chunks * layout.chunk
  w = local_mask(layout, length, axis_name)
  # Centring (see the module docstring); padding rows stay exactly zero.
  x = (jnp.pad(x, ((0, length - x.shape[0]), (0, 0))) - shift) * w[:, None]
  return x, jnp.sum(x * x, axis=1), w


def gather_rows(x, idx, layout, axis_name):
  """Rows `idx` (global indices) of the sharded points, on every device."""
  local = idx - start(layout, axis_name)
  inside = (local >= 0) & (local < x.shape[0])
  rows = jnp.where(inside[..., None], x[jnp.clip(local, 0, x.shape[0] - 1)], 0)
  return reducer(axis_name)(rows)


def on_mesh(local, mesh, in_specs, out_specs):
  """`local` over the points' shards, or as it is without a mesh."""
  if mesh is None:
    return functools.partial(local, axis_name=None)
  return jax.shard_map(functools.partial(local, axis_name='data'), mesh=mesh,
                       in_specs=in_specs, out_specs=out_specs)


def constrain(x, mesh, spec):
  if mesh is None:
    return x
  sharding = NamedSharding(mesh, spec)
  if dict(zip(mesh.axis_names, mesh.axis_types))['data'] == AxisType.Explicit:
    return jax.reshard(x, sharding)
  return jax.lax.with_sharding_constraint(x, sharding)


def shard_points(x, layout, mesh):
  """Pads n to a multiple of the devices and shards the rows over `data`."""
  rows = layout.devices * layout.rows
  if x.shape[0] != rows:
    x = jnp.pad(x, ((0, rows - x.shape[0]), (0, 0)))
  return constrain(x, mesh, P('data'))


def unpad(v, layout, mesh):
  # Replicated, so that every host can read all assignments (DeepCluster
  # turns them into pseudo-labels); n values are small next to the points.
  return constrain(v, mesh, P())[:layout.n]


def default_chunk(num_clusters):
  """Rows per chunk when the caller gives none.

  On CPU, chunks of about 2^19 scores (2 MB) were fastest (2,048 rows for
  k = 256, 512 for k = 1,024, of 512 to 8,192 tried). Accelerators want large
  matmuls: 2^26 scores (256 MB), not measured.
  """
  if jax.default_backend() == 'cpu':
    return max(128, 2**19 // num_clusters)
  return max(1024, 2**26 // num_clusters)


def checked_layout(n, mesh, chunk_size, num_clusters):
  if chunk_size is None:
    chunk_size = default_chunk(num_clusters)
  if int(chunk_size) < 1:
    raise UserError(f'chunk_size must be >= 1, got {chunk_size}')
  if mesh is not None and 'data' not in mesh.axis_names:
    raise UserError(f"k-means mesh needs a 'data' axis, got axes "
                    f'{mesh.axis_names}')
  return make_layout(n, 1 if mesh is None else mesh.shape['data'], int(chunk_size))


def place(x, layout, mesh):
  """Host arrays for a mesh are padded on the host and sent to their shards
  (no whole copy on one device); the rest is padded inside the jit."""
  if mesh is None or isinstance(x, jax.Array):
    return x
  x = np.pad(x, ((0, layout.devices * layout.rows - layout.n), (0, 0)))
  return jax.device_put(x, NamedSharding(mesh, P('data')))
