"""VAT: the normalisation and the power iteration against numpy, the loss, the stopped
gradients, one step's effect on the state (BatchNorm), build's refusals, the presets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import config_of, tiny_config
from sslj import train
from sslj.errors import UserError
from sslj.methods import vat
from sslj.ops import adversarial, consistency


def _np_softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def _np_normalize(d):
  """vat_tf's get_normalized_vector, per example, in float64."""
  d = np.asarray(d, np.float64)
  axes = tuple(range(1, d.ndim))
  d = d / (1e-12 + np.abs(d).max(axis=axes, keepdims=True))
  return d / np.sqrt(1e-6 + (d ** 2).sum(axis=axes, keepdims=True))


def test_normalize_matches_numpy_per_example_over_every_dimension():
  rng = np.random.RandomState(0)
  d = rng.randn(5, 3, 3, 2).astype(np.float32)
  d[1] *= 1e-9           # a tiny gradient still comes out of norm 1 (the max-abs step)
  d[2] *= 1e6
  d[3] = 0.0             # stays zero, no NaN
  d[4] *= 1e-30          # below the 1e-12 floor the norm shrinks, as in vat_tf
  got = np.asarray(jax.jit(adversarial.normalize)(d))
  np.testing.assert_allclose(got, _np_normalize(d), rtol=1e-6, atol=1e-7)
  norms = np.sqrt((got.astype(np.float64) ** 2).sum(axis=(1, 2, 3)))
  np.testing.assert_allclose(norms[:3], 1.0, rtol=1e-5)
  assert np.all(got[3] == 0) and norms[4] < 1e-10
  # Without the max-abs step, sqrt(1e-6 + sum d^2) would shrink example 1 to ~1e-5.
  assert np.sqrt((d[1].astype(np.float64) ** 2).sum() / (1e-6 + (d[1].astype(np.float64) ** 2).sum())) < 1e-4
  # Per example: the other examples do not change one's direction.
  np.testing.assert_allclose(got[0], _np_normalize(d[:1])[0], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(adversarial.example_norms(d[:3])),
                             np.sqrt((d[:3].astype(np.float64) ** 2).sum(axis=(1, 2, 3))),
                             rtol=1e-5)


# A linear-softmax "network" on [B, 2, 3, 2] inputs: logits = flatten(x) W^T. The
# KL to its clean prediction has, per example, the Hessian W^T (diag(p) - p p^T) W / B
# at r = 0 (the batch mean divides by B), and the examples do not interact.
B, SHAPE, K = 3, (2, 3, 2), 5
D = int(np.prod(SHAPE))


def _linear_problem(seed=0):
  rng = np.random.RandomState(seed)
  w = rng.randn(K, D).astype(np.float32)
  x = rng.randn(B, *SHAPE).astype(np.float32) * 0.5
  d0 = rng.randn(B, *SHAPE).astype(np.float32)
  return w, x, d0


def _divergence(w, x):
  logits = lambda inputs: inputs.reshape(len(inputs), -1) @ w.T
  target = jax.lax.stop_gradient(logits(x))
  return lambda r: consistency.softmax_kl(logits(x + r), target)


def _np_gradient(w, x, r):
  """grad_r of mean_b KL(q_b || softmax(W (x_b + r_b))) = W^T (p_b - q_b) / B."""
  w, x, r = (np.asarray(a, np.float64) for a in (w, x, r))
  q = _np_softmax(x.reshape(B, -1) @ w.T)
  p = _np_softmax((x + r).reshape(B, -1) @ w.T)
  return ((p - q) @ w / B).reshape(x.shape)


