"""Pictures of runs (`sslj.viz`): each is written at its size, shows what it claims, is listed.

A tiny supervised run and a tiny Mean Teacher run are trained and drawn once
each (t-SNE of 150 points); a kmeans_svm run directory is faked with a
config.json and a centroids.npz of known patches and drawn by
`launch.py --mode=viz` in a subprocess.
"""

from html import escape as html_escape
import json
import os
import re
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from conftest import ROOT, copy_of_tiny_run, replace_method, tiny_config
from sslj import cli, run_files, train
from sslj.errors import UserError
from sslj.use import restore
from sslj.ops import image_grid as grids
from sslj.viz import context, drawing, pictures
from sslj.viz.context import Options
from sslj.viz.page import Picture, Skipped

OPTIONS = Options(tsne_points=150)
GAP = grids.GAP


def _by_name(entries):
  return {e.name: e for e in entries}


def _png(folder, name):
  return np.asarray(Image.open(os.path.join(folder, name)).convert('RGB'))


def _check_written(folder, entries, expected_sizes):
  """Every Picture is a PNG of its stated (and the expected) size, not blank, and listed."""
  written = [e for e in entries if isinstance(e, Picture)]
  for entry in written:
    image = _png(folder, entry.file)
    assert (image.shape[1], image.shape[0]) == entry.size, entry.name
    assert image.std() > 10, f'{entry.file} looks blank (pixel std {image.std():.1f})'
  for name, size in expected_sizes.items():
    assert _by_name(entries)[name].size == size, name
  html = open(os.path.join(folder, 'index.html')).read()
  linked = set(re.findall(r'<img src="([^"]+)"', html))
  on_disk = {f for f in os.listdir(folder) if f.endswith('.png')}
  assert linked == on_disk == {e.file for e in written}
  for entry in entries:
    if isinstance(entry, Skipped):  # every skipped picture is on the page with its reason
      assert f'id="{entry.name}"' in html and html_escape(entry.reason) in html


def _tile(image, index, cols, tile_hw, zoom):
  """Source pixels of tile `index` read back from a grid (one per zoomed block)."""
  r, c = divmod(index, cols)
  top, left = GAP + r * (tile_hw[0] * zoom + GAP), GAP + c * (tile_hw[1] * zoom + GAP)
  return image[top:top + tile_hw[0] * zoom:zoom, left:left + tile_hw[1] * zoom:zoom]


def _expected_tile(values):
  return np.round(255 * grids.normalize_each(values[None])[0]).astype(np.uint8)


@pytest.fixture(scope='module')
def sup_run(tmp_path_factory, tiny_run):
  """The session's tiny supervised run, copied: drawing writes into it."""
  workdir = str(tmp_path_factory.mktemp('sup') / 'run')
  results = copy_of_tiny_run(tiny_run, workdir)
  return workdir, results


@pytest.fixture(scope='module')
def sup_drawn(sup_run):
  """The supervised run drawn once, with a `pictures` hook (as a GAN would define) added."""
  workdir, _ = sup_run
  yy, xx = np.mgrid[0:20, 0:30]
  grid = np.stack([yy * 12, xx * 8, (yy + xx) * 5], -1).astype(np.uint8)

  def hook(state, config, data, seed):
    assert int(state.step) == config.num_steps and data.num_classes == 10 and seed == 0
    return {'samples': (grid, 'Fake generated samples.'), 'broken': grid.astype(np.float32)}

  with pytest.MonkeyPatch.context() as mp:
    replace_method(mp, 'supervised', pictures=hook)  # as if it declared the hook
    _, entries = drawing.draw(workdir, options=OPTIONS)
  return os.path.join(workdir, 'pictures'), entries


