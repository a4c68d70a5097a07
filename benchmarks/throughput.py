r"""Train-step throughput of every gradient method with its default and report models.

Each case builds the method's real step as `sslj.train` does (images on the
devices, `train.sample_batch` + the method's `train_step` inside
`train.sampled_step`, state donated) on synthetic uint8 images of the case's
shape (a step's cost does not depend on the pixel values; STL-10 is not on
these machines), compiles it ahead of time and reports:

* compile seconds (`jit(...).lower(...).compile()`),
* milliseconds per step and images per second after compilation (best of
  the timed repeats: the least disturbed by other load),
* FLOPs per step from XLA's cost analysis (`Compiled.cost_analysis()`),
  achieved TFLOP/s, and MFU against a peak: `--peak_tflops`, else the dense
  bf16 peak of a known device (`common.PEAK_TFLOPS`, e.g. H100 SXM 989);
  on a CPU MFU is n/a unless a peak is given.

Images per step are the real images a step samples (labeled + unlabeled; the
GAN's generated images are not counted; for Exemplar-CNN the surrogate
patches). On a CPU (and with --quick) the ResNet-50/152 cases use small
batches and 3 (quick: 2) timed steps, and the other large models smaller
batches than their configs; the table says which batch each row used.

  python -m benchmarks.throughput [--cases=NAME,...] [--quick] [--peak_tflops=989] \
      [--out=bench/throughput.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import time

import jax

from benchmarks import common

STL = 'dataset=stl10,labels_per_class=64'


@dataclasses.dataclass(frozen=True)
class Case:
  """One method + model at one input shape.

  Attributes:
    method: the method's config name.
    model: the model the case trains (for the table).
    config: `configs/<method>.py[:arg]`.
    shape: (H, W, C) of the synthetic images.
    overrides: dotted config fields to set.
    cpu_batch: the batch on a CPU (None: the config's).
    heavy: ResNet-50/152: few timed steps on a CPU.
    pool: unlabeled images (DeepCluster's k and Exemplar's seeds need enough).
  """
  method: str
  model: str
  config: str
  shape: tuple[int, int, int]
  overrides: tuple = ()
  cpu_batch: int | None = None
  heavy: bool = False
  pool: int = 512

  @property
  def name(self) -> str:
    return f"{self.method}/{self.model}@{'x'.join(map(str, self.shape))}"


# The recipes at their report sizes: (config string, batch on a CPU,
# unlabeled pool: DeepCluster's clusters and Exemplar-CNN's seeds need
# enough). A method's own row at its default config comes from the registry
# (`all_cases`).
RESNET_CPU_BATCH = {'resnet18': 16, 'resnet50': 8, 'resnet152': 4}
LARGE = [
    *((f'configs/{m}.py:{STL},model={r}', b, 512) for m in ('supervised', 'mean_teacher')
      for r, b in RESNET_CPU_BATCH.items()),
    ('configs/mean_teacher.py:dataset=cifar10,labels_per_class=100,model=convlarge', 16, 512),
    ('configs/ssl_gan.py:dataset=cifar10,labels_per_class=400', 64, 512),
    ('configs/deep_cluster.py:dataset=stl10,model=alexnet', 32, 1000),
    ('configs/exemplar_cnn.py:dataset=stl10,labels_per_class=100,model=exemplar_large', 64, 4000),
]
SHAPES = {'digits': (8, 8, 1), 'cifar10': (32, 32, 3), 'stl10': (96, 96, 3)}
DIGITS_POOL = 1347  # the digits training split: every default config runs on it
HEAVY = ('resnet50', 'resnet152')  # few timed steps on a CPU


def _case(config_string: str, cpu_batch: int | None = None, pool: int = DIGITS_POOL) -> Case:
  """The case of one config: its method, model and data shape come from the config."""
  config = common.load_config(config_string, {})
  model = config.model.name
  # The ResNets at 96x96 (the ResNet-152 preset resizes to 224).
  overrides = (('augment.out_size', None),) if model.startswith('resnet') else ()
  return Case(config.method, model, config_string, SHAPES[config.data.name], overrides,
              cpu_batch, heavy=model in HEAVY, pool=pool)


def all_cases() -> list[Case]:
  """Every registered gradient method at its default config, then the LARGE recipes."""
  from sslj import methods  # pylint: disable=g-import-not-at-top
  default = [(f'configs/{name}.py',) for name, definition in methods.registry().items()
             if not definition.is_pipeline]
  return [_case(*c) for c in default + LARGE]


# --quick: every case at a small batch (labeled images for the mu-methods).
QUICK_BATCH = 8


def batch_overrides(config, batch: int) -> dict:
  """Config fields that set a global batch of `batch`.

  A method whose section has a `labeled_batch_size` (a share of
  `batch_size`) keeps its config's share; for the others `batch_size` is
  the labeled batch and the method draws its unlabeled images from it.
  """
  out = {'batch_size': batch}
  section = config.get(config.method) or {}
  if 'labeled_batch_size' in section:
    share = section.labeled_batch_size / config.batch_size
    out[f'{config.method}.labeled_batch_size'] = max(1, int(batch * share))
  return out


def measure(case: Case, *, quick: bool, peak: float | None) -> dict:
  """Compiles and times one case; returns its table row."""
  cpu = common.on_cpu()
  overrides = dict(case.overrides)
  batch = QUICK_BATCH if quick else case.cpu_batch if cpu else None
  if batch:
    overrides.update(batch_overrides(common.load_config(case.config, overrides), batch))
  config = common.load_config(case.config, overrides)
  data = common.synthetic_data(case.shape, num_classes=10, unlabeled=case.pool)
  bench = common.TrainStep(config, data)
  carry = bench.fresh_carry()
  compiled, compile_s, flops = bench.compile(carry)
  run = bench.runner(compiled, carry)
  start = time.perf_counter()
  run(1)  # warm-up
  first = time.perf_counter() - start
  if case.heavy and (cpu or quick):
    steps, repeats = (2 if quick else 3), 1
  else:
    target = 0.3 if quick else 1.0  # seconds per timed repeat
    steps = max(2, min(50, int(target / max(first, 1e-4))))
    repeats = 1 if quick else 3
  seconds = common.best_seconds(lambda: run(steps), repeats) / steps
  row = {'case': case.name, 'method': case.method, 'model': case.model,
         'input': 'x'.join(map(str, case.shape)), 'images_per_step': bench.images_per_step,
         'timed_steps': steps, 'repeats': repeats, 'compile_s': compile_s,
         'ms_per_step': 1e3 * seconds, 'images_per_s': bench.images_per_step / seconds,
         'gflop_per_step': flops / 1e9 if flops else None,
         'tflops': flops / seconds / 1e12 if flops else None,
         'mfu_pct': 100 * flops / seconds / 1e12 / peak if flops and peak else None,
         'small_batch': bool(batch)}
  return row


def suite(quick: bool = False, peak_tflops: float | None = None,
          cases: list[str] | None = None) -> dict:
  """Every case (or those named in `cases`) as one benchmark result."""
  known = all_cases()
  selected = [c for c in known if not cases or c.name in cases or c.method in cases]
  if cases and not selected:
    raise ValueError(f'no case matches {cases}; cases: {", ".join(c.name for c in known)}')
  peak = common.peak_tflops(peak_tflops)
  rows = []
  for case in selected:
    rows.append(measure(case, quick=quick, peak=peak))
    gc.collect()  # free the case's state and executables before the next
    jax.clear_caches()
    print(f"{rows[-1]['case']}: {rows[-1]['images_per_s']:,.0f} images/s, "
          f"compile {rows[-1]['compile_s']:.1f} s", flush=True)
  notes = ['images/s counts the real images a step samples (labeled + unlabeled); '
           "the GAN's generated images are not counted.",
           'GFLOP/step is XLA\'s cost analysis of the whole compiled step (sampling, '
           'augmentation, forward, backward, update).',
           f'MFU against {peak} TFLOP/s.' if peak else
           'MFU: n/a (no peak known for this device; pass --peak_tflops).']
  if quick:
    notes.append(f'--quick: every case at batch {QUICK_BATCH} (labeled batch for FixMatch and '
                 'the pseudo-label methods), ResNet-50/152 with 2 timed steps.')
  elif common.on_cpu():
    notes.append('On this CPU the ResNets, ConvLarge, AlexNet, Exemplar-large and the CIFAR '
                 'GAN run at the small batches shown, not their configs\' (ResNet-18 16, '
                 'ResNet-50 8, ResNet-152 4), and ResNet-50/152 with 3 timed steps and one '
                 'repeat: their figures are indicative only.')
  columns = [['method', 'method'], ['model', 'model'], ['input', 'input'],
             ['images_per_step', 'images/step'], ['timed_steps', 'timed steps'],
             ['compile_s', 'compile (s)'], ['ms_per_step', 'ms/step'],
             ['images_per_s', 'images/s'], ['gflop_per_step', 'GFLOP/step'],
             ['tflops', 'TFLOP/s'], ['mfu_pct', 'MFU %']]
  return {'benchmark': 'throughput',
          'command': common.command('throughput', {'quick': quick, 'peak_tflops': peak_tflops,
                                                   'cases': cases}),
          'peak_tflops': peak, 'tables': [{'title': 'Train-step throughput',
                                           'columns': columns, 'rows': rows}],
          'notes': notes}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--cases', default=None,
                      help='comma-separated case names or methods; default: all')
  parser.add_argument('--quick', action='store_true', help='small batches, few steps')
  parser.add_argument('--peak_tflops', type=float, default=None,
                      help='peak TFLOP/s of one device, for MFU')
  parser.add_argument('--out', default=None, help='write the result as JSON here')
  parser.add_argument('--list', action='store_true', help='list the cases and exit')
  args = parser.parse_args()
  if args.list:
    print('\n'.join(c.name for c in all_cases()))
    return
  result = suite(args.quick, args.peak_tflops, args.cases.split(',') if args.cases else None)
  common.print_result(result, args.out)


if __name__ == '__main__':
  main()
