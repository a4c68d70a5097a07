"""The supervised baseline's optional parameter average (`supervised.ema_decay`)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from sslj import methods, run_files, train
from sslj.errors import UserError
from sslj.methods import base, supervised
from sslj.use import restore


def _build(config):
  data = train.load_data(config)
  return data, supervised.METHOD.make(config, data)


def test_the_average_follows_the_formula_over_the_trained_variables(data_dir):
  """Each step folds the new variables in with d_t = min(1 - 1/(t+1), decay)."""
  decay = 0.9
  config = tiny_config(**{'data.data_dir': data_dir, 'supervised.ema_decay': decay})
  data, method = _build(config)
  state = method.init(jax.random.key(0))
  assert isinstance(state, supervised.AveragedTrainState)
  expected = {'params': state.params, 'batch_stats': state.batch_stats}
  rng = np.random.default_rng(0)
  step = jax.jit(method.train_step)
  for t in range(1, 6):
    rows = rng.choice(len(data.labeled_images), config.batch_size)
    batch = {'labeled_images': jnp.asarray(data.labeled_images[rows]),
             'labels': jnp.asarray(data.labeled_labels[rows])}
    state, metrics = step(state, batch, jax.random.key(t))
    d = min(1 - 1 / (t + 1), decay)
    trained = {'params': state.params, 'batch_stats': state.batch_stats}
    expected = jax.tree.map(lambda a, p, d=d: d * a + (1 - d) * p, expected, trained)
    assert np.isfinite(float(metrics['loss']))
  assert int(state.ema.count) == 5
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               state.ema.average, expected)
  # The average is not the trained network: it moves behind it.
  assert not np.allclose(jax.tree.leaves(state.ema.average['params'])[0],
                         jax.tree.leaves(state.params)[0])
  images = jnp.asarray(data.test_images[:8])
  logits = method.predict(state, images)
  assert set(logits) == {'model', 'ema'} and method.reported_model == 'ema'
  reported = methods.get('supervised').reported(state, config, data)
  jax.tree.map(np.testing.assert_array_equal, reported.variables, dict(state.ema.average))


def test_without_an_average_the_state_and_the_report_are_as_before(data_dir):
  """Decay 0 (the default) keeps the plain TrainState, so old checkpoints restore."""
  config = tiny_config(**{'data.data_dir': data_dir})
  assert config.supervised.ema_decay == 0.0
  data, method = _build(config)
  state = method.init(jax.random.key(0))
  assert type(state) is base.TrainState and method.reported_model == 'model'
  assert set(method.predict(state, jnp.asarray(data.test_images[:4]))) == {'model'}


def test_a_run_with_an_average_reports_it_and_restores_it(data_dir, tmp_path):
  config = tiny_config(**{'data.data_dir': data_dir, 'supervised.ema_decay': 0.99})
  workdir = str(tmp_path / 'ema')
  train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  assert set(results['models']) == {'model', 'ema'}
  assert results['top1'] == results['models']['ema']['top1']
  run = restore.restore(workdir)
  assert isinstance(run.state, supervised.AveragedTrainState)
  images = run.data.test_images[:8]
  np.testing.assert_allclose(np.asarray(run.network.logits(run.network.variables, images)),
                             np.asarray(run.method.predict(run.state, images)['ema']),
                             rtol=1e-5, atol=1e-5)


def test_a_supervised_run_recorded_before_the_option_resumes_without_it(tmp_path):
  """Its config.json has no `supervised` section: it reads as ema_decay 0."""
  workdir = str(tmp_path / 'old')
  recorded = json.loads(tiny_config().to_json_best_effort())
  del recorded['supervised']
  os.makedirs(workdir)
  run_files.atomic_write_json(os.path.join(workdir, 'config.json'), recorded)
  run_files.claim_workdir(workdir, tiny_config())
  assert run_files.as_current(recorded)['supervised'] == {'ema_decay': 0.0}
  with pytest.raises(UserError, match="supervised.ema_decay: 0.0 there, 0.999 now"):
    run_files.claim_workdir(workdir, tiny_config(**{'supervised.ema_decay': 0.999}))
