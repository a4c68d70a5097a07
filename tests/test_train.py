"""End-to-end runs of the training loop: results, resume, sharding, metrics."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import ROOT, copy_of_tiny_run, tiny_config, train_until_first_checkpoint
from sslj import checkpoint, train
from sslj.methods import base


def _final_params(workdir):
  ckpt = checkpoint.Checkpointer(workdir, every=0, keep=10)
  step = ckpt.latest_step()
  restored = ocp.PyTreeCheckpointer().restore(
      os.path.join(ckpt.directory, str(step), 'default'))
  ckpt.close()
  return step, restored['params']


def _read(path):
  with open(path) as f:
    return json.load(f)


def test_run_writes_results_metrics_and_checkpoints(tmp_path, tiny_run):
  # The session's tiny run (`tiny_config()` trained by train_and_evaluate), copied.
  tmp_path = tmp_path / 'run'
  results = copy_of_tiny_run(tiny_run, tmp_path)
  written = _read(tmp_path / 'results.json')
  assert written == json.loads(json.dumps(results))
  assert set(written) == {'method', 'dataset', 'labels_per_class', 'seed', 'num_steps',
                          'wall_s', 'top1', 'top5', 'models', 'provenance'}
  assert written['provenance']['device_count'] == 1
  assert written['provenance']['host_cores'] == os.cpu_count()
  assert written['num_steps'] == 12 and written['method'] == 'supervised'
  assert 0 <= written['top1'] <= written['top5'] <= 100
  assert written['models']['model']['top1'] == written['top1']
  lines = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert [l['step'] for l in lines if 'train/loss' in l] == [4, 8, 12]
  assert [l['step'] for l in lines if 'eval/model/top1' in l] == [6, 12]
  assert all(np.isfinite(l['train/loss']) for l in lines if 'train/loss' in l)
  assert os.listdir(tmp_path / 'tensorboard')
  step, _ = _final_params(str(tmp_path))
  assert step == 12


def test_eval_at_adds_early_evaluations_and_bad_lists_fail_first(tmp_path, data_dir):
  from sslj.errors import UserError
  config = tiny_config(**{'data.data_dir': data_dir, 'eval_at': '1, 3,6,20'})
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  lines = [json.loads(l) for l in open(tmp_path / 'run' / 'metrics.jsonl')]
  assert [l['step'] for l in lines if 'eval/model/top1' in l] == [1, 3, 6, 12]
  for bad in ('0,10', 'ten', '5;10'):
    with pytest.raises(UserError, match='eval_at'):
      train.train_and_evaluate(tiny_config(**{'data.data_dir': data_dir, 'eval_at': bad}),
                               str(tmp_path / 'bad'))
  assert not (tmp_path / 'bad').exists()


def test_interrupted_run_resumes_to_the_same_end(tmp_path, data_dir, tiny_run, monkeypatch):
  config = tiny_config(**{'data.data_dir': data_dir})
  straight = tmp_path / 'straight'  # the session's run of this config, copied
  expected = copy_of_tiny_run(tiny_run, straight)

  resumed = tmp_path / 'resumed'
  train_until_first_checkpoint(config, resumed, monkeypatch)
  assert _final_params(str(resumed))[0] == 6
  got = train.train_and_evaluate(config, str(resumed))

  assert got['models'] == expected['models']
  jax.tree.map(np.testing.assert_array_equal, _final_params(str(resumed))[1],
               _final_params(str(straight))[1])
  # metrics.jsonl reads as one run: the lines past the checkpoint that the
  # interrupted invocation wrote were dropped, not repeated.
  shape = lambda d: [(r['step'], sorted(r)) for r in map(json.loads, open(d / 'metrics.jsonl'))]
  assert shape(resumed) == shape(straight)


_SHARDED_RUN = r'''
import json, os, sys
sys.path.insert(0, {root!r}); sys.path.insert(0, os.path.join({root!r}, 'tests'))
import jax
import numpy as np
from conftest import tiny_config
from sslj import train
from test_train import _final_params
assert jax.device_count() == {devices}, jax.devices()
config = tiny_config(**{{'data.data_dir': {data_dir!r}, 'num_steps': 6}})
train.train_and_evaluate(config, {workdir!r})
# Restored on the topology it was saved from, then kept as plain arrays.
leaves = jax.tree.leaves(_final_params({workdir!r})[1])
np.savez(os.path.join({workdir!r}, 'params.npz'), *[np.asarray(x) for x in leaves])
'''


@pytest.mark.parametrize('devices', [4])
def test_sharded_step_matches_one_device(tmp_path, data_dir, devices):
  """The same run on 4 fake CPU devices and on 1 ends in the same state.

  Reductions (the batch mean, BatchNorm's statistics) are summed in a
  different order across devices, so the parameters agree to float32
  round-off: rtol 1e-4, atol 1e-5 after 6 SGD steps.
  """
  ends = {}
  for n in (1, devices):
    workdir = str(tmp_path / f'devices{n}')
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={n}',
               JAX_PLATFORMS='cpu')
    code = _SHARDED_RUN.format(root=ROOT, devices=n, data_dir=data_dir, workdir=workdir)
    subprocess.run([sys.executable, '-c', code], check=True, env=env, timeout=600)
    params = np.load(os.path.join(workdir, 'params.npz'))
    ends[n] = ([params[k] for k in sorted(params.files, key=lambda k: int(k.split('_')[1]))],
               _read(os.path.join(workdir, 'results.json')))
  assert len(ends[1][0]) == len(ends[devices][0]) > 0
  for a, b in zip(ends[1][0], ends[devices][0]):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert ends[1][1]['models'] == ends[devices][1]['models']


def test_model_dropout_rate_reaches_the_model():
  from sslj.errors import UserError
  from sslj.methods import network
  assert network.build_model(tiny_config(**{'model.dropout_rate': 0.5}), 10).dropout_rate == 0.5
  assert network.build_model(tiny_config(), 10).dropout_rate == 0.0
  with pytest.raises(UserError, match='resnet18'):
    network.build_model(tiny_config(**{'model.name': 'resnet18', 'model.dropout_rate': 0.5}), 10)


def test_model_first_kernel_size_reaches_the_first_convolution():
  import jax
  import jax.numpy as jnp
  from sslj.errors import UserError
  from sslj.methods import network
  config = tiny_config(**{'model.first_kernel_size': 7})
  assert network.model_options(config) == {'first_kernel_size': 7}
  model = network.build_model(config, 10)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))['params']
  assert params['Conv_0']['kernel'].shape == (7, 7, 1, 32)
  assert params['Conv_1']['kernel'].shape[:2] == (3, 3)
  assert network.model_options(tiny_config()) == {}
  with pytest.raises(UserError, match='resnet18'):
    network.build_model(tiny_config(**{'model.name': 'resnet18', 'model.first_kernel_size': 7}),
                        10)


def test_model_fields_reach_the_constructor_and_unknown_ones_are_refused():
  from sslj import models, preflight
  from sslj.errors import UserError
  from sslj.methods import network
  # Every field of the config string's model is declared, None (the model's own).
  config = tiny_config('supervised', 'model=resnet18')
  assert {k: config.model[k] for k in models.fields('resnet18')} == dict.fromkeys(
      ['width', 'stem', 'zero_init_residual', 'bn_momentum'])
  assert network.model_options(config) == {}
  config = tiny_config('supervised', 'model=resnet18',
                       **{'model.stem': 'small', 'model.bn_momentum': 0.99})
  assert network.model_options(config) == {'stem': 'small', 'bn_momentum': 0.99}
  model = network.build_model(config, 10)
  assert (model.stem, model.bn_momentum) == ('small', 0.99)
  # A field the model lacks: one line, before anything is built, naming the allowed ones.
  bad = tiny_config('supervised', 'model=resnet18', **{'model.dropout_rate': 0.5})
  with pytest.raises(UserError) as err:
    preflight.check_config(bad)
  assert str(err.value) == ('--config.model.dropout_rate=0.5 is not allowed: model resnet18 has '
                            'no field dropout_rate; its fields are bn_momentum, stem, width, '
                            'zero_init_residual.')
  with pytest.raises(UserError, match='out of range'):
    preflight.check_config(tiny_config(**{'model.bn_momentum': 1.0}))


def test_pseudo_labels_are_scored_against_the_hidden_classes_and_leave_the_metrics():
  """The loop's score of a step's pseudo-labels, against numpy; -1 rows do not count."""
  rng = np.random.default_rng(0)
  hidden = rng.integers(-1, 3, 40).astype(np.int32)
  indices = rng.integers(0, 40, 12).astype(np.int32)
  targets = rng.integers(0, 3, 10).astype(np.int32)  # the first 10 of 12 rows
  weights = rng.random(10).astype(np.float32)
  metrics = {'loss': 1.0, base.PSEUDO_LABELS: targets, base.PSEUDO_LABEL_WEIGHTS: weights}
  sums = np.asarray(jax.jit(lambda m: (train.score_pseudo_labels(m, {'unlabeled_indices': indices},
                                                                  hidden), m))(metrics)[0])
  truth = hidden[indices[:10]]
  known = truth >= 0
  right = (targets == truth) & known
  np.testing.assert_allclose(sums, [np.sum(weights * right), np.sum(weights * known),
                                    right.sum(), known.sum()], rtol=1e-6)
  scalars = train.pseudo_label_scalars(sums)
  np.testing.assert_allclose(scalars['pseudo_label_accuracy'],
                             100 * np.sum(weights * right) / np.sum(weights * known), rtol=1e-5)
  np.testing.assert_allclose(scalars['pseudo_label_accuracy_all'],
                             100 * right.sum() / known.sum(), rtol=1e-6)
  # The per-image entries are taken out, so only scalars are logged.
  train.score_pseudo_labels(metrics, {'unlabeled_indices': indices}, hidden)
  assert set(metrics) == {'loss'}
  # Nothing known, or nothing given: zeros, and no scalars.
  assert not np.any(np.asarray(train.score_pseudo_labels({}, {}, hidden)))
  assert train.pseudo_label_scalars(np.zeros(4)) == {}
