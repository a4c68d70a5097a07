"""The method contract, checked for every registered method with one test body.

Each method trains one tiny run on digits (shared by every test of the
method: a session-scoped fixture), and the run is then used the way a user
uses it: its results, its restored state's predictions against its reported
network, its features and probes, export and `sslj.load` (or the refusal,
for a network that does not classify the dataset's classes), and its
pictures. A new method gets all of this by registering.
"""

import json
import os

import jax
import numpy as np
import pytest

from conftest import ROOT, config_of, tiny_config

import sslj
from sslj import configlib, methods, train
from sslj.errors import UserError
from sslj.methods import base
from sslj.use import evaluate, export, reported, restore

NAMES = methods.names()
GRADIENT = [n for n in NAMES if not methods.get(n).is_pipeline]

# A tiny run: two steps at the config's batch sizes (k-means iterations for a
# pipeline), the final checkpoint and evaluation.
TINY = {'num_steps': 2, 'eval_batch_size': 64, 'log_every': 1,
        'eval_every': 0, 'checkpoint_every': 0, 'data.labels_per_class': 5}


def contract_config(name, data_dir):
  """configs/<name>.py at its own batch sizes, for TINY's steps."""
  config = config_of(name)
  configlib.set_fields(config, {'data.data_dir': data_dir, **TINY})
  config.lock()
  return config


@pytest.fixture(scope='session')
def tiny_runs(tmp_path_factory, data_dir):
  """{method: workdir of its tiny run}, trained the first time a method asks."""
  made = {}

  def run(name):
    if name not in made:
      workdir = str(tmp_path_factory.mktemp(f'contract_{name}'))
      train.train_and_evaluate(contract_config(name, data_dir), workdir)
      made[name] = workdir
    return made[name]

  return run


def test_registry_names_every_config_and_nothing_else():
  configs = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, 'configs'))
                   if f.endswith('.py') and not f.startswith('_'))
  assert sorted(NAMES) == configs
  for name in NAMES:
    definition = methods.get(name)
    assert isinstance(definition, base.Definition) and definition.name == name
    assert definition.summary and definition.summary[-1] != '.'
    assert tiny_config(name).method == name
  with pytest.raises(UserError, match='known methods: '):
    methods.get('no_such_method')


@pytest.mark.parametrize('name', NAMES)
def test_a_tiny_run_writes_its_results(name, tiny_runs):
  workdir = tiny_runs(name)
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  assert results['method'] == name and results['dataset'] == 'digits'
  reported_scores = results['models']
  assert results['top1'] == max(0.0, results['top1'])
  assert any(s['top1'] == results['top1'] and s['top5'] == results['top5']
             for s in reported_scores.values())
  for scores in reported_scores.values():
    assert 0 <= scores['top1'] <= scores['top5'] <= 100


@pytest.mark.parametrize('name', GRADIENT)
def test_the_reported_network_is_what_predict_reports(name, tiny_runs):
  run = restore.restore(tiny_runs(name))
  net = run.network
  images = run.data.test_images[:16]
  features = np.asarray(jax.jit(net.features)(net.variables, images))
  assert features.ndim == 2 and len(features) == 16 and np.isfinite(features).all()
  predicted = jax.jit(run.method.predict)(run.state, images)
  if net.classifies:
    logits = np.asarray(jax.jit(net.logits)(net.variables, images))
    assert logits.shape == (16, run.data.num_classes)
    np.testing.assert_allclose(logits, predicted[run.method.reported_model], rtol=1e-5,
                               atol=1e-5)
  else:
    # Fitted on the features after training (`finalize`), not a head's output.
    assert run.method.reported_model not in predicted
    assert run.method.finalize is not None


@pytest.mark.parametrize('name', GRADIENT)
def test_probe_export_and_load(name, tiny_runs, tmp_path):
  workdir = tiny_runs(name)
  record = evaluate.evaluate(workdir, with_probes=True)
  assert record['reported_model'] in record['models']
  for probe in ('linear', 'knn'):
    assert 0 <= record['probes'][probe]['top1'] <= 100
  run = restore.restore(workdir)
  out = str(tmp_path / 'export')
  if not run.network.classifies:
    with pytest.raises(UserError, match='no class logits to export'):
      export.export(workdir, out=out)
    return
  export.export(workdir, out=out)
  model = sslj.load(out)
  images = run.data.test_images[:8]
  np.testing.assert_array_equal(
      np.asarray(model(images)),
      np.asarray(jax.jit(run.network.logits)(run.network.variables, images)))


@pytest.mark.parametrize('name', NAMES)
def test_pictures_render(name, tiny_runs, tmp_path):
  from sslj.viz import context, drawing, page  # pylint: disable=g-import-not-at-top
  definition = methods.get(name)
  _, entries = drawing.draw(tiny_runs(name), out=str(tmp_path / 'pictures'),
                            options=context.Options(tsne_points=20))
  failed = [(e.name, e.reason) for e in entries if isinstance(e, page.Skipped)
            and e.reason.startswith(drawing.FAILED)]
  assert not failed
  drawn = {e.name for e in entries if isinstance(e, page.Picture)}
  assert 'tsne' in drawn
  if definition.pictures is not None:
    assert any(n.startswith(f'{name}_') for n in drawn), drawn
  if not definition.is_pipeline:
    assert {'curves', 'filters'} <= drawn


@pytest.mark.parametrize('name', [n for n in NAMES if methods.get(n).is_pipeline])
def test_a_pipeline_run_is_refused_where_a_network_is_needed(name, tiny_runs):
  workdir = tiny_runs(name)
  with pytest.raises(UserError, match='not trained by gradient steps'):
    restore.restore(workdir)
  with pytest.raises(UserError, match='not trained by gradient steps'):
    reported.check_supported(name)
