"""Semi-supervised GAN: K+1 losses and feature matching against numpy, the split step,
the reference code's options (L1 feature matching, a separate generator batch),
collapse detection, and tiny runs that write results and sample grids and resume."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import (assert_trees_equal, config_of, latest_checkpoint, tiny_config,
                      train_until_first_checkpoint)
from sslj import models, parallel, train
from sslj.data import augment
from sslj.errors import UserError
from sslj.methods import ssl_gan, ssl_gan_samples
from sslj.ops import gan


def _np_k_plus_one(logits):
  """(log P(real), log P(generated)) per row from the explicit K+1 softmax in float64.

  The (K+1)-th logit is a literal 0 column; log-softmax with the max shifted
  out, then log of the sum of the K real-class probabilities, also shifted.
  """
  z = np.concatenate([np.asarray(logits, np.float64), np.zeros((len(logits), 1))], axis=1)
  m = z.max(axis=1, keepdims=True)
  log_p = z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))
  real = log_p[:, :-1]
  mr = real.max(axis=1, keepdims=True)
  log_real = (mr + np.log(np.exp(real - mr).sum(axis=1, keepdims=True)))[:, 0]
  return log_real, log_p[:, -1]


def _logits():
  rng = np.random.RandomState(0)
  k = 10
  rows = [rng.randn(k) * 3, rng.randn(k) * 3 - 6,
          np.full(k, 1000.0), np.linspace(950, 1000, k),   # exp overflows float32/bfloat16
          np.full(k, -1000.0), np.linspace(-1000, -900, k),  # P(real) underflows
          np.r_[500.0, np.full(k - 1, -500.0)], np.r_[100.0, np.zeros(k - 1)]]
  return np.stack(rows).astype(np.float32)


@pytest.mark.parametrize('dtype,rtol,atol', [(jnp.float32, 1e-5, 1e-6),
                                             (jnp.bfloat16, 2e-2, 2e-2)])
def test_k_plus_one_losses_match_explicit_softmax(dtype, rtol, atol):
  logits = jnp.asarray(_logits(), dtype)
  # The reference sees exactly the (rounded) values the function sees.
  log_real, log_fake = _np_k_plus_one(np.asarray(logits.astype(jnp.float32)))
  got = jax.jit(gan.log_real_probability)(logits)
  assert got.dtype == dtype and bool(jnp.all(jnp.isfinite(got)))
  np.testing.assert_allclose(np.asarray(got, np.float64), log_real, rtol=rtol, atol=atol)
  np.testing.assert_allclose(float(jax.jit(gan.unlabeled_loss)(logits)), -log_real.mean(),
                             rtol=rtol, atol=atol)
  np.testing.assert_allclose(float(jax.jit(gan.generated_loss)(logits)), -log_fake.mean(),
                             rtol=rtol, atol=atol)
  np.testing.assert_allclose(np.asarray(jax.jit(gan.real_probability)(logits), np.float64),
                             np.exp(log_real), rtol=rtol, atol=atol)
  # The naive formula, D = Z / (Z + 1) with Z = sum exp(l), overflows on these rows.
  z = jnp.sum(jnp.exp(logits), axis=-1)
  naive = jnp.log(z / (z + 1))
  assert not bool(jnp.all(jnp.isfinite(naive)))


def test_losses_have_finite_gradients_at_large_logits():
  logits = jnp.asarray(_logits())
  for fn in (gan.unlabeled_loss, gan.generated_loss):
    g = jax.jit(jax.grad(fn))(logits)
    assert bool(jnp.all(jnp.isfinite(g)))


def test_feature_matching_matches_numpy():
  rng = np.random.RandomState(1)
  real, fake = rng.randn(7, 5).astype(np.float32), rng.randn(9, 5).astype(np.float32) + 0.3
  expected = np.sum((real.astype(np.float64).mean(0) - fake.astype(np.float64).mean(0)) ** 2)
  np.testing.assert_allclose(float(jax.jit(gan.feature_matching)(real, fake)), expected,
                             rtol=1e-5)
  np.testing.assert_allclose(float(jax.jit(gan.manifold_penalty)(real[:5], fake[:5])),
                             np.mean(np.sum((real[:5] - fake[:5]) ** 2, -1)), rtol=1e-5)


def test_l1_feature_matching_and_its_gradient_match_numpy():
  rng = np.random.RandomState(2)
  real = rng.randn(7, 5).astype(np.float32)
  fake = rng.randn(9, 5).astype(np.float32) + np.float32([0.8, -0.8, 0.5, -0.5, 1.0])
  diff = real.astype(np.float64).mean(0) - fake.astype(np.float64).mean(0)
  assert np.abs(diff).min() > 0.05 and (diff > 0).any() and (diff < 0).any()
  value, (g_real, g_fake) = jax.jit(jax.value_and_grad(gan.feature_matching_l1, argnums=(0, 1)))(
      real, fake)
  # The CIFAR script's T.mean(abs(m1 - m2)) over D = 5 features, and its gradient
  # sign(m1 - m2) / D through each batch mean (1/7 and -1/9 per row).
  np.testing.assert_allclose(float(value), np.abs(diff).mean(), rtol=1e-6)
  np.testing.assert_allclose(g_real, np.tile(np.sign(diff) / (5 * 7), (7, 1)), rtol=1e-6)
  np.testing.assert_allclose(g_fake, np.tile(-np.sign(diff) / (5 * 9), (9, 1)), rtol=1e-6)
  assert gan.FEATURE_MATCHING == {'l2': gan.feature_matching, 'l1': gan.feature_matching_l1}


def _built(data_dir, **overrides):
  config = tiny_config('ssl_gan', **{'data.data_dir': data_dir,
                                     'ssl_gan.labeled_batch_size': 4, **overrides})
  data = train.load_data(config)
  method = ssl_gan.METHOD.make(config, data)
  state = jax.jit(method.init)(jax.random.key(0))
  rng = np.random.RandomState(0)
  labeled, unlabeled = ssl_gan.batch_split(config)
  pick = rng.randint(0, len(data.labeled_images), labeled)
  batch = {'labeled_images': data.labeled_images[pick], 'labels': data.labeled_labels[pick],
           'unlabeled_images': data.unlabeled_images[
               rng.randint(0, len(data.unlabeled_images), unlabeled)]}
  return config, data, method, state, batch


def _leaves(tree):
  return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


def test_generator_loss_reaches_only_the_generator(data_dir):
  config, _, method, state, batch = _built(data_dir)
  preprocess = method.train_step.keywords['preprocess']
  x_real = preprocess.eval(batch['unlabeled_images'])
  z = jax.random.normal(jax.random.key(1), (x_real.shape[0], config.ssl_gan.latent_dim))

  def loss(gen_params, disc_params):
    return ssl_gan.generator_loss(gen_params, disc_params, state, z, x_real,
                                  jax.random.key(2), preprocess=preprocess)[0]

  g_gen, g_disc = jax.jit(jax.grad(loss, argnums=(0, 1)))(state.generator.params,
                                                          state.discriminator.params)
  assert np.all(_leaves(g_disc) == 0.0)
  assert np.abs(_leaves(g_gen)).max() > 0


def _generator_loss_as_before(gen_params, disc_params, state, z, x_real, key, *, preprocess,
                              distance=gan.feature_matching):
  """`ssl_gan.generator_loss` as it was before `feature_matching` was an option."""
  disc = state.discriminator
  disc_params = jax.lax.stop_gradient(disc_params)
  images, stats = ssl_gan._generate(state.generator, gen_params, z, train=True)
  fake = augment.normalize(images, preprocess.mean, preprocess.std)
  features, _ = disc.apply_fn(
      {'params': disc_params, 'batch_stats': disc.batch_stats},
      jnp.concatenate([x_real, fake]), train=True, return_features=True,
      mutable=['batch_stats'], rngs={'dropout': key})
  features = features.astype(jnp.float32)
  real_features = jax.lax.stop_gradient(features[:x_real.shape[0]])
  return distance(real_features, features[x_real.shape[0]:]), stats


def test_default_generator_loss_is_as_before_and_l1_swaps_only_the_distance(data_dir):
  config, _, method, state, batch = _built(data_dir)
  assert method.train_step.keywords['settings'].feature_matching == 'l2'
  preprocess = method.train_step.keywords['preprocess']
  x_real = preprocess.eval(batch['unlabeled_images'])
  z = jax.random.normal(jax.random.key(1), (x_real.shape[0], config.ssl_gan.latent_dim))
  args = (state.generator.params, state.discriminator.params, state, z, x_real,
          jax.random.key(2))
  value_and_grad = lambda fn, **kw: jax.jit(jax.value_and_grad(
      functools.partial(fn, preprocess=preprocess, **kw), has_aux=True))(*args)
  assert_trees_equal(value_and_grad(ssl_gan.generator_loss),
                     value_and_grad(_generator_loss_as_before))
  l1 = value_and_grad(ssl_gan.generator_loss, feature_matching='l1')
  assert_trees_equal(l1, value_and_grad(_generator_loss_as_before,
                                        distance=gan.feature_matching_l1))
  assert float(l1[0][0]) != float(value_and_grad(ssl_gan.generator_loss)[0][0])


def test_bad_reference_options_fail_at_build(data_dir):
  for field, value in (('feature_matching', 'l3'), ('generator_batch', 'other')):
    config = tiny_config('ssl_gan', **{'data.data_dir': data_dir, 'ssl_gan.labeled_batch_size': 4,
                                       f'ssl_gan.{field}': value})
    with pytest.raises(UserError, match=f"ssl_gan.{field}='{value}' is unknown; use one of"):
      ssl_gan.METHOD.make(config, train.load_data(config))


def test_presets_take_the_reference_script_for_their_images():
  """The generator's own batch everywhere (both scripts); the distance of
  the MNIST script on the small grey presets, of the CIFAR-10 script on
  CIFAR-10 (the module docstring's decisions)."""
  expected = {'': 'l2', 'dataset=fashion_mnist,labels_per_class=10': 'l2',
              'dataset=cifar10,labels_per_class=400': 'l1'}
  for arg, distance in expected.items():
    config = config_of('ssl_gan', arg)
    assert (config.ssl_gan.generator_batch, config.ssl_gan.feature_matching) == (
        'separate', distance), arg


def test_supervised_baseline_trains_with_the_gans_optimiser():
  for arg in ('', 'dataset=fashion_mnist,labels_per_class=10',
              'dataset=cifar10,labels_per_class=400'):
    gan = config_of('ssl_gan', arg)
    baseline = config_of('supervised', ','.join(filter(None, (arg, 'model=dcgan_discriminator'))))
    assert baseline.optimizer.to_dict() == gan.optimizer.to_dict(), arg
  assert config_of('ssl_gan').optimizer.learning_rate == 0.003
  assert config_of('ssl_gan', 'dataset=cifar10,labels_per_class=400').optimizer.learning_rate == 3e-4


def test_separate_generator_batch_is_a_second_draw_of_the_loop(data_dir):
  config, data, method, state, _ = _built(data_dir, **{'ssl_gan.generator_batch': 'separate'})
  labeled, unlabeled = ssl_gan.batch_split(config)
  assert (method.labeled_batch, method.unlabeled_batch) == (labeled, 2 * unlabeled)
  shared_config = tiny_config('ssl_gan', **{'data.data_dir': data_dir,
                                            'ssl_gan.labeled_batch_size': 4,
                                            'ssl_gan.generator_batch': 'shared'})
  assert ssl_gan.steps_per_epoch(config, data) == ssl_gan.steps_per_epoch(shared_config, data)
  # The loop draws the batch: twice the unlabeled rows, split in halves.
  mesh = parallel.make_mesh()
  batch = jax.jit(functools.partial(
      train.sample_batch, mesh=mesh, labeled_batch=method.labeled_batch,
      unlabeled_batch=method.unlabeled_batch))(train.put_train_data(data, method, mesh),
                                               jax.random.key(3))
  d_batch, g_batch = ssl_gan.split_unlabeled(batch, 'separate')
  assert set(d_batch) == set(batch) and set(g_batch) == {'unlabeled_images', 'unlabeled_indices'}
  d_rows, g_rows = (np.asarray(b['unlabeled_indices']) for b in (d_batch, g_batch))
  assert len(d_rows) == len(g_rows) == unlabeled and not np.array_equal(d_rows, g_rows)
  np.testing.assert_array_equal(g_batch['unlabeled_images'], data.unlabeled_images[g_rows])
  np.testing.assert_array_equal(d_batch['labeled_images'], batch['labeled_images'])
  # The step: the discriminator on the first half, the generator on the second.
  kw = method.train_step.keywords
  key = jax.random.key(7)
  d_key, g_key = jax.random.split(key)
  full, metrics = jax.jit(method.train_step)(state, batch, key)
  after_d, d_metrics = jax.jit(lambda s: ssl_gan.discriminator_step(s, d_batch, d_key, **kw))(
      state)
  generator_step = jax.jit(lambda s, b: ssl_gan.generator_step(
      s, b, g_key, preprocess=kw['preprocess'], settings=kw['settings']))
  after_g, g_metrics = generator_step(after_d, g_batch)
  np.testing.assert_allclose(float(metrics['d_loss']), float(d_metrics['d_loss']), rtol=1e-6)
  np.testing.assert_allclose(float(metrics['g_loss']), float(g_metrics['g_loss']), rtol=1e-6)
  np.testing.assert_allclose(_leaves(full.generator.params), _leaves(after_g.generator.params),
                             rtol=1e-5, atol=1e-6)
  _, on_d_half = generator_step(after_d, {'unlabeled_images': d_batch['unlabeled_images']})
  assert float(on_d_half['g_loss']) != float(metrics['g_loss'])


def test_data_init_normalises_every_layer_on_its_images_and_keeps_the_directions(data_dir):
  """improved-gan's init: each layer's pre-activations on the init images, in one
  training-mode pass, have per-channel mean 0 and deviation 1 (the head 0.1)."""
  config, data, method, state, _ = _built(data_dir, **{'ssl_gan.data_init': True})
  images = ssl_gan.data_init_images(config, data, method.train_step.keywords['preprocess'])
  assert len(images) == min(ssl_gan.DATA_INIT_IMAGES, len(data.unlabeled_images))
  d_key = jax.random.split(jax.random.key(0))[0]
  disc = state.discriminator
  _, captured = disc.apply_fn({'params': disc.params}, images, train=True,
                              rngs={'dropout': jax.random.fold_in(d_key, 1)},
                              capture_intermediates=True)
  layers = {name: np.asarray(out['__call__'][0]) for name, out in
            captured['intermediates'].items() if name.startswith('WeightNorm') or name == 'head'}
  assert len(layers) == 8
  for name, t in layers.items():
    axes = tuple(range(t.ndim - 1))
    np.testing.assert_allclose(t.mean(axes), 0.0, atol=2e-5, err_msg=name)
    np.testing.assert_allclose(t.std(axes), 0.1 if name == 'head' else 1.0, rtol=2e-5,
                               err_msg=name)
  # Only scales, biases and the head change: every kernel's direction is Flax's.
  _, _, _, plain, _ = _built(data_dir)
  for name, layer in plain.discriminator.params.items():
    if name.startswith('Conv_'):
      np.testing.assert_array_equal(layer['kernel'], disc.params[name]['kernel'])
      assert not np.array_equal(layer['bias'], disc.params[name]['bias'])
  np.testing.assert_array_equal(plain.generator.params['Dense_0']['kernel'],
                                state.generator.params['Dense_0']['kernel'])


def test_data_init_needs_weight_normalised_layers(data_dir):
  config = tiny_config('ssl_gan', **{'data.data_dir': data_dir, 'ssl_gan.labeled_batch_size': 4,
                                     'ssl_gan.data_init': True, 'model.weight_norm': False})
  with pytest.raises(UserError, match='ssl_gan.data_init=True initialises weight-normalised'):
    ssl_gan.METHOD.make(config, train.load_data(config))


_checkpointed = latest_checkpoint


def test_reference_options_run_resumes_to_the_same_end(tmp_path, data_dir, monkeypatch):
  config = tiny_config('ssl_gan', **{'data.data_dir': data_dir, 'ssl_gan.labeled_batch_size': 4,
                                     'ssl_gan.num_samples': 4, 'ssl_gan.feature_matching': 'l1',
                                     'ssl_gan.generator_batch': 'separate',
                                     'ssl_gan.data_init': True})
  expected = train.train_and_evaluate(config, str(tmp_path / 'straight'))
  train_until_first_checkpoint(config, tmp_path / 'resumed', monkeypatch)
  assert _checkpointed(str(tmp_path / 'resumed'))[0] == 6
  got = train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert got['models'] == expected['models']
  (step_a, a), (step_b, b) = (_checkpointed(str(tmp_path / d)) for d in ('straight', 'resumed'))
  assert step_a == step_b == 12
  assert_trees_equal(a, b)
  grid = lambda d: np.asarray(Image.open(tmp_path / d / 'samples' / 'step_000012.png'))
  np.testing.assert_array_equal(grid('resumed'), grid('straight'))


def test_step_is_discriminator_then_generator_each_leaving_the_other(data_dir):
  # One batch for both halves ('shared'); the 'separate' split is tested above.
  config, _, method, state, batch = _built(data_dir, **{'ssl_gan.manifold_weight': 0.1,
                                                        'ssl_gan.generator_batch': 'shared'})
  kw = method.train_step.keywords
  key = jax.random.key(7)
  full, metrics = jax.jit(method.train_step)(state, batch, key)
  d_key, g_key = jax.random.split(key)
  after_d, _ = jax.jit(lambda s: ssl_gan.discriminator_step(s, batch, d_key, **kw))(state)
  after_g, _ = jax.jit(lambda s: ssl_gan.generator_step(
      s, batch, g_key, preprocess=kw['preprocess'], settings=kw['settings']))(after_d)
  # The discriminator's update leaves the generator exactly as it was ...
  np.testing.assert_array_equal(_leaves(after_d.generator.params), _leaves(state.generator.params))
  np.testing.assert_array_equal(_leaves(after_d.generator.opt_state),
                                _leaves(state.generator.opt_state))
  assert not np.allclose(_leaves(after_d.discriminator.params),
                         _leaves(state.discriminator.params))
  # ... and the generator's leaves the (updated) discriminator and its average.
  np.testing.assert_array_equal(_leaves(after_g.discriminator.params),
                                _leaves(after_d.discriminator.params))
  np.testing.assert_array_equal(_leaves(after_g.discriminator_ema.average),
                                _leaves(after_d.discriminator_ema.average))
  assert not np.allclose(_leaves(after_g.generator.params), _leaves(after_d.generator.params))
  # The two halves are the step.
  for a, b in ((full.discriminator.params, after_g.discriminator.params),
               (full.generator.params, after_g.generator.params),
               (full.generator.batch_stats, after_g.generator.batch_stats)):
    np.testing.assert_allclose(_leaves(a), _leaves(b), rtol=1e-5, atol=1e-6)
  # The reported average after its first update: decay 0.5.
  np.testing.assert_allclose(
      _leaves(full.discriminator_ema.average),
      0.5 * _leaves(state.discriminator.params) + 0.5 * _leaves(full.discriminator.params),
      rtol=1e-6, atol=1e-7)
  assert int(full.step) == 1 and float(metrics['manifold_loss']) > 0
  np.testing.assert_allclose(float(metrics['loss']),
                             float(metrics['d_loss']) + float(metrics['g_loss']), rtol=1e-6)


def test_collapse_is_detected_on_a_collapsed_batch_only():
  rng = np.random.RandomState(0)
  real = rng.rand(32, 8, 8, 1).astype(np.float32)
  collapsed = np.repeat(real[:1], 32, axis=0) + 1e-3 * rng.randn(32, 8, 8, 1).astype(np.float32)
  spread = jax.jit(gan.batch_spread)
  np.testing.assert_allclose(float(spread(real)), real.reshape(32, -1).std(0).mean(), rtol=1e-5)
  ratio_collapsed = float(spread(collapsed) / spread(real))
  ratio_spread = float(spread(real[::-1] * 0.9) / spread(real))
  assert ratio_collapsed < 0.01 and ratio_spread == pytest.approx(0.9, rel=1e-5)

  watch = gan.CollapseWatch(fraction=0.1, patience=3)
  fired = [watch(step, {'spread_ratio': ratio_collapsed})['collapse'] for step in range(4)]
  assert fired == [0.0, 0.0, 1.0, 1.0]
  assert watch(4, {'spread_ratio': ratio_spread}) == {'low_spread_logs': 0.0, 'collapse': 0.0}
  calm = gan.CollapseWatch(fraction=0.1, patience=3)
  assert all(calm(s, {'spread_ratio': ratio_spread})['collapse'] == 0.0 for s in range(6))
  from sslj.errors import UserError
  stopper = gan.CollapseWatch(fraction=0.1, patience=1, stop=True)
  with pytest.raises(UserError, match='COLLAPSE'):
    stopper(1, {'spread_ratio': ratio_collapsed})


@pytest.mark.parametrize('upsample', ['transpose', 'resize'])
@pytest.mark.parametrize('shape', [(8, 8, 1), (28, 28, 1), (32, 32, 3), (96, 96, 3)])
def test_generator_makes_images_of_the_dataset_size(shape, upsample):
  model = models.build_generator('dcgan', image_shape=shape, upsample=upsample, base_width=32)
  z = jax.ShapeDtypeStruct((2, 100), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2, 100))))
  out = jax.eval_shape(lambda v, z: model.apply(v, z), variables, z)
  assert (out.shape, out.dtype) == ((2,) + shape, jnp.float32)


