"""FreeMatch: tau_t and tau_t(c) against numpy over steps, the fairness loss, the loss, a step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_trees_equal, tiny_config
from sslj import checkpoint, train
from sslj.errors import UserError
from sslj.methods import fixmatch, freematch
from sslj.ops import thresholds


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_self_adaptive(probs_steps, momentum):
  """The paper's tau_t, p~_t(c), h~_t(c) (all 1/C at t = 0) and tau_t(c), float64,
  each step's EMAs taking in its batch before its mask."""
  num_classes = probs_steps[0].shape[1]
  tau = 1.0 / num_classes
  p_tilde = np.full(num_classes, 1.0 / num_classes)
  h_tilde = np.full(num_classes, 1.0 / num_classes)
  out = []
  for probs in probs_steps:
    q = probs.astype(np.float64)
    tau = momentum * tau + (1 - momentum) * q.max(1).mean()
    p_tilde = momentum * p_tilde + (1 - momentum) * q.mean(0)
    hist = np.bincount(q.argmax(1), minlength=num_classes) / len(q)
    h_tilde = momentum * h_tilde + (1 - momentum) * hist
    local = p_tilde / p_tilde.max() * tau                # MaxNorm(p~_t(c)) * tau_t
    threshold = local[q.argmax(1)]
    out.append((q.max(1) >= threshold, tau, p_tilde.copy(), h_tilde.copy(), local,
                threshold, q.max(1)))
  return out


def _np_fairness(strong, mask, p_tilde, h_tilde):
  """-H(SumNorm(p~ / h~), SumNorm(p_bar / h_bar)) over the kept strong views, as the code."""
  keep = mask > 0
  if not keep.any():
    return 0.0
  q = np.exp(_np_log_softmax(strong[keep].astype(np.float64)))
  p_bar = q.mean(0)
  h_bar = np.bincount(q.argmax(1), minlength=q.shape[1]) / len(q)
  inv = lambda x: np.where(x > 0, 1 / np.where(x > 0, x, 1), 0)
  target = p_tilde * inv(h_tilde)
  target = target / target.sum()
  modulated = p_bar * inv(h_bar)
  modulated = modulated / modulated.sum()
  return float(np.sum(target * np.log(modulated + 1e-12)))


def _probs(rng, batch, num_classes):
  logits = rng.randn(batch, num_classes) * rng.uniform(0.3, 4.0, (batch, 1))
  logits[:, 0] += 1.0  # an uneven class distribution, so the local thresholds differ
  return np.exp(_np_log_softmax(logits)).astype(np.float32)


def test_thresholds_follow_numpy_over_steps():
  rng = np.random.RandomState(0)
  momentum, num_classes = 0.7, 4  # a short EMA, so that a few steps move it far
  probs_steps = [_probs(rng, 8, num_classes) for _ in range(6)]
  mask_fn = thresholds.self_adaptive_mask(momentum)
  state = mask_fn.init(100, num_classes)
  np.testing.assert_array_equal(state.global_threshold, np.float32(0.25))
  update = jax.jit(mask_fn.update)
  partial_masks = 0
  for probs, want in zip(probs_steps, _np_self_adaptive(probs_steps, momentum)):
    mask, state = update(probs, jnp.zeros(8, jnp.int32), state)
    want_mask, tau, p_tilde, h_tilde, local, threshold, max_prob = want
    # float32 EMAs against float64: a few roundings per step.
    np.testing.assert_allclose(state.global_threshold, tau, rtol=1e-6)
    np.testing.assert_allclose(state.class_probs, p_tilde, rtol=1e-6)
    np.testing.assert_allclose(state.label_histogram, h_tilde, rtol=1e-6)
    np.testing.assert_allclose(thresholds.local_thresholds(state), local, rtol=1e-6)
    assert np.abs(max_prob - threshold).min() > 1e-5  # no comparison decided by rounding
    np.testing.assert_array_equal(mask, want_mask.astype(np.float32))
    partial_masks += 0 < want_mask.mean() < 1
  assert partial_masks >= 3
  assert np.ptp(local) > 0.01  # the classes' thresholds differ
  described = jax.jit(mask_fn.describe)(state)
  np.testing.assert_allclose(described['global_threshold'], tau, rtol=1e-6)
  np.testing.assert_allclose(described['mean_threshold'], local.mean(), rtol=1e-6)


