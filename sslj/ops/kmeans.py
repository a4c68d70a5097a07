"""Chunked, shardable k-means (Lloyd's algorithm) in JAX.

DeepCluster clusters 1.28M features into 10,000 centroids every epoch: the
n x k distance matrix (51 GB) cannot exist. Each pass walks the points in
chunks of rows and keeps only the nearest centroid and its distance per point.
With a mesh the points are sharded over its `data` axis, each device reduces
its rows, and the per-cluster sums and counts are summed with `psum`; the
centroids stay replicated.

One iteration is: assign every point to its nearest centroid, move every
centroid to the mean of its points, re-seed empty clusters. After `num_iters`
iterations the points are assigned once more, to the final centroids, and the
inertia is the sum of squared distances of that assignment. While no cluster
empties, this is what scikit-learn's `KMeans(algorithm='lloyd', tol=0,
max_iter=num_iters)` returns in `cluster_centers_`, `labels_` and `inertia_`
(faiss's `obj[-1]` instead measures the assignment before the last update).
Like scikit-learn, the points are centred first: distances do not change,
and the expanded form ||x||^2 - 2 x.c + ||c||^2 cancels less.

Empty clusters are re-seeded as faiss does: an empty cluster takes a copy of a
non-empty cluster chosen with probability proportional to its size minus one,
both copies are perturbed by a symmetric relative 1/1024, and the count is
split evenly between them. The choice is drawn from the key, so a run is
deterministic for a given key.

Seeding (`init_centroids`) is by default scikit-learn's greedy k-means++
(2 + floor(ln k) D^2-sampled candidates per centre, the one that lowers the
potential most kept), and `n_init` runs (seeding + Lloyd) keep the one of
least inertia, as scikit-learn's `n_init`; the runs are one compiled program.

References:
  Lloyd, "Least squares quantization in PCM", IEEE Trans. Inf. Theory 1982.
  Arthur & Vassilvitskii, "k-means++: the advantages of careful seeding",
    SODA 2007 (its conclusion mentions the greedy variant; the
    2 + floor(ln k) trials are scikit-learn's choice).
  scikit-learn, sklearn/cluster/_kmeans.py, `_kmeans_plusplus` and `KMeans`
    (its default: greedy k-means++, n_init='auto' = 1 run for k-means++).
  Johnson, Douze & Jegou, "Billion-scale similarity search with GPUs",
    arXiv:1702.08734, 2017 (faiss; its empty-cluster splitting).
  Caron, Bojanowski, Joulin & Douze, "Deep clustering for unsupervised
    learning of visual features", ECCV 2018.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sslj.errors import UserError
from sslj.ops import point_layout
# Re-exported: the seeding is part of this module's interface.
from sslj.ops.kmeans_seeding import (INITS, _as_points, _check_counts, _seed_local,  # noqa: F401
                                     check_options, init_centroids, local_trials)

# GPUs run float32 matmuls in TF32 by default; its 10-bit mantissa moves
# nearest-centroid decisions, so every distance matmul asks for full float32.
_HIGHEST = jax.lax.Precision.HIGHEST
# faiss's relative perturbation of a split centroid.
_SPLIT_EPS = 1.0 / 1024.0


class KMeansResult(NamedTuple):
  """Output of `kmeans`.

  Attributes:
    centroids: float32 [k, d], after the last iteration.
    assignments: int32 [n], index of the nearest final centroid of each point.
    inertia: float32 scalar, sum of squared distances of the points to their
      assigned final centroid.
  """
  centroids: jax.Array
  assignments: jax.Array
  inertia: jax.Array


def _first_argmin(scores):
  """Minimum and first index attaining it along axis 1, for any k.

  Two plain reductions (the minimum, then the first index that attains it):
  the same result and ties as jnp.argmin, but XLA:CPU vectorises them, while
  its variadic (value, index) reduce over a whole row took longer than the
  matmul itself (measured 0.039 s vs 0.089 s per pass, n=98k, k=256).
  """
  k = scores.shape[1]
  best = jnp.min(scores, axis=1)
  iota = jax.lax.broadcasted_iota(jnp.int32, scores.shape, 1)
  return best, jnp.min(jnp.where(scores == best[:, None], iota, k), axis=1)


def _blocked_argmin(scores, blocks):
  """`_first_argmin` in one pass over the scores, for k divisible by `blocks`.

  The minimum of each of `blocks` column blocks (one vectorised reduction),
  the first block holding the row's minimum, then the first index within that
  block's k / blocks scores: the variadic argmin only ever sees `blocks` or
  k / blocks values. The first block that attains the minimum holds its first
  index, so ties resolve as jnp.argmin's. `_first_argmin` reads the scores a
  second time and, where the minimum's only use is that comparison, XLA:CPU
  fuses its broadcast into the reduction and writes a [chunk, k] copy; this
  way took 0.33-0.35 s per pass against 0.40-0.44 (n=200k, d=128, k=1,024)
  and 0.044 against 0.049 (n=100k, k=256).
  """
  m, k = scores.shape
  per_block = scores.reshape(m, blocks, k // blocks)
  block_min = jnp.min(per_block, axis=2)
  block = jnp.argmin(block_min, axis=1)
  within = jnp.take_along_axis(per_block, block[:, None, None], axis=1)[:, 0]
  labels = block * (k // blocks) + jnp.argmin(within, axis=1)
  return jnp.min(block_min, axis=1), labels.astype(jnp.int32)


# Column blocks of `_blocked_argmin`: 16 was fastest at k = 256 (blocks of 16;
# 8 and 32 were slower) and at k = 1,024 (blocks of 64; 32 and 128 were slower).
_ARGMIN_BLOCKS = 16


def _nearest(xc, xsqc, neg2c, csq):
  """Nearest centroid and its squared distance for one chunk of rows."""
  # ||x||^2 is the same for every centroid, so the argmin only needs
  # ||c||^2 - 2 x.c; -2 is folded into the centroids once per pass.
  scores = jnp.dot(xc, neg2c.T, precision=_HIGHEST) + csq
  k = scores.shape[1]
  if k >= 16 * _ARGMIN_BLOCKS and k % _ARGMIN_BLOCKS == 0:
    best, labels = _blocked_argmin(scores, _ARGMIN_BLOCKS)
  else:
    best, labels = _first_argmin(scores)
  # NaN rows match no score; keep their label in range.
  labels = jnp.minimum(labels, k - 1)
  # Cancellation can leave tiny negative values for points on a centroid.
  return labels, jnp.maximum(best + xsqc, 0.0)


def _pass(x, xsq, w, centroids, layout, update):
  """One chunked sweep over the local rows.

  With `update`, returns labels [m] and the per-cluster sums [k, d] and
  counts [k] (padded rows have w = 0 and x = 0, so they add nothing);
  without, labels and the exact squared distances to the assigned centroid.
  """
  k, d = centroids.shape
  neg2c = -2.0 * centroids
  csq = jnp.sum(centroids * centroids, axis=1)
  shape = (layout.num_chunks, layout.chunk)
  xs, xsqs = x.reshape(shape + (d,)), xsq.reshape(shape)

  def body(_, chunk):
    xc, xsqc = chunk
    labels, dist = _nearest(xc, xsqc, neg2c, csq)
    if not update:
      # The reported distances (and inertia) are recomputed directly: O(m d)
      # and free of the cancellation in the expanded form.
      dist = jnp.sum((xc - centroids[labels]) ** 2, axis=1)
    return None, (labels, dist)

  _, (labels, dist) = jax.lax.scan(body, None, (xs, xsqs))
  labels, dist = labels.reshape(-1), dist.reshape(-1)
  if not update:
    return labels, dist
  # One scatter-add over all local rows after the sweep: O(n d) work. The
  # alternative, a one-hot [chunk, k] matmul per chunk, is O(n k d), as much
  # as the distances: 0.149 s against 0.003 s for n=100k, k=256 on CPU.
  return labels, (jax.ops.segment_sum(x, labels, k),
                  jax.ops.segment_sum(w, labels, k))


def _split_empty(centroids, counts, key, shift):
  """faiss's re-seeding of empty clusters by splitting a populated one.

  `centroids` are centred by `shift`; faiss's perturbation is relative to the
  caller's coordinates (it depends on where their origin is), so it is
  applied to centroid + shift.
  """
  k, d = centroids.shape
  # Alternate signs so the two halves move apart along every coordinate.
  sign = jnp.where(jnp.arange(d) % 2 == 0, _SPLIT_EPS, -_SPLIT_EPS)

  def cond(state):
    _, cnt, _ = state
    # n >= k is checked up front, so an empty cluster implies some cluster
    # holds >= 2 points; the second test only guards against looping forever.
    return jnp.any(cnt == 0) & (jnp.max(cnt) >= 2)

  def body(state):
    c, cnt, i = state
    empty = jnp.argmax(cnt == 0)
    # Probability proportional to size - 1: singletons are never split.
    weight = jnp.maximum(cnt - 1, 0).astype(jnp.float32)
    donor = jax.random.categorical(jax.random.fold_in(key, i), jnp.log(weight))
    src = c[donor]
    delta = (src + shift) * sign
    c = c.at[empty].set(src + delta).at[donor].set(src - delta)
    half = cnt[donor] // 2
    cnt = cnt.at[empty].set(half).at[donor].add(-half)
    return c, cnt, i + 1

  counts = jnp.round(counts).astype(jnp.int32)
  centroids, _, _ = jax.lax.while_loop(cond, body, (centroids, counts, 0))
  return centroids


def _lloyd_local(x, centroids, num_iters, key, *, layout, axis_name):
  """Lloyd iterations on this device's rows; reductions over `axis_name`."""
  reduce = point_layout.reducer(axis_name)
  rows = x.shape[0]
  mask = point_layout.local_mask(layout, rows, axis_name)
  shift = reduce(jnp.sum(x * mask[:, None], axis=0)) / layout.n
  x, xsq, w = point_layout.local_rows(x, layout, axis_name, shift)

  def step(i, c):
    _, (sums, counts) = _pass(x, xsq, w, c, layout, update=True)
    sums, counts = reduce((sums, counts))
    # Every device holds the same sums, counts and key after the psum, so
    # the replicated centroids stay identical without further communication.
    means = jnp.where(counts[:, None] > 0,
                      sums / jnp.maximum(counts, 1.0)[:, None], c)
    return _split_empty(means, counts, jax.random.fold_in(key, i), shift)

  centroids = jax.lax.fori_loop(0, num_iters, step, centroids - shift)
  labels, dist = _pass(x, xsq, w, centroids, layout, update=False)
  return centroids + shift, labels[:rows], reduce(jnp.sum(w * dist))


