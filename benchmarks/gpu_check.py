r"""One command for a machine with one GPU: the race, MFU, k-means and a FixMatch run.

  benchmarks/gpu_check.sh [OUT] [--quick]      # sets the machine up, then runs:
  python -m benchmarks.gpu_check --out=OUT [--quick] [--total_s=450]

Four parts, in this order, each in a process of its own (`--part=NAME`) with
its own time budget and a timeout (both capped so that the parts after it
keep their reserve and the whole run ends inside `--total_s`); a part that
fails or runs out of time is recorded with the end of its log, and the
others still run:

  race      the Mean Teacher step at ResNet-50 96x96 (16 + 48 images), sslj
            float32 and bfloat16 against PyTorch eager, compile+bf16 and
            compile (`benchmarks.torch_mean_teacher.race`, within its budget);
            skipped where PyTorch is not installed.
  mfu       the same sslj steps compiled ahead of time: FLOPs per step from
            XLA's cost analysis (`Compiled.cost_analysis()`), step time,
            TFLOP/s and MFU against the device's dense peak
            (`common.DENSE_PEAK_TFLOPS`: bf16 for the bfloat16 step, tf32
            for the float32 one); the persistent compilation cache shared
            by the parts gives it the race's executables.
  kmeans    `benchmarks.kmeans`: sslj's Lloyd iterations (and
            scikit-learn's on the smaller case), TFLOP/s and % of the fp32
            peak (its distances run at precision HIGHEST).
  fixmatch  `python launch.py --config=configs/fixmatch.py:dataset=fashion_mnist,
            labels_per_class=10`: the data prepared once, a probe run that
            measures the step time and the fixed cost of a run, then one run
            of as many steps as fit in the time left (`benchmarks.gpu_check_fixmatch`).

OUT gets summary.json and summary.md (every figure with the device's
`jax.devices()[0].device_kind`), each part's NAME.json and NAME.log, the
FixMatch runs under fixmatch/, the compilation cache under jax_cache/, and
bundle.tar.gz: the JSON, Markdown, logs and metrics without checkpoints or
caches. The exit status is 1 if a part failed or timed out (a part skipped
for want of PyTorch is not a failure).

--quick runs the same parts end to end at toy sizes on a CPU (the digits
Mean Teacher step with sslj float32 against PyTorch eager, its MFU row in
float32 alone, a small k-means,
FixMatch on a few hundred toy images in Fashion-MNIST's files): for testing
the command, not for figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import signal
import subprocess
import sys
import time
import traceback

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # see benchmarks/torch_mean_teacher.py

from benchmarks import common  # pylint: disable=wrong-import-position
from benchmarks import gpu_check_report as report  # pylint: disable=wrong-import-position


@dataclasses.dataclass(frozen=True)
class Part:
  """A part's plan: it aims at `budget_s`, is stopped after `timeout_s`, and
  the parts before it leave it at least `reserve_s`. None: the time left."""
  name: str
  budget_s: float | None
  timeout_s: float | None
  reserve_s: float


PARTS = {
    False: (Part('race', 200, 270, 0), Part('mfu', 40, 100, 40), Part('kmeans', 40, 80, 40),
            Part('fixmatch', None, None, 90)),
    True: (Part('race', 30, 150, 0), Part('mfu', 20, 120, 20), Part('kmeans', 10, 60, 10),
           Part('fixmatch', None, None, 60)),
}
TOTAL_S = {False: 450.0, True: 420.0}
# A part with less time than this left is not started.
MIN_PART_S = 15.0


def _with_device(table: dict, kind: str) -> dict:
  """The table with the device kind as its first column, in every row."""
  return {**table, 'columns': [['device', 'device'], *table['columns']],
          'rows': [{'device': kind, **row} for row in table['rows']]}


def part_race(quick: bool, budget_s: float) -> dict:
  try:
    from benchmarks import torch_mean_teacher as tmt  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    if e.name != 'torch' and not str(e).startswith('PyTorch'):
      raise
    return {'skipped': f"PyTorch is not installed (pip install -e '.[bench]'): {e}"}
  case = 'digits' if quick else 'resnet50'
  # Eager (seconds to warm) and the likely fastest variant first: a tight
  # budget leaves out the float32 compile.
  variants = (('sslj float32', 'PyTorch eager') if quick else
              ('sslj float32', 'sslj bfloat16', 'PyTorch eager', 'PyTorch compile+bf16',
               'PyTorch compile'))
  if common.on_cpu() and not quick:
    variants = tuple(v for v in variants if v != 'sslj bfloat16')
  result = tmt.suite(quick=quick, cases=[case], variants=variants,
                     budget_s=None if quick else budget_s)
  (facts,) = result['ratios']
  return {'figures': facts, 'tables': result['tables'], 'notes': result['notes'],
          'torch': result['torch']}


def part_mfu(quick: bool, budget_s: float) -> dict:
  case = 'digits' if quick else 'resnet50'
  started, rows = time.perf_counter(), []
  # --quick: float32 alone (one compile fewer; a CPU has no peak for MFU anyway).
  for dtype, math in (('bfloat16', 'bf16'), ('float32', 'tf32'))[quick:]:
    config, data = common.mean_teacher_case(case, quick=quick, dtype=dtype)
    bench = common.TrainStep(config, data)
    carry = bench.fresh_carry()
    compiled, compile_s, flops = bench.compile(carry)
    run = bench.runner(compiled, carry)
    start = time.perf_counter()
    run(1)
    first = time.perf_counter() - start
    per_repeat = max(0.05, min(1.0, (budget_s - (time.perf_counter() - started)) / 8))
    steps = 2 if quick else max(3, min(200, int(per_repeat / max(first, 1e-4))))
    seconds = common.best_seconds(lambda: run(steps), 1 if quick else 3) / steps
    tflops = flops / seconds / 1e12 if flops else None
    peak = common.dense_peak_tflops(math)
    rows.append({'case': case, 'model': config.model.name, 'dtype': dtype,
                 'images_per_step': bench.images_per_step, 'compile_s': compile_s,
                 'timed_steps': steps, 'ms_per_step': 1e3 * seconds,
                 'gflop_per_step': flops / 1e9 if flops else None, 'tflops': tflops,
                 'peak': math, 'peak_tflops': peak,
                 'mfu_pct': 100 * tflops / peak if tflops and peak else None})
  columns = [['case', 'case'], ['model', 'model'], ['dtype', 'dtype'],
             ['images_per_step', 'images/step'], ['compile_s', 'compile (s)'],
             ['timed_steps', 'timed steps'], ['ms_per_step', 'ms/step'],
             ['gflop_per_step', 'GFLOP/step'], ['tflops', 'TFLOP/s'], ['peak', 'peak'],
             ['peak_tflops', 'peak TFLOP/s'], ['mfu_pct', 'MFU %']]
  notes = ["GFLOP/step: XLA's cost analysis of the whole compiled step (sampling, "
           'augmentation, teacher and student forward, backward, update, EMA).',
           'Peaks are dense (no sparsity), from NVIDIA\'s data sheets '
           '(benchmarks/common.py:DENSE_PEAK_TFLOPS); float32 is measured against tf32, '
           "which XLA's default precision lets convolutions and matmuls use.",
           'A compile of a second or two is a hit in the compilation cache the race filled.']
  if rows[0]['peak_tflops'] is None:
    notes.append('MFU: n/a, no peak is known for this device.')
  if quick:
    notes.append('--quick: the float32 step alone.')
  return {'figures': {r['dtype']: {k: r[k] for k in ('tflops', 'mfu_pct', 'peak_tflops',
                                                     'ms_per_step', 'gflop_per_step')}
                      for r in rows},
          'tables': [{'title': 'sslj Mean Teacher step: FLOPs and MFU', 'columns': columns,
                      'rows': rows}], 'notes': notes}


def part_kmeans(quick: bool, budget_s: float) -> dict:
  from benchmarks import kmeans  # pylint: disable=import-outside-toplevel
  # (n, d, k, implementations left out): the docs' CPU case with scikit-learn,
  # then DeepCluster's size (1.28M features of 256 into 10,000) sslj alone.
  cases = ([(2000, 16, 32, set())] if quick else
           [(200_000, 128, 1024, set()), (1_280_000, 256, 10_000, {'sklearn'})])
  iters, repeats = (3, 1) if quick else (10, 2)
  started, rows, notes = time.perf_counter(), [], []
  peak = common.dense_peak_tflops('fp32')
  for n, d, k, skip in cases:
    if rows and time.perf_counter() - started > 0.4 * budget_s:
      notes.append(f'{n}x{d}x{k} not run: the budget ({budget_s:.0f} s) was too short.')
      continue
    args = argparse.Namespace(iters=iters, repeats=repeats, chunk_size=None, seed=0,
                              skip=skip | {'faiss'})
    row = kmeans.bench_case(n, d, k, iters, args)
    for impl in ('sslj', 'sklearn'):
      if impl in row:
        r = row[impl]
        rows.append({'n': n, 'd': d, 'k': k, 'impl': impl, 'iters': iters,
                     's_per_iter': r['s_per_iter'], 'inertia': r['inertia'],
                     'tflops': r['tflops'],
                     'pct_fp32_peak': 100 * r['tflops'] / peak if peak else None})
  columns = [['n', 'n'], ['d', 'd'], ['k', 'k'], ['impl', 'impl'], ['iters', 'iterations'],
             ['s_per_iter', 's/iter'], ['inertia', 'inertia'], ['tflops', 'TFLOP/s'],
             ['pct_fp32_peak', '% of fp32 peak']]
  notes += [f'{iters} Lloyd iterations from the same initial centroids, best of {repeats}; '
            'TFLOP/s counts the distances, 2 n k d per iteration.',
            f'fp32 peak: {peak} TFLOP/s.' if peak else 'fp32 peak: n/a for this device.']
  return {'figures': {f"{r['n']}x{r['d']}x{r['k']} {r['impl']}": {
              'tflops': r['tflops'], 's_per_iter': r['s_per_iter'],
              'pct_fp32_peak': r['pct_fp32_peak']} for r in rows},
          'tables': [{'title': 'k-means', 'columns': columns, 'rows': rows}], 'notes': notes}


def run_part(name: str, args) -> dict:
  """One part in this process: its result, with the environment and wall time."""
  if name == 'fixmatch':
    # This process only asks for the device's name; the runs it starts take the GPU.
    os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'] = 'false'
  env = common.environment()
  start = time.perf_counter()
  if name == 'fixmatch':
    from benchmarks import gpu_check_fixmatch  # pylint: disable=import-outside-toplevel
    result = gpu_check_fixmatch.part(args.out, quick=args.quick, budget_s=args.budget_s,
                                     fashion_mnist_dir=args.fashion_mnist_dir)
  else:
    result = globals()[f'part_{name}'](args.quick, args.budget_s)
  if 'torch' in sys.modules:
    env['torch'] = sys.modules['torch'].__version__
  kind = env['device_kind']
  result['tables'] = [_with_device(t, kind) for t in result.get('tables', [])]
  if 'figures' in result:
    result['figures'] = {'device_kind': kind, **result['figures']}
  return {'status': 'skipped' if 'skipped' in result else 'ok', **result,
          'environment': env, 'wall_s': time.perf_counter() - start}


def _log_tail(path: str, lines: int = 15) -> str:
  try:
    with open(path, errors='replace') as f:
      return ''.join(f.readlines()[-lines:])
  except OSError:
    return ''


def launch_part(part: Part, out: str, quick: bool, budget_s: float, timeout_s: float,
                fashion_mnist_dir: str | None) -> dict:
  """Runs one part in its own process group; kills the group at the timeout."""
  log = os.path.join(out, f'{part.name}.log')
  result_path = os.path.join(out, f'{part.name}.json')
  if os.path.exists(result_path):
    os.remove(result_path)
  cmd = [sys.executable, '-m', 'benchmarks.gpu_check', f'--part={part.name}', f'--out={out}',
         f'--budget_s={budget_s:.0f}'] + (['--quick'] if quick else []) + (
             [f'--fashion_mnist_dir={fashion_mnist_dir}'] if fashion_mnist_dir else [])
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  env.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(out, 'jax_cache'))
  if part.name == 'race':  # JAX takes 75% of the GPU by default: leave PyTorch room
    env.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.45')
  start = time.perf_counter()
  with open(log, 'w') as f:
    proc = subprocess.Popen(cmd, cwd=common.ROOT, stdout=f, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    try:
      code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
      code = None
      os.killpg(proc.pid, signal.SIGTERM)
      try:
        proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
  wall = time.perf_counter() - start
  plan = {'budget_s': round(budget_s), 'timeout_s': round(timeout_s), 'wall_s': wall,
          'command': ' '.join(cmd[1:])}
  if code is None:
    return {'status': 'timeout', **plan,
            'error': f'stopped after its timeout of {timeout_s:.0f} s', 'log_tail': _log_tail(log)}
  result = {}
  if os.path.exists(result_path):
    with open(result_path) as f:
      result = json.load(f)
  if code != 0 or not result:
    return {**result, 'status': 'failed', **plan,
            'error': result.get('error') or f'exit status {code}', 'log_tail': _log_tail(log)}
  return {**result, **plan}


def _nvidia_smi() -> str | None:
  try:
    proc = subprocess.run(['nvidia-smi', '--query-gpu=name,driver_version,memory.total',
                           '--format=csv,noheader'], capture_output=True, text=True, timeout=20)
  except (OSError, subprocess.TimeoutExpired):
    return None
  return proc.stdout.strip() or None if proc.returncode == 0 else None


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default='gpucheck', help='folder for everything it writes')
  parser.add_argument('--quick', action='store_true', help='toy sizes on a CPU, for testing')
  parser.add_argument('--total_s', type=float, default=None,
                      help=f'seconds for the whole run (default {TOTAL_S[False]:.0f}, '
                      f'--quick {TOTAL_S[True]:.0f})')
  parser.add_argument('--started_at', type=float, default=None,
                      help='epoch seconds the run began (gpu_check.sh: before its set-up)')
  parser.add_argument('--fashion_mnist_dir', default=None,
                      help="Fashion-MNIST's four *-ubyte.gz files (default: .gpucheck/"
                      'fashion-mnist if there, else /usr/share/datasets/fashion-mnist)')
  parser.add_argument('--part', default=None, choices=[p.name for p in PARTS[False]],
                      help='run one part in this process (what the driver starts)')
  parser.add_argument('--budget_s', type=float, default=60.0, help='with --part: its budget')
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  args.out = os.path.abspath(args.out)
  if args.part:
    path = os.path.join(args.out, f'{args.part}.json')
    try:
      result = run_part(args.part, args)
    except Exception as e:  # pylint: disable=broad-except  # recorded; the driver goes on
      traceback.print_exc()
      result = {'status': 'failed', 'error': f'{type(e).__name__}: {e}'.strip().splitlines()[0]}
    with open(path, 'w') as f:
      json.dump(result, f, indent=1)
    return 0 if result['status'] != 'failed' else 1

  started_at = args.started_at or time.time()
  total = args.total_s or TOTAL_S[args.quick]
  deadline = time.perf_counter() + total - (time.time() - started_at)
  given = [a for a in (sys.argv[1:] if argv is None else argv)
           if not a.startswith(('--out=', '--started_at='))]
  summary = {'command': ' '.join(['benchmarks/gpu_check.sh', args.out, *given]),
             'quick': args.quick, 'total_s': total,
             'started': datetime.datetime.fromtimestamp(started_at).astimezone().isoformat(
                 timespec='seconds'),
             'nvidia_smi': _nvidia_smi(), 'device_kinds': [], 'parts': {}}
  parts = PARTS[args.quick]
  for i, part in enumerate(parts):
    later = sum(p.reserve_s for p in parts[i + 1:])
    left = deadline - time.perf_counter() - later - 5  # 5 s for the summary
    timeout = min(part.timeout_s or left, left)
    # A part with no budget of its own plans for all of its time but 10 s.
    budget = min(part.budget_s, 0.8 * timeout) if part.budget_s else timeout - 10
    print(f'=== {part.name}: budget {budget:.0f} s, timeout {timeout:.0f} s', flush=True)
    if timeout < MIN_PART_S:
      result = {'status': 'failed', 'error': f'not started: {max(timeout, 0):.0f} s left'}
    else:
      result = launch_part(part, args.out, args.quick, budget, timeout, args.fashion_mnist_dir)
    summary['parts'][part.name] = result
    kind = result.get('environment', {}).get('device_kind')
    if kind and kind not in summary['device_kinds']:
      summary['device_kinds'].append(kind)
    print(f"{part.name}: {result['status']} in {result.get('wall_s', 0):.0f} s: "
          f'{report.headline(part.name, result)}', flush=True)
    summary['wall_s'] = time.time() - started_at
    report.write_summary(summary, args.out)
  summary['finished'] = datetime.datetime.now().astimezone().isoformat(timespec='seconds')
  summary['wall_s'] = time.time() - started_at
  report.write_summary(summary, args.out)
  report.bundle(args.out)
  print(f"wrote {os.path.join(args.out, 'summary.json')}, summary.md and bundle.tar.gz "
        f"({summary['wall_s']:.0f} s)")
  return 1 if any(r['status'] in ('failed', 'timeout') for r in summary['parts'].values()) else 0


if __name__ == '__main__':
  sys.exit(main())
