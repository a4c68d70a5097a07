"""What every benchmark shares: the environment, timing, configs, data, tables.

Not a benchmark itself; `python -m benchmarks.run` and the benchmark modules
import it. A benchmark's `suite(quick=..., peak_tflops=...)` returns a dict
`{'benchmark', 'command', 'tables': [table, ...], 'notes': [str, ...]}`,
where a table is `{'title', 'columns': [[key, header], ...], 'rows': [dict]}`;
the runner adds `environment()` to it and writes JSON and Markdown.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import platform
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from sslj import configlib, methods, parallel, train
from sslj.data import splits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Dense peak TFLOP/s (no 2:4 sparsity) of known accelerators, by `device_kind`,
# for MFU. NVIDIA's data sheets quote the tensor-core figures with sparsity;
# these are half of them. The kinds of math:
#   bf16: BF16 tensor cores (a step run with `model.dtype=bfloat16`);
#   tf32: TF32 tensor cores, which XLA's default precision lets float32
#     convolutions and matmuls use on these GPUs (a float32 step);
#   fp32: float32 on the CUDA cores, what `precision=HIGHEST` asks for
#     (sslj's k-means distances).
# H100 SXM (HBM3) and H200 share the H100 SXM's tensor cores and clocks.
# References: NVIDIA H100 Tensor Core GPU data sheet (H100 SXM, PCIe, NVL);
# NVIDIA H200 Tensor Core GPU data sheet (H200 SXM, NVL); NVIDIA A100 Tensor
# Core GPU data sheet (SXM4 and PCIe, 40 and 80 GB).
_H100_SXM = {'bf16': 989.5, 'tf32': 494.5, 'fp32': 67.0}
_NVL = {'bf16': 835.5, 'tf32': 417.5, 'fp32': 60.0}
_A100 = {'bf16': 312.0, 'tf32': 156.0, 'fp32': 19.5}
DENSE_PEAK_TFLOPS = {
    'NVIDIA H100 80GB HBM3': _H100_SXM,
    'NVIDIA H100 PCIe': {'bf16': 756.5, 'tf32': 378.0, 'fp32': 51.0},
    'NVIDIA H100 NVL': _NVL,
    'NVIDIA H200': _H100_SXM,
    'NVIDIA H200 NVL': _NVL,
    'NVIDIA A100-SXM4-80GB': _A100,
    'NVIDIA A100-SXM4-40GB': _A100,
    'NVIDIA A100-PCIE-40GB': _A100,
    'NVIDIA A100 80GB PCIe': _A100,
}
# The dense bf16 peak alone: the MFU of `benchmarks.throughput`.
PEAK_TFLOPS = {kind: peaks['bf16'] for kind, peaks in DENSE_PEAK_TFLOPS.items()}

# The Mean Teacher race's cases (benchmarks.torch_mean_teacher), here so that
# code without PyTorch builds the same sslj step: name -> (config, (H, W, C),
# overrides).
MEAN_TEACHER_CASES = {
    'digits': ('configs/mean_teacher.py', (8, 8, 1), {}),
    'fashion_mnist': ('configs/mean_teacher.py:dataset=fashion_mnist,labels_per_class=10',
                      (28, 28, 1), {}),
    'resnet50': ('configs/mean_teacher.py:dataset=stl10,labels_per_class=64,model=resnet50',
                 (96, 96, 3), {'augment.out_size': None}),
}


def environment() -> dict:
  """Device kind, device count, versions and load: what a figure was measured on."""
  device = jax.devices()[0]
  return {'device_kind': device.device_kind, 'platform': device.platform,
          'devices': jax.device_count(), 'jax': jax.__version__,
          'machine': platform.machine(), 'cpu_count': os.cpu_count(),
          'load_avg_1m': round(os.getloadavg()[0], 2)}


def on_cpu() -> bool:
  return jax.devices()[0].platform == 'cpu'


def peak_tflops(given: float | None) -> float | None:
  """`given`, else the table's peak for this device, else None (MFU is n/a)."""
  if given:
    return given
  return PEAK_TFLOPS.get(jax.devices()[0].device_kind)


