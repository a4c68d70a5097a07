"""`launch.py --mode=eval|probe|predict|export` end to end, on a Mean Teacher run.

One test runs every mode once in a subprocess (bad inputs are in
test_use_errors.py).
"""

import csv
import json
import os
import subprocess
import sys

import jax
import numpy as np
from PIL import Image

from conftest import ROOT, tiny_config
from sslj import train


def _start(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.Popen([sys.executable, os.path.join(ROOT, 'launch.py'), *args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          cwd=ROOT)


def _finish(proc):
  proc.stdout_text, proc.stderr_text = proc.communicate(timeout=300)
  return proc


def _launch(*args):
  return _finish(_start(*args))


def _ok(proc):
  assert proc.returncode == 0, proc.stderr_text[-3000:]
  return proc.stdout_text.strip().splitlines()[-1]


def test_every_mode_on_the_command_line(tmp_path, data_dir):
  workdir = tmp_path / 'mt'
  config = tiny_config('mean_teacher', **{'data.data_dir': data_dir,
                                          'mean_teacher.labeled_batch_size': 4})
  results = train.train_and_evaluate(config, str(workdir))

  line = _ok(_launch('--mode=eval', f'--workdir={workdir}'))
  assert 'teacher (reported)' in line and 'eval_test_step12.json' in line
  evaluated = json.loads((workdir / 'eval_test_step12.json').read_text())
  assert evaluated['models'] == results['models'] and evaluated['reported_model'] == 'teacher'

  _ok(_launch('--mode=probe', f'--workdir={workdir}', '--split=labeled', '--step=6'))
  probed = json.loads((workdir / 'probe_labeled_step6.json').read_text())
  # Each evaluation has its own file: the probe did not replace the eval.
  assert json.loads((workdir / 'eval_test_step12.json').read_text()) == evaluated
  assert (probed['step'], probed['split']) == (6, 'labeled')
  assert probed['probes']['num_labeled'] == 50  # 5 labels per class
  for name in ('linear', 'knn'):
    assert 0 <= probed['probes'][name]['top1'] <= probed['probes'][name]['top5'] <= 100

  images = tmp_path / 'images'
  images.mkdir()
  pixels = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
  for i, image in enumerate(pixels):
    Image.fromarray(image[..., 0], 'L').save(images / f'{i}.png')
  (images / 'notes.txt').write_text('not an image')
  proc = _launch('--mode=predict', f'--workdir={workdir}', f'--images={images}')
  assert '3 images (1 unreadable' in _ok(proc)
  assert 'skipped 1 unreadable files: notes.txt' in proc.stderr_text
  with open(workdir / 'predictions.csv', newline='') as f:
    rows = list(csv.DictReader(f))
  assert [r['file'] for r in rows] == ['0.png', '1.png', '2.png']

  _ok(_launch('--mode=export', f'--workdir={workdir}'))
  meta = json.loads((workdir / 'export' / 'sslj_export.json').read_text())
  assert (meta['method'], meta['reported_model'], meta['model']['num_heads']) == (
      'mean_teacher', 'teacher', 2)
  # The exported teacher predicts what the run's own predict did, via the CSV.
  import sslj
  model = sslj.load(str(workdir / 'export'))
  probs = np.asarray(jax.nn.softmax(model(pixels), axis=-1))
  assert [int(r['class_index']) for r in rows] == list(probs.argmax(1))
  np.testing.assert_allclose([float(r['probability']) for r in rows], probs.max(1), atol=2e-6)


