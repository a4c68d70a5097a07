"""UDA: TSA's thresholds and annealed loss, the sharpened KL and the whole loss on a
constructed batch against numpy under jit; the targets carry no gradient; one step's
effect on the state; build's refusals."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import config_of, tiny_config
from sslj import preflight, train
from sslj.errors import UserError
from sslj.methods import uda
from sslj.ops import pseudo_labels, signal_annealing, soft_targets


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_tsa_threshold(schedule, t, k):
  """UDA Sec. 3.2: eta_t = alpha_t (1 - 1/K) + 1/K."""
  alpha = {'linear': t, 'log': 1 - np.exp(-5 * t), 'exp': np.exp(5 * (t - 1)), 'none': 1.0}
  return alpha[schedule] * (1 - 1 / k) + 1 / k


def _np_annealed_ce(logits, labels, eta):
  """Cross-entropy over the examples with p(label) <= eta, divided by max(kept, 1)."""
  log_p = _np_log_softmax(logits)
  n = np.arange(len(labels))
  kept = np.exp(log_p[n, labels]) <= eta
  return np.sum(np.where(kept, -log_p[n, labels], 0.0)) / max(kept.sum(), 1), kept


def _np_kl(weak, strong, t):
  """KL(softmax(z_w / T) || softmax(z_s)) per example."""
  log_p = _np_log_softmax(weak / t)
  return np.sum(np.exp(log_p) * (log_p - _np_log_softmax(strong)), -1)


def _np_uda_loss(labeled, labels, weak, strong, *, eta, threshold, t, weight):
  """UDA's loss (Eq. 1 with TSA, sharpening and confidence masking), in float64."""
  labeled_loss, kept = _np_annealed_ce(labeled, labels, eta)
  mask = np.exp(_np_log_softmax(weak)).max(-1) >= threshold
  unlabeled_loss = np.mean(np.where(mask, _np_kl(weak, strong, t), 0.0))
  return labeled_loss + weight * unlabeled_loss, labeled_loss, unlabeled_loss, mask, kept


@pytest.mark.parametrize('schedule', signal_annealing.SCHEDULES)
def test_tsa_thresholds_match_the_schedules(schedule):
  fn = jax.jit(functools.partial(signal_annealing.threshold, schedule, num_classes=10))
  for t in (0.0, 0.1, 0.37, 0.5, 1.0):
    np.testing.assert_allclose(float(fn(t)), _np_tsa_threshold(schedule, t, 10), rtol=1e-6)
  assert float(fn(1.7)) == pytest.approx(float(fn(1.0)))  # progress is clipped to 1
  if schedule != 'none':
    assert float(fn(0.0)) == pytest.approx(0.1, abs=0.01)  # starts near 1/K
  with pytest.raises(ValueError, match='unknown TSA schedule'):
    signal_annealing.threshold('cosine', 0.5, 10)


def test_annealed_cross_entropy_drops_confident_labels_and_averages_over_the_kept():
  rng = np.random.RandomState(0)
  logits = (rng.randn(8, 5) * 2).astype(np.float32)
  labels = rng.randint(0, 5, 8).astype(np.int32)
  logits[np.arange(3), labels[:3]] += 6  # three examples already fit
  fn = jax.jit(signal_annealing.annealed_cross_entropy)
  for eta in (0.5, 0.9, 1.0, 0.0):
    loss, kept = fn(logits, labels, eta)
    want, want_kept = _np_annealed_ce(logits.astype(np.float64), labels, eta)
    np.testing.assert_array_equal(np.asarray(kept), want_kept.astype(np.float32))
    np.testing.assert_allclose(float(loss), want, rtol=1e-6, atol=1e-7)
  assert 0 < float(fn(logits, labels, 0.5)[1].mean()) < 1
  assert float(fn(logits, labels, 0.0)[0]) == 0.0  # nothing kept: 0, not 0 / 0
  # eta = 1 keeps everything: the plain mean cross-entropy.
  log_p = _np_log_softmax(logits.astype(np.float64))
  np.testing.assert_allclose(float(fn(logits, labels, 1.0)[0]),
                             -log_p[np.arange(8), labels].mean(), rtol=1e-6)


def test_sharpened_kl_matches_numpy():
  rng = np.random.RandomState(1)
  weak = (rng.randn(6, 10) * 3).astype(np.float32)
  strong = (rng.randn(6, 10) * 3).astype(np.float32)
  fn = jax.jit(lambda w, s: soft_targets.kl_divergence(
      soft_targets.temperature_log_targets(w, 0.4), s))
  got = np.asarray(fn(weak, strong))
  # float32 log-softmax against float64: relative 1e-5.
  np.testing.assert_allclose(got, _np_kl(weak.astype(np.float64), strong.astype(np.float64), 0.4),
                             rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(fn(strong * 0.4, strong))).max() < 1e-5  # KL(p || p) = 0


