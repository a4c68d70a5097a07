r"""Race: sslj's Mean Teacher step against the same step in PyTorch.

The PyTorch step (`TorchMeanTeacher`) does what `sslj.methods.mean_teacher`
does, written as a careful PyTorch user would: a batch of labeled + unlabeled
uint8 images drawn from tensors in memory, two independent augmentations
(flip / pad-and-crop translation with mirrored borders as the config says,
then normalisation, Gaussian input noise if configured), the teacher's
forward under `no_grad` in training mode (its own BatchNorm statistics),
the student's forward and backward with two heads, cross-entropy on the
labeled part, the softmax-MSE (or KL) consistency cost with its sigmoid
ramp-up, the logit distance between the heads, SGD with Nesterov momentum,
L2 weight decay and the config's learning-rate schedule, and the EMA of the
parameters into the teacher (decay min(1 - 1/(t + 1), ema_decay), with
ema_decay_rampup during the consistency ramp-up when the config sets it).
Same network (`benchmarks.torch_models`, same parameter count), same batch,
same input size. Variants: eager, `torch.compile` (forward + loss +
augmentation in one graph, optimizer step + EMA in another), and
`torch.compile` with bf16 autocast; all channels_last. `tests/test_benchmarks.py` checks on a fixed
batch with copied weights that both give the same losses and the same
parameters after one step.

Both are timed in the same process, in alternating rounds (best round each):
the ratio is sslj images/s over PyTorch images/s (> 1: sslj is faster).

Cases: 'digits' (configs/mean_teacher.py: 8x8x1, 32 + 96 images) and
'fashion_mnist' (28x28x1, 16 + 48) by default; 'resnet50' (the STL-10
recipe at 96x96x3, 16 + 48, the GPU case; default on a GPU).

  python -m benchmarks.torch_mean_teacher [--cases=digits,fashion_mnist,resnet50] [--quick] \
      [--out=bench/torch_mean_teacher.json]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import time

# PyTorch's OpenMP threads spin, then sleep, while they wait by default; on a
# 2-core machine shared with other jobs that made the eager small-CNN step
# take 8 s instead of 10-20 ms (its 2 threads wait for each other's time
# slices at every parallel region). Passive waiting is the setting that is
# fair to PyTorch there (as in benchmarks/kmeans.py for faiss); export
# OMP_WAIT_POLICY to override. It must be set before the OpenMP runtime loads.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import jax
import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import common, torch_augment, torch_models
from sslj.data import augment
from sslj.methods import mean_teacher
from sslj.ops import optim

CASES = common.MEAN_TEACHER_CASES
# Every variant of the race, in the order they are built, warmed and timed.
VARIANTS = ('sslj float32', 'sslj bfloat16', 'PyTorch eager', 'PyTorch compile',
            'PyTorch compile+bf16')
_TORCH_VARIANTS = {'PyTorch eager': {}, 'PyTorch compile': {'compile': True},
                   'PyTorch compile+bf16': {'compile': True, 'bf16': True}}


@dataclasses.dataclass(frozen=True)
class Settings:
  """What the PyTorch step needs from an sslj Mean Teacher config."""
  model: str
  shape: tuple
  num_classes: int
  labeled: int
  unlabeled: int
  steps_per_epoch: int
  num_steps: int
  ema_decay: float
  ema_decay_rampup: float | None
  ema_rampup_steps: int
  consistency: str
  consistency_weight: float
  rampup_epochs: float
  logit_distance_cost: float
  lr: float
  schedule: str
  # sslj's own schedule (sslj.ops.optim) evaluated once at steps 0..num_steps.
  lr_table: np.ndarray = dataclasses.field(compare=False, repr=False)
  momentum: float
  nesterov: bool
  weight_decay: float
  flip: bool
  pad_crop: int
  rotate_deg: float
  noise_std: float
  mean: tuple
  std: tuple

  @classmethod
  def from_config(cls, config, data) -> Settings:
    mt, opt, aug = config.mean_teacher, config.optimizer, config.augment
    if opt.name != 'sgd':
      raise ValueError('the PyTorch step implements SGD only')
    spec = augment.AugmentSpec.from_config(aug)
    rest = dataclasses.replace(spec, flip=False, pad_crop=0, rotate_deg=0.0, noise_std=0.0)
    if rest != augment.AugmentSpec():
      raise ValueError('the PyTorch step implements the augmentations flip, pad_crop, '
                       f'rotate_deg and noise_std only; got {spec}')
    labeled, unlabeled = mean_teacher.batch_split(config)
    run_steps = mean_teacher.METHOD.steps(config, data)
    steps_per_epoch, num_steps = run_steps.per_epoch, run_steps.total
    steps = np.arange(num_steps + 1)  # a constant schedule returns one number
    lr_table = np.broadcast_to(optim.learning_rate(opt, num_steps)(steps), steps.shape)
    return cls(
        model=config.model.name, shape=tuple(data.labeled_images.shape[1:]),
        num_classes=data.num_classes, labeled=labeled, unlabeled=unlabeled,
        steps_per_epoch=steps_per_epoch,
        num_steps=num_steps, ema_decay=mt.ema_decay,
        ema_decay_rampup=mt.ema_decay_rampup,
        ema_rampup_steps=int(round(mt.rampup_epochs * steps_per_epoch)),
        consistency=mt.consistency, consistency_weight=mt.consistency_weight,
        rampup_epochs=mt.rampup_epochs, logit_distance_cost=mt.logit_distance_cost,
        lr=opt.learning_rate, schedule=opt.schedule, lr_table=lr_table, momentum=opt.momentum,
        nesterov=opt.nesterov, weight_decay=opt.weight_decay, flip=aug.flip,
        pad_crop=aug.pad_crop, rotate_deg=aug.rotate_deg, noise_std=aug.noise_std,
        mean=tuple(float(v) for v in data.mean), std=tuple(float(v) for v in data.std))


def learning_rate(s: Settings, step: int) -> float:
  """The learning rate of the step about to be taken (step counted from 0)."""
  return float(s.lr_table[min(step, s.num_steps)])


class TorchMeanTeacher:
  """sslj's Mean Teacher step in PyTorch (see the module docstring)."""

  def __init__(self, s: Settings, labeled_images, labels, unlabeled_images, *,
               device: str = 'cpu', compile: bool = False, bf16: bool = False):
    self.s, self.device, self.bf16 = s, torch.device(device), bf16
    put = lambda a: torch.as_tensor(np.asarray(a), device=self.device)
    self.labeled_images, self.labels = put(labeled_images), put(labels).long()
    self.unlabeled_images = put(unlabeled_images)
    self.mean = torch.tensor(s.mean, device=self.device)
    self.std = torch.tensor(s.std, device=self.device)
    self.student = torch_models.build(s.model, s.shape, s.num_classes, 2).to(
        self.device, memory_format=torch.channels_last).train()
    self.teacher = copy.deepcopy(self.student)
    for p in self.teacher.parameters():
      p.requires_grad_(False)
    # A tensor learning rate: the compiled optimizer step is not recompiled as it changes.
    self.lr = torch.tensor(s.lr, device=self.device)
    self.opt = torch.optim.SGD(self.student.parameters(), lr=self.lr, momentum=s.momentum,
                               nesterov=s.nesterov, weight_decay=s.weight_decay)
    self.step_count = 0
    self.ema_count = torch.zeros((), device=self.device)
    # Static shapes: a second case of another shape in the same process would
    # otherwise be recompiled with dynamic shapes, which Inductor 2.13 failed
    # to compile here ("cannot determine truth value of Relational").
    compiled = lambda f: torch.compile(f, dynamic=False)
    self._loss = compiled(self._loss_terms) if compile else self._loss_terms
    self._update = compiled(self._apply_updates) if compile else self._apply_updates

  def teacher_from_student(self):
    """The teacher starts as a copy of the student (sslj's `ema.init`)."""
    self.teacher.load_state_dict(self.student.state_dict())

  def preprocess(self, images, augment: bool = True):
    """uint8 [B, H, W, C] -> normalised float, NCHW on channels_last memory."""
    x = images.float() / 255
    b = x.shape[0]
    if augment:
      flip = (torch.rand(b, device=x.device) < 0.5) & self.s.flip
      p = self.s.pad_crop
      shift = (torch.randint(-p, p + 1, (b, 2), device=x.device) if p
               else torch.zeros((b, 2), dtype=torch.long, device=x.device))
      if self.s.rotate_deg:
        x = torch_augment.rotate(x, flip, shift, self.s.rotate_deg)
      elif p or self.s.flip:
        x = torch_augment.shift_flip(x, flip, shift)
    x = (x - self.mean) / self.std
    if augment and self.s.noise_std:
      x = x + self.s.noise_std * torch.randn_like(x)
    return x.permute(0, 3, 1, 2)  # NHWC memory = channels_last

  def _consistency(self, student, teacher):
    if self.s.consistency == 'mse':
      diff = student.softmax(-1) - teacher.softmax(-1)
      return diff.pow(2).sum(-1).mean() / student.shape[-1]
    log_pt = teacher.log_softmax(-1)
    return (log_pt.exp() * (log_pt - student.log_softmax(-1))).sum(-1).mean()

  def _loss_terms(self, images, labels, weight, augment: bool = True):
    student_x = self.preprocess(images, augment)
    teacher_x = self.preprocess(images, augment)  # independent noise
    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
      with torch.no_grad():
        target = self.teacher(teacher_x)[0].float()
      class_logits, cons_logits = self.student(student_x)
    class_logits, cons_logits = class_logits.float(), cons_logits.float()
    class_loss = F.cross_entropy(class_logits[:labels.shape[0]], labels)
    cons_loss = self._consistency(cons_logits, target)
    res_loss = (self.s.logit_distance_cost
                * (class_logits - cons_logits).pow(2).sum(-1).mean() / class_logits.shape[-1])
    return class_loss + weight * cons_loss + res_loss, class_loss, cons_loss, res_loss

  def _apply_updates(self):
    self.opt.step()
    with torch.no_grad():  # the teacher must not join the student's autograd graph
      self.ema_count += 1
      cap = self.s.ema_decay
      if self.s.ema_decay_rampup is not None and self.s.ema_rampup_steps > 0:
        cap = torch.where(self.ema_count <= self.s.ema_rampup_steps,
                          self.s.ema_decay_rampup, self.s.ema_decay)
      decay = torch.minimum(1 - 1 / (self.ema_count + 1), torch.as_tensor(cap))
      torch._foreach_lerp_(list(self.teacher.parameters()), list(self.student.parameters()),
                           1 - decay)

  def step(self, images, labels, augment: bool = True) -> dict:
    """One step on uint8 images (labeled first) and the labeled part's labels."""
    s = self.s
    t = min(max(self.step_count / s.steps_per_epoch / s.rampup_epochs, 0.0), 1.0) if (
        s.rampup_epochs) else 1.0
    weight = torch.tensor(s.consistency_weight * math.exp(-5 * (1 - t) ** 2),
                          device=self.device)
    self.lr.fill_(learning_rate(s, self.step_count))
    loss, class_loss, cons_loss, res_loss = self._loss(images, labels, weight, augment)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self._update()
    self.step_count += 1
    return {'loss': loss.detach(), 'class_loss': class_loss.detach(),
            'consistency_loss': cons_loss.detach(), 'logit_distance_loss': res_loss.detach()}

  def sampled_step(self) -> dict:
    """Draws the batch from the images in memory, then steps."""
    li = torch.randint(len(self.labeled_images), (self.s.labeled,), device=self.device)
    ui = torch.randint(len(self.unlabeled_images), (self.s.unlabeled,), device=self.device)
    images = torch.cat([self.labeled_images[li], self.unlabeled_images[ui]])
    return self.step(images, self.labels[li])


