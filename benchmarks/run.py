r"""Runs every benchmark and writes DIR/results.json and DIR/results.md.

  python -m benchmarks.run [--only NAME[,NAME]] [--out DIR] [--quick] [--peak_tflops=989]

Benchmarks (each module's `suite(quick=..., peak_tflops=...)`, which returns
its tables; each module also has its own command line):

  throughput          train-step images/s, compile time, FLOPs and MFU of every method
  torch_mean_teacher  the Mean Teacher step against the same step in PyTorch
  knobs               bf16, donation, lax.scan, compilation cache, resident data
  input_path          the on-device input path's share of a step
  kmeans              JAX k-means against scikit-learn and faiss
  kmeans_features     k-means feature extraction throughput
  gan_generator       DCGAN generator: transposed conv against resize + conv

Every benchmark's entry in results.json carries its `environment` (device
kind, number of devices, JAX version, PyTorch's where it ran, the load
average when it started) and `command`, the command that reruns it alone;
the file also records this run's command and `uptime` before and after.
`--quick` runs every benchmark at toy sizes (seconds to a minute or two
each on a CPU): for testing the suite, not for figures. A benchmark that
fails is recorded with its error, the others still run, and the exit status
is 1. results.json and results.md are rewritten after every benchmark.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback

# Before anything loads an OpenMP runtime (PyTorch, scikit-learn): see
# benchmarks/kmeans.py and benchmarks/torch_mean_teacher.py.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

from benchmarks import common  # pylint: disable=wrong-import-position

BENCHMARKS = ('throughput', 'torch_mean_teacher', 'knobs', 'input_path', 'kmeans',
              'kmeans_features', 'gan_generator')


def _uptime() -> str:
  try:
    return subprocess.run(['uptime'], capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'load average: ' + ', '.join(f'{v:.2f}' for v in os.getloadavg())


def _now() -> str:
  return datetime.datetime.now().astimezone().isoformat(timespec='seconds')


def markdown(results: dict) -> str:
  """The whole run as Markdown: the run's facts, then every benchmark's tables."""
  lines = ['# sslj benchmarks', '', f"`{results['command']}`", '',
           f"- started {results['started']}; `uptime` before: {results['uptime_before']}"]
  if 'uptime_after' in results:
    lines.append(f"- finished {results['finished']}; `uptime` after: {results['uptime_after']}")
  lines.append('')
  for name, result in results['benchmarks'].items():
    if 'error' in result:
      lines += [f'## {name}', '', f"FAILED: {result['error']}", '']
    elif 'skipped' in result:
      lines += [f'## {name}', '', f"Skipped: {result['skipped']}", '']
    else:
      lines += [common.markdown(result), f"Took {result['wall_s']:.0f} s.", '']
  return '\n'.join(lines)


def _write(results: dict, out: str) -> None:
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(out, 'results.md'), 'w') as f:
    f.write(markdown(results))


def run_one(name: str, quick: bool, peak_tflops: float | None) -> dict:
  """One benchmark's result with its environment, or {'skipped'} / {'error'}."""
  if name == 'torch_mean_teacher' and importlib.util.find_spec('torch') is None:
    return {'skipped': "PyTorch is not installed (pip install -e '.[bench]')."}
  start = time.perf_counter()
  env = common.environment()
  try:
    module = importlib.import_module(f'benchmarks.{name}')
    result = module.suite(quick=quick, peak_tflops=peak_tflops)
  except Exception as e:  # pylint: disable=broad-except  # record it, run the others
    traceback.print_exc()
    return {'error': f'{type(e).__name__}: {e}'.strip().splitlines()[0]}
  if 'torch' in sys.modules:
    env['torch'] = sys.modules['torch'].__version__
  result['environment'] = env
  result['wall_s'] = time.perf_counter() - start
  return result


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--only', default=None,
                      help=f'comma-separated benchmarks of {", ".join(BENCHMARKS)}')
  parser.add_argument('--out', default='bench', help='directory for results.json and .md')
  parser.add_argument('--quick', action='store_true', help='toy sizes, for testing the suite')
  parser.add_argument('--peak_tflops', type=float, default=None,
                      help='peak TFLOP/s of one device for MFU (default: known devices only)')
  args = parser.parse_args(argv)
  names = args.only.split(',') if args.only else list(BENCHMARKS)
  unknown = [n for n in names if n not in BENCHMARKS]
  if unknown:
    parser.error(f'unknown benchmark(s) {", ".join(unknown)}; choose from '
                 f'{", ".join(BENCHMARKS)}')
  results = {'command': ' '.join(['python -m benchmarks.run', *(argv or sys.argv[1:])]),
             'started': _now(), 'uptime_before': _uptime(), 'quick': args.quick,
             'benchmarks': {}}
  failed = False
  for name in names:
    print(f'=== {name}', flush=True)
    results['benchmarks'][name] = result = run_one(name, args.quick, args.peak_tflops)
    failed |= 'error' in result
    _write(results, args.out)
  results.update(finished=_now(), uptime_after=_uptime())
  _write(results, args.out)
  print(f"wrote {os.path.join(args.out, 'results.json')} and results.md")
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