def test_supervised_run_pictures(sup_run, sup_drawn):
  workdir, results = sup_run
  folder, entries = sup_drawn
  named = _by_name(entries)
  assert {n for n, e in named.items() if isinstance(e, Picture)} == {
      'curves', 'tsne', 'confusion', 'filters', 'augmentations', 'supervised_samples'}
  # small_cnn's first convolution: 32 filters of 3x3x1 -> 6x6 tiles of 48 px (zoom 16);
  # augmentations: 1 + 31 digits of 8x8 -> 8x4 tiles of 96 px (zoom 12); the hook's
  # 30x20 picture upscaled x14 to at least 400 px wide.
  _check_written(folder, entries, {
      'curves': (1200, 450), 'confusion': (760, 680), 'tsne': (2 * 640 + 150, 700),
      'filters': (6 * 48 + 7 * GAP, 6 * 48 + 7 * GAP),
      'augmentations': (8 * 96 + 9 * GAP, 4 * 96 + 5 * GAP),
      'supervised_samples': (420, 280)})
  # The confusion matrix is the final model's: its diagonal is results.json's top-1.
  assert named['confusion'].numbers['top1'] == pytest.approx(results['top1'], abs=1e-9)
  assert named['confusion'].numbers['counts'].sum() == 450
  assert named['tsne'].numbers['points'] == 150 and 'knn_features' in named['tsne'].numbers
  # The filters shown are the network's first convolution, each on its own range.
  kernel = np.asarray(restore.restore(workdir).state.params['Conv_0']['kernel'])
  image = _png(folder, 'filters.png')
  for f in (0, 31):
    shown = _tile(image, f, 6, (3, 3), 16)
    assert np.array_equal(shown[..., 0], _expected_tile(kernel[..., f])[..., 0])
  # Its structure figure is computed from those same kernels.
  assert np.allclose(named['filters'].numbers['neighbour_correlation'],
                     pictures.neighbour_correlation(np.moveaxis(kernel, -1, 0)))
  assert 'smoother than 95% of random ones' in named['filters'].caption
  # The original in the augmentation grid is framed; the hook's bad picture is skipped.
  assert tuple(_png(folder, 'augmentations.png')[0, 0]) == grids.FRAME
  assert 'bad picture' in named['supervised_broken'].reason
  assert 'no centroids.npz' in named['centroids'].reason
  assert 'exemplar_patches' not in named  # a method's own picture now (contract test)


def test_neighbour_correlation_against_numpy_and_on_noise_and_bars():
  rng = np.random.default_rng(1)
  tiles = rng.standard_normal((5, 7, 6, 3))
  got = pictures.neighbour_correlation(tiles)
  for f in range(5):
    x = tiles[f] - tiles[f].mean()
    h = np.corrcoef(x[:, :-1].ravel(), x[:, 1:].ravel())[0, 1]
    v = np.corrcoef(x[:-1].ravel(), x[1:].ravel())[0, 1]
    assert got[f] == pytest.approx(max(h, v), abs=1e-12)
  # Noise scores near 0; vertical bars (constant down a column) score 1,
  # whatever their orientation; a constant filter scores 0, not NaN.
  noise = pictures.random_neighbour_correlation((7, 7, 1))
  assert abs(np.median(noise)) < 0.15 and np.quantile(noise, 0.95) < 0.45
  bars = np.tile(rng.standard_normal(7)[None, :, None], (7, 1, 1))
  scores = pictures.neighbour_correlation(np.stack([bars, bars.transpose(1, 0, 2),
                                                    np.ones((7, 7, 1))]))
  assert scores == pytest.approx([1.0, 1.0, 0.0])


def test_mean_teacher_run_pictures(tmp_path, data_dir):
  config = tiny_config('mean_teacher', **{'data.data_dir': data_dir, 'checkpoint_every': 12,
                                          'mean_teacher.labeled_batch_size': 4})
  workdir = str(tmp_path / 'mt')
  results = train.train_and_evaluate(config, workdir)
  _, entries = drawing.draw(workdir, options=OPTIONS)
  folder = os.path.join(workdir, 'pictures')
  _check_written(folder, entries, {'curves': (1200, 450), 'filters': (302, 302)})
  named = _by_name(entries)
  # Student and teacher top-1 on the same axes, as logged.
  logged = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  top1 = named['curves'].numbers['top1']
  assert set(top1) == {'student', 'teacher'}
  for model in top1:
    assert top1[model] == [(r['step'], r[f'eval/{model}/top1']) for r in logged
                           if f'eval/{model}/top1' in r]
  # Confusion matrix and filters are the teacher's (the reported network).
  assert named['confusion'].numbers['top1'] == pytest.approx(
      results['models']['teacher']['top1'], abs=1e-9)
  state = restore.restore(workdir).state
  teacher = np.asarray(state.teacher.average['Conv_0']['kernel'])
  student = np.asarray(state.params['Conv_0']['kernel'])
  shown = _tile(_png(folder, 'filters.png'), 3, 6, (3, 3), 16)[..., 0]
  assert np.array_equal(shown, _expected_tile(teacher[..., 3])[..., 0])
  assert not np.array_equal(shown, _expected_tile(student[..., 3])[..., 0])


