"""FixMatch: the masked loss against numpy, constant targets, the schedule, a run."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from sslj import train
from sslj.errors import UserError
from sslj.methods import fixmatch
from sslj.ops import optim, pseudo_labels


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_fixmatch_loss(labeled, labels, weak, strong, threshold, weight):
  """The paper's Eq. 4 written out in float64."""
  labeled_ce = -_np_log_softmax(labeled)[np.arange(len(labels)), labels].mean()
  p = np.exp(_np_log_softmax(weak))
  pseudo, keep = p.argmax(-1), p.max(-1) >= threshold
  strong_ce = -_np_log_softmax(strong)[np.arange(len(pseudo)), pseudo]
  return labeled_ce + weight * np.sum(np.where(keep, strong_ce, 0.0)) / len(weak), keep.mean()


def _fake_apply(variables, x, train, mutable, rngs):
  """A 'network' that returns its input as logits, so the loss sees chosen logits."""
  del train, mutable, rngs
  return x * variables['params']['scale'], {'batch_stats': variables['batch_stats']}


def test_loss_masks_unconfident_pseudo_labels_like_numpy():
  rng = np.random.RandomState(0)
  num_labeled, num_unlabeled, k = 3, 8, 5
  labeled = rng.randn(num_labeled, k) * 2
  weak = rng.randn(num_unlabeled, k) * 3
  weak[:3, 1] += 8  # three confident rows, so the mask is neither all 0 nor all 1
  strong = rng.randn(num_unlabeled, k) * 2
  labels = rng.randint(0, k, num_labeled)
  inputs = np.concatenate([labeled, weak, strong]).astype(np.float32)
  loss = jax.jit(functools.partial(
      fixmatch.loss_fn, apply_fn=_fake_apply, num_unlabeled=num_unlabeled,
      mask_fn=pseudo_labels.fixed_threshold(0.95), unlabeled_weight=1.5))
  total, aux = loss({'scale': jnp.float32(1)}, {}, inputs=inputs, labels=labels,
                    dropout_key=jax.random.key(0))
  expected, kept = _np_fixmatch_loss(labeled, labels, weak.astype(np.float32).astype(np.float64),
                                     strong, 0.95, 1.5)
  assert 0 < kept < 1
  np.testing.assert_allclose(float(total), expected, rtol=1e-5)
  np.testing.assert_allclose(float(aux[2].mean()), kept)
  p = np.exp(_np_log_softmax(weak.astype(np.float64)))
  np.testing.assert_allclose(np.asarray(aux[3]), p.max(-1), rtol=1e-5)


def test_hard_labels_threshold_is_inclusive():
  logits = jnp.log(jnp.array([[0.5, 0.5 - 1e-3, 1e-3], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]]))
  labels, mask, max_prob = jax.jit(pseudo_labels.hard_labels, static_argnums=1)(logits, 0.7)
  np.testing.assert_array_equal(labels, [0, 1, 2])
  np.testing.assert_array_equal(mask, [0, 1, 1])  # 0.7 itself is kept
  np.testing.assert_allclose(max_prob, [0.5, 0.7, 0.8], rtol=1e-6)


def _built(data_dir, **overrides):
  config = tiny_config('fixmatch', **{'data.data_dir': data_dir, 'batch_size': 4,
                                      'fixmatch.mu': 2, **overrides})
  data = train.load_data(config)
  method = fixmatch.METHOD.make(config, data)
  state = jax.jit(method.init)(jax.random.key(0))
  rng = np.random.RandomState(0)
  pick = rng.randint(0, len(data.labeled_images), method.labeled_batch)
  unlabeled = rng.randint(0, len(data.unlabeled_images), method.unlabeled_batch)
  batch = {'labeled_images': data.labeled_images[pick], 'labels': data.labeled_labels[pick],
           'unlabeled_images': data.unlabeled_images[unlabeled],
           'unlabeled_indices': unlabeled.astype(np.int32)}
  return config, data, method, state, batch


def test_pseudo_labels_carry_no_gradient(data_dir):
  config, _, method, state, batch = _built(data_dir)
  kw = method.train_step.keywords
  keys = jax.random.split(jax.random.key(7), 4)

  @jax.jit
  def views(batch):
    return jnp.concatenate([kw['preprocess'].train(batch['labeled_images'], keys[0]),
                            kw['preprocess'].train(batch['unlabeled_images'], keys[1]),
                            kw['strong'](batch['unlabeled_images'], keys[2])])

  inputs = views(batch)
  logits, _ = jax.jit(lambda p: state.apply_fn(
      {'params': p, 'batch_stats': state.batch_stats}, inputs, train=True,
      mutable=['batch_stats'], rngs={'dropout': keys[3]}))(state.params)
  p = np.asarray(jax.nn.softmax(logits[4:12]))
  # A threshold between the weak views' confidences keeps some and drops others.
  threshold = float(np.sort(p.max(-1))[4])
  targets = (p.argmax(-1).astype(np.int32), (p.max(-1) >= threshold).astype(np.float32))
  assert 0 < targets[1].mean() < 1
  loss = functools.partial(fixmatch.loss_fn, batch_stats=state.batch_stats,
                           apply_fn=state.apply_fn, inputs=inputs, labels=batch['labels'],
                           dropout_key=keys[3], num_unlabeled=8,
                           mask_fn=pseudo_labels.fixed_threshold(threshold), unlabeled_weight=1.0)
  grad = jax.jit(jax.grad(lambda params, targets: loss(params, targets=targets)[0]))
  # The loss's own pseudo-labels and mask, and the same fed as numpy constants.
  g = jax.jit(jax.grad(lambda params: loss(params)[0]))(state.params)
  g_const = grad(state.params, targets)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g, g_const)
  np.testing.assert_array_equal(jax.jit(loss)(state.params)[1][2], targets[1])
  # And the unlabeled term does contribute a gradient.
  g_none = grad(state.params, (targets[0], np.zeros_like(targets[1])))
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_none)))


