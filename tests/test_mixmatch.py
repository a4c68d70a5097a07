"""MixMatch: sharpening, MixUp with lambda', the interleave and the loss against numpy
under jit; the guesses carry no gradient; the optimiser's kernel-only decay; one
step's effect on the state (BatchNorm from the first interleaved pass); build's refusals."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from conftest import tiny_config
from sslj import preflight, train
from sslj.errors import UserError
from sslj.methods import mixmatch
from sslj.ops import mixup, soft_targets


def _np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _np_sharpen(p, t):
  """MixMatch Eq. 7: p_i^(1/T) / sum_j p_j^(1/T)."""
  s = p ** (1.0 / t)
  return s / s.sum(-1, keepdims=True)


def _np_mix(v, lam, perm):
  """MixMatch Eqs. 8-11: lambda' = max(lambda, 1 - lambda),
  v' = lambda' v + (1 - lambda') v[perm]."""
  lp = np.maximum(lam, 1 - lam).reshape((-1,) + (1,) * (v.ndim - 1))
  return lp * v + (1 - lp) * v[perm]


def test_sharpen_matches_the_equation_and_softmax_at_a_temperature():
  rng = np.random.RandomState(0)
  p = _np_softmax(rng.randn(6, 10) * 2).astype(np.float32)
  for t in (0.5, 0.4, 1.0, 2.0):
    got = np.asarray(jax.jit(soft_targets.sharpen, static_argnums=1)(p, t))
    # float32 powers and a float32 sum against float64: a few ulps.
    np.testing.assert_allclose(got, _np_sharpen(p.astype(np.float64), t), rtol=2e-6, atol=1e-8)
  np.testing.assert_allclose(np.asarray(soft_targets.sharpen(p, 1.0)), p, rtol=1e-6)
  # UDA's form: softmax(z / T) is the sharpened softmax(z).
  z = rng.randn(6, 10).astype(np.float32) * 3
  got = np.asarray(jax.jit(soft_targets.temperature_targets, static_argnums=1)(z, 0.4))
  np.testing.assert_allclose(got, _np_sharpen(_np_softmax(z.astype(np.float64)), 0.4),
                             rtol=1e-5, atol=1e-9)
  assert (_np_sharpen(p, 0.5).max(-1) > p.max(-1)).all()  # T < 1 sharpens


def test_mixup_uses_lambda_prime_and_one_partner_for_inputs_and_targets():
  rng = np.random.RandomState(1)
  x = rng.randn(9, 4, 4, 1).astype(np.float32)
  y = _np_softmax(rng.randn(9, 10)).astype(np.float32)
  lam = rng.uniform(size=9).astype(np.float32)
  lam[:2] = (0.2, 0.8)  # lambda' is the same for lambda and 1 - lambda
  perm = rng.permutation(9).astype(np.int32)
  mx, my, used = jax.jit(mixup.mixup)(x, y, lam, perm)
  np.testing.assert_array_equal(np.asarray(used), np.maximum(lam, 1 - lam))
  assert (np.asarray(used) >= 0.5).all() and float(used[0]) == float(used[1])
  # The same float32 operations: equal up to one ulp (XLA may fuse the multiply-add).
  np.testing.assert_allclose(np.asarray(mx), _np_mix(x, lam, perm), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(my), _np_mix(y, lam, perm), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(my).sum(-1), 1.0, rtol=1e-6)
  # alpha = 0: no mixing at all.
  lam0, perm0 = mixup.sample_mixup(jax.random.key(3), 9, 0.0)
  assert sorted(np.asarray(perm0)) == list(range(9))
  mx0, my0, _ = jax.jit(mixup.mixup)(x, y, lam0, perm0)
  np.testing.assert_array_equal(np.asarray(mx0), x)
  np.testing.assert_array_equal(np.asarray(my0), y)


def test_mixup_draws_follow_beta_and_its_fold_from_the_key():
  draw = jax.jit(mixup.sample_mixup, static_argnums=(1, 2))
  lam, perm = draw(jax.random.key(0), 4000, 0.75)
  lam = np.asarray(lam, np.float64)
  assert sorted(np.asarray(perm)) == list(range(4000))
  assert stats.kstest(lam, stats.beta(0.75, 0.75).cdf).pvalue > 1e-3
  assert stats.kstest(lam, stats.beta(2.0, 2.0).cdf).pvalue < 1e-6  # the test can tell
  # lambda' = max(lambda, 1 - lambda): P(lambda' <= m) = 2 F(m) - 1 on [1/2, 1].
  folded = np.maximum(lam, 1 - lam)
  assert stats.kstest(folded, lambda m: 2 * stats.beta(0.75, 0.75).cdf(m) - 1).pvalue > 1e-3
  # Pure: the same key gives the same draws, another key others.
  again, _ = draw(jax.random.key(0), 4000, 0.75)
  other, _ = draw(jax.random.key(1), 4000, 0.75)
  np.testing.assert_array_equal(np.asarray(again, np.float64), lam)
  assert not np.array_equal(np.asarray(other, np.float64), lam)


def _np_interleave(groups):
  """The code's rule written on lists: swap slice i of batch 0 with slice i of batch i."""
  n, b = len(groups), len(groups[0])
  sizes = [b // n] * n
  for p in range(b % n):
    sizes[-1 - p] += 1
  cuts = np.cumsum([0] + sizes)
  pieces = [[g[cuts[p]:cuts[p + 1]] for p in range(n)] for g in groups]
  for i in range(1, n):
    pieces[0][i], pieces[i][i] = pieces[i][i], pieces[0][i]
  return [np.concatenate(p) for p in pieces]


@pytest.mark.parametrize('batch, groups', [(6, 3), (7, 3), (5, 2), (2, 3)])
def test_interleave_matches_the_rule_and_is_its_own_inverse(batch, groups):
  data = [np.arange(batch) + 100 * g for g in range(groups)]
  got = jax.jit(mixup.interleave)([jnp.asarray(d) for d in data])
  for a, b in zip(got, _np_interleave(data)):
    np.testing.assert_array_equal(np.asarray(a), b)
  back = mixup.interleave(got)
  for a, b in zip(back, data):
    np.testing.assert_array_equal(np.asarray(a), b)
  if batch >= groups:  # the first batch holds a slice of every batch
    assert set(np.asarray(got[0]) // 100) == set(range(groups))


def _fake_apply(variables, x, train, mutable, rngs):
  """A 'network' whose logits are its inputs times a scale: the loss sees chosen logits."""
  del train, mutable, rngs
  return x * variables['params']['scale'], {'batch_stats': variables['batch_stats']}


def _np_mixmatch_loss(labeled, views, labels, lam, perm, t, weight, scale=1.0):
  """Algorithm 1 and Eqs. 2-5 of the paper, in float64."""
  k, _, c = views.shape
  q = _np_sharpen(_np_softmax(views * scale).mean(0), t)
  x = np.concatenate([labeled, views.reshape(-1, c)])
  y = np.concatenate([np.eye(c)[labels]] + [q] * k)
  logits = _np_mix(x, lam, perm) * scale
  ym = _np_mix(y, lam, perm)
  b = len(labels)
  log_p = np.log(_np_softmax(logits[:b]))
  l_x = -np.mean(np.sum(ym[:b] * log_p, -1))
  l_u = np.mean((ym[b:] - _np_softmax(logits[b:])) ** 2)
  return l_x + weight * l_u, l_x, l_u, q


def _constructed_batch(b=6, k=2, c=5, seed=0):
  rng = np.random.RandomState(seed)
  labeled = (rng.randn(b, c) * 2).astype(np.float32)
  views = (rng.randn(k, b, c) * 2).astype(np.float32)
  views[:, :2, 3] += 8  # two unlabeled images with a confident guess
  labels = rng.randint(0, c, b).astype(np.int32)
  lam = rng.beta(0.75, 0.75, b + k * b).astype(np.float32)
  return labeled, views, labels, lam, rng.permutation(b + k * b).astype(np.int32)


@pytest.mark.parametrize('interleave', [True, False])
def test_loss_on_a_constructed_batch_matches_numpy(interleave):
  labeled, views, labels, lam, perm = _constructed_batch()
  loss = jax.jit(functools.partial(mixmatch.loss_fn, apply_fn=_fake_apply, temperature=0.5,
                                   weight=75.0, interleave=interleave))
  total, aux = loss({'scale': jnp.float32(1.0)}, {}, labeled=labeled, views=views,
                    labels=labels, lam=lam, perm=perm, dropout_key=jax.random.key(0))
  want, l_x, l_u, q = _np_mixmatch_loss(labeled.astype(np.float64), views.astype(np.float64),
                                        labels, lam.astype(np.float64), perm, 0.5, 75.0)
  # float32 softmax, logs and means against float64: relative 1e-5.
  np.testing.assert_allclose(float(total), want, rtol=1e-5)
  np.testing.assert_allclose([float(aux[0]), float(aux[1])], [l_x, l_u], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(aux[2]), q, rtol=1e-5, atol=1e-7)
  assert 0 < l_u and q.max(-1)[:2].min() > 0.9  # the confident guesses were sharpened


def test_the_guesses_carry_no_gradient():
  labeled, views, labels, lam, perm = _constructed_batch(seed=2)
  params = {'scale': jnp.float32(0.7)}

  def loss(params, targets=None, weight=75.0):
    return mixmatch.loss_fn(params, {}, _fake_apply, labeled, views, labels, lam, perm,
                            jax.random.key(0), temperature=0.5, weight=weight,
                            interleave=True, targets=targets)

  def leaky(params):
    """What the loss would be if the guess let gradients through."""
    p = jax.nn.softmax(views * params['scale'], -1).mean(0) ** 2
    return loss(params, targets=p / p.sum(-1, keepdims=True))[0]

  @jax.jit
  def gradients(params):
    guess = loss(params)[1][2]
    grad = lambda f: jax.grad(f)(params)['scale']
    return (grad(lambda p: loss(p)[0]),
            grad(lambda p: loss(p, targets=jax.lax.stop_gradient(guess))[0]),
            grad(leaky), grad(lambda p: loss(p, weight=0.0)[0]),
            jax.grad(lambda v: jnp.sum(mixmatch.guess_labels(v, 0.5) * 3.0))(views))

  g, g_const, g_leaky, g_labeled, d_guess = gradients(params)
  # The loss's own guesses and the same fed as constants: the same gradient, bit for bit.
  assert float(g) == float(g_const)
  # The target path itself: d(guess) / d(view logits) is exactly zero.
  assert not np.asarray(d_guess).any()
  # A guess that let gradients through would change it; so does the unlabeled term.
  assert abs(float(g_leaky) - float(g)) > 1e-4
  assert float(g_labeled) != float(g)


def test_unlabeled_weight_ramps_linearly():
  w = jax.jit(lambda s: mixmatch.unlabeled_weight_at(s, unlabeled_weight=75.0, rampup_steps=400))
  for step in (0, 1, 100, 399, 400, 5000):
    assert float(w(step)) == pytest.approx(75.0 * min(step / 400, 1.0), rel=1e-6)
  assert float(w(0)) == 0.0
  assert float(mixmatch.unlabeled_weight_at(0, unlabeled_weight=3.0, rampup_steps=0)) == 3.0


def test_weight_decay_is_decoupled_and_on_kernels_only(data_dir):
  config = tiny_config('mixmatch', **{'data.data_dir': data_dir})
  tx = mixmatch.optimizer(config.optimizer, 100)
  params = {'conv': {'kernel': jnp.full((3, 3), 2.0), 'bias': jnp.full((3,), 2.0)},
            'bn': {'scale': jnp.full((3,), 2.0), 'bias': jnp.full((3,), 2.0)}}
  grads = jax.tree.map(jnp.zeros_like, params)
  grads['conv']['kernel'] = grads['conv']['kernel'].at[0, 0].set(0.5)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  lr, wd = 0.002, 0.02
  # Adam's first step is g / (|g| + eps); the decay is lr * wd * v on kernels only.
  want_kernel = -lr * (np.where(np.asarray(grads['conv']['kernel']) != 0, 0.5 / (0.5 + 1e-8), 0)
                       + wd * 2.0)
  # Adam's bias corrections 1 - b^1 are rounded in float32 (1 - 0.999 by 5e-5): rtol 3e-5.
  np.testing.assert_allclose(np.asarray(updates['conv']['kernel']), want_kernel, rtol=3e-5)
  for leaf in (updates['conv']['bias'], updates['bn']['scale'], updates['bn']['bias']):
    assert not np.asarray(leaf).any()
  # Another optimiser name is the library's (SGD's coupled L2 on every parameter).
  config.unlock()
  config.optimizer.name = 'sgd'
  sgd = mixmatch.optimizer(config.optimizer, 100)
  updates, _ = sgd.update(jax.tree.map(jnp.zeros_like, params), sgd.init(params), params)
  assert np.asarray(updates['bn']['scale']).all()


@pytest.fixture(scope='module')
def built(data_dir):
  """(data, method, state, batch) of a tiny run: 6 labeled + 6 unlabeled images."""
  # K = 1 and one conv stage keep the compiled step small (1 guess pass and 2 interleaved
  # passes of a [conv, BN, ReLU] network); the constructed-batch tests cover K = 2.
  config = tiny_config('mixmatch', **{'data.data_dir': data_dir, 'batch_size': 6,
                                      'mixmatch.num_augmentations': 1, 'model.widths': (8,)})
  data = train.load_data(config)
  method = mixmatch.METHOD.make(config, data)
  rng = np.random.RandomState(0)
  pick = rng.randint(0, len(data.labeled_images), 6)
  rows = rng.randint(0, len(data.unlabeled_images), 6)
  batch = {'labeled_images': data.labeled_images[pick], 'labels': data.labeled_labels[pick],
           'unlabeled_images': data.unlabeled_images[rows],
           'unlabeled_indices': rows.astype(np.int32)}
  return data, method, jax.jit(method.init)(jax.random.key(0)), batch


def test_one_step_updates_params_ema_and_batchnorm_from_the_first_interleaved_pass(built):
  _, method, state, batch = built
  key = jax.random.key(5)
  step = jax.jit(method.train_step)
  new, metrics = step(state, batch, key)
  assert int(new.step) == 1 and int(new.ema.count) == 1
  assert set(metrics) >= {'loss', 'labeled_loss', 'unlabeled_loss', 'unlabeled_weight',
                          'guess_max_prob', 'mixup_lambda'}
  # Step 0 of the ramp: weight 0, the loss is the labeled term.
  assert float(metrics['unlabeled_weight']) == 0.0
  assert float(metrics['loss']) == float(metrics['labeled_loss'])
  assert 0.5 <= float(metrics['mixup_lambda']) <= 1 and float(metrics['unlabeled_loss']) > 0
  # First EMA update has decay 0.5 (ema.decay_at's warm-up); the average is of params only.
  jax.tree.map(lambda e, a, b: np.testing.assert_allclose(e, 0.5 * a + 0.5 * b, rtol=1e-6,
                                                          atol=1e-7),
               new.ema.average, state.params, new.params)
  assert not np.allclose(jax.tree.leaves(new.params)[0], jax.tree.leaves(state.params)[0])
  # The next step: the ramp at 1/rampup_steps of the weight, the EMA's decay min(1 - 1/3, 0.999).
  newer, later = step(new, batch, jax.random.key(6))
  assert float(later['unlabeled_weight']) == pytest.approx(
      75.0 / method.train_step.keywords['rampup_steps'])
  jax.tree.map(lambda e, a, b: np.testing.assert_allclose(e, 2 / 3 * a + 1 / 3 * b, rtol=1e-6,
                                                          atol=1e-7),
               newer.ema.average, new.ema.average, newer.params)

  # The running statistics are those of one training pass over the first interleaved batch.
  kw = method.train_step.keywords
  k_labeled, k_views, k_mix, k_dropout = jax.random.split(key, 4)

  @jax.jit
  def first_pass_stats(batch):
    labeled = kw['preprocess'].train(batch['labeled_images'], k_labeled)
    views = [kw['preprocess'].train(batch['unlabeled_images'], k)
             for k in jax.random.split(k_views, 1)]
    lam, perm = mixup.sample_mixup(k_mix, 12, 0.75)
    x = jnp.concatenate([labeled] + views)
    mixed, _, _ = mixup.mixup(x, jnp.zeros((12, 10)), lam, perm)
    first = mixup.interleave(jnp.split(mixed, 2))[0]
    mixed_key = jax.random.split(k_dropout)[1]
    _, updates = state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats},
                                first, train=True, mutable=['batch_stats'],
                                rngs={'dropout': jax.random.fold_in(mixed_key, 0)})
    return updates['batch_stats']

  want = first_pass_stats(batch)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               new.batch_stats, want)
  assert method.reported_model == 'ema'
  assert mixmatch.reported(new, None, None).variables == {'params': new.ema.average,
                                                          'batch_stats': new.batch_stats}


