"""Using a trained run: eval, predict, export/load, the reported-network hooks, TensorBoard.

One tiny supervised run is trained once for the module; every check against
it is exact (the same numbers, not close ones).
"""

import csv
import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from conftest import ROOT, replace_method, tiny_config
from sslj import train
from sslj.errors import UserError
from sslj.methods import mean_teacher
from sslj.use import evaluate, export, predict, reported, restore

NUM_STEPS = 24  # Enough for a model that does not predict one class for all.


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp('supervised_run'))
  config = tiny_config(**{'data.data_dir': data_dir, 'num_steps': NUM_STEPS})
  train.train_and_evaluate(config, workdir)
  return workdir


@pytest.fixture(scope='module')
def restored(run_dir):
  return restore.restore(run_dir)


def _read(path):
  with open(path) as f:
    return json.load(f)


def _reported_logits(run, images):
  predict_fn = jax.jit(run.method.predict)
  return np.asarray(predict_fn(run.state, images)[run.method.reported_model])


def test_eval_reproduces_the_accuracies_of_training(run_dir, restored):
  results = _read(os.path.join(run_dir, 'results.json'))
  record = evaluate.evaluate(run_dir)
  assert record.pop('file') == os.path.join(run_dir, f'eval_test_step{NUM_STEPS}.json')
  assert record == _read(os.path.join(run_dir, f'eval_test_step{NUM_STEPS}.json'))
  assert record['models'] == results['models']  # exactly
  assert (record['method'], record['step'], record['split'], record['dataset']) == (
      'supervised', NUM_STEPS, 'test', 'digits')
  # An earlier checkpoint gives exactly what the loop logged at that step.
  logged = {l['step']: l for l in map(json.loads, open(os.path.join(run_dir, 'metrics.jsonl')))}
  earlier = evaluate.evaluate(run_dir, step=18)
  assert earlier['step'] == 18
  assert earlier['models']['model'] == {'top1': logged[18]['eval/model/top1'],
                                        'top5': logged[18]['eval/model/top5']}
  # Another split: the whole train split, against a direct count.
  on_train = evaluate.evaluate(run_dir, split='train')['models']['model']
  logits = _reported_logits(restored, restored.arrays.train_images)
  labels = restored.arrays.train_labels
  top5 = np.argsort(-logits, axis=1, kind='stable')[:, :5]
  assert on_train == {
      'top1': 100 * float(np.sum(logits.argmax(1) == labels)) / len(labels),
      'top5': 100 * float(np.sum(np.any(top5 == labels[:, None], axis=1))) / len(labels)}
  with pytest.raises(UserError, match='no checkpoint of step 5'):
    evaluate.evaluate(run_dir, step=5)
  with pytest.raises(UserError, match='unknown split'):
    evaluate.evaluate(run_dir, split='validation')


def _write_png(path, image):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(image[..., 0], 'L').save(path)


def _read_csv(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def test_predict_on_png_files_matches_predict_on_arrays(run_dir, restored, tmp_path):
  images = restored.data.test_images[:40]
  folder = tmp_path / 'images'
  names = []
  for i, image in enumerate(images):
    name = os.path.join(f'group{i % 3}', 'nested' if i % 2 else '', f'digit_{i:03d}.png')
    _write_png(str(folder / name), image)
    names.append(os.path.normpath(name))
  (folder / 'broken.png').write_bytes(b'not an image at all')
  (folder / '.hidden.png').write_bytes(b'skipped without being read')

  path, done, skipped = predict.predict(run_dir, str(folder))
  assert (path, done, skipped) == (os.path.join(run_dir, 'predictions.csv'), 40, 1)
  rows = {r['file']: r for r in _read_csv(path)}
  assert sorted(rows) == sorted(names)
  logits = _reported_logits(restored, images)
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  want = logits.argmax(1)
  got = np.array([int(rows[n]['class_index']) for n in names])
  np.testing.assert_array_equal(got, want)
  assert len(set(want)) > 1  # a model predicting one class would prove little
  assert [rows[n]['class_name'] for n in names] == [restored.data.class_names[i] for i in want]
  np.testing.assert_allclose([float(rows[n]['probability']) for n in names],
                             probs[np.arange(40), want], atol=1e-6)

  # A text list of paths (relative to the list) gives the same rows.
  listing = folder / 'list.txt'
  listing.write_text('# digits\n' + '\n'.join(names[:5]) + '\n\n')
  out = tmp_path / 'listed.csv'
  assert predict.predict(run_dir, str(listing), out=str(out))[1:] == (5, 0)
  assert [r['class_index'] for r in _read_csv(out)] == [rows[n]['class_index'] for n in names[:5]]
  with pytest.raises(UserError, match='does not exist'):
    predict.predict(run_dir, str(tmp_path / 'nowhere'))


def test_export_then_load_gives_the_restored_logits(run_dir, restored, tmp_path):
  import sslj
  out = export.export(run_dir, out=str(tmp_path / 'exported'))
  assert sorted(os.listdir(out)) == ['sslj_export.json', 'variables.msgpack']
  meta = _read(os.path.join(out, 'sslj_export.json'))
  assert meta['format_version'] == 1 and meta['step'] == NUM_STEPS
  assert meta['model'] == {'name': 'small_cnn', 'dtype': 'float32', 'num_heads': 1}
  assert meta['image_shape'] == [8, 8, 1] and meta['num_classes'] == 10
  np.testing.assert_array_equal(np.float32(meta['mean']), restored.data.mean)
  np.testing.assert_array_equal(np.float32(meta['std']), restored.data.std)

  model = sslj.load(out)
  images = restored.data.test_images[:64]
  np.testing.assert_array_equal(np.asarray(model(images)), _reported_logits(restored, images))
  assert model.class_names == restored.data.class_names
  assert model.features(images).shape == (64, 128)
  with pytest.raises(UserError, match='uint8'):
    model(images.astype(np.float32))
  meta['format_version'] = 2
  with open(os.path.join(out, 'sslj_export.json'), 'w') as f:
    json.dump(meta, f)
  with pytest.raises(UserError, match='format_version 2'):
    sslj.load(out)
  # `import sslj` stays light: JAX comes only with the first load.
  code = 'import sys, sslj; print(sorted(m for m in ("jax", "tensorflow_datasets") if m in sys.modules))'
  light = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT,
                         check=True)
  assert light.stdout.strip() == '[]'


