r"""Cost of the on-device input path: sampling + gather + augmentation.

Times the full training step (indices sampled, images gathered from the
device-resident set and augmented on the devices, then the update) against
the same update fed a batch that is already on the device, normalised and
not augmented. The ratio is what the input path costs; the target is under
1.05 on a GPU.

  python -m benchmarks.input_path --config=configs/supervised.py:dataset=fashion_mnist \
      [--steps=200] [--out=bench/input_path.json]
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

from sslj import methods, parallel, train

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/supervised.py', 'Method config.')
_STEPS = flags.DEFINE_integer('steps', 200, 'Timed steps per variant (after warm-up).')
_OUT = flags.DEFINE_string('out', None, 'Write the figures as JSON here.')


def _time(fn, state, steps, repeats=5):
  """Best of `repeats` timings of `steps` steps (the least disturbed by other load)."""
  state = fn(state)  # compile and warm up
  jax.block_until_ready(state)
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      state = fn(state)
    jax.block_until_ready(state)
    best = min(best, (time.perf_counter() - start) / steps)
  return best


def measure(config, steps: int) -> dict:
  module = methods.get(config.method)
  data = train.load_data(config)
  num_steps = train.num_steps_for(config, module, data)
  method = module.build(config, data, num_steps)
  mesh = parallel.make_mesh()
  train_data = train.put_train_data(data, method, mesh)
  init_key, base_key = jax.random.split(jax.random.key(config.seed))
  sampler = functools.partial(train.sample_batch, mesh=mesh, labeled_batch=method.labeled_batch,
                              unlabeled_batch=method.unlabeled_batch)

  # The full step, as training runs it.
  full = jax.jit(functools.partial(train.sampled_step, method_step=method.train_step,
                                   sampler=sampler), donate_argnums=(0, 1))
  bad = jnp.array(-1, jnp.int32)

  def run_full(carry):
    state, bad = carry
    state, bad, _ = full(state, bad, train_data, base_key)
    return state, bad

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
  plain = module.build(config_plain, data, num_steps)
  batch = jax.jit(sampler)(train_data, jax.random.key(1))
  plain_step = jax.jit(plain.train_step, donate_argnums=(0,))

  def run_plain(state):
    state, _ = plain_step(state, batch, base_key)
    return state

  make_state = jax.jit(method.init, out_shardings=parallel.replicated(mesh))
  t_full = _time(run_full, (make_state(init_key), bad), steps)
  t_plain = _time(run_plain, make_state(init_key), steps)
  return {'benchmark': 'input_path', 'device': jax.devices()[0].device_kind,
          'devices': jax.device_count(), 'jax': jax.__version__,
          'method': config.method, 'dataset': config.data.name, 'model': config.model.name,
          'batch_size': config.batch_size, 'steps': steps,
          'full_step_ms': 1e3 * t_full, 'batch_on_device_step_ms': 1e3 * t_plain,
          'ratio': t_full / t_plain}


def main(argv):
  del argv
  result = measure(_CONFIG.value, _STEPS.value)
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
  app.run(main)
