"""Benchmark: sslj's JAX k-means against scikit-learn and faiss.

Every implementation starts from the same initial centroids (k distinct rows
of the data, picked uniformly with one seed) and runs the same number of Lloyd
iterations on the same float32 data, so the inertias are comparable. The data
(a mixture of 4,096 Gaussians, more than k) is chosen so that no cluster
empties during the run: sslj and faiss would re-seed it by a random split
(from different random generators) and scikit-learn by moving it to a far
point, and the runs would part ways for reasons that say nothing about speed.

* sslj: `kmeans(..., init=centroids)`, timed after a warm-up call that
  compiles it (the iteration count is a traced value, so no recompilation).
* scikit-learn: `KMeans(init=centroids, n_init=1, max_iter=T,
  algorithm='lloyd', tol=0)`.
* faiss (optional, `pip install faiss-cpu`; not a dependency of sslj):
  `faiss.Kmeans(..., niter=T).train(x, init_centroids=centroids)` with
  `max_points_per_centroid` raised so that faiss does not subsample.

Seconds per iteration = wall time of the whole call / T, the best of
--repeats runs taken in turn (the machines this runs on are often shared;
the minimum is the least disturbed run). sslj and
scikit-learn also make one final assignment to the final centroids (their
inertia); faiss does not, so the ratio is, if anything, unfair to sslj.
The inertia column is, for all three, the sum of squared distances of every
point to its nearest *final* centroid: sslj's and scikit-learn's own value,
and for faiss one exact search of the final centroids with IndexFlatL2
(faiss's `obj[-1]` is measured before the last centroid update).

One iteration costs 2 n k d FLOPs for the distances; on an accelerator the
table also shows TFLOP/s and, with --peak_tflops, the fraction of peak.

Run (from the repository root):
  python -m benchmarks.kmeans --out /tmp/kmeans.json
(`suite()` runs the default cases for `python -m benchmarks.run`.)

References:
  Lloyd 1982; Arthur & Vassilvitskii 2007; Johnson, Douze & Jegou 2017
  (faiss); Caron et al. 2018 (DeepCluster's k-means on 1.28M x 10,000).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

# faiss and scikit-learn run on OpenMP, whose threads spin while they wait by
# default; on a machine shared with other work that made faiss 4x slower
# (0.56 vs 0.14 s/iter, n=100k, k=256, 2 cores). Passive waiting is the
# setting that is fair to them there; export OMP_WAIT_POLICY to override.
# It must be set before the OpenMP runtime loads.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import jax
import numpy as np

from sslj.ops import kmeans as km


def make_data(n: int, d: int, seed: int) -> np.ndarray:
  """A mixture of 4,096 overlapping Gaussians: structure to find, and
  assignments that keep changing for many iterations."""
  rng = np.random.default_rng(seed)
  means = rng.normal(size=(4096, d)).astype(np.float32) * 2.0
  x = means[rng.integers(0, 4096, n)] + rng.normal(size=(n, d)).astype(np.float32)
  return x.astype(np.float32)


def run_sslj(x, init, iters, chunk_size):
  kw = dict(key=jax.random.key(0), init=init, chunk_size=chunk_size)
  jax.block_until_ready(km.kmeans(x, init.shape[0], num_iters=1, **kw))
  xd = jax.device_put(x)  # time the clustering, not the host-to-device copy
  start = time.perf_counter()
  res = jax.block_until_ready(km.kmeans(xd, init.shape[0], num_iters=iters,
                                        **kw))
  return time.perf_counter() - start, float(res.inertia)


def run_sklearn(x, init, iters):
  from sklearn.cluster import KMeans
  model = KMeans(init.shape[0], init=init, n_init=1, max_iter=iters,
                 algorithm='lloyd', tol=0.0)
  start = time.perf_counter()
  model.fit(x)
  return time.perf_counter() - start, float(model.inertia_)


def run_faiss(x, init, iters):
  try:
    import faiss  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None, None
  n, d = x.shape
  model = faiss.Kmeans(d, init.shape[0], niter=iters, seed=0, verbose=False,
                       max_points_per_centroid=n, min_points_per_centroid=1)
  start = time.perf_counter()
  model.train(x, init_centroids=init)
  seconds = time.perf_counter() - start
  index = faiss.IndexFlatL2(d)
  index.add(model.centroids)
  dist, _ = index.search(x, 1)
  return seconds, float(dist.astype(np.float64).sum())


def bench_case(n, d, k, iters, args):
  x = make_data(n, d, args.seed)
  init = np.asarray(km.init_centroids(x, k, key=jax.random.key(args.seed),
                                      method='random'))
  flops = 2.0 * n * k * d
  row = {'n': n, 'd': d, 'k': k, 'iters': iters}
  impls = {'sslj': lambda: run_sslj(x, init, iters, args.chunk_size),
           'sklearn': lambda: run_sklearn(x, init, iters),
           'faiss': lambda: run_faiss(x, init, iters)}
  impls = {name: fn for name, fn in impls.items() if name not in args.skip}
  best = {}
  for _ in range(args.repeats):
    # In turn, so that a burst of load from elsewhere hits all of them.
    for name, fn in impls.items():
      seconds, inertia = fn()
      if seconds is not None and (name not in best or seconds < best[name][0]):
        best[name] = (seconds, inertia)
  for name in impls:
    if name not in best:
      print(f'{name}: not installed, skipped')
      continue
    seconds, inertia = best[name]
    row[name] = {'s_per_iter': seconds / iters, 'inertia': inertia,
                 'tflops': flops / (seconds / iters) / 1e12}
    print(f'n={n} d={d} k={k} {name}: {seconds / iters:.4f} s/iter '
          f'inertia {inertia:.6g}', flush=True)
  if 'faiss' in row:
    for name in ('sslj', 'sklearn'):
      if name in row:
        row[name]['vs_faiss'] = (row[name]['s_per_iter']
                                 / row['faiss']['s_per_iter'])
        row[name]['inertia_rel_diff_vs_faiss'] = (
            row[name]['inertia'] / row['faiss']['inertia'] - 1)
  return row


def markdown(rows, peak):
  head = ('| n | d | k | impl | s/iter | x faiss | inertia | rel. diff '
          '| TFLOP/s |' + (' % peak |' if peak else ''))
  lines = [head, '|' + '---|' * (head.count('|') - 1)]
  for row in rows:
    for name in ('sslj', 'sklearn', 'faiss'):
      if name not in row:
        continue
      r = row[name]
      ratio = f"{r['vs_faiss']:.2f}" if 'vs_faiss' in r else '1.00' if (
          name == 'faiss') else '-'
      diff = (f"{r['inertia_rel_diff_vs_faiss']:+.1e}"
              if 'inertia_rel_diff_vs_faiss' in r else '-')
      line = (f"| {row['n']} | {row['d']} | {row['k']} | {name} | "
              f"{r['s_per_iter']:.4f} | {ratio} | {r['inertia']:.6g} | {diff} "
              f"| {r['tflops']:.3f} |")
      if peak:
        line += f" {100 * r['tflops'] / peak:.1f} |"
      lines.append(line)
  return '\n'.join(lines)


def run_cases(cases: str, args) -> list:
  """`bench_case` for each NxDxK of the comma-separated `cases`."""
  rows = []
  for case in cases.split(','):
    n, d, k = (int(v) for v in case.lower().split('x'))
    rows.append(bench_case(n, d, k, args.iters, args))
  return rows


def suite(quick: bool = False, peak_tflops: float | None = None) -> dict:
  """The default cases (quick: one small case, 3 iterations, one repeat).

  `peak_tflops` is not used: this benchmark's peak is the float32 one
  (`--peak_tflops` of its own command line).
  """
  del peak_tflops
  cases = '20000x32x64' if quick else '100000x128x256,200000x128x1024'
  args = argparse.Namespace(iters=3 if quick else 10, repeats=1 if quick else 3,
                            chunk_size=None, skip=set(), seed=0)
  rows = run_cases(cases, args)
  flat = []
  for row in rows:
    for name in ('sslj', 'sklearn', 'faiss'):
      if name in row:
        flat.append({'n': row['n'], 'd': row['d'], 'k': row['k'], 'impl': name,
                     'x_sklearn': row[name]['s_per_iter'] / row['sklearn']['s_per_iter']
                                  if 'sklearn' in row else None,
                     'x_faiss': row[name].get('vs_faiss'),
                     'rel_diff': row[name].get('inertia_rel_diff_vs_faiss'),
                     **{key: row[name][key] for key in ('s_per_iter', 'inertia', 'tflops')}})
  columns = [['n', 'n'], ['d', 'd'], ['k', 'k'], ['impl', 'impl'], ['s_per_iter', 's/iter'],
             ['x_sklearn', 'time x sklearn'], ['x_faiss', 'time x faiss'], ['inertia', 'inertia'],
             ['rel_diff', 'inertia rel. diff vs faiss'], ['tflops', 'TFLOP/s']]
  notes = [f"{args.iters} Lloyd iterations, best of {args.repeats} runs; "
           f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}."]
  if not any(r['impl'] == 'faiss' for r in flat):
    notes.append('faiss is not installed (pip install faiss-cpu): no faiss rows.')
  return {'benchmark': 'kmeans',
          'command': (f'python -m benchmarks.kmeans --cases={cases} --iters={args.iters} '
                      f'--repeats={args.repeats}'),
          'tables': [{'title': 'k-means: sslj against scikit-learn and faiss',
                      'columns': columns, 'rows': flat}],
          'notes': notes}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--cases', default='100000x128x256,200000x128x1024',
                      help='comma-separated NxDxK')
  parser.add_argument('--iters', type=int, default=10)
  parser.add_argument('--repeats', type=int, default=3,
                      help='runs per implementation; the fastest is kept')
  parser.add_argument('--chunk_size', type=int, default=None,
                      help='rows per distance block; default: sslj picks')
  parser.add_argument('--skip', default='',
                      help='comma-separated implementations to leave out')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--peak_tflops', type=float, default=None,
                      help='peak float32 TFLOP/s of the device, for % of peak')
  parser.add_argument('--out', default=None, help='write JSON here')
  args = parser.parse_args()
  args.skip = set(filter(None, args.skip.split(',')))
  rows = run_cases(args.cases, args)
  table = markdown(rows, args.peak_tflops)
  print(table)
  if args.out:
    meta = {'backend': jax.default_backend(),
            'devices': [str(dev) for dev in jax.devices()],
            'machine': platform.processor() or platform.machine(),
            'chunk_size': args.chunk_size,
            'omp_wait_policy': os.environ['OMP_WAIT_POLICY'],
            'repeats': args.repeats, 'load_avg': os.getloadavg()}
    with open(args.out, 'w') as f:
      json.dump({'meta': meta, 'rows': rows}, f, indent=1)


if __name__ == '__main__':
  main()