def _cosines(a, b):
  a = np.asarray(a, np.float64).reshape(len(a), -1)
  b = np.asarray(b, np.float64).reshape(len(b), -1)
  return np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_one_power_iteration_is_the_finite_difference_formula():
  w, x, d0 = _linear_problem()
  xi, epsilon = 1e-2, 2.5  # xi large enough that float32's cancellation in p - q is ~1e-5
  fn = jax.jit(lambda w, x, d: adversarial.virtual_adversarial_perturbation(
      _divergence(w, x), d, xi=xi, epsilon=epsilon, num_iters=1))
  r_adv, g = fn(w, x, d0)
  want_g = _np_gradient(w, x, xi * _np_normalize(d0))
  np.testing.assert_allclose(np.asarray(g), want_g, rtol=2e-3, atol=1e-6 * np.abs(want_g).max())
  np.testing.assert_allclose(np.asarray(r_adv), epsilon * _np_normalize(want_g), atol=1e-4)
  np.testing.assert_allclose(np.asarray(adversarial.example_norms(r_adv)), epsilon, rtol=1e-5)


def test_power_iterations_converge_to_the_top_eigenvector_of_the_hessian():
  w, x, d0 = _linear_problem(1)
  w64 = w.astype(np.float64)
  p = _np_softmax(x.reshape(B, -1).astype(np.float64) @ w64.T)
  tops = []
  for pb in p:
    hessian = w64.T @ (np.diag(pb) - np.outer(pb, pb)) @ w64 / B
    values, vectors = np.linalg.eigh(hessian)
    assert values[-2] / values[-1] < 0.8   # a gap, so 40 iterations converge to ~1e-4
    tops.append(vectors[:, -1])
  tops = np.stack(tops)

  def direction(num_iters):
    fn = jax.jit(lambda w, x, d: adversarial.power_iteration(
        _divergence(w, x), d, xi=1e-3, num_iters=num_iters)[0])
    return np.asarray(fn(w, x, d0))

  many = np.abs(_cosines(direction(40), tops))
  assert np.all(many > 0.9999), many
  one = np.abs(_cosines(direction(1), tops))
  assert one.min() < 0.99, one   # so the test tells the iterations apart
  # One iteration from d0 is H d0 normalised (the finite difference's first order).
  h_d0 = np.stack([w64.T @ (np.diag(pb) - np.outer(pb, pb)) @ w64 @ db.ravel()
                   for pb, db in zip(p, _np_normalize(d0))])
  np.testing.assert_allclose(_cosines(direction(1), h_d0), 1.0, atol=1e-5)


def test_power_iteration_refuses_no_iterations():
  with pytest.raises(ValueError, match='num_iters=0'):
    adversarial.power_iteration(lambda r: jnp.sum(r ** 2), jnp.ones((1, 2)), xi=1e-6,
                                num_iters=0)


def _np_objective(labeled, labels, clean, adv, weight, entropy_weight):
  n = len(labels)
  log_l = np.log(_np_softmax(labeled))
  ce = -np.mean(log_l[np.arange(n), labels])
  q, p = _np_softmax(clean), _np_softmax(adv)
  kl = np.mean(np.sum(q * (np.log(q) - np.log(p)), -1))      # KL(clean || perturbed)
  ent = np.mean(-np.sum(q * np.log(q), -1))
  return ce + weight * kl + entropy_weight * ent, ce, kl, ent


def _logits(seed=2):
  rng = np.random.RandomState(seed)
  labeled = (rng.randn(4, 10) * 2).astype(np.float32)
  labels = rng.randint(0, 10, 4).astype(np.int32)
  clean = (rng.randn(12, 10) * 3).astype(np.float32)
  adv = (clean + rng.randn(12, 10)).astype(np.float32)
  return labeled, labels, clean, adv


def test_objective_matches_numpy_under_jit():
  labeled, labels, clean, adv = _logits()
  loss, (ce, kl, ent) = jax.jit(vat.vat_objective)(labeled, labels, clean, adv, 0.7, 0.06)
  want = _np_objective(*(a.astype(np.float64) if a.dtype == np.float32 else a
                         for a in (labeled, labels, clean, adv)), 0.7, 0.06)
  np.testing.assert_allclose([float(loss), float(ce), float(kl), float(ent)], want, rtol=1e-5)


