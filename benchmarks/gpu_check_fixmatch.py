r"""The FixMatch part of `benchmarks.gpu_check`: as many Fashion-MNIST steps as fit.

Three processes, in OUT/fixmatch/:

1. prepare: `sources.load_arrays('fashion_mnist', ...)` on the CPU prepares
   the tfds data in OUT/fixmatch/tfds from the four IDX files, so neither run
   below pays for it (nor the probe's measurement with it).
2. probe: `python launch.py --config=configs/fixmatch.py:dataset=fashion_mnist,
   labels_per_class=10 --config.num_steps=P` (no evaluation or checkpoint
   before the end): its logged steps/s give the step time, and its wall time
   less P steps the fixed cost of a run (start-up, reading the data,
   compilation, the final evaluation).
3. run: the same command with `num_steps` = what fits in the time left at the
   probe's rate, less the fixed cost and 15% for safety; it evaluates and
   saves a checkpoint five times in all.

The IDX files come from `fashion_mnist_dir`, else `.gpucheck/fashion-mnist`
(what `benchmarks/gpu_check.sh --prepare` copies there to travel with the
working tree), else Debian's /usr/share/datasets/fashion-mnist. --quick
writes a toy set in the same format (300 + 100 images) instead, and caps the
run at the probe's 8 steps.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time

import numpy as np

from benchmarks import common
from sslj.data.builders import fashion_mnist

CONFIG = 'configs/fixmatch.py:dataset=fashion_mnist,labels_per_class=10'
SEARCH = (os.path.join(common.ROOT, '.gpucheck', 'fashion-mnist'),
          fashion_mnist.DEFAULT_MANUAL_DIR)
SAFETY = 0.85
# --quick: the probe and the run both take this many steps, so the run's
# step is the probe's executable, from the persistent compilation cache.
QUICK_STEPS = 8


def write_toy_idx(folder: str, train: int = 300, test: int = 100, seed: int = 0) -> str:
  """Fashion-MNIST's four gzip IDX files holding a few class-striped noise images."""
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  for split, n in (('train', train), ('test', test)):
    labels = (np.arange(n) % 10).astype(np.uint8)
    images = rng.integers(0, 96, (n, 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):  # class c: a bright band at rows 2c..2c+5
      images[i, 2 * label:2 * label + 6] += 150
    images_file, labels_file = fashion_mnist.FILES[split]
    for name, array, magic in ((images_file, images, fashion_mnist.IMAGES_MAGIC),
                               (labels_file, labels, fashion_mnist.LABELS_MAGIC)):
      header = magic.to_bytes(4, 'big') + b''.join(
          d.to_bytes(4, 'big') for d in array.shape)
      with gzip.open(os.path.join(folder, name), 'wb') as f:
        f.write(header + array.tobytes())
  return folder


def find_idx_dir(given: str | None) -> str:
  names = [name for pair in fashion_mnist.FILES.values() for name in pair]
  for folder in ([given] if given else SEARCH):
    if all(os.path.exists(os.path.join(folder, n)) for n in names):
      return folder
  raise FileNotFoundError(
      f"Fashion-MNIST's {', '.join(names)} are not in {given or ' or '.join(SEARCH)}: run "
      'benchmarks/gpu_check.sh --prepare where they are (Debian: apt install '
      'dataset-fashion-mnist) and carry .gpucheck, or pass --fashion_mnist_dir.')


def _run(cmd: list[str], log: str, timeout: float, env: dict) -> tuple[int | None, float]:
  """(exit status or None on timeout, seconds) of `cmd`, its output to `log`."""
  start = time.perf_counter()
  with open(log, 'w') as f:
    proc = subprocess.Popen(cmd, cwd=common.ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    try:
      code = proc.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
      proc.terminate()  # the loop saves a checkpoint on SIGTERM and stops
      try:
        proc.wait(timeout=20)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
      code = None
  return code, time.perf_counter() - start


def _metrics(workdir: str) -> list[dict]:
  try:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      return [json.loads(line) for line in f if line.strip()]
  except OSError:
    return []


def _tail(path: str, lines: int = 5) -> str:
  with open(path, errors='replace') as f:
    return ''.join(f.readlines()[-lines:]).strip()


def launch_command(workdir: str, num_steps: int, every: int, log_every: int,
                   data_dir: str, idx_dir: str, quick: bool) -> list[str]:
  cmd = [sys.executable, 'launch.py', f'--config={CONFIG}', f'--workdir={workdir}',
         f'--config.num_steps={num_steps}', f'--config.eval_every={every}',
         f'--config.checkpoint_every={every}', f'--config.log_every={log_every}',
         f'--config.data.data_dir={data_dir}', f'--config.data.manual_dir={idx_dir}']
  if quick:
    cmd.append('--config.eval_batch_size=100')
  return cmd


def part(out: str, *, quick: bool, budget_s: float, fashion_mnist_dir: str | None) -> dict:
  """Prepare, probe, run; the figures and a table of both runs."""
  started = time.perf_counter()
  deadline = started + budget_s
  folder = os.path.join(out, 'fixmatch')
  os.makedirs(folder, exist_ok=True)
  idx_dir = (write_toy_idx(os.path.join(folder, 'toy-fashion-mnist')) if quick
             else find_idx_dir(fashion_mnist_dir))
  data_dir = os.path.join(folder, 'tfds')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_PYTHON_CLIENT_PREALLOCATE'}
  prepare = [sys.executable, '-c',
             'import sys; from sslj.data import sources; sources.load_arrays('
             '"fashion_mnist", data_dir=sys.argv[1], manual_dir=sys.argv[2])', data_dir, idx_dir]
  code, prepare_s = _run(prepare, os.path.join(folder, 'prepare.log'),
                         deadline - time.perf_counter(), dict(env, JAX_PLATFORMS='cpu'))
  if code != 0:
    raise RuntimeError(f"preparing Fashion-MNIST failed: {_tail(os.path.join(folder, 'prepare.log'))}")

  probe_steps, probe_log = (QUICK_STEPS, 2) if quick else (300, 50)
  probe_dir = os.path.join(folder, 'probe')
  cmd = launch_command(probe_dir, probe_steps, 0, probe_log, data_dir, idx_dir, quick)
  code, probe_s = _run(cmd, os.path.join(folder, 'probe.log'),
                       deadline - time.perf_counter() - 10, env)
  rates = [m['train/steps_per_s'] for m in _metrics(probe_dir)
           if m.get('train/steps_per_s', 0) > 0]
  if code != 0 or not rates:
    raise RuntimeError(f"the probe run failed: {_tail(os.path.join(folder, 'probe.log'))}")
  step_s = 1 / float(np.median(rates))
  fixed_s = max(0.0, probe_s - probe_steps * step_s)

  left = deadline - time.perf_counter()
  num_steps = int(SAFETY * (left - fixed_s - 5) / step_s)
  if quick:
    num_steps = min(num_steps, QUICK_STEPS)
  if num_steps < min(10, QUICK_STEPS):
    raise RuntimeError(f'{left:.0f} s left after the probe: too little for a run '
                       f'(fixed cost {fixed_s:.0f} s, {1e3 * step_s:.1f} ms/step)')
  every = 0 if num_steps < 1000 else max(100, num_steps // 5 // 100 * 100)
  run_dir = os.path.join(folder, 'run')
  cmd = launch_command(run_dir, num_steps, every, max(1, min(100, num_steps // 10)), data_dir,
                       idx_dir, quick)
  code, run_s = _run(cmd, os.path.join(folder, 'run.log'), deadline - time.perf_counter(), env)
  metrics = _metrics(run_dir)
  train = [m for m in metrics if 'train/loss' in m]
  evals = [m for m in metrics if 'eval/ema/top1' in m]
  results = {}
  if os.path.exists(os.path.join(run_dir, 'results.json')):
    with open(os.path.join(run_dir, 'results.json')) as f:
      results = json.load(f)
  figures = {
      'command': ' '.join(['python', *cmd[1:]]), 'prepare_s': prepare_s,
      'probe_steps': probe_steps, 'probe_wall_s': probe_s, 'probe_steps_per_s': 1 / step_s,
      'fixed_cost_s': fixed_s, 'num_steps': num_steps,
      'steps_done': train[-1]['step'] if train else 0,
      'run_steps_per_s': float(np.median([m['train/steps_per_s'] for m in train]))
                         if train else None,
      'run_wall_s': run_s, 'exit_status': code,
      'top1': results.get('top1', evals[-1]['eval/ema/top1'] if evals else None),
      'top5': results.get('top5', evals[-1]['eval/ema/top5'] if evals else None),
      'models': results.get('models')}
  rows = [{'run': 'probe', 'num_steps': probe_steps, 'steps_done': probe_steps,
           'wall_s': probe_s, 'steps_per_s': 1 / step_s},
          {'run': 'run', 'num_steps': num_steps, 'steps_done': figures['steps_done'],
           'wall_s': run_s, 'steps_per_s': figures['run_steps_per_s'],
           'top1': figures['top1'], 'top5': figures['top5']}]
  columns = [['run', 'run'], ['num_steps', 'num_steps'], ['steps_done', 'steps done'],
             ['wall_s', 'wall (s)'], ['steps_per_s', 'steps/s'], ['top1', 'top-1 (ema) %'],
             ['top5', 'top-5 %']]
  notes = [f'Data: {"toy IDX files (--quick)" if quick else idx_dir}; prepared in '
           f'{prepare_s:.0f} s. Fixed cost of a run, from the probe: {fixed_s:.0f} s.',
           f"The run: `{figures['command']}`."]
  result = {'figures': figures, 'notes': notes,
            'tables': [{'title': 'FixMatch on Fashion-MNIST (10 labels per class)',
                        'columns': columns, 'rows': rows}]}
  if code != 0:
    result['status'] = 'failed'
    result['error'] = (f"the run stopped at step {figures['steps_done']} of {num_steps}: "
                       + ('out of time' if code is None else f'exit status {code}'))
  return result