def _assign_local(x, centroids, *, layout, axis_name):
  rows, shift = x.shape[0], jnp.mean(centroids, axis=0)
  x, xsq, w = point_layout.local_rows(x, layout, axis_name, shift)
  labels, dist = _pass(x, xsq, w, centroids - shift, layout, update=False)
  return labels[:rows], dist[:rows]


def run_key(key, r):
  """The key of run r of `kmeans(..., n_init)`: `key` itself for run 0 (so
  n_init = 1 is a plain run), `jax.random.fold_in(key, r)` for r >= 1."""
  folded = jax.random.fold_in(key, r)
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):  # a raw uint32 key
    return jnp.where(r == 0, key, folded)
  data = jnp.where(r == 0, jax.random.key_data(key), jax.random.key_data(folded))
  return jax.random.wrap_key_data(data, impl=jax.random.key_impl(key))


def _fit_local(x, key, num_iters, n_init, *, num_clusters, method, layout,
               axis_name):
  """`n_init` runs of seeding + Lloyd; the one of least inertia."""

  def body(r, best):
    init_key, split_key = jax.random.split(run_key(key, r))
    start = _seed_local(x, init_key, num_clusters=num_clusters, method=method,
                        layout=layout, axis_name=axis_name)
    out = _lloyd_local(x, start, num_iters, split_key, layout=layout,
                       axis_name=axis_name)
    # The inertia is a psum: every device takes the same branch. Strict <,
    # so ties keep the earlier run.
    better = (r == 0) | (out[2] < best[2])
    return jax.tree.map(lambda new, old: jnp.where(better, new, old), out, best)

  # n_init is traced: one compiled program for any number of runs, each run
  # traced once. The initial carry only fixes the shapes: run 0 always replaces it.
  labels = jnp.zeros((x.shape[0],), jnp.int32)
  if axis_name is not None:  # per-device rows, as the runs' labels are
    labels = jax.lax.pcast(labels, (axis_name,), to='varying')
  shapes = (jnp.zeros((num_clusters, x.shape[1]), jnp.float32), labels,
            jnp.float32(jnp.inf))
  return jax.lax.fori_loop(0, n_init, body, shapes)


