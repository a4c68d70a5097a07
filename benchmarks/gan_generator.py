r"""Generator upsampling: transposed convolution against resize-then-convolve.

Times the jitted forward + backward of `sslj.models.DCGANGenerator` (a sum
of the images as the loss, gradients for every parameter, BatchNorm in
training mode) for both `upsample` variants at the image sizes of the
datasets, on whatever device JAX finds, and prints images per second (best
of several timings, the least disturbed by other load).

  python -m benchmarks.gan_generator [--batch=100] [--steps=20] \
      [--sizes=8x8x1,28x28x1,32x32x3] [--out=bench/gan_generator.json]

`suite()` returns the same figures for `python -m benchmarks.run`. The figures
measured go into the docstring of `sslj/models/dcgan.py`, which
keeps the faster variant as the default.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags
import jax
import jax.numpy as jnp

from benchmarks import common
from sslj import models
from sslj.models import dcgan


def _step_fn(model):
  """Jitted (variables, z) -> gradients of sum(G(z)) w.r.t. the parameters."""

  def loss(params, batch_stats, z):
    images, _ = model.apply({'params': params, 'batch_stats': batch_stats}, z, train=True,
                            mutable=['batch_stats'])
    return jnp.sum(images)

  return jax.jit(jax.grad(loss))


def measure(shape, upsample: str, batch: int, steps: int, repeats: int, latent: int) -> float:
  """Images per second of forward + backward for one variant."""
  model = models.build_generator('dcgan', image_shape=shape, upsample=upsample)
  z = jax.random.normal(jax.random.key(0), (batch, latent))
  variables = model.init(jax.random.key(1), z, train=False)
  fn = _step_fn(model)
  params, stats = variables['params'], variables['batch_stats']
  jax.block_until_ready(fn(params, stats, z))  # compile and warm up
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      grads = fn(params, stats, z)
    jax.block_until_ready(grads)
    best = min(best, (time.perf_counter() - start) / steps)
  return batch / best


def suite(quick: bool = False, peak_tflops: float | None = None) -> dict:
  """Both variants at every size (quick: 8x8x1, batch 16, 2 steps, one repeat)."""
  del peak_tflops
  batch, steps, repeats, sizes = ((16, 2, 1, ['8x8x1']) if quick else
                                  (100, 20, 3, ['8x8x1', '28x28x1', '32x32x3']))
  rows = []
  for size in sizes:
    shape = tuple(int(v) for v in size.split('x'))
    row = {'size': size}
    for upsample in dcgan.UPSAMPLING:
      row[upsample] = measure(shape, upsample, batch, steps, repeats, 100)
    row['faster'] = max(dcgan.UPSAMPLING, key=row.get)
    rows.append(row)
  columns = [['size', 'image size'], *[[u, f'{u} (images/s)'] for u in dcgan.UPSAMPLING],
             ['faster', 'faster']]
  return {'benchmark': 'gan_generator',
          'command': common.command('gan_generator', {'batch': batch, 'steps': steps,
                                                      'repeats': repeats, 'sizes': sizes}),
          'tables': [{'title': 'DCGAN generator forward + backward', 'columns': columns,
                      'rows': rows}],
          'notes': [f'batch {batch}, best of {repeats} x {steps} steps.']}


def main(argv):
  del argv
  device = jax.devices()[0]
  figures = {'device': f'{device.platform}: {device.device_kind}', 'cpu_count': os.cpu_count(),
             'batch': _BATCH.value, 'images_per_s': {}}
  print(f"device {figures['device']} ({os.cpu_count()} CPUs), batch {_BATCH.value}, "
        'jitted forward + backward, best of '
        f'{_REPEATS.value} x {_STEPS.value} steps')
  for size in _SIZES.value:
    shape = tuple(int(v) for v in size.split('x'))
    row = {}
    for upsample in dcgan.UPSAMPLING:
      row[upsample] = measure(shape, upsample, _BATCH.value, _STEPS.value, _REPEATS.value,
                              _LATENT.value)
    figures['images_per_s'][size] = row
    faster = max(row, key=row.get)
    print(f'{size:>9}: ' + '  '.join(f'{k} {v:,.0f} img/s' for k, v in row.items())
          + f'  -> {faster} {max(row.values()) / min(row.values()):.2f}x faster')
  if _OUT.value:
    os.makedirs(os.path.dirname(_OUT.value) or '.', exist_ok=True)
    with open(_OUT.value, 'w') as f:
      json.dump(figures, f, indent=1)


if __name__ == '__main__':
  # Defined here, not at import, so `benchmarks.run` can import this module
  # next to others that define flags of the same names.
  _BATCH = flags.DEFINE_integer('batch', 100, 'Latent vectors per step.')
  _STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps per repeat (after warm-up).')
  _REPEATS = flags.DEFINE_integer('repeats', 3, 'Timings taken; the best is reported.')
  _SIZES = flags.DEFINE_list('sizes', ['8x8x1', '28x28x1', '32x32x3'], 'HxWxC image sizes.')
  _LATENT = flags.DEFINE_integer('latent_dim', 100, 'Latent dimension.')
  _OUT = flags.DEFINE_string('out', None, 'Write the figures as JSON here.')
  app.run(main)