def test_the_clean_target_carries_no_gradient_but_the_entropy_does():
  labeled, labels, clean, adv = _logits()

  def grads(entropy_weight):
    f = lambda c, a: vat.vat_objective(labeled, labels, c, a, 1.0, entropy_weight)[0]
    return jax.jit(jax.grad(f, argnums=(0, 1)))(clean, adv)

  through_clean, through_adv = grads(0.0)
  assert np.all(np.asarray(through_clean) == 0)           # the KL's target is a constant
  q, p = _np_softmax(clean.astype(np.float64)), _np_softmax(adv.astype(np.float64))
  np.testing.assert_allclose(np.asarray(through_adv), (p - q) / len(clean), rtol=1e-4, atol=1e-7)
  with_entropy, _ = grads(0.5)
  entropy_grad = jax.grad(vat.entropy)(clean)
  np.testing.assert_allclose(np.asarray(with_entropy), 0.5 * np.asarray(entropy_grad),
                             rtol=1e-6, atol=1e-9)
  assert np.abs(np.asarray(entropy_grad)).max() > 0


def test_the_perturbation_carries_no_gradient_into_the_parameters():
  # d loss / dW with r_adv computed from W inside equals it with r_adv a constant.
  w, x, d0 = _linear_problem(3)
  perturbation = lambda w: adversarial.virtual_adversarial_perturbation(
      _divergence(w, x), d0, xi=1e-2, epsilon=1.0)[0]

  def leaky(w):  # the same r_adv with its gradient left in: what the stops prevent
    g = jax.grad(_divergence(w, x))(1e-2 * adversarial.normalize(d0))
    return adversarial.normalize(g)

  inside = jax.jit(jax.grad(lambda w: _divergence(w, x)(perturbation(w))))(w)
  r_adv = jax.jit(perturbation)(w)
  constant = jax.jit(jax.grad(lambda w, r: _divergence(w, x)(r)))(w, r_adv)
  leaked = jax.jit(jax.grad(lambda w: _divergence(w, x)(leaky(w))))(w)
  np.testing.assert_allclose(np.asarray(inside), np.asarray(constant), rtol=1e-5, atol=1e-8)
  assert np.abs(np.asarray(leaked) - np.asarray(constant)).max() > 1e-2 * np.abs(
      np.asarray(constant)).max()


def test_warmup_is_linear_over_its_steps_or_constant():
  w = jax.jit(lambda s: vat.warmup_weight(s, unlabeled_weight=2.0, warmup_steps=40))
  for step in (0, 10, 39, 40, 400):
    assert float(w(step)) == pytest.approx(2.0 * min(1.0, step / 40), rel=1e-6)
  assert float(vat.warmup_weight(0, unlabeled_weight=2.0, warmup_steps=0)) == 2.0


@pytest.fixture(scope='module')
def built(data_dir):
  """(method, state, batches, step) of a tiny run with dropout: 4 labeled + 8 unlabeled.

  xi = 1e-2 instead of 1e-6: at 1e-6 the float32 finite difference amplifies the
  last-bit differences between two compilations of the same passes (0.3% in the
  VAT loss), and a test that recomputes the step's loss needs it robust.
  """
  config = tiny_config('vat', **{'data.data_dir': data_dir, 'batch_size': 4, 'vat.mu': 2,
                                 'vat.xi': 1e-2, 'model.dropout_rate': 0.5,
                                 # Input noise instead of translations: the step's input
                                 # streams still matter, and it compiles in less time.
                                 'augment.pad_crop': 0, 'augment.noise_std': 0.1})
  data = train.load_data(config)
  method = vat.METHOD.make(config, data)
  rng = np.random.RandomState(0)
  batches = []
  for _ in range(3):
    li = rng.randint(0, len(data.labeled_images), 4)
    ui = rng.randint(0, len(data.unlabeled_images), 8)
    batches.append({'labeled_images': data.labeled_images[li], 'labels': data.labeled_labels[li],
                    'unlabeled_images': data.unlabeled_images[ui],
                    'unlabeled_indices': jnp.asarray(ui, jnp.int32)})
  # The weights as arguments, so that one compilation serves every test.
  step = jax.jit(lambda s, b, k, w, e: method.train_step(s, b, k, unlabeled_weight=w,
                                                        entropy_weight=e))
  return method, jax.jit(method.init)(jax.random.key(0)), batches, step


