"""Sampling uniformly over clusters: a cluster first, then one of its members.

DeepCluster draws its training images this way so that large clusters do not
dominate and the network does not collapse into a few of them (Caron et al.
2018, Sec. 3.4). The tables are built once per clustering on the host and
read inside the jitted step.

References:
  Caron et al., "Deep Clustering for Unsupervised Learning of Visual
  Features", ECCV 2018.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np


class ClusterTables(NamedTuple):
  """One epoch's pseudo-labels and what the sampler draws from.

  Attributes:
    labels: int32 [U], the cluster of every pool image (its pseudo-label).
    order: int32 [U], pool indices sorted by cluster (stable).
    start: int32 [k], where each cluster's images begin in `order`.
    size: int32 [k], images per cluster.
    nonempty: int32 [k], the non-empty clusters' ids first (ascending), then 0.
    num_nonempty: int32 scalar.
  """
  labels: jax.Array
  order: jax.Array
  start: jax.Array
  size: jax.Array
  nonempty: jax.Array
  num_nonempty: jax.Array


def cluster_tables(labels: np.ndarray, num_clusters: int) -> ClusterTables:
  labels = np.asarray(labels, np.int32)
  size = np.bincount(labels, minlength=num_clusters).astype(np.int32)
  used = np.flatnonzero(size).astype(np.int32)
  nonempty = np.zeros(num_clusters, np.int32)
  nonempty[:len(used)] = used
  return ClusterTables(labels=labels, order=np.argsort(labels, kind='stable').astype(np.int32),
                       start=(np.cumsum(size) - size).astype(np.int32), size=size,
                       nonempty=nonempty, num_nonempty=np.int32(len(used)))


def sample_uniform_over_clusters(tables: ClusterTables, key, n: int) -> jax.Array:
  """`n` pool indices: a non-empty cluster uniformly, then one of its images uniformly."""
  cluster_key, member_key = jax.random.split(key)
  cluster = tables.nonempty[jax.random.randint(cluster_key, (n,), 0, tables.num_nonempty)]
  offset = jax.random.randint(member_key, (n,), 0, tables.size[cluster])
  return tables.order[tables.start[cluster] + offset]