def _sync(device):
  if device.type == 'cuda':
    torch.cuda.synchronize()


def race(case: str, *, quick: bool, variants=None,
         budget_s: float | None = None) -> tuple[list[dict], dict]:
  """Times sslj and the PyTorch variants on one case; returns rows and facts.

  `variants`: names from VARIANTS, the sslj ones first, then the PyTorch ones,
  each in the order given (default: all; sslj bfloat16 only off the CPU).
  With `budget_s`, a variant is not
  started once 60% of the budget is spent on building and warming the ones
  before it (the facts name it under `skipped`), and the timed steps are
  as many as fit in the rest.
  """
  started = time.perf_counter()
  cpu = common.on_cpu()
  if variants is None:
    variants = [v for v in VARIANTS if not (cpu and v == 'sslj bfloat16')]
  unknown = set(variants) - set(VARIANTS)
  if unknown or not any(v.startswith('sslj') for v in variants) or not any(
      v.startswith('PyTorch') for v in variants):
    raise ValueError(f'variants {list(variants)}: name at least one sslj and one PyTorch '
                     f'variant of {", ".join(VARIANTS)}')
  variants = list(dict.fromkeys(variants))
  builders, counts, data = {}, {}, None
  for name in variants:
    if name.startswith('sslj'):
      config, data = common.mean_teacher_case(case, quick=quick, dtype=name.split()[1])

      def build(config=config, data=data):
        bench = common.TrainStep(config, data)
        carry = bench.fresh_carry()
        counts['sslj'] = sum(x.size for x in jax.tree.leaves(carry[0].params))
        return bench.runner(bench.jitted, carry)

      builders[name] = build
  settings = Settings.from_config(config, data)
  device = 'cpu' if cpu else 'cuda'
  torch._dynamo.reset()  # a clean compile cache per case  # pylint: disable=protected-access
  for name in variants:
    if name.startswith('PyTorch'):

      def build(kw=_TORCH_VARIANTS[name]):
        torch.manual_seed(0)
        mt = TorchMeanTeacher(settings, data.labeled_images, data.labeled_labels,
                              data.unlabeled_images, device=device, **kw)
        counts['torch'] = torch_models.num_params(mt.student)

        def run(n):
          for _ in range(n):
            out = mt.sampled_step()
          _sync(mt.device)
          return float(out['loss'])

        return run

      builders[name] = build
  runners, warm, skipped, per_step = {}, {}, [], 0.0
  for name, build in builders.items():  # compile and warm up, then estimate a step
    if budget_s is not None and time.perf_counter() - started > 0.6 * budget_s:
      skipped.append(name)
      continue
    start = time.perf_counter()
    runners[name] = run = build()
    run(2)
    warm[name] = time.perf_counter() - start
    start = time.perf_counter()
    run(2)
    per_step = max(per_step, 0.5 * (time.perf_counter() - start))
  rounds = 1 if quick else 3
  steps = 2 if quick else max(3, min(100, int(1.5 / max(per_step, 1e-4))))
  if budget_s is not None and not quick:
    left = budget_s - (time.perf_counter() - started)
    steps = max(3, min(steps, int(left / (rounds * len(runners) * max(per_step, 1e-4)))))
  best = dict.fromkeys(runners, float('inf'))
  for _ in range(rounds):  # in turn, so a burst of load hits every variant
    for name, run in runners.items():
      start = time.perf_counter()
      run(steps)
      best[name] = min(best[name], (time.perf_counter() - start) / steps)
  images = settings.labeled + settings.unlabeled
  torch_times = [v for k, v in best.items() if k.startswith('PyTorch')]
  fastest_torch = min(torch_times) if torch_times else None
  ratio = lambda t: fastest_torch / t if fastest_torch and t else None
  shape = data.labeled_images.shape[1:]
  rows = [{'case': case, 'input': 'x'.join(map(str, shape)), 'model': settings.model,
           'images_per_step': images, 'variant': name, 'timed_steps': steps,
           'first_2_steps_s': warm[name], 'ms_per_step': 1e3 * t, 'images_per_s': images / t,
           'vs_best_pytorch': ratio(t)} for name, t in best.items()]
  sslj_times = [v for k, v in best.items() if k.startswith('sslj')]
  facts = {'case': case, 'params_sslj': counts.get('sslj'), 'params_torch': counts.get('torch'),
           'ratio_sslj_f32_vs_best_pytorch': ratio(best.get('sslj float32')),
           'ratio_best_sslj_vs_best_pytorch': ratio(min(sslj_times)) if sslj_times else None,
           'skipped': skipped}
  return rows, facts