@functools.partial(jax.jit, static_argnames=('num_clusters', 'method', 'layout',
                                             'mesh'))
def _fit(x, key, num_iters, n_init, *, num_clusters, method, layout, mesh):
  local = point_layout.on_mesh(
      functools.partial(_fit_local, num_clusters=num_clusters, method=method,
                        layout=layout), mesh,
      (P('data'), P(), P(), P()), (P(), P('data'), P()))
  centroids, labels, inertia = local(point_layout.shard_points(x, layout, mesh),
                                     key, num_iters, n_init)
  return centroids, point_layout.unpad(labels, layout, mesh), inertia


@functools.partial(jax.jit, static_argnames=('layout', 'mesh'))
def _lloyd(x, centroids, num_iters, key, *, layout, mesh):
  local = point_layout.on_mesh(functools.partial(_lloyd_local, layout=layout), mesh,
                               (P('data'), P(), P(), P()), (P(), P('data'), P()))
  centroids, labels, inertia = local(point_layout.shard_points(x, layout, mesh),
                                     point_layout.constrain(centroids, mesh, P()),
                                     num_iters, key)
  return centroids, point_layout.unpad(labels, layout, mesh), inertia


@functools.partial(jax.jit, static_argnames=('layout', 'mesh'))
def _assign(x, centroids, *, layout, mesh):
  local = point_layout.on_mesh(functools.partial(_assign_local, layout=layout), mesh,
                               (P('data'), P()), (P('data'), P('data')))
  labels, dist = local(point_layout.shard_points(x, layout, mesh),
                       point_layout.constrain(centroids, mesh, P()))
  return point_layout.unpad(labels, layout, mesh), point_layout.unpad(dist, layout, mesh)


