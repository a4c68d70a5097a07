"""Benchmark: sslj's k-means seeding against scikit-learn's default KMeans.

On 30,000 points of 40 Gaussian blobs in 24 dimensions
(`sklearn.datasets.make_blobs(random_state=0, cluster_std=...)`), each
variant `init:n_init` runs `sslj.ops.kmeans.kmeans(..., num_iters=50)` on
keys 0 to 4 and the table shows its final inertia over that of
`KMeans(n_clusters=40, random_state=key)` with scikit-learn's defaults
(greedy k-means++, one run, up to 300 iterations, tol 1e-4), and the
scikit-learn inertia over that of the true partition (each blob around its
own mean). The last row is the median seconds per call over keys 1-4 (key 0
compiles).

Run (from the repository root):
  python -m benchmarks.kmeans_quality --cluster_std=1.0
  python -m benchmarks.kmeans_quality --cluster_std=2.0
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from sslj.ops import kmeans as km


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--cluster_std', type=float, default=1.0)
  parser.add_argument('--variants', default='k-means++-plain:1,k-means++:1,k-means++:3,'
                      'k-means++:10,random:1', help='comma-separated init:n_init')
  parser.add_argument('--keys', type=int, default=5)
  args = parser.parse_args()
  from sklearn.cluster import KMeans  # pylint: disable=import-outside-toplevel
  from sklearn.datasets import make_blobs  # pylint: disable=import-outside-toplevel

  x, y = make_blobs(n_samples=30000, centers=40, n_features=24, random_state=0,
                    cluster_std=args.cluster_std)
  x = x.astype(np.float32)
  optimum = sum(((x[y == j] - x[y == j].mean(0)) ** 2).sum() for j in range(40))
  variants = [(init, int(n)) for init, n in (v.split(':') for v in args.variants.split(','))]
  rows, seconds = [], [[] for _ in variants]
  for key in range(args.keys):
    ref = KMeans(n_clusters=40, random_state=key).fit(x).inertia_
    ratios = []
    for j, (init, n_init) in enumerate(variants):
      start = time.perf_counter()
      res = jax.block_until_ready(km.kmeans(x, 40, num_iters=50, key=jax.random.key(key),
                                            init=init, n_init=n_init))
      if key > 0:
        seconds[j].append(time.perf_counter() - start)
      ratios.append(float(res.inertia) / ref)
    rows.append((key, ref, ratios))
  print(f'cluster_std={args.cluster_std}; true-partition inertia {optimum:.6g}')
  print('| key | sklearn default inertia (x true partition) | '
        + ' | '.join(f'{init}, n_init={n}' for init, n in variants) + ' |')
  print('|---' * (2 + len(variants)) + '|')
  for key, ref, ratios in rows:
    print(f'| {key} | {ref:.6g} ({ref / optimum:.3f}) | '
          + ' | '.join(f'{r:.4f}' for r in ratios) + ' |')
  print('| mean | | ' + ' | '.join(f'{np.mean([r[2][j] for r in rows]):.4f}'
                                  for j in range(len(variants))) + ' |')
  if args.keys > 1:
    print('| s per call | | ' + ' | '.join(f'{np.median(s):.2f}' for s in seconds) + ' |')


if __name__ == '__main__':
  main()