def _fake_apply(variables, x, train, mutable, rngs):
  """A 'network' whose logits are its inputs times a scale: the loss sees chosen logits."""
  del train, mutable, rngs
  return x * variables['params']['scale'], {'batch_stats': variables['batch_stats']}


def _constructed_batch(seed=0, labeled=4, unlabeled=8, k=5):
  rng = np.random.RandomState(seed)
  lab = (rng.randn(labeled, k) * 2).astype(np.float32)
  labels = rng.randint(0, k, labeled).astype(np.int32)
  lab[0, labels[0]] += 6  # one labeled example already fit (TSA drops it)
  weak = (rng.randn(unlabeled, k) * 2).astype(np.float32)
  weak[:3, 2] += 6  # three confident weak views, so the mask is neither all 0 nor all 1
  strong = (rng.randn(unlabeled, k) * 2).astype(np.float32)
  return lab, labels, weak, strong


def _loss(**kw):
  return functools.partial(uda.loss_fn, apply_fn=_fake_apply, num_unlabeled=8,
                           mask_fn=pseudo_labels.fixed_threshold(0.8), temperature=0.4,
                           unlabeled_weight=1.5, **kw)


def test_loss_on_a_constructed_batch_matches_numpy():
  lab, labels, weak, strong = _constructed_batch()
  inputs = np.concatenate([lab, weak, strong])
  eta = float(_np_tsa_threshold('linear', 0.6, 5))
  total, aux = jax.jit(_loss(eta=eta))({'scale': jnp.float32(1)}, {}, inputs=inputs,
                                       labels=labels, dropout_key=jax.random.key(0))
  want, l_lab, l_unl, mask, kept = _np_uda_loss(
      lab.astype(np.float64), labels, weak.astype(np.float64), strong.astype(np.float64),
      eta=eta, threshold=0.8, t=0.4, weight=1.5)
  assert 0 < mask.mean() < 1 and 0 < kept.mean() < 1
  # float32 softmax, logs and means against float64: relative 1e-5.
  np.testing.assert_allclose(float(total), want, rtol=1e-5)
  np.testing.assert_allclose([float(aux[0]), float(aux[1])], [l_lab, l_unl], rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(aux[2]), mask.astype(np.float32))
  np.testing.assert_array_equal(np.asarray(aux[4]), kept.astype(np.float32))
  np.testing.assert_allclose(np.asarray(aux[3]),
                             np.exp(_np_log_softmax(weak.astype(np.float64))).max(-1), rtol=1e-6)


def test_the_targets_carry_no_gradient():
  lab, labels, weak, strong = _constructed_batch(seed=3)
  inputs = jnp.asarray(np.concatenate([lab, weak, strong]))
  params = {'scale': jnp.float32(1)}
  loss = _loss()

  def leaky(x):
    """The unlabeled term if the sharpened target let gradients through."""
    target = jax.nn.log_softmax(x[4:12] / 0.4)
    kl = jnp.sum(jnp.exp(target) * (target - jax.nn.log_softmax(x[12:])), -1)
    return jnp.mean((jax.nn.softmax(x[4:12]).max(-1) >= 0.8) * kl)

  @jax.jit
  def gradients(x):
    total = lambda x: loss(params, {}, inputs=x, labels=labels, dropout_key=jax.random.key(0))[0]
    return jax.grad(total)(x), jax.grad(leaky)(x)

  g, g_leaky = map(np.asarray, gradients(inputs))
  # Through the target and through the mask: the weak views' logits get exactly nothing.
  assert not g[4:12].any()
  assert np.abs(g[12:]).max() > 1e-3 and np.abs(g[:4]).max() > 1e-3
  assert np.abs(g_leaky[4:12]).max() > 1e-3  # what a target without stop_gradient gets


@pytest.fixture(scope='module')
def built(data_dir):
  """(config, method, state, batch) of a tiny run: 4 labeled + 8 unlabeled images."""
  # One conv stage and the identity as the only RandAugment op keep the compiled step
  # small (FixMatch's tests cover RandAugment); TSA on, so its threshold is logged.
  config = tiny_config('uda', **{'data.data_dir': data_dir, 'batch_size': 4, 'uda.mu': 2,
                                 'uda.tsa': 'linear', 'model.widths': (8,),
                                 'uda.randaugment_ops': ('identity',)})
  data = train.load_data(config)
  method = uda.METHOD.make(config, data)
  rng = np.random.RandomState(0)
  pick = rng.randint(0, len(data.labeled_images), 4)
  rows = rng.randint(0, len(data.unlabeled_images), 8)
  batch = {'labeled_images': data.labeled_images[pick], 'labels': data.labeled_labels[pick],
           'unlabeled_images': data.unlabeled_images[rows],
           'unlabeled_indices': rows.astype(np.int32)}
  return config, method, jax.jit(method.init)(jax.random.key(0)), batch