def dense_peak_tflops(math: str) -> float | None:
  """This device's dense peak for `math` ('bf16', 'tf32' or 'fp32'), or None."""
  return DENSE_PEAK_TFLOPS.get(jax.devices()[0].device_kind, {}).get(math)


def mean_teacher_case(case: str, *, quick: bool, dtype: str = 'float32'):
  """(config, data) of the race's sslj step for `case` at compute `dtype`.

  Quick runs, and the ResNet-50 case on a CPU, take a batch of 8 (2 labeled).
  The data are 2,048 synthetic unlabeled images of the case's shape.
  """
  spec, shape, overrides = MEAN_TEACHER_CASES[case]
  overrides = dict(overrides)
  if quick or (on_cpu() and case == 'resnet50'):
    overrides.update({'batch_size': 8, 'mean_teacher.labeled_batch_size': 2})
  config = load_config(spec, {**overrides, 'model.dtype': dtype})
  return config, synthetic_data(shape, unlabeled=2048)


def command(module: str, args: dict) -> str:
  """The shell command that reruns one benchmark alone with these arguments."""
  parts = ['python', '-m', f'benchmarks.{module}']
  for key, value in args.items():
    if value is None or value is False:
      continue
    if value is True:
      parts.append(f'--{key}')
    else:
      if isinstance(value, (list, tuple)):
        value = ','.join(str(v) for v in value)
      parts.append(f'--{key}={value}')
  return ' '.join(shlex.quote(p) for p in parts)


def best_seconds(run_steps, repeats: int) -> float:
  """Fastest of `repeats` calls of `run_steps()` (which must block): the run
  least disturbed by other load on a shared machine."""
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    run_steps()
    best = min(best, time.perf_counter() - start)
  return best


