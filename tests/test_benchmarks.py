"""The benchmark suite's output, the PyTorch twin of Mean Teacher, and one compile per step.

  python -m pytest tests/test_benchmarks.py -p no:cacheprovider

The PyTorch tests are skipped when torch is not installed
(`pip install -e '.[bench]'`).
"""

import dataclasses
import functools
import json
import os
import subprocess
import sys
import tarfile

# Before torch loads OpenMP: its spinning threads crawl on a shared 2-core
# machine (see benchmarks/torch_mean_teacher.py).
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from conftest import ROOT, tiny_config  # noqa: E402
from sslj import train  # noqa: E402

try:
  import torch
except ImportError:
  torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch not installed (.[bench])")


def test_run_quick_writes_results_with_environment_and_command(tmp_path):
  out = tmp_path / 'bench'
  proc = subprocess.run(
      [sys.executable, '-m', 'benchmarks.run', '--only', 'gan_generator', '--quick',
       '--out', str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((out / 'results.json').read_text())
  assert results['command'] == f'python -m benchmarks.run --only gan_generator --quick --out {out}'
  assert 'load average' in results['uptime_before'] and 'load average' in results['uptime_after']
  assert list(results['benchmarks']) == ['gan_generator']
  result = results['benchmarks']['gan_generator']
  env = result['environment']
  assert env['device_kind'] == jax.devices()[0].device_kind
  assert env['devices'] == 1 and env['jax'] == jax.__version__
  assert result['command'].startswith('python -m benchmarks.gan_generator --batch=16')
  (table,) = result['tables']
  keys = [key for key, _ in table['columns']]
  assert table['rows'] and all(set(keys) <= set(row) for row in table['rows'])
  assert all(row['transpose'] > 0 and row['resize'] > 0 for row in table['rows'])
  markdown = (out / 'results.md').read_text()
  assert '## gan_generator' in markdown and '| 8x8x1 |' in markdown


def test_gpu_check_quick_writes_every_part_and_the_summary(tmp_path):
  """benchmarks/gpu_check.sh --quick end to end on the CPU: each part's figures with the
  device kind, the summary and the bundle; without PyTorch the race alone is skipped."""
  out = tmp_path / 'gpucheck'
  proc = subprocess.run(['bash', os.path.join(ROOT, 'benchmarks', 'gpu_check.sh'), str(out),
                         '--quick'], cwd=ROOT, capture_output=True, text=True, timeout=900,
                        env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHON=sys.executable))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  summary = json.loads((out / 'summary.json').read_text())
  kind = jax.devices()[0].device_kind
  assert summary['quick'] and summary['device_kinds'] == [kind]
  parts = summary['parts']
  assert list(parts) == ['race', 'mfu', 'kmeans', 'fixmatch']
  for name, part in parts.items():
    assert part['environment']['device_kind'] == kind
    assert json.loads((out / f'{name}.json').read_text())['status'] == part['status']
    assert all(row['device'] == kind for table in part['tables'] for row in table['rows'])
  race = parts['race']
  if torch is None:
    assert race['status'] == 'skipped' and 'PyTorch is not installed' in race['skipped']
  else:
    assert race['status'] == 'ok' and race['figures']['ratio_sslj_f32_vs_best_pytorch'] > 0
    assert [r['variant'] for r in race['tables'][0]['rows']] == ['sslj float32', 'PyTorch eager']
  mfu = parts['mfu']
  assert mfu['status'] == 'ok'
  assert mfu['figures']['float32']['gflop_per_step'] > 0 and mfu['figures']['float32']['tflops'] > 0
  assert mfu['figures']['float32']['mfu_pct'] is None  # a CPU has no peak
  kmeans = parts['kmeans']
  assert kmeans['status'] == 'ok' and kmeans['figures']['2000x16x32 sslj']['tflops'] > 0
  fixmatch = parts['fixmatch']
  assert fixmatch['status'] == 'ok'
  figures = fixmatch['figures']
  assert figures['steps_done'] == figures['num_steps'] == 8 and figures['probe_steps_per_s'] > 0
  assert 0 <= figures['top1'] <= 100
  results = json.loads((out / 'fixmatch' / 'run' / 'results.json').read_text())
  assert results['method'] == 'fixmatch' and results['num_steps'] == 8
  markdown = (out / 'summary.md').read_text()
  assert all(f'| {name} | {kind} |' in markdown for name in parts)
  with tarfile.open(out / 'bundle.tar.gz') as tar:
    names = tar.getnames()
  assert {'summary.json', 'summary.md', 'fixmatch.log', 'fixmatch/run/metrics.jsonl'} <= set(names)
  assert not any(n.startswith(('jax_cache', 'fixmatch/tfds')) for n in names)


def test_run_rejects_unknown_benchmark():
  proc = subprocess.run([sys.executable, '-m', 'benchmarks.run', '--only', 'nope'], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and 'unknown benchmark(s) nope' in proc.stderr


@pytest.mark.parametrize('method,overrides', [
    ('mean_teacher', {'mean_teacher.labeled_batch_size': 4}),
    ('fixmatch', {'batch_size': 4, 'fixmatch.mu': 2}),
])
def test_train_step_is_traced_and_compiled_once(method, overrides, tmp_path, data_dir,
                                                monkeypatch):
  """The loop's steps of one shape reuse one trace and one executable."""
  traces, compiles = [], []
  real = train.sampled_step

  @functools.wraps(real)
  def counting(*args, **kwargs):
    traces.append(1)  # runs only while jax traces the function
    return real(*args, **kwargs)

  def on_event(event, duration, **kwargs):
    del duration
    if event == '/jax/core/compile/backend_compile_duration' and 'sampled_step' in str(
        kwargs.get('fun_name')):
      compiles.append(1)

  monkeypatch.setattr(train, 'sampled_step', counting)
  jax.monitoring.register_event_duration_secs_listener(on_event)
  try:
    config = tiny_config(method, **{'data.data_dir': data_dir, 'num_steps': 5, 'eval_every': 0,
                                    'checkpoint_every': 0, 'log_every': 2, **overrides})
    train.train_and_evaluate(config, str(tmp_path))
  finally:
    jax.monitoring.unregister_event_duration_listener(on_event)
  assert len(traces) == 1
  assert len(compiles) == 1


@needs_torch
def test_torch_mean_teacher_step_matches_sslj():
  """Copied weights, one fixed batch, augmentation off: same losses, same update."""
  from benchmarks import common, torch_models
  from benchmarks import torch_mean_teacher as tmt
  from sslj.methods import mean_teacher
  config = common.load_config('configs/mean_teacher.py', {
      'augment.pad_crop': 0, 'batch_size': 16, 'mean_teacher.labeled_batch_size': 4})
  data = common.synthetic_data((8, 8, 1))
  method = mean_teacher.METHOD.make(config, data)
  state = jax.jit(method.init)(jax.random.key(0))
  n_l, n_u = method.labeled_batch, method.unlabeled_batch
  batch = {'labeled_images': data.labeled_images[:n_l], 'labels': data.labeled_labels[:n_l],
           'unlabeled_images': data.unlabeled_images[:n_u]}
  new, metrics = jax.jit(method.train_step)(state, batch, jax.random.key(1))

  twin = tmt.TorchMeanTeacher(tmt.Settings.from_config(config, data), data.labeled_images,
                              data.labeled_labels, data.unlabeled_images)
  assert torch_models.num_params(twin.student) == sum(
      x.size for x in jax.tree.leaves(state.params))
  torch_models.copy_small_cnn(twin.student, jax.device_get(state.params),
                              jax.device_get(state.batch_stats))
  twin.teacher_from_student()
  images = torch.from_numpy(np.concatenate([batch['labeled_images'],
                                            batch['unlabeled_images']]))
  out = twin.step(images, torch.from_numpy(batch['labels']).long(), augment=False)
  for key in ('loss', 'class_loss', 'consistency_loss', 'logit_distance_loss'):
    np.testing.assert_allclose(float(out[key]), float(metrics[key]), rtol=1e-5, err_msg=key)

  for module, params, stats in ((twin.student, new.params, new.batch_stats),
                                (twin.teacher, new.teacher.average, new.teacher_batch_stats)):
    expected = torch_models.SmallCNN(1, 8, 10, 2)
    torch_models.copy_small_cnn(expected, jax.device_get(params), jax.device_get(stats))
    for (name, got), want in zip(module.named_parameters(), expected.parameters()):
      np.testing.assert_allclose(got.detach().numpy(), want.detach().numpy(), rtol=1e-4,
                                 atol=1e-6, err_msg=name)


@needs_torch
@pytest.mark.parametrize('arg,schedule', [
    ('', 'constant'), ('', 'cosine'),
    ('dataset=fashion_mnist,labels_per_class=10', 'truncated_cosine')])
def test_torch_twin_follows_the_config_schedule_and_teacher_decay(arg, schedule):
  """The twin's learning rate is sslj's at every step; its EMA cap switches with sslj's."""
  from benchmarks import common
  from benchmarks import torch_mean_teacher as tmt
  from sslj.ops import ema, optim
  config = common.load_config(f'configs/mean_teacher.py:{arg}'.rstrip(':'),
                              {'optimizer.schedule': schedule, 'num_steps': 40})
  data = common.synthetic_data((8, 8, 1))
  s = tmt.Settings.from_config(config, data)
  expected = optim.learning_rate(config.optimizer, s.num_steps)
  for step in (0, 1, 13, 39, 40):
    np.testing.assert_allclose(tmt.learning_rate(s, step), float(expected(step)),
                               rtol=1e-6, atol=1e-6 * s.lr)  # optax: float32
  # The teacher averages a student that jumped from 0 to 1: after n updates
  # it holds 1 - prod(d_t), which tells the decays d_t apart. 150 ramp-up
  # updates: the warm-up 1 - 1/(t + 1) passes 0.99 at t = 99, so the
  # ramp-up's 0.99 cap binds for 50 of them.
  s = dataclasses.replace(s, ema_rampup_steps=150)
  twin = tmt.TorchMeanTeacher(s, data.labeled_images, data.labeled_labels,
                              data.unlabeled_images)
  with torch.no_grad():
    for p in twin.teacher.parameters():
      p.zero_()
    for p in twin.student.parameters():
      p.fill_(1.0)
  average = ema.parameter_ema(s.ema_decay, s.ema_decay_rampup, s.ema_rampup_steps)
  state = average.init({'w': np.zeros((), np.float32)})
  for _ in range(160):
    twin._apply_updates()  # no gradients: SGD leaves the student, the EMA runs
    _, state = average.update({'w': np.ones((), np.float32)}, state)
  np.testing.assert_allclose(float(next(twin.teacher.parameters()).flatten()[0]),
                             float(state.average['w']), rtol=1e-5)
  assert s.schedule == schedule and (s.ema_decay_rampup is None) == (arg == '')


@needs_torch
def test_torch_shift_flip_matches_sslj_augment():
  """The same flips and pad-and-crop shifts give sslj's pixels exactly."""
  from benchmarks import torch_augment
  from sslj.data import augment
  images = np.random.default_rng(0).integers(0, 256, (32, 28, 28, 1), dtype=np.uint8)
  spec = augment.AugmentSpec(flip=True, pad_crop=2)  # fashion_mnist's
  key = jax.random.key(3)
  # Jitted: op by op, every small primitive would be compiled on its own.
  want = np.asarray(jax.jit(augment.augment_batch, static_argnums=2)(images, key, spec))
  drawn = jax.jit(augment.sample_batch_params, static_argnums=(1, 2, 3))(
      key, spec, (28, 28), len(images))
  flip = torch.from_numpy(np.array(drawn.flip))
  shift = torch.from_numpy(np.array(drawn.shift).astype(np.int64))
  assert flip.any() and not flip.all() and (shift != 0).any()
  got = torch_augment.shift_flip(torch.from_numpy(images).float() / 255, flip, shift)
  np.testing.assert_array_equal(got.numpy(), want)


@needs_torch
@pytest.mark.parametrize('name', ['resnet18', 'resnet50'])
def test_torch_resnet_twin_has_sslj_parameter_count(name):
  from benchmarks import torch_models
  from sslj import models
  model = models.build(name, num_classes=10, num_heads=2)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 96, 96, 3),
                                                                         np.float32)))
  want = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes['params']))
  assert torch_models.num_params(torch_models.build(name, (96, 96, 3), 10, 2)) == want


def test_profile_step_attributes_op_time_to_the_step_ops(tmp_path):
  # A fresh process: the module must set XLA's trace flag before JAX starts.
  out = tmp_path / 'profile.json'
  proc = subprocess.run(
      [sys.executable, '-m', 'benchmarks.profile_step', '--config=configs/supervised.py',
       '--shape=8,8,1', '--steps=2', '--top=5', f'--out={out}'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  kinds, top = json.loads(out.read_text())['tables']
  assert abs(sum(r['share_pct'] for r in kinds['rows']) - 100) < 1e-6
  assert {r['kind'] for r in kinds['rows']} >= {'convolution/dot (YNNPACK)', 'elementwise'}
  assert len(top['rows']) == 5 and all(r['ms_per_step'] > 0 for r in top['rows'])