def test_reported_network_hooks_match_each_methods_predict(restored, data_dir):
  images = restored.data.test_images[:32]
  net = restored.network
  np.testing.assert_array_equal(np.asarray(jax.jit(net.logits)(net.variables, images)),
                                _reported_logits(restored, images))
  # The features are what the head sees: logits = features @ kernel + bias.
  feats = np.asarray(jax.jit(net.features)(net.variables, images))
  head = net.variables['params']['head']
  np.testing.assert_allclose(feats @ np.asarray(head['kernel']) + np.asarray(head['bias']),
                             _reported_logits(restored, images), rtol=1e-5, atol=1e-5)

  # Mean Teacher reports the teacher (head 0 of the dual output). A teacher
  # made to differ from the student shows the hook reads the teacher.
  config = tiny_config('mean_teacher', **{'data.data_dir': data_dir,
                                          'mean_teacher.labeled_batch_size': 4})
  data = restore.load_data(config)[1]
  method = mean_teacher.METHOD.make(config, data)
  state = jax.jit(method.init)(jax.random.key(0))
  teacher = jax.tree.map(lambda p: p * 1.5 + 0.01, state.teacher.average)
  state = state.replace(teacher=state.teacher._replace(average=teacher))
  net = reported.reported_network(config, data, state)
  assert net.model_config['num_heads'] == 2
  outputs = jax.jit(method.predict)(state, images)
  logits = np.asarray(jax.jit(net.logits)(net.variables, images))
  np.testing.assert_array_equal(logits, np.asarray(outputs['teacher']))
  assert not np.allclose(logits, np.asarray(outputs['student']))


def test_tensorboard_reads_the_event_files(run_dir):
  accumulator = pytest.importorskip('tensorboard.backend.event_processing.event_accumulator')
  events = accumulator.EventAccumulator(os.path.join(run_dir, 'tensorboard'))
  events.Reload()
  lines = [json.loads(l) for l in open(os.path.join(run_dir, 'metrics.jsonl'))]
  for tag in ('train/loss', 'eval/model/top1'):
    logged = [(l['step'], l[tag]) for l in lines if tag in l]
    read = [(e.step, e.value) for e in events.Scalars(tag)]
    assert [s for s, _ in read] == [s for s, _ in logged]
    # TensorBoard stores float32.
    np.testing.assert_array_equal([v for _, v in read], np.float32([v for _, v in logged]))


def test_another_dataset_is_read_at_the_runs_size_and_checked(restored, monkeypatch):
  own = restored.arrays
  asked = {}

  def fake_load_arrays(name, *, data_dir, image_size=None, **unused):
    asked.update(name=name, image_size=image_size)
    if name == 'grey_copy':  # the run's own images under another name
      return dataclasses.replace(own, name=name)
    if name == 'colour':
      return dataclasses.replace(own, name=name, train_images=np.repeat(own.train_images, 3, -1))
    return dataclasses.replace(own, name=name, class_names=own.class_names[:7])

  monkeypatch.setattr(restore.sources, 'load_arrays', fake_load_arrays)
  other = restore.eval_set(restored, 'grey_copy', 'test')
  assert asked == {'name': 'grey_copy', 'image_size': (8, 8)}
  mine = restore.eval_set(restored, None, 'test')
  np.testing.assert_array_equal(other.images, mine.images)
  # The probes' labelled images: the run's labels_per_class and seed, drawn anew.
  np.testing.assert_array_equal(other.labeled_images, restored.data.labeled_images)
  with pytest.raises(UserError, match='3-channel'):
    restore.eval_set(restored, 'colour', 'test')
  with pytest.raises(UserError, match='7 classes'):
    restore.eval_set(restored, 'seven_classes', 'test')


def test_models_fitted_by_finalize_are_scored_on_the_evaluated_split(run_dir, monkeypatch):
  from sslj.methods import supervised
  seen = {}

  def finalize(state, data):
    seen.update(step=int(state.step), test=len(data.test_images), labeled=len(data.labeled_images))
    return {'fitted': {'top1': 1.0, 'top5': 2.0}}

  build = supervised.build
  replace_method(monkeypatch, 'supervised',
                 build=lambda *a: dataclasses.replace(build(*a), finalize=finalize))
  record = evaluate.evaluate(run_dir, step=18, split='train')
  assert record['models']['fitted'] == {'top1': 1.0, 'top5': 2.0} and 'model' in record['models']
  assert seen == {'step': 18, 'test': 1347, 'labeled': 1347}  # the train split in the test's place