def _forward(state, params, inputs, dropout_key):
  return state.apply_fn({'params': params, 'batch_stats': state.batch_stats}, inputs,
                        train=True, mutable=['batch_stats'], rngs={'dropout': dropout_key})


def _reference(method, state, batch, key):
  """What one step should do, recomputed from its pieces with the step's keys and noise
  (drawn as `vat.train_step` draws them): {name: value}."""
  kw = method.train_step.keywords
  k_l, k_u, k_drop_l, k_drop_u, k_d = jax.random.split(key, 5)
  x_l = kw['preprocess'].train(batch['labeled_images'], k_l)
  x = kw['preprocess'].train(batch['unlabeled_images'], k_u)
  d = jax.random.normal(k_d, x.shape, x.dtype)
  # One dropout key for the clean and both perturbed passes; training mode throughout.
  clean, unlabeled_stats = _forward(state, state.params, x, k_drop_u)
  div = lambda r: consistency.softmax_kl(_forward(state, state.params, x + r, k_drop_u)[0],
                                         clean)
  r_adv, g = adversarial.virtual_adversarial_perturbation(
      div, d, xi=kw['xi'], epsilon=kw['epsilon'], num_iters=kw['num_power_iterations'])

  def ce(params):
    logits, stats = _forward(state, params, x_l, k_drop_l)
    return -jax.nn.log_softmax(logits)[jnp.arange(len(x_l)), batch['labels']].mean(), stats

  grads, labeled_stats = jax.grad(ce, has_aux=True)(state.params)
  return {'labeled_stats': labeled_stats['batch_stats'],
          'unlabeled_stats': unlabeled_stats['batch_stats'],
          'vat_loss': div(r_adv), 'entropy': vat.entropy(clean),
          'power_gradient_norm': adversarial.example_norms(g).mean(),
          'supervised_params': state.apply_gradients(grads, state.batch_stats).params}


def _flat(tree):
  return np.concatenate([np.ravel(v) for v in jax.tree_util.tree_leaves(tree)])


@pytest.fixture(scope='module')
def stepped(built):
  """[(state, batch, metrics, new state, reference)] of three steps from the initial state,
  and the zero-weight step from it; one compilation each of the step and the reference."""
  method, state, batches, step = built
  reference = jax.jit(lambda s, b, k: _reference(method, s, b, k))
  steps = []
  for i, batch in enumerate(batches):
    key = jax.random.key(10 + i)
    new, metrics = step(state, batch, key, 1.0, 0.06)
    steps.append((state, batch, metrics, new, reference(state, batch, key)))
    state = new
  plain = step(steps[0][0], batches[0], jax.random.key(10), 0.0, 0.0)
  return steps, plain


def test_batchnorm_statistics_are_the_labeled_pass_alone_over_steps(stepped):
  for i, (_, _, metrics, new, ref) in enumerate(stepped[0]):
    np.testing.assert_allclose(_flat(new.batch_stats), _flat(ref['labeled_stats']), rtol=1e-6,
                               atol=1e-7)
    assert not np.allclose(_flat(new.batch_stats), _flat(ref['unlabeled_stats']), atol=1e-4)
    assert np.isfinite(float(metrics['loss'])) and int(new.step) == i + 1