def test_fairness_loss_matches_numpy_and_is_zero_when_nothing_is_kept():
  rng = np.random.RandomState(1)
  strong = (rng.randn(8, 5) * 2).astype(np.float32)
  mask = np.float32([1, 0, 1, 1, 0, 1, 1, 0])
  state = thresholds.SelfAdaptiveState(
      global_threshold=jnp.float32(0.5), class_probs=jnp.float32([0.3, 0.2, 0.2, 0.2, 0.1]),
      label_histogram=jnp.float32([0.4, 0.3, 0.0, 0.2, 0.1]))  # a class never predicted: 1/0 -> 0
  fairness = jax.jit(thresholds.fairness_loss)
  want = _np_fairness(strong, mask, np.asarray(state.class_probs, np.float64),
                      np.asarray(state.label_histogram, np.float64))
  np.testing.assert_allclose(float(fairness(strong, mask, state)), want, rtol=1e-6)
  assert float(fairness(strong, np.zeros(8, np.float32), state)) == 0


def _fake_apply(variables, x, train, mutable, rngs):
  """A 'network' that returns its input as logits, so the loss sees chosen logits."""
  del train, mutable, rngs
  return x * variables['params']['scale'], {'batch_stats': variables['batch_stats']}


def _constructed_batch():
  rng = np.random.RandomState(2)
  num_classes, num_unlabeled = 4, 8
  labeled = rng.randn(3, num_classes) * 2
  weak = np.log(_probs(rng, num_unlabeled, num_classes).astype(np.float64))
  strong = rng.randn(num_unlabeled, num_classes) * 2
  labels = rng.randint(0, num_classes, 3)
  inputs = np.concatenate([labeled, weak, strong]).astype(np.float32)
  state = thresholds.SelfAdaptiveState(
      global_threshold=jnp.float32(0.6), class_probs=jnp.float32([0.4, 0.3, 0.2, 0.1]),
      label_histogram=jnp.float32([0.4, 0.3, 0.2, 0.1]))
  return inputs, labels, state, num_unlabeled


def _loss(momentum, weight, fairness_weight, num_unlabeled):
  return functools.partial(
      fixmatch.loss_fn, apply_fn=_fake_apply, num_unlabeled=num_unlabeled,
      mask_fn=thresholds.self_adaptive_mask(momentum), unlabeled_weight=weight,
      extra_loss=functools.partial(freematch.weighted_fairness_loss, weight=fairness_weight))


def test_loss_on_a_constructed_batch_matches_numpy():
  inputs, labels, state, num_unlabeled = _constructed_batch()
  momentum, weight, fairness_weight = 0.5, 1.5, 0.1
  loss = jax.jit(_loss(momentum, weight, fairness_weight, num_unlabeled))
  total, aux = loss({'scale': jnp.float32(1)}, {}, inputs=inputs, labels=labels,
                    dropout_key=jax.random.key(0), mask_state=state)
  x = inputs.astype(np.float64)
  labeled, weak, strong = x[:3], x[3:3 + num_unlabeled], x[3 + num_unlabeled:]
  p = np.exp(_np_log_softmax(weak))
  pseudo = p.argmax(1)
  tau = momentum * 0.6 + (1 - momentum) * p.max(1).mean()
  p_tilde = momentum * np.array([0.4, 0.3, 0.2, 0.1]) + (1 - momentum) * p.mean(0)
  h_tilde = (momentum * np.array([0.4, 0.3, 0.2, 0.1])
             + (1 - momentum) * np.bincount(pseudo, minlength=4) / num_unlabeled)
  keep = p.max(1) >= tau * p_tilde[pseudo] / p_tilde.max()
  assert 0 < keep.mean() < 1
  ce_strong = -_np_log_softmax(strong)[np.arange(num_unlabeled), pseudo]
  fair = _np_fairness(strong, keep, p_tilde, h_tilde)
  expected = (-_np_log_softmax(labeled)[np.arange(3), labels].mean()
              + weight * np.sum(np.where(keep, ce_strong, 0)) / num_unlabeled
              + fairness_weight * fair)
  np.testing.assert_allclose(float(total), expected, rtol=1e-6)
  np.testing.assert_array_equal(aux[2], keep.astype(np.float32))
  np.testing.assert_allclose(float(aux[7]['fairness_loss']), fair, rtol=1e-6)


