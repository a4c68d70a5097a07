r"""Performance knobs, each measured on the small-CNN Mean Teacher step.

The step is configs/mean_teacher.py's (small CNN, 8x8x1 digits-shaped
synthetic images, 32 labeled + 96 unlabeled), built as `sslj.train` builds
it (`common.TrainStep`). Each knob is a row `knob, off, on, ratio` with
ratio = off / on of the unit shown (> 1: turning the knob on is faster):

* bf16 compute: `config.model.dtype='bfloat16'` (float32 parameters, bf16
  convolutions; `sslj.methods.network.compute_dtype`) against float32.
* donated state: `jax.jit(..., donate_argnums=(0, 1))` (the loop's) against
  no donation (XLA must keep the old state and write a new one).
* k steps per call: `lax.scan` over k steps inside one jitted call against
  one step per call (per-step dispatch overhead), as an XLA while loop and
  unrolled (on XLA:CPU convolutions inside a while loop are much slower:
  jax-ml/jax#12868).
* persistent compilation cache: seconds to a compiled step (trace, lower,
  compile) in a fresh process with an empty cache directory
  (`jax_compilation_cache_dir`) against a second fresh process that finds
  the first one's entry.
* data resident on the device: batches sampled and gathered on the device
  inside the step (the loop's) against numpy batches gathered on the host
  and passed to the jitted method step every step.

Step times are the best of alternating rounds (every variant timed in turn,
so a burst of load from elsewhere hits them all).

  python -m benchmarks.knobs [--quick] [--scan_steps=8] [--out=bench/knobs.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from benchmarks import common

CONFIG = 'configs/mean_teacher.py'
SHAPE = (8, 8, 1)


def _step(dtype: str = 'float32', donate: bool = True) -> common.TrainStep:
  config = common.load_config(CONFIG, {'model.dtype': dtype})
  return common.TrainStep(config, common.synthetic_data(SHAPE, unlabeled=1297), donate=donate)


def _scan_runner(bench: common.TrainStep, k: int, unroll: bool = False):
  """Runs n steps as n / k calls of one jitted scan over k steps (`unroll`:
  the k steps written out one after the other instead of an XLA while loop)."""

  def k_steps(state, bad, scores, data, base_key):
    def body(carry, _):
      *carry, metrics = bench.step(*carry, data, base_key)
      return tuple(carry), metrics
    (state, bad, scores), metrics = jax.lax.scan(body, (state, bad, scores), None, length=k,
                                                 unroll=k if unroll else 1)
    return state, bad, scores, jax.tree.map(lambda m: m[-1], metrics)

  run = bench.runner(jax.jit(k_steps, donate_argnums=(0, 1, 2)), bench.fresh_carry())
  return lambda n: run(max(1, n // k))


def _host_runner(bench: common.TrainStep, seed: int = 0):
  """numpy batches gathered on the host each step, fed to the jitted method step."""
  method = bench.method
  data = bench.data
  rng = np.random.default_rng(seed)
  step = jax.jit(method.train_step, donate_argnums=(0,))
  box = [bench.fresh_carry()[0]]

  def run(n: int):
    state = box[0]
    for _ in range(n):
      li = rng.integers(0, len(data.labeled_images), method.labeled_batch)
      ui = rng.integers(0, len(data.unlabeled_images), method.unlabeled_batch)
      batch = {'labeled_images': data.labeled_images[li], 'labels': data.labeled_labels[li],
               'unlabeled_images': data.unlabeled_images[ui]}
      state, metrics = step(state, batch, jax.random.fold_in(bench.base_key, state.step))
    jax.block_until_ready((state, metrics))
    box[0] = state

  return run


def compile_probe(cache_dir: str) -> float:
  """Seconds to a compiled step in this process, with the persistent cache in `cache_dir`."""
  jax.config.update('jax_compilation_cache_dir', cache_dir)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  bench = _step()
  _, seconds, _ = bench.compile(bench.fresh_carry())
  return seconds


def _probe_subprocess(cache_dir: str) -> float:
  out = subprocess.run([sys.executable, '-m', 'benchmarks.knobs', f'--compile_probe={cache_dir}'],
                       cwd=common.ROOT, capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])['compile_s']


def _time_all(runners: dict, quick: bool, k: int) -> tuple[dict, int]:
  """(best seconds per step of every runner, in alternating rounds; timed steps).

  Step counts are multiples of `k`, the scan runner's steps per call.
  """
  warm = {}
  for name, run in runners.items():
    run(k)  # compile and warm up
    start = time.perf_counter()
    run(k)
    warm[name] = (time.perf_counter() - start) / k
  steps = k if quick else max(k, min(400, int(2.0 / max(max(warm.values()), 1e-5))))
  steps -= steps % k
  best = dict.fromkeys(runners, float('inf'))
  for _ in range(1 if quick else 3):
    for name, run in runners.items():
      start = time.perf_counter()
      run(steps)
      best[name] = min(best[name], (time.perf_counter() - start) / steps)
  return best, steps


def suite(quick: bool = False, peak_tflops: float | None = None, scan_steps: int = 8) -> dict:
  """Every knob as a row: knob, off, on, unit, ratio (off / on)."""
  del peak_tflops
  base = _step()
  runners = {
      'float32': base.runner(base.jitted, base.fresh_carry()),
      'bfloat16': (lambda b: b.runner(b.jitted, b.fresh_carry()))(_step('bfloat16')),
      'not donated': (lambda b: b.runner(b.jitted, b.fresh_carry()))(_step(donate=False)),
      f'scan {scan_steps}': _scan_runner(base, scan_steps),
      f'unrolled {scan_steps}': _scan_runner(base, scan_steps, unroll=True),
      'host batches': _host_runner(base),
  }
  best, steps = _time_all(runners, quick, scan_steps)
  with tempfile.TemporaryDirectory() as cache_dir:
    cold = _probe_subprocess(cache_dir)
    entries = len(os.listdir(cache_dir))
    warm = _probe_subprocess(cache_dir)
  ms = {k: 1e3 * v for k, v in best.items()}
  rows = [
      {'knob': 'bf16 compute (model.dtype)', 'off': ms['float32'], 'on': ms['bfloat16'],
       'unit': 'ms/step'},
      {'knob': 'donated state', 'off': ms['not donated'], 'on': ms['float32'], 'unit': 'ms/step'},
      {'knob': f'{scan_steps} steps per call (lax.scan, a while loop)', 'off': ms['float32'],
       'on': ms[f'scan {scan_steps}'], 'unit': 'ms/step'},
      {'knob': f'{scan_steps} steps per call (lax.scan, unrolled)', 'off': ms['float32'],
       'on': ms[f'unrolled {scan_steps}'], 'unit': 'ms/step'},
      {'knob': 'persistent compilation cache', 'off': cold, 'on': warm,
       'unit': 's to a compiled step (cold / warm cache, fresh process)'},
      {'knob': 'data resident on the device', 'off': ms['host batches'], 'on': ms['float32'],
       'unit': 'ms/step'},
  ]
  for row in rows:
    row['ratio'] = row['off'] / row['on']
  columns = [['knob', 'knob'], ['off', 'off'], ['on', 'on'], ['unit', 'unit'],
             ['ratio', 'ratio off/on']]
  notes = [f'Mean Teacher, small CNN, 8x8x1, {base.images_per_step} images per step; '
           f'{steps} timed steps per round, best of {1 if quick else 3} alternating rounds.',
           'ratio > 1: the knob on is faster.',
           f'The cold compile wrote {entries} cache entries.']
  if common.on_cpu():
    notes.append('On XLA:CPU a convolution inside a while loop runs far slower than the same '
                 'convolution outside one (jax-ml/jax#12868): the rolled scan is slow here; '
                 'the training loop calls one jitted step per step.')
  return {'benchmark': 'knobs',
          'command': common.command('knobs', {'quick': quick, 'scan_steps': scan_steps}),
          'tables': [{'title': 'Knobs on the small-CNN Mean Teacher step', 'columns': columns,
                      'rows': rows}],
          'notes': notes}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--scan_steps', type=int, default=8, help='k of the lax.scan knob')
  parser.add_argument('--out', default=None, help='write the result as JSON here')
  parser.add_argument('--compile_probe', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.compile_probe:
    print(json.dumps({'compile_s': compile_probe(args.compile_probe)}))
    return
  result = suite(args.quick, scan_steps=args.scan_steps)
  common.print_result(result, args.out)


if __name__ == '__main__':
  main()
