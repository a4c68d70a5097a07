"""SoftMatch: lambda(p) and uniform alignment against numpy over steps, the loss, a step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_trees_equal, tiny_config
from sslj import checkpoint, train
from sslj.errors import UserError
from sslj.methods import fixmatch, softmatch
from sslj.ops import thresholds


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_weight(max_prob, mu, var, n_sigma):
  """The paper's truncated Gaussian: lambda_max = 1 at or above mu_t, below it
  exp(-(max p - mu_t)^2 / (2 sigma_t^2)), with sigma_t^2 = var / n_sigma^2 (the code's)."""
  sigma2 = var / n_sigma ** 2
  return np.where(max_prob < mu, np.exp(-(max_prob - mu) ** 2 / (2 * sigma2)), 1.0)


def _np_softmatch(probs_steps, momentum, n_sigma, align):
  """p_hat (the first batch's mean, then its EMA), UA(p), mu_t, sigma_t^2 (unbiased batch
  variance), mu_0 = 1/C, sigma_0^2 = 1, and each step's weights, in float64."""
  num_classes = probs_steps[0].shape[1]
  p_hat, mu, var = None, 1.0 / num_classes, 1.0
  out = []
  for probs in probs_steps:
    q = probs.astype(np.float64)
    if align:
      p_hat = q.mean(0) if p_hat is None else momentum * p_hat + (1 - momentum) * q.mean(0)
      q = q * (1 / num_classes + 1e-6) / (p_hat + 1e-6)
      q = q / q.sum(1, keepdims=True)
    max_prob = q.max(1)
    mu = momentum * mu + (1 - momentum) * max_prob.mean()
    var = momentum * var + (1 - momentum) * max_prob.var(ddof=1)
    out.append((_np_weight(max_prob, mu, var, n_sigma), p_hat, mu, var, q))
  return out


def _probs(rng, batch, num_classes):
  logits = rng.randn(batch, num_classes) * rng.uniform(0.3, 4.0, (batch, 1))
  logits[:, 0] += 1.5  # class 0 over-predicted: the alignment has work to do
  return np.exp(_np_log_softmax(logits)).astype(np.float32)


def test_gaussian_weight_is_the_papers_lambda():
  max_prob = np.float32([0.1, 0.35, 0.5, 0.6, 0.95, 1.0])
  weight = jax.jit(thresholds.gaussian_weight, static_argnums=3)
  for n_sigma in (1.0, 2.0):
    got = np.asarray(weight(max_prob, np.float32(0.5), np.float32(0.04), n_sigma))
    want = _np_weight(max_prob.astype(np.float64), 0.5, 0.04, n_sigma)
    np.testing.assert_array_equal(got[2:], 1)  # at or above the mean: lambda_max exactly
    np.testing.assert_allclose(got, want, rtol=2e-6)  # float32 exp
    assert 0 < got[0] < got[1] < 1


@pytest.mark.parametrize('align', [True, False])
def test_statistics_and_weights_follow_numpy_over_steps(align):
  rng = np.random.RandomState(0)
  momentum, n_sigma, num_classes = 0.6, 2.0, 4
  probs_steps = [_probs(rng, 8, num_classes) for _ in range(6)]
  mask_fn = thresholds.truncated_gaussian_mask(momentum, n_sigma=n_sigma, align=align)
  state = mask_fn.init(100, num_classes)
  update = jax.jit(mask_fn.update)
  soft = 0
  for probs, want in zip(probs_steps, _np_softmatch(probs_steps, momentum, n_sigma, align)):
    weight, state = update(probs, jnp.zeros(8, jnp.int32), state)
    want_weight, p_hat, mu, var, _ = want
    if align:
      np.testing.assert_allclose(state.class_probs, p_hat, rtol=1e-6)
    # float32 EMAs, the variance and exp against float64: a few roundings each.
    np.testing.assert_allclose(state.mean, mu, rtol=1e-6)
    np.testing.assert_allclose(state.variance, var, rtol=2e-6)
    np.testing.assert_allclose(weight, want_weight, rtol=2e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(weight) == 1, want_weight == 1)
    soft += ((want_weight > 0.01) & (want_weight < 0.99)).sum()
  assert soft >= 5  # weights strictly between 0 and 1 were checked
  assert int(state.count) == 6
  described = jax.jit(mask_fn.describe)(state)
  np.testing.assert_allclose(described['gaussian_mean'], mu, rtol=1e-6)
  np.testing.assert_allclose(described['gaussian_std'], np.sqrt(var), rtol=2e-6)


def _fake_apply(variables, x, train, mutable, rngs):
  """A 'network' that returns its input as logits, so the loss sees chosen logits."""
  del train, mutable, rngs
  return x * variables['params']['scale'], {'batch_stats': variables['batch_stats']}


def _constructed_batch():
  """Logits whose weak views' argmax changes under uniform alignment in some rows."""
  rng = np.random.RandomState(3)
  num_classes, num_unlabeled = 4, 8
  labeled = rng.randn(3, num_classes) * 2
  weak = np.log(_probs(rng, num_unlabeled, num_classes).astype(np.float64))
  strong = rng.randn(num_unlabeled, num_classes) * 2
  labels = rng.randint(0, num_classes, 3)
  inputs = np.concatenate([labeled, weak, strong]).astype(np.float32)
  # A state after some steps: p_hat leans to class 0.
  state = thresholds.TruncatedGaussianState(
      class_probs=jnp.float32([0.55, 0.15, 0.15, 0.15]), count=jnp.int32(5),
      mean=jnp.float32(0.7), variance=jnp.float32(0.05))
  return inputs, labels, state, num_unlabeled


def test_loss_on_a_constructed_batch_matches_numpy():
  inputs, labels, state, num_unlabeled = _constructed_batch()
  momentum, weight = 0.5, 1.5
  loss = jax.jit(functools.partial(
      fixmatch.loss_fn, apply_fn=_fake_apply, num_unlabeled=num_unlabeled,
      mask_fn=thresholds.truncated_gaussian_mask(momentum), unlabeled_weight=weight))
  total, aux = loss({'scale': jnp.float32(1)}, {}, inputs=inputs, labels=labels,
                    dropout_key=jax.random.key(0), mask_state=state)
  x = inputs.astype(np.float64)
  labeled, weak, strong = x[:3], x[3:3 + num_unlabeled], x[3 + num_unlabeled:]
  p = np.exp(_np_log_softmax(weak))
  p_hat = momentum * np.array([0.55, 0.15, 0.15, 0.15]) + (1 - momentum) * p.mean(0)
  q = p * (0.25 + 1e-6) / (p_hat + 1e-6)
  q = q / q.sum(1, keepdims=True)
  mu = momentum * 0.7 + (1 - momentum) * q.max(1).mean()
  var = momentum * 0.05 + (1 - momentum) * q.max(1).var(ddof=1)
  w = _np_weight(q.max(1), mu, var, 2.0)
  pseudo = p.argmax(1)  # from the unaligned probabilities
  assert (q.argmax(1) != pseudo).any()
  assert ((w > 0.01) & (w < 1)).any() and (w == 1).any()
  ce_strong = -_np_log_softmax(strong)[np.arange(num_unlabeled), pseudo]
  expected = (-_np_log_softmax(labeled)[np.arange(3), labels].mean()
              + weight * np.sum(w * ce_strong) / num_unlabeled)
  np.testing.assert_allclose(float(total), expected, rtol=1e-6)
  np.testing.assert_allclose(aux[2], w, rtol=2e-5)


def test_pseudo_labels_and_weights_carry_no_gradient():
  inputs, labels, state, num_unlabeled = _constructed_batch()
  mask_fn = thresholds.truncated_gaussian_mask(0.5)
  loss = functools.partial(fixmatch.loss_fn, {'scale': jnp.float32(1)}, {}, _fake_apply,
                           labels=labels, dropout_key=jax.random.key(0),
                           num_unlabeled=num_unlabeled, mask_fn=mask_fn, mask_state=state,
                           unlabeled_weight=1.0)
  grad = np.asarray(jax.jit(jax.grad(lambda x: loss(x)[0]))(inputs))
  assert (grad[3:3 + num_unlabeled] == 0).all()
  assert np.abs(grad[3 + num_unlabeled:]).sum() > 0 and np.abs(grad[:3]).sum() > 0
  # The weight is a smooth function of the probabilities, yet passes no gradient.
  g = jax.jit(jax.grad(lambda p: mask_fn.update(jax.nn.softmax(p), None, state)[0].sum()))(
      inputs[3:3 + num_unlabeled])
  assert (np.asarray(g) == 0).all()


@pytest.fixture(scope='module')
def built(data_dir):
  # Two RandAugment ops (of 14) and a one-stage CNN: the step compiles in seconds.
  config = tiny_config('softmatch', **{'data.data_dir': data_dir, 'batch_size': 4,
                                       'softmatch.mu': 2,
                                       'softmatch.randaugment_ops': ('identity', 'brightness'),
                                       'model.widths': (8,)})
  data = train.load_data(config)
  method = softmatch.METHOD.make(config, data)
  state = jax.jit(method.init)(jax.random.key(0))
  rng = np.random.RandomState(0)
  pick = rng.randint(0, len(data.labeled_images), method.labeled_batch)
  unlabeled = rng.randint(0, len(data.unlabeled_images), method.unlabeled_batch)
  batch = {'labeled_images': data.labeled_images[pick], 'labels': data.labeled_labels[pick],
           'unlabeled_images': data.unlabeled_images[unlabeled],
           'unlabeled_indices': unlabeled.astype(np.int32)}
  return config, data, method, state, batch


def test_one_step_updates_the_gaussian_and_resumes_exactly(built, tmp_path):
  config, data, method, state, batch = built
  k, m = data.num_classes, config.softmatch.statistics_momentum
  new, metrics = jax.jit(method.train_step)(state, batch, jax.random.key(5))
  ms = new.mask_state
  assert int(ms.count) == 1
  # p_hat is the first batch's mean probability vector: a distribution.
  np.testing.assert_allclose(float(ms.class_probs.sum()), 1, rtol=1e-6)
  # mu_1 = m / K + (1 - m) * mean max UA(p), which lies in [1/K, 1].
  assert m / k + (1 - m) / k - 1e-7 <= float(ms.mean) <= m / k + (1 - m) + 1e-7
  assert float(ms.variance) < 1  # m * 1 + (1 - m) * (a variance of numbers in [0, 1])
  np.testing.assert_allclose(float(metrics['gaussian_mean']), float(ms.mean))
  assert set(metrics) >= {'loss', 'mask_rate', 'gaussian_mean', 'gaussian_std'}
  assert 0 < float(metrics['mask_rate']) <= 1  # the mean weight
  np.testing.assert_allclose(float(metrics['loss']), float(metrics['labeled_loss'])
                             + float(metrics['unlabeled_loss']), rtol=1e-6)
  saver = checkpoint.Checkpointer(str(tmp_path), every=1, keep=1)
  saver.save(1, new)
  restored = saver.restore(jax.jit(method.init)(jax.random.key(1)))
  saver.close()
  assert jax.tree.structure(restored) == jax.tree.structure(new)
  assert_trees_equal(restored, new)


def test_bad_options_fail_before_compiling(data_dir):
  for overrides, match in (({'softmatch.n_sigma': 0.0}, 'n_sigma'),
                           ({'batch_size': 1, 'softmatch.mu': 1}, 'at least 2'),
                           ({'softmatch.mu': 0}, 'mu'),
                           ({'softmatch.randaugment_ops': ('rotate', 'nope')}, 'RandAugment'),
                           ({'augment.out_size': 6}, 'out_size')):
    config = tiny_config('softmatch', **{'data.data_dir': data_dir, **overrides})
    with pytest.raises(UserError, match=match):
      softmatch.METHOD.make(config, train.load_data(config), 10)