def test_pseudo_labels_and_thresholds_carry_no_gradient():
  inputs, labels, state, num_unlabeled = _constructed_batch()
  loss = functools.partial(_loss(0.5, 1.0, 0.1, num_unlabeled), {'scale': jnp.float32(1)}, {},
                           labels=labels, dropout_key=jax.random.key(0), mask_state=state)
  grad = np.asarray(jax.jit(jax.grad(lambda x: loss(inputs=x)[0]))(inputs))
  # The weak views only make targets, thresholds and the fairness loss's statistics.
  assert (grad[3:3 + num_unlabeled] == 0).all()
  assert np.abs(grad[3 + num_unlabeled:]).sum() > 0 and np.abs(grad[:3]).sum() > 0
  # The fairness term alone still reaches the strong views (through p_bar).
  fair_only = _loss(0.5, 0.0, 1.0, num_unlabeled)
  g_fair = jax.jit(jax.grad(lambda x: fair_only(
      {'scale': jnp.float32(1)}, {}, inputs=x, labels=labels, dropout_key=jax.random.key(0),
      mask_state=state)[0]))(inputs)
  assert np.abs(np.asarray(g_fair)[3 + num_unlabeled:]).sum() > 0
  mask_fn = thresholds.self_adaptive_mask(0.5)
  probs = inputs[3:3 + num_unlabeled]
  g = jax.jit(jax.grad(lambda p: thresholds.local_thresholds(
      mask_fn.update(jax.nn.softmax(p), None, state)[1]).sum()))(probs)
  assert (np.asarray(g) == 0).all()


@pytest.fixture(scope='module')
def built(data_dir):
  # Two RandAugment ops (of 14) and a one-stage CNN: the step compiles in seconds.
  config = tiny_config('freematch', **{'data.data_dir': data_dir, 'batch_size': 4,
                                       'freematch.mu': 2,
                                       'freematch.randaugment_ops': ('identity', 'brightness'),
                                       'model.widths': (8,)})
  data = train.load_data(config)
  method = freematch.METHOD.make(config, data)
  state = jax.jit(method.init)(jax.random.key(0))
  rng = np.random.RandomState(0)
  pick = rng.randint(0, len(data.labeled_images), method.labeled_batch)
  unlabeled = rng.randint(0, len(data.unlabeled_images), method.unlabeled_batch)
  batch = {'labeled_images': data.labeled_images[pick], 'labels': data.labeled_labels[pick],
           'unlabeled_images': data.unlabeled_images[unlabeled],
           'unlabeled_indices': unlabeled.astype(np.int32)}
  return config, data, method, state, batch


def test_one_step_updates_the_thresholds_and_resumes_exactly(built, tmp_path):
  config, data, method, state, batch = built
  k, m = data.num_classes, config.freematch.statistics_momentum
  np.testing.assert_array_equal(state.mask_state.class_probs, np.full(k, 1 / k, np.float32))
  new, metrics = jax.jit(method.train_step)(state, batch, jax.random.key(5))
  # tau_1 = m tau_0 + (1 - m) * the batch's mean max probability (logged as max_prob).
  np.testing.assert_allclose(float(new.mask_state.global_threshold),
                             m / k + (1 - m) * float(metrics['max_prob']), rtol=1e-6)
  np.testing.assert_allclose(float(metrics['global_threshold']),
                             float(new.mask_state.global_threshold))
  for field in ('class_probs', 'label_histogram'):  # EMAs of distributions stay ones
    np.testing.assert_allclose(float(getattr(new.mask_state, field).sum()), 1, rtol=1e-6)
  assert set(metrics) >= {'loss', 'mask_rate', 'global_threshold', 'mean_threshold',
                          'fairness_loss'}
  np.testing.assert_allclose(float(metrics['loss']), float(metrics['labeled_loss'])
                             + float(metrics['unlabeled_loss'])
                             + config.freematch.fairness_weight * float(metrics['fairness_loss']),
                             rtol=1e-5)
  assert float(metrics['mask_rate']) > 0  # tau starts at 1/K: most pseudo-labels count
  saver = checkpoint.Checkpointer(str(tmp_path), every=1, keep=1)
  saver.save(1, new)
  restored = saver.restore(jax.jit(method.init)(jax.random.key(1)))
  saver.close()
  assert jax.tree.structure(restored) == jax.tree.structure(new)
  assert_trees_equal(restored, new)


def test_bad_options_fail_before_compiling(data_dir):
  for overrides, match in (({'freematch.mu': 0}, 'mu'),
                           ({'freematch.randaugment_ops': ('rotate', 'nope')}, 'RandAugment'),
                           ({'augment.out_size': 6}, 'out_size')):
    config = tiny_config('freematch', **{'data.data_dir': data_dir, **overrides})
    with pytest.raises(UserError, match=match):
      freematch.METHOD.make(config, train.load_data(config), 10)