def kmeans(x, num_clusters: int, *, num_iters: int, key,
           init='k-means++', n_init: int = 1, chunk_size: int | None = None,
           mesh=None) -> KMeansResult:
  """Clusters the rows of `x` [n, d] into `num_clusters` with Lloyd's algorithm.

  Args:
    x: float points [n, d]; numpy, or a jax.Array (for a mesh spanning
      several hosts, a global array sharded over `data`).
    num_clusters: k, at most n.
    num_iters: Lloyd iterations (assign, then update); the final assignment
      to the resulting centroids comes on top.
    key: PRNG key for the initialisation and the empty-cluster splits.
    init: 'k-means++' (greedy, scikit-learn's), 'k-means++-plain', 'random'
      (see `init_centroids`), or an array [k, d] of initial centroids.
    n_init: runs of seeding + Lloyd, of which the one with the least final
      inertia is returned (the first on ties), as scikit-learn's `n_init`
      and faiss's `nredo`. The runs are one compiled program, a loop whose
      length is traced (changing n_init does not recompile). Run r uses the
      key `run_key(key, r)` (`key` itself for run 0) and returns what
      `kmeans(..., key=run_key(key, r), n_init=1)` returns. An explicit
      init array makes a single run.
    chunk_size: rows per distance block (memory: chunk_size x k floats);
      None picks one by backend and k (see `point_layout.default_chunk`).
    mesh: optional `jax.sharding.Mesh` with a `data` axis; points are sharded
      over it, centroids replicated. n need not divide the device count.

  Returns:
    KMeansResult(centroids, assignments, inertia), all replicated on a mesh.
  """
  x = _as_points(x)
  n, d = x.shape
  _check_counts(n, num_clusters)
  if int(num_iters) < 0:
    raise UserError(f'num_iters must be >= 0, got {num_iters}')
  check_options(init, n_init)
  layout = point_layout.checked_layout(n, mesh, chunk_size, num_clusters)
  if isinstance(init, str):
    centroids, labels, inertia = _fit(
        point_layout.place(x, layout, mesh), key, jnp.int32(num_iters),
        jnp.int32(n_init), num_clusters=num_clusters, method=init,
        layout=layout, mesh=mesh)
    return KMeansResult(centroids, labels, inertia)
  if n_init != 1:
    raise UserError(f'n_init={n_init} needs a seeding method to draw the runs '
                    'from; with an array of initial centroids there is one run '
                    '(n_init=1)')
  centroids = jnp.asarray(init, jnp.float32)
  if centroids.shape != (num_clusters, d):
    raise UserError(f'initial centroids have shape {centroids.shape}, '
                    f'expected ({num_clusters}, {d})')
  # The key split matches a run of `_fit_local`: a string init's result with
  # n_init = 1 is this with init = init_centroids(x, k, key=split(key)[0],
  # method=init).
  _, split_key = jax.random.split(key)
  centroids, labels, inertia = _lloyd(
      point_layout.place(x, layout, mesh), centroids, jnp.int32(num_iters), split_key,
      layout=layout, mesh=mesh)
  return KMeansResult(centroids, labels, inertia)


def assign(x, centroids, chunk_size: int | None = None, *, mesh=None):
  """Nearest centroid of every row of `x`.

  Returns:
    (assignments int32 [n], squared distances float32 [n]).
  """
  x = _as_points(x)
  centroids = jnp.asarray(centroids, jnp.float32)
  if centroids.ndim != 2 or centroids.shape[1] != x.shape[1]:
    raise UserError(f'centroids have shape {centroids.shape}; expected '
                    f'[k, {x.shape[1]}] to match the points')
  layout = point_layout.checked_layout(x.shape[0], mesh, chunk_size, centroids.shape[0])
  return _assign(point_layout.place(x, layout, mesh), centroids, layout=layout, mesh=mesh)
