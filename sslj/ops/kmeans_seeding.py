"""Initial centroids for `sslj.ops.kmeans`: greedy or plain k-means++, or random rows.

Every seeding works on points sharded over a mesh's `data` axis, as the
Lloyd iterations do (`sslj.ops.point_layout`). 'k-means++' is scikit-learn's
greedy D^2 seeding (2 + floor(ln k) candidates per centre, the one of least
potential kept); 'k-means++-plain' is Arthur & Vassilvitskii's one candidate
per centre; 'random' picks k distinct rows, as faiss does. Also here: the
checks of the points and of k that every k-means entry point makes.

References:
  Arthur & Vassilvitskii, "k-means++: the advantages of careful seeding",
    SODA 2007.
  scikit-learn, sklearn/cluster/_kmeans.py, `_kmeans_plusplus`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from sslj.errors import UserError
from sslj.ops import point_layout

# Full float32 for the candidates' distances (GPUs default to TF32).
_HIGHEST = jax.lax.Precision.HIGHEST


def _kmeanspp_local(x, key, *, num_clusters, trials, layout, axis_name):
  """k-means++ D^2 seeding over sharded rows, `trials` candidates per centre.

  trials = 1 is plain D^2 sampling; trials > 1 is the greedy variant (see
  `init_centroids`).
  """
  reduce = point_layout.reducer(axis_name)
  w = point_layout.local_mask(layout, x.shape[0], axis_name)
  me = 0 if axis_name is None else jax.lax.axis_index(axis_name)
  first_key, key = jax.random.split(key)
  first = point_layout.gather_rows(
      x, jax.random.randint(first_key, (), 0, layout.n), layout, axis_name)
  centroids = jnp.zeros((num_clusters, x.shape[1]), x.dtype).at[0].set(first)
  # Direct differences: O(n d) per step like the matmul form, and exactly 0
  # for points equal to a centroid, which must never be picked again.
  d2 = jnp.sum((x - first) ** 2, axis=1) * w
  if trials > 1:
    # The candidates' potentials use the expanded form (one [rows, d] x
    # [d, trials] matmul per step, no [trials, rows, d] differences) on
    # points centred on the first centre: a data row, so the same on every
    # layout, unlike the mean (a psum), and close enough to the data's
    # middle to keep the cancellation small. They only rank the candidates;
    # d2 itself stays exact.
    xc = (x - first) * w[:, None]
    xsq = jnp.sum(xc * xc, axis=1)

  def body(i, state):
    c, d2 = state
    k_pick, k_uniform = jax.random.split(jax.random.fold_in(key, i))
    # D^2 sampling by inverting the cumulative distribution, first over
    # devices, then within the owning device's rows.
    cum = jnp.cumsum(d2)
    # Every device's total, as a psum (its result is the same on all).
    totals = reduce(jnp.zeros(layout.devices).at[me].set(cum[-1]))
    ends = jnp.cumsum(totals)
    u = jax.random.uniform(k_pick, (trials,), jnp.float32) * ends[-1]
    # u can round up to the total: never step past the last row (or device)
    # with positive weight, which would pick padding or a chosen point.
    owner = jnp.minimum(jnp.searchsorted(ends, u, side='right'),
                        _last_positive(totals))
    # ... nor, rounded below the owner's start, land before its first row
    # with positive weight (side='right' of 0 is that row).
    offset = jnp.maximum(u - (ends[owner] - totals[owner]), 0.0)
    local = jnp.minimum(jnp.searchsorted(cum, offset, side='right'),
                        _last_positive(d2))
    cand = reduce(jnp.where((me == owner)[:, None], x[local], 0))
    # If every point is already a centroid (duplicates), pick uniformly.
    fallback = point_layout.gather_rows(
        x, jax.random.randint(k_uniform, (), 0, layout.n), layout, axis_name)
    cand = jnp.where(ends[-1] > 0, cand, fallback[None])
    if trials == 1:
      new = cand[0]
    else:
      cc = cand - first
      # [trials, rows]: this way round XLA:CPU's matmul took 2.2 ms against
      # 4.0 ms for [rows, trials] (100k rows, d = 25, 7 candidates).
      scores = (xsq[None] - 2.0 * jnp.dot(cc, xc.T, precision=_HIGHEST)
                + jnp.sum(cc * cc, axis=1)[:, None])
      # Each candidate's potential: sum_x min(D^2(x), ||x - cand||^2).
      potential = reduce(jnp.sum(
          w[None] * jnp.minimum(d2[None], jnp.maximum(scores, 0.0)), axis=1))
      new = cand[jnp.argmin(potential)]  # ties: the first, as np.argmin
    return c.at[i].set(new), jnp.minimum(d2, jnp.sum((x - new) ** 2, 1) * w)

  centroids, _ = jax.lax.fori_loop(1, num_clusters, body, (centroids, d2))
  return centroids


def _last_positive(v):
  return v.shape[0] - 1 - jnp.argmax(v[::-1] > 0)


def _random_local(x, key, *, num_clusters, layout, axis_name):
  idx = jax.random.choice(key, layout.n, (num_clusters,), replace=False)
  return point_layout.gather_rows(x, idx, layout, axis_name)  # distinct rows


INITS = ('k-means++', 'k-means++-plain', 'random')


def local_trials(num_clusters: int, method: str = 'k-means++') -> int:
  """Candidates drawn per centre: scikit-learn's 2 + floor(ln k) for the
  greedy 'k-means++', 1 for 'k-means++-plain'."""
  return 2 + int(math.log(num_clusters)) if method == 'k-means++' else 1


def _seed_local(x, key, *, num_clusters, method, layout, axis_name):
  if method == 'random':
    return _random_local(x, key, num_clusters=num_clusters, layout=layout,
                         axis_name=axis_name)
  return _kmeanspp_local(x, key, num_clusters=num_clusters, layout=layout,
                         trials=local_trials(num_clusters, method),
                         axis_name=axis_name)


@functools.partial(jax.jit,
                   static_argnames=('num_clusters', 'method', 'layout', 'mesh'))
def _init(x, key, *, num_clusters, method, layout, mesh):
  local = point_layout.on_mesh(
      functools.partial(_seed_local, num_clusters=num_clusters, method=method,
                        layout=layout), mesh, (P('data'), P()), P())
  return local(point_layout.shard_points(x, layout, mesh), key)


def check_options(init='k-means++', n_init=1, *, fields=('init', 'n_init')):
  """Raises UserError unless `init` is a seeding name (or an array) and
  `n_init` an integer >= 1; `fields` name them in the message (a method's
  build checks its config's fields with it before anything is compiled)."""
  if isinstance(init, str) and init not in INITS:
    raise UserError(f"{fields[0]}={init!r} is an unknown k-means init; use "
                    "'k-means++', 'k-means++-plain', 'random' or an array of "
                    'initial centroids')
  if (isinstance(n_init, bool) or not isinstance(n_init, (int, np.integer))
      or n_init < 1):
    raise UserError(f'{fields[1]} must be an integer >= 1, got {n_init!r}')


def init_centroids(x, num_clusters: int, *, key, method: str = 'k-means++',
                   mesh=None) -> jax.Array:
  """Initial centroids: rows of `x` chosen by k-means++ or uniformly.

  'k-means++' is greedy k-means++ (mentioned by Arthur & Vassilvitskii)
  as scikit-learn's `_kmeans_plusplus` does it, which is what
  `KMeans(init='k-means++')` seeds with: the first centre is a uniformly
  chosen row; each further one is the best of L = 2 + floor(ln k)
  candidates (`local_trials`) drawn by D^2 sampling (with probability
  proportional to the squared distance D^2(x) to the nearest centre so far),
  best meaning the least potential sum_x min(D^2(x), ||x - candidate||^2).
  'k-means++-plain' is the same D^2 sampling with one candidate per centre
  and no potentials (k-means++ as the paper states it): cheaper, with worse
  seeds (tests/test_kmeans.py). The greedy candidates cost an [L, rows]
  matmul per centre and a centred copy of the local rows (memory: rows x
  (d + L) floats more); measured on a shared 2-core CPU, 100,000 x 25
  points, k = 400: 1.9 s against 0.8 s for plain seeding, and 16 against
  7.5 s for 100,000 x 49, k = 1,600 (one Lloyd iteration: 0.08 and 0.5 s).
  'random' picks
  `num_clusters` distinct rows uniformly. With a mesh the points stay
  sharded over its `data` axis; the draws are the same as on one device.

  Departures from scikit-learn's `_kmeans_plusplus`:
  * the random draws come from the JAX key (threefry), so no seed gives
    scikit-learn's centres;
  * float32 throughout; the potentials use the expanded form
    ||x||^2 - 2 x.c + ||c||^2 on points centred on the first centre, while
    D^2 is kept by direct differences, exactly 0 on a chosen point;
  * scikit-learn inverts the cumulative D^2 with searchsorted side='left'
    (a draw landing exactly on a boundary, e.g. u = 0, can pick a row of
    D^2 = 0, a chosen centre again); here side='right' with the draw clipped
    to the rows of positive D^2, so a row that is already a centre is never
    a candidate. When every D^2 is 0 (all rows duplicates of centres),
    scikit-learn keeps picking row 0, this picks a row uniformly;
  * no sample weights (every row weighs 1).
  Ties between candidates' potentials go to the first drawn, as np.argmin.
  """
  if not isinstance(method, str):
    raise UserError(f'method must be a seeding name, got {type(method).__name__}')
  check_options(method, fields=('method', 'n_init'))
  x = _as_points(x)
  _check_counts(x.shape[0], num_clusters)
  layout = point_layout.checked_layout(x.shape[0], mesh, x.shape[0], num_clusters)
  return _init(point_layout.place(x, layout, mesh), key, num_clusters=num_clusters,
               method=method, layout=layout, mesh=mesh)


def _as_points(x):
  x = x if isinstance(x, jax.Array) else np.asarray(x, np.float32)
  if x.ndim != 2 or x.shape[0] == 0:
    raise UserError(f'k-means needs points as a non-empty [n, d] array, got '
                    f'shape {x.shape}')
  return x.astype(jnp.float32)


def _check_counts(n, num_clusters):
  if not 1 <= num_clusters <= n:
    raise UserError(f'num_clusters must be between 1 and the number of points '
                    f'({n}), got {num_clusters}')