def test_one_step_vat_loss_is_the_train_mode_target_at_the_adversarial_point(built, stepped):
  epsilon = built[0].train_step.keywords['epsilon']
  for _, _, metrics, _, ref in stepped[0]:
    # rtol 1e-3: g = J^T (p(x + xi d) - q) is a difference of nearly equal float32
    # probabilities (p - q ~ 1e-3 of p at xi = 1e-2), so the two compilations' last bits
    # reach it at ~1e-4; a different dropout mask or BatchNorm mode changes it by far more.
    for name in ('vat_loss', 'power_gradient_norm'):
      np.testing.assert_allclose(float(metrics[name]), float(ref[name]), rtol=1e-3)
    np.testing.assert_allclose(float(metrics['entropy']), float(ref['entropy']), rtol=1e-6)
    assert float(metrics['vat_loss']) > 0 and float(metrics['power_gradient_norm']) > 0
    np.testing.assert_allclose(float(metrics['r_adv_norm']), epsilon, rtol=1e-5)
    assert 0 <= float(metrics['adversarial_changed']) <= 1


def test_with_zero_weights_a_step_is_the_supervised_step(stepped):
  steps, (plain, metrics) = stepped
  _, _, _, full, ref = steps[0]
  assert float(metrics['loss']) == pytest.approx(float(metrics['class_loss']), rel=1e-6)
  np.testing.assert_allclose(_flat(plain.params), _flat(ref['supervised_params']), rtol=1e-5,
                             atol=1e-6)
  assert not np.allclose(_flat(plain.params), _flat(full.params))


@pytest.mark.parametrize('overrides, match', [
    ({'vat.epsilon': 0.0}, 'vat.epsilon=0.0 must be above 0'),
    ({'vat.xi': 0.0}, 'vat.xi=0.0 must be above 0'),
    ({'vat.num_power_iterations': 0}, 'vat.num_power_iterations=0 must be a whole number'),
    ({'vat.warmup_fraction': 1.5}, 'vat.warmup_fraction=1.5 is a fraction'),
    ({'vat.mu': 0}, 'vat.mu=0 .unlabeled per labeled. must be positive integers'),
])
def test_build_refuses_bad_settings(data_dir, overrides, match):
  config = tiny_config('vat', **{'data.data_dir': data_dir, **overrides})
  with pytest.raises(UserError, match=match):
    vat.METHOD.make(config, train.load_data(config))


def test_every_label_is_refused(data_dir):
  config = tiny_config('vat', 'labels_per_class=all', **{'data.data_dir': data_dir})
  with pytest.raises(UserError, match='needs unlabeled images'):
    vat.METHOD.make(config, train.load_data(config))


def test_presets_follow_the_references():
  digits = config_of('vat')
  assert (digits.num_steps, digits.batch_size) == (config_of('fixmatch').num_steps, 16)
  assert digits.vat.xi == 1e-6 and digits.vat.num_power_iterations == 1
  fashion = config_of('vat', 'dataset=fashion_mnist,labels_per_class=10')
  assert (fashion.num_steps, fashion.batch_size * (1 + fashion.vat.mu)) == (3000, 64)
  cifar = config_of('vat', 'dataset=cifar10,labels_per_class=400')
  assert cifar.model.name == 'wrn28_2' and cifar.num_steps == 1 << 20
  assert (cifar.batch_size, cifar.vat.mu, cifar.vat.epsilon, cifar.vat.xi) == (64, 1, 6.0, 1e-6)
  assert (cifar.vat.entropy_weight, cifar.vat.warmup_fraction) == (0.06, 0.4)
  assert cifar.optimizer.schedule == 'truncated_cosine' and cifar.optimizer.learning_rate == 0.03
  # USB's optimiser skips BatchNorm and biases, on every preset.
  assert digits.optimizer.decay == fashion.optimizer.decay == cifar.optimizer.decay == 'kernels'