def load_config(spec: str, overrides: dict | None = None):
  """`configs/x.py[:arg]` as the launcher builds it, with dotted `overrides`.

  Every method is registered first, as the launcher's checks do, so the names
  a method's module adds (its schedule names) are known to what reads the config.
  """
  methods.registry()
  path, _, arg = spec.partition(':')
  name = os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(f'bench_config_{name}',
                                                       os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  config.unlock()
  configlib.set_fields(config, overrides or {})
  config.lock()
  return config


def synthetic_data(shape, *, num_classes: int = 10, labeled: int = 100,
                   unlabeled: int = 512, test: int = 10, seed: int = 0):
  """Random uint8 images of `shape` (H, W, C) as a run's `SemiSupervisedData`.

  A step's cost does not depend on the pixel values, and this needs no
  dataset on the machine (STL-10 is not on these machines).
  """
  rng = np.random.default_rng(seed)
  images = lambda n: rng.integers(0, 256, (n, *shape), dtype=np.uint8)
  labels = lambda n: (np.arange(n) % num_classes).astype(np.int32)
  channels = shape[-1]
  return splits.SemiSupervisedData(
      labeled_images=images(labeled), labeled_labels=labels(labeled),
      unlabeled_images=images(unlabeled), test_images=images(test), test_labels=labels(test),
      num_classes=num_classes, class_names=tuple(str(i) for i in range(num_classes)),
      mean=np.full(channels, 0.5, np.float32), std=np.full(channels, 0.29, np.float32),
      labeled_indices=np.arange(labeled, dtype=np.int64))


def flops_of(compiled) -> float | None:
  """FLOPs of one call of a compiled function, from XLA's cost analysis.

  `Compiled.cost_analysis()` returns a dict in JAX 0.10 (a list of one dict
  per program in older releases); None where the backend gives no figure.
  """
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # backends without it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or 'flops' not in cost:
    return None
  return float(cost['flops'])


def _format(value) -> str:
  if value is None:
    return 'n/a'
  if isinstance(value, bool):
    return 'yes' if value else 'no'
  if isinstance(value, float):
    if value != value:  # nan
      return 'n/a'
    if value == 0:
      return '0'
    if abs(value) >= 100:
      return f'{value:,.0f}'
    if abs(value) >= 1:
      return f'{value:.2f}'
    return f'{value:.3g}'
  return str(value)


def markdown_table(table: dict) -> str:
  """One benchmark table as Markdown (missing cells are blank)."""
  keys = [key for key, _ in table['columns']]
  lines = ['| ' + ' | '.join(header for _, header in table['columns']) + ' |',
           '|' + '---|' * len(keys)]
  for row in table['rows']:
    lines.append('| ' + ' | '.join(_format(row[k]) if k in row else '' for k in keys) + ' |')
  return '\n'.join(lines)


def markdown(result: dict) -> str:
  """A benchmark's result (tables, notes, environment, command) as Markdown."""
  env = result.get('environment', {})
  out = [f"## {result['benchmark']}", '',
         f"`{result['command']}`", '',
         f"Device: {env.get('device_kind')} x {env.get('devices')} ({env.get('platform')}), "
         f"JAX {env.get('jax')}" + (f", PyTorch {env['torch']}" if env.get('torch') else '')
         + f", load average {env.get('load_avg_1m')} at the start.", '']
  for table in result['tables']:
    if table.get('title'):
      out += [f"### {table['title']}", '']
    out += [markdown_table(table), '']
  for note in result.get('notes', []):
    out.append(f'- {note}')
  return '\n'.join(out).rstrip() + '\n'


def print_result(result: dict, out: str | None = None) -> None:
  """Prints the Markdown of a result (a benchmark's own command line) and
  writes it as JSON to `out` if given."""
  result.setdefault('environment', environment())
  sys.stdout.write(markdown(result))
  sys.stdout.flush()
  if out:
    with open(out, 'w') as f:
      json.dump(result, f, indent=1)


class TrainStep:
  """A method's compiled training step, built as `sslj.train` builds it.

  The run's images are put on the devices (`train.put_train_data`), and the
  jitted function is `train.sampled_step` with the method's `train_step` and
  `train.sample_batch` (sampling, gather and augmentation on the devices,
  then the update), donating the state, exactly as the training loop does.

  Attributes:
    config, method, mesh: the run's config, `base.Method` and mesh.
    data: the host-side `SemiSupervisedData` the benchmark was built from.
    images_per_step: labeled + unlabeled images a step samples (for methods
      that sample none themselves, such as Exemplar-CNN, `batch_size`).
    jitted: the jitted `(state, first_bad, label_scores, data, base_key) ->
      (state, first_bad, label_scores, metrics)` (`fresh_carry` is its first three).
  """

  def __init__(self, config, data, *, donate: bool = True):
    self.config = config
    self.data = data
    self.method = methods.get(config.method).make(config, data)
    self.mesh = parallel.make_mesh()
    self.train_data = train.put_train_data(data, self.method, self.mesh)
    self.init_key, self.base_key = jax.random.split(jax.random.key(config.seed))
    self._init = jax.jit(self.method.init, out_shardings=parallel.replicated(self.mesh))
    self._bad = lambda: jax.device_put(jnp.array(-1, jnp.int32),
                                       parallel.replicated(self.mesh))
    self.sampler = functools.partial(
        train.sample_batch, mesh=self.mesh, labeled_batch=self.method.labeled_batch,
        unlabeled_batch=self.method.unlabeled_batch,
        sample_unlabeled=self.method.sample_unlabeled)
    self.step = functools.partial(train.sampled_step, method_step=self.method.train_step,
                                  sampler=self.sampler)
    self.jitted = jax.jit(self.step, donate_argnums=(0, 1, 2) if donate else ())
    self.images_per_step = (self.method.labeled_batch + self.method.unlabeled_batch
                            or config.batch_size)

  def fresh_carry(self):
    """(state, first_bad, label_scores): a newly initialised state."""
    return (self._init(self.init_key), self._bad(),
            jax.device_put(np.zeros(4, np.float32), parallel.replicated(self.mesh)))

  def compile(self, carry):
    """(compiled step, seconds to lower and compile, FLOPs per step or None)."""
    start = time.perf_counter()
    compiled = self.jitted.lower(*carry, self.train_data, self.base_key).compile()
    return compiled, time.perf_counter() - start, flops_of(compiled)

  def runner(self, fn, carry):
    """A closure running `fn` for n steps from `carry` and blocking; it keeps
    the latest carry, so donated buffers are never reused."""
    box = [carry]

    def run(n: int):
      carry = box[0]
      for _ in range(n):
        *carry, metrics = fn(*carry, self.train_data, self.base_key)
      jax.block_until_ready((carry, metrics))
      box[0] = tuple(carry)
      return metrics

    return run