def suite(quick: bool = False, peak_tflops: float | None = None,
          cases: list[str] | None = None, variants=None, budget_s: float | None = None) -> dict:
  """The race on every case (default: digits + fashion_mnist; + resnet50 on a GPU).

  `variants` and `budget_s` (for each case) as `race`'s.
  """
  del peak_tflops
  if not cases:
    cases = ['digits'] if quick else ['digits', 'fashion_mnist'] + (
        [] if common.on_cpu() else ['resnet50'])
  rows, facts = [], []
  for case in cases:
    case_rows, case_facts = race(case, quick=quick, variants=variants, budget_s=budget_s)
    rows += case_rows
    facts.append(case_facts)
    ratio = case_facts['ratio_best_sslj_vs_best_pytorch']
    print(f"{case}: sslj / best PyTorch = {ratio if ratio is None else round(ratio, 2)}",
          flush=True)
  columns = [['case', 'case'], ['input', 'input'], ['model', 'model'],
             ['images_per_step', 'images/step'], ['variant', 'variant'],
             ['timed_steps', 'timed steps'], ['first_2_steps_s', 'first 2 steps (s)'],
             ['ms_per_step', 'ms/step'], ['images_per_s', 'images/s'],
             ['vs_best_pytorch', 'x best PyTorch']]
  fact_columns = [['case', 'case'], ['params_sslj', 'params sslj'],
                  ['params_torch', 'params PyTorch'],
                  ['ratio_sslj_f32_vs_best_pytorch', 'sslj f32 / best PyTorch (images/s)'],
                  ['ratio_best_sslj_vs_best_pytorch', 'best sslj / best PyTorch (images/s)']]
  notes = ['"x best PyTorch" is images/s over the fastest PyTorch variant\'s (> 1: faster).',
           '"first 2 steps" includes compilation (XLA for sslj, TorchInductor for compile).',
           f'torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, '
           f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}."]
  if quick:
    notes.append('--quick: batch 8 (2 labeled), 2 timed steps, one round.')
  for f in facts:
    if f['skipped']:
      notes.append(f"{f['case']}: not run within the budget of {budget_s:.0f} s: "
                   f"{', '.join(f['skipped'])}.")
  return {'benchmark': 'torch_mean_teacher',
          'command': common.command('torch_mean_teacher', {'quick': quick, 'cases': cases}),
          'torch': torch.__version__, 'ratios': facts,
          'tables': [{'title': 'Mean Teacher step: sslj against PyTorch', 'columns': columns,
                      'rows': rows},
                     {'title': 'Ratios and parameter counts', 'columns': fact_columns,
                      'rows': facts}],
          'notes': notes}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--cases', default=None, help=f'comma-separated of {", ".join(CASES)}')
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--out', default=None, help='write the result as JSON here')
  args = parser.parse_args()
  result = suite(args.quick, cases=args.cases.split(',') if args.cases else None)
  result['environment'] = dict(common.environment(), torch=torch.__version__)
  common.print_result(result, args.out)


if __name__ == '__main__':
  main()