def _bars(k, p=5):
  """k structured p x p patches: bars at different positions and orientations."""
  out = np.zeros((k, p, p, 1))
  for i in range(k):
    if i % 2:
      out[i, i // 2 % p, :, 0] = 1.0
    else:
      out[i, :, i // 2 % p, 0] = 1.0
    out[i, ..., 0] += np.linspace(0, 0.3, p)[None] * (i % 3)
  return out


def _launch_viz(*args):
  return subprocess.run([sys.executable, os.path.join(ROOT, 'launch.py'), '--mode=viz', *args],
                        capture_output=True, text=True, cwd=ROOT, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'))


def test_launch_mode_viz_on_kmeans_centroids(tmp_path, data_dir):
  """`launch.py --mode=viz` on a kmeans_svm run: centroids un-whitened and whitened."""
  workdir = str(tmp_path / 'km')
  config = tiny_config('kmeans_svm', **{'data.data_dir': data_dir,
                                        'kmeans_features.num_centroids': 16})
  run_files.claim_workdir(workdir, config)
  patches = _bars(16)
  rng = np.random.default_rng(0)
  a = rng.normal(size=(25, 25))
  matrix = a @ a.T / 25 + np.eye(25)  # symmetric positive definite, like a ZCA matrix
  mean = rng.normal(size=25)
  whitened = (patches.reshape(16, 25) - mean) @ matrix
  np.savez(os.path.join(workdir, 'centroids.npz'), centroids=whitened.astype(np.float32),
           zca_mean=mean.astype(np.float32), zca_matrix=matrix.astype(np.float32),
           patch_shape=np.array([5, 5, 1]))
  np.testing.assert_allclose(pictures.unwhiten(whitened, mean, matrix).reshape(patches.shape),
                             patches, atol=1e-9)

  proc = _launch_viz(f'--workdir={workdir}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  folder = os.path.join(workdir, 'pictures')
  line = proc.stdout.strip().splitlines()[-1]
  assert line == ('Drew 3 pictures (tsne, centroids, centroids_whitened); 5 not applicable '
                  '(curves, confusion, filters, augmentations, method_pictures): '
                  f'{folder}/index.html'), line
  side = 4 * 30 + 5 * GAP  # 16 centroids of 5x5 -> 4x4 tiles of 30 px (zoom 6)
  sizes = {'centroids': (side, side), 'centroids_whitened': (side, side),
           'tsne': (2 * 640 + 150, 700)}  # two maps: pixels and the k-means features
  for name, size in sizes.items():
    image = _png(folder, f'{name}.png')
    assert (image.shape[1], image.shape[0]) == size and image.std() > 10, name
  html = open(os.path.join(folder, 'index.html')).read()
  assert set(re.findall(r'<img src="([^"]+)"', html)) == {f'{n}.png' for n in sizes}
  assert 'kmeans_svm is not trained by gradient steps' in html
  # It trains no network: no picture of an augmentation it never applies.
  assert 'kmeans_svm trains no network, so it uses no training augmentation' in html
  for i in (0, 7):  # un-whitened: the bars back (to float32 round-off in the saved file)
    shown = _tile(_png(folder, 'centroids.png'), i, 4, (5, 5), 6)[..., 0].astype(int)
    assert np.abs(shown - _expected_tile(patches[i])[..., 0]).max() <= 1
    shown = _tile(_png(folder, 'centroids_whitened.png'), i, 4, (5, 5), 6)[..., 0].astype(int)
    assert np.abs(shown - _expected_tile(whitened[i].reshape(5, 5, 1))[..., 0]).max() <= 1


def test_no_confusion_matrix_of_a_head_that_is_not_the_reported_model(sup_run, monkeypatch):
  """A reported model fitted after training (DeepCluster's, Exemplar-CNN's probe) has no
  per-image network output: the page says why instead of drawing another head under its name."""
  import dataclasses
  from sslj.use import restore
  real = restore.restore

  def probe_reported(*args, **kwargs):
    run = real(*args, **kwargs)
    return dataclasses.replace(run, method=dataclasses.replace(run.method,
                                                                reported_model='linear_probe'))

  monkeypatch.setattr(restore, 'restore', probe_reported)
  ctx = context.load(sup_run[0], step=None, out_dir=sup_run[0], options=Options())
  with pytest.raises(context.Skip, match="reported model \\('linear_probe'\\) is fitted"):
    drawing.confusion_picture(ctx)


def test_a_run_without_a_checkpoint_and_a_failing_picture(sup_run, tmp_path, monkeypatch):
  workdir = str(tmp_path / 'fresh')
  os.makedirs(workdir)
  with open(os.path.join(sup_run[0], 'config.json')) as f:
    recorded = f.read()
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(recorded)

  def broken(ctx):
    raise RuntimeError('boom')

  monkeypatch.setattr(drawing, 'PICTURES', drawing.PICTURES + (('broken', 'Broken', broken),))
  _, entries = drawing.draw(workdir, options=Options(tsne_points=150, thumbnails=True))
  named = _by_name(entries)
  _check_written(os.path.join(workdir, 'pictures'), entries, {})
  assert {n for n, e in named.items() if isinstance(e, Picture)} == {'tsne', 'augmentations'}
  assert 'knn_features' not in named['tsne'].numbers  # one map (pixels), with thumbnails
  assert named['tsne'].size == (640 + 150, 700)
  for name in ('confusion', 'filters'):
    assert 'no checkpoint yet' in named[name].reason
  assert 'no metrics.jsonl' in named['curves'].reason
  assert named['broken'].reason == 'drawing it failed: RuntimeError: boom'
  line = drawing.run_command(workdir, tsne_points=150, thumbnails=True)
  assert '; 1 failed (broken): ' in line and 'broken' not in line.partition('failed')[0]


def test_bad_input_is_one_user_error(sup_run, tmp_path, capsys):
  with pytest.raises(UserError, match='does not exist'):
    drawing.draw(str(tmp_path / 'nowhere'))
  with pytest.raises(UserError, match='no config.json'):
    drawing.draw(str(tmp_path))
  with pytest.raises(UserError, match='no checkpoint of step 5'):
    drawing.draw(sup_run[0], step=5)
  with pytest.raises(UserError, match='--split does not apply'):
    drawing.run_command(sup_run[0], split='test')
  with pytest.raises(SystemExit) as exit_info:
    cli.run(config=None, workdir=str(tmp_path / 'nowhere'), mode='viz')
  assert exit_info.value.code == cli.EXIT_USER_ERROR
  assert capsys.readouterr().err.strip().count('\n') == 0


def test_curves_read_the_teacher_overtaking_and_use_a_log_axis_for_early_evals(tmp_path):
  from sslj.viz import curves
  student = [(10, 35.0), (20, 23.0), (30, 43.1), (40, 47.8), (100, 55.0), (1000, 80.0)]
  teacher = [(10, 25.0), (20, 40.9), (30, 41.5), (40, 48.8), (100, 68.7), (1000, 81.0)]
  assert curves.teacher_lead(student, teacher) == ([20, 40, 100, 1000], 40)
  assert curves.teacher_lead(student, teacher[:-1] + [(1000, 79.0)]) == ([20, 40, 100], None)
  records = [{'step': s, 'eval/student/top1': a, 'eval/teacher/top1': b, 'train/loss': 1.0 / s}
             for (s, a), (_, b) in zip(student, teacher)]
  size, numbers = curves.draw_curves(records, str(tmp_path / 'early.png'), title='t',
                                     reported_model='teacher')
  assert size == (1200, 450) and numbers['step_scale'] == 'log'
  late = [r for r in records if r['step'] >= 100]
  assert curves.draw_curves(late, str(tmp_path / 'late.png'), title='t',
                            reported_model='teacher')[1]['step_scale'] == 'linear'
