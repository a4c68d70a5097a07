"""Pi-model: the loss against numpy, the ramp, one step's effect, build's refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import config_of, tiny_config
from sslj import train
from sslj.errors import UserError
from sslj.methods import pi_model


def _np_softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def _np_pi_loss(l1, l2, labels, weight, on):
  n = len(labels)
  p1 = _np_softmax(l1.astype(np.float64))
  log_p1 = np.log(p1[:n])
  ce = -np.mean(log_p1[np.arange(n), labels])
  p2 = _np_softmax(l2.astype(np.float64))
  rows = slice(None) if on == 'all' else slice(n, None)
  cons = np.mean((p1[rows] - p2[rows]) ** 2)   # mean over images and classes
  return ce + weight * cons, ce, cons


@pytest.mark.parametrize('on', ['all', 'unlabeled'])
def test_loss_matches_numpy_under_jit(on):
  rng = np.random.RandomState(0)
  l1 = rng.randn(12, 10).astype(np.float32) * 3
  l2 = rng.randn(12, 10).astype(np.float32) * 3
  labels = rng.randint(0, 10, 4).astype(np.int32)
  fn = jax.jit(lambda a, b, y, w: pi_model.pi_loss(a, b, y, w, consistency_on=on))
  got = fn(l1, l2, labels, 7.5)
  want = _np_pi_loss(l1, l2, labels, 7.5, on)
  np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-7)


def test_rampup_is_gaussian_over_the_epochs():
  w = jax.jit(lambda s: pi_model.rampup_weight(s, consistency_weight=100.0, rampup_epochs=4.0,
                                               steps_per_epoch=10))
  for step in (0, 5, 10, 25, 39):
    t = step / 40
    np.testing.assert_allclose(float(w(step)), 100 * np.exp(-5 * (1 - t) ** 2), rtol=1e-6)
  assert float(w(40)) == pytest.approx(100.0) and float(w(1000)) == pytest.approx(100.0)
  assert float(pi_model.rampup_weight(0, consistency_weight=3.0, rampup_epochs=0.0,
                                      steps_per_epoch=10)) == 3.0


@pytest.fixture(scope='module')
def built(data_dir):
  """(data, method, state, batch) of a tiny run: 4 labeled + 12 unlabeled images."""
  config = tiny_config('pi_model', **{'data.data_dir': data_dir,
                                      'pi_model.labeled_batch_size': 4})
  data = train.load_data(config)
  method = pi_model.METHOD.make(config, data)
  rng = np.random.RandomState(0)
  batch = {'labeled_images': data.labeled_images[rng.randint(0, len(data.labeled_images), 4)],
           'labels': data.labeled_labels[rng.randint(0, len(data.labeled_labels), 4)],
           'unlabeled_images': data.unlabeled_images[rng.randint(0, len(data.unlabeled_images), 12)],
           'unlabeled_indices': jnp.arange(12, dtype=jnp.int32)}
  return data, method, method.init(jax.random.key(0)), batch


def _flat(tree):
  return np.concatenate([np.ravel(v) for v in jax.tree_util.tree_leaves(tree)])


def test_consistency_gradient_flows_through_both_passes_unless_stopped():
  # Logits linear in the parameters (two passes: two noisy inputs), so the
  # gradients are checked without compiling a network.
  rng = np.random.RandomState(1)
  x1 = jnp.asarray(rng.randn(16, 5), jnp.float32)
  x2 = x1 + 0.3 * jnp.asarray(rng.randn(16, 5), jnp.float32)
  w = jnp.asarray(rng.randn(5, 10), jnp.float32)
  labels = jnp.asarray(rng.randint(0, 10, 4), jnp.int32)

  def cons(w, stop, hold_second):
    l2 = x2 @ w
    if hold_second:
      l2 = jax.lax.stop_gradient(l2)
    return pi_model.pi_loss(x1 @ w, l2, labels, 1.0, stop_gradient=stop)[2]

  both = jax.grad(cons)(w, False, False)
  stopped = jax.grad(cons)(w, True, False)
  np.testing.assert_allclose(stopped, jax.grad(cons)(w, False, True), rtol=1e-6, atol=1e-9)
  # Through both passes: the gradient of the symmetric cost is the sum of
  # the two one-sided ones (pass 1 moving with pass 2 held, and the converse).
  def second_only(w):
    return pi_model.pi_loss(jax.lax.stop_gradient(x1 @ w), x2 @ w, labels, 1.0)[2]
  np.testing.assert_allclose(both, stopped + jax.grad(second_only)(w), rtol=1e-5, atol=1e-8)
  assert np.abs(np.asarray(stopped)).max() > 0 and not np.allclose(both, stopped)


def test_one_step_moves_params_and_with_zero_weight_is_supervised(built):
  _, method, state, batch = built
  key = jax.random.key(5)
  # The weight as an argument, so that one compilation serves w = 100 and w = 0.
  step = jax.jit(lambda s, b, k, w: method.train_step(s, b, k, consistency_weight=w))
  new, metrics = step(state, batch, key, 100.0)
  assert int(new.step) == 1 and np.isfinite(float(metrics['loss']))
  assert float(metrics['consistency_loss']) > 0      # the two passes differ
  assert np.abs(_flat(new.params) - _flat(state.params)).max() > 0
  assert not np.array_equal(_flat(new.batch_stats), _flat(state.batch_stats))

  # w = 0: the loss and the update are those of cross-entropy on pass 1.
  new0, metrics0 = step(state, batch, key, 0.0)
  assert float(metrics0['consistency_weight']) == 0.0
  assert float(metrics0['loss']) == pytest.approx(float(metrics0['class_loss']), rel=1e-6)
  images = jnp.concatenate([batch['labeled_images'], batch['unlabeled_images']])
  aug_key, _, dropout_key, _ = jax.random.split(key, 4)
  x1 = method.train_step.keywords['preprocess'].train(images, aug_key)

  def ce(params):
    logits = state.apply_fn({'params': params, 'batch_stats': state.batch_stats}, x1,
                            train=True, mutable=['batch_stats'],
                            rngs={'dropout': dropout_key})[0]
    return -jax.nn.log_softmax(logits[:4])[jnp.arange(4), batch['labels']].mean()

  expected = state.apply_gradients(jax.jit(jax.grad(ce))(state.params), state.batch_stats)
  np.testing.assert_allclose(_flat(new0.params), _flat(expected.params), rtol=1e-5, atol=1e-6)
  assert not np.allclose(_flat(new0.params), _flat(new.params))

  # BatchNorm: the running statistics are the second pass's update alone, from the
  # statistics the step started with (the paper's code keeps its second branch's).
  @jax.jit
  def pass_statistics(aug_key, dropout_key):
    x = method.train_step.keywords['preprocess'].train(images, aug_key)
    return state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats}, x,
                          train=True, mutable=['batch_stats'],
                          rngs={'dropout': dropout_key})[1]['batch_stats']

  aug_key_1, aug_key_2, dropout_key_1, dropout_key_2 = jax.random.split(key, 4)
  second = pass_statistics(aug_key_2, dropout_key_2)
  np.testing.assert_allclose(_flat(new.batch_stats), _flat(second), rtol=1e-6, atol=1e-7)
  assert not np.allclose(_flat(new.batch_stats), _flat(pass_statistics(aug_key_1, dropout_key_1)),
                         atol=1e-5)


@pytest.mark.parametrize('overrides, match', [
    ({'pi_model.labeled_batch_size': 16}, 'pi_model.labeled_batch_size=16 must be between 1'),
    ({'pi_model.consistency_on': 'labeled'}, "consistency_on='labeled' is unknown"),
])
def test_build_refuses_bad_settings(data_dir, overrides, match):
  config = tiny_config('pi_model', **{'data.data_dir': data_dir,
                                      'pi_model.labeled_batch_size': 4, **overrides})
  data = train.load_data(config)
  with pytest.raises(UserError, match=match):
    pi_model.METHOD.make(config, data)


def test_every_label_is_refused(data_dir):
  config = tiny_config('pi_model', 'labels_per_class=all', **{'data.data_dir': data_dir,
                                                                'pi_model.labeled_batch_size': 4})
  with pytest.raises(UserError, match='needs unlabeled images'):
    pi_model.METHOD.make(config, train.load_data(config))


def test_presets_follow_the_references():
  fashion = config_of('pi_model', 'dataset=fashion_mnist,labels_per_class=10')
  assert (fashion.num_steps, fashion.batch_size, fashion.pi_model.labeled_batch_size) == (
      3000, 64, 8)    # FixMatch's Fashion-MNIST budget: 8 labeled + 56 unlabeled a step
  cifar = config_of('pi_model', 'dataset=cifar10,labels_per_class=400')
  assert cifar.model.name == 'wrn28_2' and cifar.model.dropout_rate == 0.0
  assert (cifar.num_epochs, cifar.pi_model.rampup_epochs) == (300.0, 80.0)      # the paper
  assert (cifar.batch_size, cifar.pi_model.labeled_batch_size,
          cifar.pi_model.consistency_weight, cifar.pi_model.consistency_on,
          cifar.pi_model.stop_gradient) == (128, 64, 10.0, 'unlabeled', True)  # USB
  assert (cifar.optimizer.learning_rate, cifar.optimizer.weight_decay,
          cifar.optimizer.schedule, cifar.augment.noise_std) == (0.03, 5e-4, 'truncated_cosine', 0.0)
  # USB's optimiser skips BatchNorm and biases, on every preset.
  assert (config_of('pi_model').optimizer.decay == fashion.optimizer.decay
          == cifar.optimizer.decay == 'kernels')
  assert config_of('pi_model', 'dataset=cifar10,model=convlarge').model.name == 'convlarge'
