r"""Cost of the on-device input path: sampling + gather + augmentation.

Times the full training step (indices sampled, images gathered from the
device-resident set and augmented on the devices, then the update) against
the same update fed a batch that is already on the device, normalised and
not augmented. The ratio is what the input path costs; the target is under
1.05 on a GPU.

  python -m benchmarks.input_path --config=configs/supervised.py:dataset=fashion_mnist \
      [--steps=200] [--repeats=5] [--out=bench/input_path.json]

`suite()` runs the supervised and Mean Teacher configs, on digits and Fashion-MNIST,
for `python -m benchmarks.run`.
"""

from __future__ import annotations

import functools
import json
import os
import time

from absl import app, flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from benchmarks import common
from sslj import methods, parallel, train

# Supervised and Mean Teacher, digits and Fashion-MNIST; --quick runs the first only.
SUITE_CONFIGS = ('configs/supervised.py', 'configs/mean_teacher.py',
                 'configs/supervised.py:dataset=fashion_mnist',
                 'configs/mean_teacher.py:dataset=fashion_mnist,labels_per_class=10')


def _time(fn, state, steps, repeats=5):
  """Best of `repeats` timings of `steps` steps (the least disturbed by other load)."""
  for _ in range(2):  # compile and warm up (twice: a second call can compile again when
    state = fn(state)  # the outputs' shardings differ from the first inputs')
  jax.block_until_ready(state)
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      state = fn(state)
    jax.block_until_ready(state)
    best = min(best, (time.perf_counter() - start) / steps)
  return best


def measure(config, steps: int, repeats: int = 5) -> dict:
  definition = methods.get(config.method)
  data = train.load_data(config)
  run_steps = definition.steps(config, data)
  method = definition.build(config, data, run_steps)
  mesh = parallel.make_mesh()
  train_data = train.put_train_data(data, method, mesh)
  init_key, base_key = jax.random.split(jax.random.key(config.seed))
  sampler = functools.partial(train.sample_batch, mesh=mesh, labeled_batch=method.labeled_batch,
                              unlabeled_batch=method.unlabeled_batch,
                              sample_unlabeled=method.sample_unlabeled)

  # The full step, as training runs it.
  full = jax.jit(functools.partial(train.sampled_step, method_step=method.train_step,
                                   sampler=sampler), donate_argnums=(0, 1, 2))
  # Replicated, as the loop puts it: an uncommitted first value would make
  # the second call compile again, inside the timed region.
  bad = jax.device_put(jnp.array(-1, jnp.int32), parallel.replicated(mesh))
  scores = jax.device_put(np.zeros(4, np.float32), parallel.replicated(mesh))

  def run_full(carry):
    *carry, _ = full(*carry, train_data, base_key)
    return tuple(carry)

  # The same update with augmentation off, on one batch already on the device.
  config_plain = config.copy_and_resolve_references()
  config_plain.unlock()
  for key in ('flip',):
    config_plain.augment[key] = False
  config_plain.augment.pad_crop = 0
  config_plain.augment.rotate_deg = 0.0
  config_plain.augment.translate = 0.0
  config_plain.augment.scale = (1.0, 1.0)
  config_plain.augment.crop_scale = None
  for key in ('brightness', 'contrast', 'saturation', 'hue'):
    config_plain.augment[key] = 0.0
  plain = definition.build(config_plain, data, run_steps)
  batch = jax.jit(sampler)(train_data, jax.random.key(1))
  plain_step = jax.jit(plain.train_step, donate_argnums=(0,))

  def run_plain(state):
    state, _ = plain_step(state, batch, base_key)
    return state

  make_state = jax.jit(method.init, out_shardings=parallel.replicated(mesh))
  t_full = _time(run_full, (make_state(init_key), bad, scores), steps, repeats)
  t_plain = _time(run_plain, make_state(init_key), steps, repeats)
  return {'benchmark': 'input_path', 'device': jax.devices()[0].device_kind,
          'devices': jax.device_count(), 'jax': jax.__version__,
          'method': config.method, 'dataset': config.data.name, 'model': config.model.name,
          'batch_size': config.batch_size, 'steps': steps,
          'full_step_ms': 1e3 * t_full, 'batch_on_device_step_ms': 1e3 * t_plain,
          'ratio': t_full / t_plain}


def suite(quick: bool = False, peak_tflops: float | None = None) -> dict:
  """The suite's configs (quick: the first, 5 steps, one repeat) as one result."""
  del peak_tflops
  specs = SUITE_CONFIGS[:1] if quick else SUITE_CONFIGS
  steps, repeats = (5, 1) if quick else (30, 3)
  rows = []
  for spec in specs:
    row = measure(common.load_config(spec), steps, repeats)
    row['config'] = spec
    rows.append(row)
    print(f"{spec}: ratio {row['ratio']:.3f}", flush=True)
  columns = [['config', 'config'], ['batch_size', 'batch'], ['full_step_ms', 'full step (ms)'],
             ['batch_on_device_step_ms', 'batch on device (ms)'], ['ratio', 'ratio']]
  return {'benchmark': 'input_path',
          'command': '; '.join(f'python -m benchmarks.input_path --config={spec} '
                               f'--steps={steps} --repeats={repeats}' for spec in specs),
          'tables': [{'title': 'Input path: full step against the batch already on the device',
                      'columns': columns, 'rows': rows}],
          'notes': [f'{steps} timed steps, best of {repeats} repetitions; the target on a GPU '
                    'is a ratio under 1.05.']}


def main(argv):
  del argv
  result = measure(_CONFIG.value, _STEPS.value, _REPEATS.value)
  print(json.dumps(result, indent=2))
  print(f"\n| device | model | batch | full step (ms) | batch on device (ms) | ratio |\n"
        f"|---|---|---|---|---|---|\n"
        f"| {result['device']} | {result['model']} | {result['batch_size']} | "
        f"{result['full_step_ms']:.2f} | {result['batch_on_device_step_ms']:.2f} | "
        f"{result['ratio']:.3f} |")
  if _OUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, 'w') as f:
      json.dump(result, f, indent=2)


if __name__ == '__main__':
  # Defined here, not at import, so `benchmarks.run` can import this module
  # next to others that define flags of the same names.
  _CONFIG = config_flags.DEFINE_config_file('config', 'configs/supervised.py', 'Method config.')
  _STEPS = flags.DEFINE_integer('steps', 200, 'Timed steps per variant (after warm-up).')
  _REPEATS = flags.DEFINE_integer('repeats', 5, 'Timings taken; the best is reported.')
  _OUT = flags.DEFINE_string('out', None, 'Write the figures as JSON here.')
  app.run(main)