def test_tiny_run_writes_results_and_sample_grids(tmp_path, data_dir):
  config = tiny_config('ssl_gan', **{'data.data_dir': data_dir,
                                     'ssl_gan.labeled_batch_size': 4,
                                     'ssl_gan.num_samples': 12})
  results = train.train_and_evaluate(config, str(tmp_path))
  with open(tmp_path / 'results.json') as f:
    saved = json.load(f)
  assert saved == results
  assert set(saved['models']) == {'discriminator', 'discriminator_ema'}
  assert saved['top1'] == saved['models']['discriminator_ema']['top1']
  assert saved['method'] == 'ssl_gan' and saved['labels_per_class'] == 5
  for step in (6, 12):
    image = np.asarray(Image.open(tmp_path / 'samples' / f'step_{step:06d}.png'))
    # 12 tiles of 8x8 digits zoomed x7 on a 4-column grid: 3 rows.
    assert image.shape == (3 * 56 + 4 * 2, 4 * 56 + 5 * 2, 3)
  logged = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  train_logs = [r for r in logged if 'train/loss' in r]
  assert len(train_logs) == 3
  for key in ('d_loss', 'g_loss', 'd_real_accuracy', 'd_fake_accuracy', 'spread_ratio',
              'collapse', 'low_spread_logs'):
    assert all(f'train/{key}' in r for r in train_logs), key
  # viz's hook draws the final grid again from the checkpoint, pixel for pixel.
  from sslj.use import restore
  run = restore.restore(str(tmp_path), None)
  grid, _ = ssl_gan_samples.pictures(run.state, run.config, run.data, 0)['samples']
  np.testing.assert_array_equal(grid, np.asarray(Image.open(tmp_path / 'samples/step_000012.png')))
  # The reported network (evaluate / export / viz) is the averaged discriminator.
  net = run.network
  logits = jax.jit(net.logits)(net.variables, run.data.test_images[:20])
  expected = jax.jit(run.method.predict)(run.state, run.data.test_images[:20])
  np.testing.assert_allclose(logits, expected['discriminator_ema'], rtol=1e-5, atol=1e-5)