@pytest.mark.parametrize('overrides, match', [
    ({'mixmatch.num_augmentations': 0}, 'num_augmentations=0'),
    ({'mixmatch.temperature': 0.0}, 'temperature=0.0 must be above 0'),
    ({'mixmatch.alpha': -0.5}, 'alpha=-0.5'),
    ({'mixmatch.rampup_steps': -1}, 'rampup_steps=-1'),
    ({'batch_size': 0}, 'batch_size=0'),
])
def test_build_refuses_bad_settings(data_dir, overrides, match):
  config = tiny_config('mixmatch', **{'data.data_dir': data_dir, **overrides})
  with pytest.raises(UserError, match=match):
    mixmatch.METHOD.make(config, train.load_data(config), 10)


def test_every_label_is_refused(data_dir):
  config = tiny_config('mixmatch', 'labels_per_class=all', **{'data.data_dir': data_dir})
  with pytest.raises(UserError, match='needs unlabeled images'):
    mixmatch.METHOD.make(config, train.load_data(config))


def test_presets_are_in_range_and_cifar10_is_the_codes():
  for arg in ('', 'dataset=fashion_mnist,labels_per_class=10', 'dataset=cifar10'):
    preflight.check_config(tiny_config('mixmatch', arg))
  from conftest import config_of
  c = config_of('mixmatch', 'dataset=cifar10,labels_per_class=25')
  assert (c.model.name, c.batch_size, c.num_steps, c.mixmatch.rampup_steps) == (
      'wrn28_2', 64, 1 << 20, 16384)
  assert (c.optimizer.name, c.optimizer.learning_rate, c.optimizer.weight_decay) == (
      'adam', 0.002, 0.02)
  assert (c.mixmatch.alpha, c.mixmatch.unlabeled_weight, c.mixmatch.temperature,
          c.mixmatch.num_augmentations) == (0.75, 75.0, 0.5, 2)
  f = config_of('mixmatch', 'dataset=fashion_mnist,labels_per_class=10')
  assert 2 * f.batch_size == 64 and f.num_steps == 3000  # FixMatch's 8 + 7 x 8 images a step
