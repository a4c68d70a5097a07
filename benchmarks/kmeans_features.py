"""Benchmark: throughput of the single-layer k-means feature extraction.

Times `sslj.methods.kmeans_features.extract_features` (dense patches at a
stride, per-patch normalisation, ZCA, distances to K centroids, triangle and
hard codes, quadrant sum-pooling), the step that dominates the k-means + SVM
pipeline, on random uint8 images of each preset's shape. The encoder is a
random one (ZCA of random patches, Gaussian centroids): the cost does not
depend on the values. Each preset is compiled by a warm-up call, then the
best of --repeats timed calls is reported (the machines are often shared; the
minimum is the least disturbed run).

One image costs about 2 * positions * K * d FLOPs for the distances
(d = p * p * C), which the table also reports as GFLOP/s.

Presets (name: image size, channels, patch, stride, centroids):
  digits: 8x8x1, 5x5, stride 1, K = 400 (configs/kmeans_svm.py)
  fashion_mnist: 28x28x1, 7x7, stride 1, K = 1,600
  cifar10: 32x32x3, 6x6, stride 1, K = 1,600 (Coates et al.'s CIFAR setting)
  stl10: 96x96x3, 22x22, stride 1, K = 1,600 (the report's STL setting; slow
    on a CPU: pass --presets=stl10 --images=16 there)

Run (from the repository root):
  python -m benchmarks.kmeans_features --out /tmp/kmeans_features.json
(`suite()` runs the default presets for `python -m benchmarks.run`.)

References:
  Coates, Lee & Ng, "An analysis of single-layer networks in unsupervised
    feature learning", AISTATS 2011.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from sslj.methods import kmeans_features as kf
from sslj.ops import whitening

PRESETS = {
    'digits': dict(size=8, channels=1, patch=5, stride=1, centroids=400, images=2048),
    'fashion_mnist': dict(size=28, channels=1, patch=7, stride=1, centroids=1600, images=512),
    'cifar10': dict(size=32, channels=3, patch=6, stride=1, centroids=1600, images=256),
    'stl10': dict(size=96, channels=3, patch=22, stride=1, centroids=1600, images=16),
}


def random_encoder(d: int, k: int, seed: int = 0) -> kf.Encoder:
  rng = np.random.default_rng(seed)
  zca = whitening.zca_fit(rng.normal(size=(max(4 * d, 64), d)).astype(np.float32), 0.1)
  return kf.Encoder(zca, jnp.asarray(rng.normal(size=(k, d)), jnp.float32))


def bench(preset: dict, *, images: int | None, repeats: int, budget_mb: float) -> dict:
  size, c, p, stride, k = (preset[n] for n in ('size', 'channels', 'patch', 'stride',
                                                'centroids'))
  n = images or preset['images']
  rng = np.random.default_rng(1)
  x = rng.integers(0, 256, (n, size, size, c)).astype(np.uint8)
  encoder = random_encoder(p * p * c, k)
  run = lambda: kf.extract_features(x, encoder, patch=p, stride=stride, normalize_eps=10.0,
                                    budget_mb=budget_mb)
  start = time.perf_counter()
  run()  # compiles
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  best = min(times)
  positions = ((size - p) // stride + 1) ** 2
  flops = 2.0 * positions * k * p * p * c * n
  return dict(preset, images=n, features=4 * k, positions=positions,
              chunk=kf.chunk_images((size, size, c), p, stride, k, budget_mb),
              seconds=best, first_call_s=compile_s, images_per_s=n / best,
              gflops=flops / best / 1e9)


def suite(quick: bool = False, peak_tflops: float | None = None) -> dict:
  """The default presets (quick: digits, 256 images, one repeat)."""
  del peak_tflops
  presets, images, repeats = (['digits'], 256, 1) if quick else (
      ['digits', 'fashion_mnist', 'cifar10'], None, 3)
  rows = [dict(preset=name, **bench(PRESETS[name], images=images, repeats=repeats,
                                    budget_mb=256.0)) for name in presets]
  columns = [['preset', 'preset'], ['images', 'images'], ['features', 'features'],
             ['chunk', 'chunk'], ['first_call_s', 'first call (s)'], ['seconds', 's'],
             ['images_per_s', 'images/s'], ['gflops', 'GFLOP/s']]
  return {'benchmark': 'kmeans_features',
          'command': common.command('kmeans_features', {'presets': presets, 'images': images,
                                                        'repeats': repeats}),
          'tables': [{'title': 'k-means feature extraction', 'columns': columns, 'rows': rows}],
          'notes': [f'best of {repeats} timed calls after a compiling call.']}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--presets', default='digits,fashion_mnist,cifar10',
                      help=f'comma-separated, of {",".join(PRESETS)}')
  parser.add_argument('--images', type=int, default=None, help='images per timed call')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--budget_mb', type=float, default=256.0,
                      help='memory budget of one encode call (kmeans_features.chunk_mb)')
  parser.add_argument('--out', default=None, help='write the results as JSON here')
  args = parser.parse_args()
  rows = []
  print(f'{"preset":>14} {"images":>7} {"features":>8} {"chunk":>6} {"s":>8} '
        f'{"images/s":>10} {"GFLOP/s":>8}')
  for name in args.presets.split(','):
    if name not in PRESETS:
      parser.error(f'unknown preset {name!r}; choose from {", ".join(PRESETS)}')
    row = dict(preset=name, **bench(PRESETS[name], images=args.images, repeats=args.repeats,
                                    budget_mb=args.budget_mb))
    rows.append(row)
    print(f'{name:>14} {row["images"]:>7} {row["features"]:>8} {row["chunk"]:>6} '
          f'{row["seconds"]:>8.3f} {row["images_per_s"]:>10.1f} {row["gflops"]:>8.1f}',
          flush=True)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({'backend': jax.default_backend(), 'devices': [str(d) for d in jax.devices()],
                 'machine': platform.machine(), 'jax': jax.__version__,
                 'budget_mb': args.budget_mb, 'repeats': args.repeats, 'results': rows},
                f, indent=2)
      f.write('\n')


if __name__ == '__main__':
  main()