def test_one_step_updates_the_ema_and_logs_the_mask(data_dir):
  config, _, method, state, batch = _built(data_dir)
  new, metrics = jax.jit(method.train_step)(state, batch, jax.random.key(5))
  # First EMA update has decay 0.5 (ema.decay_at's warm-up).
  expected = jax.tree.map(lambda e, p: 0.5 * e + 0.5 * p, state.ema.average,
                          {'params': new.params, 'batch_stats': new.batch_stats})
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               new.ema.average, expected)
  assert int(new.step) == 1 and int(new.ema.count) == 1
  assert set(metrics) >= {'loss', 'labeled_loss', 'unlabeled_loss', 'mask_rate', 'max_prob'}
  np.testing.assert_allclose(float(metrics['loss']), float(metrics['labeled_loss'])
                             + float(metrics['unlabeled_loss']), rtol=1e-6)
  assert 0.1 <= float(metrics['max_prob']) <= 1 and 0 <= float(metrics['mask_rate']) <= 1
  out = jax.jit(method.predict)(new, batch['unlabeled_images'])
  assert set(out) == {'model', 'ema', 'ema_live_stats'} and method.reported_model == 'ema'
  # The reference code's EMA model: averaged weights, the trained network's statistics.
  x = method.predict.keywords['preprocess'].eval(batch['unlabeled_images'])
  live = new.apply_fn({'params': new.ema.average['params'], 'batch_stats': new.batch_stats}, x,
                      train=False)
  np.testing.assert_allclose(out['ema_live_stats'], live, rtol=1e-5, atol=1e-6)
  assert not np.allclose(out['ema_live_stats'], out['ema'])


def test_fixmatch_cosine_matches_the_formula():
  schedule = optim.truncated_cosine(0.03, 1000)
  for k in (0, 250, 999, 1000, 1200):
    expected = 0.03 * np.cos(7 * np.pi * min(k, 1000) / 16000)
    np.testing.assert_allclose(jax.jit(schedule)(k), expected, rtol=1e-6)
  warm = optim.truncated_cosine(0.03, 1000, warmup_steps=100)
  np.testing.assert_allclose([warm(50), warm(100), warm(550)],
                             [0.015, 0.03, 0.03 * np.cos(7 * np.pi * 450 / (16 * 900))],
                             rtol=1e-6)


def test_bad_options_fail_before_compiling(data_dir):
  for overrides, match in (({'fixmatch.mu': 0}, 'mu'), ({'fixmatch.threshold': 1.5}, 'threshold'),
                           ({'fixmatch.randaugment_ops': ('rotate', 'nope')}, 'RandAugment')):
    config = tiny_config('fixmatch', **{'data.data_dir': data_dir, **overrides})
    with pytest.raises(UserError, match=match):
      fixmatch.METHOD.make(config, train.load_data(config), 10)


def test_tiny_run_writes_results(tmp_path, data_dir):
  config = tiny_config('fixmatch', **{'data.data_dir': data_dir, 'batch_size': 4,
                                      'fixmatch.mu': 2, 'num_steps': 4, 'eval_every': 0})
  results = train.train_and_evaluate(config, str(tmp_path))
  written = json.loads((tmp_path / 'results.json').read_text())
  assert written['method'] == 'fixmatch' and written['num_steps'] == 4
  assert set(written['models']) == {'model', 'ema', 'ema_live_stats'}
  assert written['top1'] == written['models']['ema']['top1'] == results['top1']
  lines = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert any('train/mask_rate' in l and 'train/max_prob' in l for l in lines)
  # The pseudo-labels scored against the digits pool's hidden classes.
  logged = [l for l in lines if 'train/pseudo_label_accuracy_all' in l]
  assert logged and all(0 <= l['train/pseudo_label_accuracy_all'] <= 100 for l in logged)
  assert not any(k.startswith('train/pseudo_labels') for l in lines for k in l)


def test_pictures_show_each_image_its_weak_and_strong_views(data_dir):
  from sslj.ops import image_grid as grids
  config = tiny_config('fixmatch', **{'data.data_dir': data_dir})
  data = train.load_data(config)
  made = fixmatch.pictures(None, config, data, 0)
  grid, caption = made['weak_and_strong_views']
  h, w = data.unlabeled_images.shape[1:3]
  zoom = grids.zoom_for((h, w), 64)
  cols, rows = fixmatch.PICTURE_VIEWS + 2, fixmatch.PICTURE_IMAGES
  assert grid.dtype == np.uint8
  assert grid.shape[1::-1] == grids.grid_size(cols * rows, (h, w), cols, zoom)
  assert 'RandAugment' in caption
  # Strong views differ from each other (random ops) and the grid is not blank.
  tile_px = h * zoom + grids.GAP
  strong = [grid[grids.GAP:grids.GAP + h * zoom, grids.GAP + c * tile_px:][:, :w * zoom]
            for c in range(2, cols)]
  assert len({s.tobytes() for s in strong}) == len(strong)
  assert grid.astype(np.float64).var() > 100