def test_one_step_updates_the_ema_and_logs_the_mask_and_tsa(built):
  config, method, state, batch = built
  step = jax.jit(method.train_step)
  new, metrics = step(state, batch, jax.random.key(5))
  assert int(new.step) == 1 and int(new.ema.count) == 1
  # First EMA update has decay 0.5 (ema.decay_at's warm-up), parameters and statistics.
  expected = jax.tree.map(lambda e, p: 0.5 * e + 0.5 * p, state.ema.average,
                          {'params': new.params, 'batch_stats': new.batch_stats})
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               new.ema.average, expected)
  assert not np.allclose(jax.tree.leaves(new.params)[0], jax.tree.leaves(state.params)[0])
  assert set(metrics) >= {'loss', 'labeled_loss', 'unlabeled_loss', 'mask_rate', 'max_prob',
                          'tsa_threshold', 'tsa_kept'}
  np.testing.assert_allclose(float(metrics['loss']), float(metrics['labeled_loss'])
                             + float(metrics['unlabeled_loss']), rtol=1e-6)
  # Step 0 of 12 under the linear schedule: eta = 1/K.
  assert float(metrics['tsa_threshold']) == pytest.approx(0.1)
  newer, later = step(new, batch, jax.random.key(6))
  assert float(later['tsa_threshold']) == pytest.approx(0.1 + 0.9 / config.num_steps)
  # Second EMA update: decay min(1 - 1/3, 0.999) = 2/3.
  expected = jax.tree.map(lambda e, p: 2 / 3 * e + 1 / 3 * p, new.ema.average,
                          {'params': newer.params, 'batch_stats': newer.batch_stats})
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               newer.ema.average, expected)
  assert 0 <= float(metrics['mask_rate']) <= 1 and 0 < float(metrics['tsa_kept']) <= 1
  out = jax.jit(method.predict)(new, batch['unlabeled_images'])
  assert set(out) == {'model', 'ema'} and method.reported_model == 'ema'
  assert uda.reported(new, None, None).variables == dict(new.ema.average)


@pytest.mark.parametrize('overrides, match', [
    ({'uda.threshold': 1.5}, 'uda.threshold=1.5 is a probability'),
    ({'uda.temperature': 0.0}, 'uda.temperature=0.0 must be above 0'),
    ({'uda.tsa': 'cosine'}, "uda.tsa='cosine' is unknown"),
    ({'uda.mu': 0}, 'uda.mu=0'),
    ({'uda.randaugment_ops': ('rotate', 'nope')}, 'unknown RandAugment op'),
    ({'uda.cutout': 1.5}, 'cutout=1.5 is a fraction'),
    ({'augment.out_size': 16}, 'does not support augment.out_size'),
])
def test_build_refuses_bad_settings(data_dir, overrides, match):
  config = tiny_config('uda', **{'data.data_dir': data_dir, **overrides})
  with pytest.raises(UserError, match=match):
    uda.METHOD.make(config, train.load_data(config), 10)


def test_every_label_is_refused(data_dir):
  config = tiny_config('uda', 'labels_per_class=all', **{'data.data_dir': data_dir})
  with pytest.raises(UserError, match='needs unlabeled images'):
    uda.METHOD.make(config, train.load_data(config))


def test_presets_are_in_range_and_cifar10_is_the_codes():
  for arg in ('', 'dataset=fashion_mnist,labels_per_class=10', 'dataset=cifar10'):
    preflight.check_config(tiny_config('uda', arg))
  c = config_of('uda', 'dataset=cifar10,labels_per_class=400')
  assert (c.model.name, c.batch_size, c.uda.mu, c.num_steps, c.uda.ema_decay) == (
      'wrn28_2', 64, 5, 400000, 0.9999)
  assert (c.uda.temperature, c.uda.threshold, c.uda.unlabeled_weight, c.uda.tsa) == (
      0.4, 0.8, 1.0, 'none')
  assert (c.optimizer.learning_rate, c.optimizer.weight_decay, c.optimizer.schedule) == (
      0.03, 5e-4, 'truncated_cosine')
  assert c.optimizer.decay == 'all'   # the code's L2 term covers every trainable variable
  f = config_of('uda', 'dataset=fashion_mnist,labels_per_class=10')
  assert (f.batch_size, f.uda.mu, f.num_steps) == (8, 7, 3000)  # FixMatch's preset
