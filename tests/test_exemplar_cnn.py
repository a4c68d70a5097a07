"""Exemplar-CNN: seed selection, surrogate patches, the two networks, a tiny run."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from sslj import models, train
from sslj.data import augment
from sslj.errors import UserError
from sslj.methods import exemplar_cnn as ex
from sslj.models import exemplar
from sslj.use import evaluate

_SPEC = augment.AugmentSpec(rotate_deg=20.0, translate=0.1, scale=(0.7, 1.4), brightness=0.1,
                            contrast=0.5, saturation=0.5, hue=0.1, out_size=8)


def _seeds(n=6, size=16, seed=0):
  images = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype(np.uint8)
  index, corners = ex.select_seeds(images, n, 8, np.random.default_rng(seed))
  return images[index], corners, ex.seed_centers(corners, 8, (size, size))


def test_surrogate_batch_is_deterministic_per_key_and_within_ranges():
  seeds, _, centers = _seeds()
  draw = jax.jit(lambda key: ex.surrogate_batch(jnp.asarray(seeds), jnp.asarray(centers), key,
                                                batch=32, spec=_SPEC))
  x, labels, params = draw(jax.random.key(3))
  x2, labels2, _ = draw(jax.random.key(3))
  x3, _, _ = draw(jax.random.key(4))
  np.testing.assert_array_equal(x, x2)
  np.testing.assert_array_equal(labels, labels2)
  assert not np.array_equal(x, x3)
  assert x.shape == (32, 8, 8, 3) and x.dtype == jnp.float32
  assert 0 <= float(x.min()) and float(x.max()) <= 1
  labels = np.asarray(labels)
  assert labels.min() >= 0 and labels.max() < 6 and len(set(labels)) > 1
  p = jax.device_get(params)
  assert np.all(np.abs(p.angle) <= np.radians(20) + 1e-6) and np.ptp(p.angle) > 0
  assert np.all((p.scale >= 0.7) & (p.scale <= 1.4))
  # Shifts are drawn in units of the whole image and shrink with the crop box
  # to 0.1 of the patch (`augment.affine_matrix`).
  assert np.all(np.abs(p.shift) <= 0.1 * 16 + 1e-5)
  assert np.all(np.abs(p.brightness) <= 0.1) and np.all(np.abs(p.hue) <= 0.1)
  assert np.all((p.contrast >= 0.5) & (p.contrast <= 1.5))
  np.testing.assert_array_equal(p.crop_hw, 8.0)
  np.testing.assert_array_equal(p.crop_center, centers[labels])


def test_identity_transformation_renders_the_seed_window_exactly():
  seeds, corners, centers = _seeds()
  spec = augment.AugmentSpec(out_size=8)
  x, labels, _ = jax.jit(lambda key: ex.surrogate_batch(
      jnp.asarray(seeds), jnp.asarray(centers), key, batch=12, spec=spec))(jax.random.key(0))
  for patch, label in zip(np.asarray(x), np.asarray(labels)):
    r, c = corners[label]
    np.testing.assert_allclose(patch, seeds[label, r:r + 8, c:c + 8] / 255.0, atol=1e-6)


def test_select_seeds_prefers_textured_windows():
  rng = np.random.default_rng(0)
  images = np.full((40, 16, 16, 1), 128, np.uint8)
  spots = rng.integers(0, 12, (40, 2))
  for image, (r, c) in zip(images, spots):
    image[r:r + 4, c:c + 4] = rng.integers(0, 256, (4, 4, 1))
  index, corners = ex.select_seeds(images, 30, 6, np.random.default_rng(1))
  again = ex.select_seeds(images, 30, 6, np.random.default_rng(1))
  np.testing.assert_array_equal(index, again[0])
  np.testing.assert_array_equal(corners, again[1])
  assert len(set(index)) == 30 and corners.min() >= 0 and corners.max() <= 10
  # Every window overlaps (or borders: the gradient reaches one pixel out)
  # its image's textured spot; flat windows have ~1e-6 of the weight.
  for i, (r, c) in zip(index, corners):
    sr, sc = spots[i]
    assert r - 4 <= sr <= r + 6 and c - 4 <= sc <= c + 6
  whole_index, whole = ex.select_seeds(images, 5, 16, np.random.default_rng(0))
  np.testing.assert_array_equal(whole, 0)
  with pytest.raises(UserError, match='num_seeds'):
    ex.select_seeds(images, 41, 6, np.random.default_rng(0))


def test_quadrant_max_matches_numpy():
  x = np.random.default_rng(0).normal(size=(2, 5, 4, 3)).astype(np.float32)
  got = np.asarray(exemplar.quadrant_max(x))
  want = np.concatenate([x[:, r, c].max(axis=(1, 2)) for r in (slice(0, 3), slice(2, 5))
                         for c in (slice(0, 2), slice(2, 4))], axis=-1)
  np.testing.assert_array_equal(got, want)
  one = np.asarray(exemplar.quadrant_max(x[:, :1, :1]))
  np.testing.assert_array_equal(one, np.tile(x[:, 0, 0], 4))


@pytest.mark.parametrize('name,widths,fc,features', [
    ('exemplar_small', (64, 64), 128, 4 * (64 + 64 + 128)),
    ('exemplar_large', (64, 128, 256), 512, 4 * (64 + 128 + 256 + 512)),
])
def test_networks_have_the_paper_layers_and_run_convolutionally(name, widths, fc, features):
  model = models.build(name, num_classes=50, input_size=32)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  kernels = [v['kernel'].shape for k, v in sorted(variables['params'].items()) if 'Conv' in k]
  assert [k[3] for k in kernels] == list(widths) and all(k[:2] == (5, 5) for k in kernels)
  # The fully connected layer sees the whole 8x8 map left by two 2x2 poolings.
  assert variables['params']['fc']['kernel'].shape == (8, 8, widths[-1], fc)
  assert variables['params']['head']['kernel'].shape == (fc, 50)
  apply = lambda shape, **kw: jax.eval_shape(
      functools.partial(model.apply, **kw), variables, jnp.zeros(shape)).shape
  assert apply((2, 32, 32, 3)) == (2, 50)
  assert apply((2, 32, 32, 3), return_features=True) == (2, features)
  # Whole larger images: the fully connected layer slides, features keep their size.
  assert apply((1, 96, 96, 3), return_features=True) == (1, features)
  with pytest.raises(UserError, match='return_features'):
    apply((1, 96, 96, 3))


def test_fully_connected_layer_is_a_dense_layer_on_the_flattened_map():
  model = models.build('exemplar_small', num_classes=5, input_size=8)
  x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
  variables = jax.jit(model.init)(jax.random.key(0), x[:1])
  logits, captured = jax.jit(functools.partial(
      model.apply, capture_intermediates=True, mutable=['intermediates']))(variables, x)
  conv2 = captured['intermediates']['Conv_1']['__call__'][0]  # before its ReLU
  pooled = jax.lax.reduce_window(jax.nn.relu(conv2), -jnp.inf, jax.lax.max,
                                 (1, 2, 2, 1), (1, 2, 2, 1), 'VALID')  # [3, 2, 2, 64]
  fc, head = variables['params']['fc'], variables['params']['head']
  hidden = jax.nn.relu(pooled.reshape(3, -1) @ fc['kernel'].reshape(-1, 128) + fc['bias'])
  np.testing.assert_allclose(logits, hidden @ head['kernel'] + head['bias'], rtol=1e-4,
                             atol=1e-5)


def test_tiny_run_scores_the_trained_and_random_network(tmp_path, data_dir):
  config = tiny_config('exemplar_cnn', **{'data.data_dir': data_dir, 'exemplar.num_seeds': 40,
                                          'eval_every': 0, 'checkpoint_every': 0})
  results = train.train_and_evaluate(config, str(tmp_path))
  written = json.loads((tmp_path / 'results.json').read_text())
  assert written == json.loads(json.dumps(results))
  assert set(written['models']) == {'exemplar_svm', 'random_net_svm'}
  assert written['top1'] == written['models']['exemplar_svm']['top1']
  assert written['method'] == 'exemplar_cnn' and written['num_steps'] == 12
  for scores in written['models'].values():
    assert 10 < scores['top1'] <= scores['top5'] <= 100
  lines = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  final = [l for l in lines if 'eval/exemplar_svm/top1' in l]
  assert [l['step'] for l in final] == [12]
  assert all(np.isfinite(l['train/loss']) for l in lines if 'train/loss' in l)
  # --mode=probe: the network rebuilt for its 8x8 patches, its pooled features probed.
  record = evaluate.evaluate(str(tmp_path), with_probes=True)
  assert record['models'] == written['models']
  assert record['probes']['feature_dim'] == 4 * (64 + 64 + 128)
  assert 10 < record['probes']['linear']['top1'] <= 100


def test_build_rejects_other_networks(data_dir):
  config = tiny_config('exemplar_cnn', 'model=small_cnn', **{'data.data_dir': data_dir})
  with pytest.raises(UserError, match='exemplar_small'):
    ex.METHOD.make(config, train.load_data(config), 12)
