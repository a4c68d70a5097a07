r"""Where a method's compiled train step spends its time, op by op.

Builds the step exactly as the training loop and `benchmarks.throughput` do
(`common.TrainStep`: sampling, gather, augmentation and the update in one
jitted function, state donated), traces `--steps` steps with
`jax.profiler.trace` (XLA:CPU records one event per executed HLO op when
`--xla_cpu_enable_xprof_traceme=true` is in XLA_FLAGS, which this module sets
before JAX starts), and prints the ops that took the most time per step with
what they compute (the JAX operation each op came from, read from the
compiled HLO's metadata).

  python -m benchmarks.profile_step \
      --config=configs/mean_teacher.py:dataset=fashion_mnist,labels_per_class=10 \
      --shape=28,28,1 [--steps=20] [--top=20] [--out=bench/profile.json]

The categories in the summary are read off each op's HLO: `__ynn_fusion`
(YNNPACK convolutions and dots), reduce-window, select-and-scatter, scatter,
reductions (BatchNorm statistics, losses), gathers (sampling, augmentation),
and the rest of the elementwise fusions. Percentages are of the summed op
time inside the step (what the threads ran), which on 2 cores can exceed
wall time.
"""

from __future__ import annotations

import os

_FLAG = '--xla_cpu_enable_xprof_traceme=true'
if _FLAG not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _FLAG).strip()

# pylint: disable=wrong-import-position
import argparse
import collections
import glob
import gzip
import json
import re
import tempfile

import jax

from benchmarks import common

_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = \S+ (\S+?)\(')
_OP_NAME = re.compile(r'op_name="([^"]+)"')
_CALLS = re.compile(r'calls=%?([\w.\-]+)')


def hlo_ops(hlo_text: str) -> dict:
  """{instruction name: (kind, JAX op names it came from)} of the entry
  computation, with a fusion's kind taken from the ops it calls."""
  computations, current, entry = {}, None, None
  for line in hlo_text.splitlines():
    if line and not line.startswith(' ') and '{' in line and '(' in line:
      current = line.split()[1 if line.startswith('ENTRY') else 0].lstrip('%')
      computations[current] = []
      if line.startswith('ENTRY'):
        entry = current
    elif current and _INSTRUCTION.match(line):
      computations[current].append(line)
  out = {}
  for line in computations.get(entry, []):
    name, opcode = _INSTRUCTION.match(line).groups()
    inner = []
    called = _CALLS.search(line)
    if called:
      inner = [_INSTRUCTION.match(l).group(2) for l in computations.get(called.group(1), [])]
    sources = set(_OP_NAME.findall(line))
    if called:
      for l in computations.get(called.group(1), []):
        sources.update(_OP_NAME.findall(l))
    out[name] = (_category(name, opcode, inner), sorted(sources))
  return out


def _category(name: str, opcode: str, inner: list) -> str:
  ops = set(inner) | {opcode}
  if 'ynn' in name or 'ynn' in opcode:
    return 'convolution/dot (YNNPACK)'
  for key, label in (('select-and-scatter', 'select-and-scatter'), ('scatter', 'scatter'),
                     ('reduce-window', 'reduce-window'), ('convolution', 'convolution (XLA)'),
                     ('dot', 'dot (XLA)'), ('gather', 'gather'), ('sort', 'sort'),
                     ('reduce', 'reduce'), ('copy', 'copy/transpose'),
                     ('transpose', 'copy/transpose')):
    if key in ops:
      return label
  return 'elementwise'


def trace_events(log_dir: str) -> list:
  paths = glob.glob(os.path.join(log_dir, '**', '*.trace.json.gz'), recursive=True)
  paths += glob.glob(os.path.join(log_dir, '**', 'perfetto_trace.json.gz'), recursive=True)
  if not paths:
    raise RuntimeError(f'no trace was written under {log_dir}')
  with gzip.open(paths[0], 'rt') as f:
    data = json.load(f)
  return data['traceEvents'] if isinstance(data, dict) else data


def profile(config_spec: str, shape, steps: int, top: int) -> dict:
  config = common.load_config(config_spec)
  data = common.synthetic_data(tuple(shape), unlabeled=max(512, 4 * config.batch_size))
  bench = common.TrainStep(config, data)
  carry = bench.fresh_carry()
  compiled, _, _ = bench.compile(carry)
  ops = hlo_ops(compiled.as_text())
  run = bench.runner(compiled, carry)
  run(3)  # warm-up
  wall = common.best_seconds(lambda: run(steps), 1) / steps
  with tempfile.TemporaryDirectory() as log_dir:
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
      run(steps)
    events = trace_events(log_dir)
  per_op = collections.Counter()
  for event in events:
    name = event.get('name', '')
    if event.get('ph') == 'X' and name in ops:
      per_op[name] += float(event.get('dur', 0.0))
  total = sum(per_op.values())
  if not total:
    raise RuntimeError('the trace holds no XLA op events; is XLA_FLAGS overriding '
                       f'{_FLAG}?')
  by_category = collections.Counter()
  for name, us in per_op.items():
    by_category[ops[name][0]] += us
  rows = [{'op': name, 'kind': ops[name][0], 'ms_per_step': us / steps / 1e3,
           'share_pct': 100 * us / total,
           'from': '; '.join(s.split('/')[-1] for s in ops[name][1])[:90]}
          for name, us in per_op.most_common(top)]
  categories = [{'kind': kind, 'ms_per_step': us / steps / 1e3, 'share_pct': 100 * us / total}
                for kind, us in by_category.most_common()]
  return {'benchmark': 'profile_step',
          'command': common.command('profile_step', {'config': config_spec,
                                                     'shape': ','.join(map(str, shape)),
                                                     'steps': steps, 'top': top}),
          'tables': [
              {'title': f'{config_spec}: op time by kind ({wall * 1e3:.1f} ms/step wall)',
               'columns': [['kind', 'kind'], ['ms_per_step', 'ms/step'],
                           ['share_pct', '% of op time']], 'rows': categories},
              {'title': f'The {top} most expensive ops',
               'columns': [['op', 'HLO op'], ['kind', 'kind'], ['ms_per_step', 'ms/step'],
                           ['share_pct', '%'], ['from', 'JAX ops inside']],
               'rows': rows}],
          'notes': [f'{steps} traced steps; op time summed over threads.']}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', required=True, help='configs/<method>.py[:arg]')
  parser.add_argument('--shape', default='28,28,1', help='H,W,C of the synthetic images')
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--top', type=int, default=20)
  parser.add_argument('--out', default=None, help='write the result as JSON here')
  args = parser.parse_args()
  result = profile(args.config, [int(s) for s in args.shape.split(',')], args.steps, args.top)
  common.print_result(result, args.out)


if __name__ == '__main__':
  main()
