"""FlexMatch: sigma_c, beta_c and M against numpy, the record over steps, the loss, a step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_trees_equal, tiny_config
from sslj import checkpoint, train
from sslj.errors import UserError
from sslj.methods import fixmatch, flexmatch
from sslj.ops import thresholds


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_beta(selected, num_classes, warmup, previous):
  """The paper's sigma_t(c) and beta_t(c) (with the warm-up's N - sum sigma), float64;
  kept at `previous` while one entry holds every image, as the reference code."""
  sigma = np.array([(selected == c).sum() for c in range(num_classes)], np.float64)
  unused = (selected == -1).sum()
  if max(sigma.max(), unused) == len(selected):
    return previous
  return sigma / (max(sigma.max(), unused) if warmup else sigma.max())


def _np_curriculum(probs_steps, index_steps, num_unlabeled, tau, warmup):
  """FlexMatch over several steps: (mask, record, beta) after each, in float64."""
  num_classes = probs_steps[0].shape[1]
  selected = -np.ones(num_unlabeled, np.int64)
  beta = np.zeros(num_classes)
  out = []
  for probs, indices in zip(probs_steps, index_steps):
    probs = probs.astype(np.float64)
    max_prob, label = probs.max(1), probs.argmax(1)
    class_threshold = tau * beta / (2 - beta)         # T_t(c) = M(beta_t(c)) tau
    mask = max_prob >= class_threshold[label]
    for b in range(len(indices)):                     # in batch order: the last one wins
      if max_prob[b] >= tau:
        selected[indices[b]] = label[b]
    beta = _np_beta(selected, num_classes, warmup, beta)
    out.append((mask, selected.copy(), beta.copy(), class_threshold[label], max_prob))
  return out


def _peaked_probs(rng, batch, num_classes):
  """Probabilities from flat to peaked, so that thresholds keep some and drop others."""
  logits = rng.randn(batch, num_classes) * rng.uniform(0.3, 4.0, (batch, 1))
  return np.exp(_np_log_softmax(logits)).astype(np.float32)


def test_convex_mapping_and_learning_effect_are_the_papers():
  m = jax.jit(thresholds.convex_mapping)(jnp.array([0.0, 0.5, 1.0, 0.25], jnp.float32))
  np.testing.assert_array_equal(m, np.array([0, 1 / 3, 1, 0.25 / 1.75], np.float32))
  beta = jax.jit(thresholds.normalized_learning_effect, static_argnums=(1, 2))
  previous = jnp.full((3,), 0.5, jnp.float32)
  mixed = jnp.array([-1, -1, -1, 0, 0, 1], jnp.int32)  # 3 unused, sigma = (2, 1, 0)
  np.testing.assert_array_equal(beta(mixed, 3, True, previous), np.float32([2 / 3, 1 / 3, 0]))
  np.testing.assert_array_equal(beta(mixed, 3, False, previous), np.float32([1, 0.5, 0]))
  # One entry holding all N images leaves beta as it was (all unused at the start,
  # or every image recorded with one class).
  for record in ([-1] * 6, [2] * 6):
    for warmup in (True, False):
      np.testing.assert_array_equal(beta(jnp.array(record, jnp.int32), 3, warmup, previous),
                                    previous)


@pytest.mark.parametrize('warmup', [True, False])
def test_record_and_thresholds_follow_numpy_over_steps(warmup):
  rng = np.random.RandomState(0)
  num_unlabeled, num_classes, batch, tau = 10, 4, 6, 0.7
  probs_steps = [_peaked_probs(rng, batch, num_classes) for _ in range(6)]
  index_steps = [rng.randint(0, num_unlabeled, batch).astype(np.int32) for _ in range(6)]
  # Step 2 draws image 3 twice, both confident, with different classes: the later wins.
  index_steps[2][:2] = 3
  probs_steps[2][0] = np.float32([0.97, 0.01, 0.01, 0.01])
  probs_steps[2][1] = np.float32([0.01, 0.01, 0.97, 0.01])
  mask_fn = thresholds.curriculum_mask(tau, warmup=warmup)
  state = mask_fn.init(num_unlabeled, num_classes)
  update = jax.jit(mask_fn.update)
  expected = _np_curriculum(probs_steps, index_steps, num_unlabeled, tau, warmup)
  seen_partial_mask = False
  for step, (probs, indices) in enumerate(zip(probs_steps, index_steps)):
    mask, state = update(probs, indices, state)
    want_mask, want_selected, want_beta, threshold, max_prob = expected[step]
    assert np.abs(max_prob - threshold).min() > 1e-5  # no comparison decided by rounding
    np.testing.assert_array_equal(mask, want_mask.astype(np.float32))
    np.testing.assert_array_equal(state.selected, want_selected)
    # beta is one float32 division of counts: exact; M and tau are float32 products.
    np.testing.assert_array_equal(state.learning_effect, want_beta.astype(np.float32))
    seen_partial_mask |= 0 < want_mask.mean() < 1
    if step == 2:
      assert int(state.selected[3]) == 2
  assert seen_partial_mask
  assert 0 < (expected[-1][1] >= 0).mean() < 1  # some images used, some not
  described = jax.jit(mask_fn.describe)(state)
  class_threshold = tau * expected[-1][2] / (2 - expected[-1][2])
  np.testing.assert_allclose(described['mean_threshold'], class_threshold.mean(), rtol=1e-6)
  np.testing.assert_allclose(described['min_threshold'], class_threshold.min(), rtol=1e-6)
  np.testing.assert_allclose(described['unused_fraction'], (expected[-1][1] < 0).mean())


def _fake_apply(variables, x, train, mutable, rngs):
  """A 'network' that returns its input as logits, so the loss sees chosen logits."""
  del train, mutable, rngs
  return x * variables['params']['scale'], {'batch_stats': variables['batch_stats']}


def _constructed_batch():
  """Logits of 3 labeled, 8 weak and 8 strong views, and a record that gives the
  classes different thresholds (beta = 1, 0.5, 0, 0, 0 with the warm-up)."""
  rng = np.random.RandomState(1)
  num_classes, num_unlabeled = 5, 8
  labeled = rng.randn(3, num_classes) * 2
  # Weak views as log-probabilities: (class, max p) per row, the rest spread evenly.
  # Thresholds 0.6 tau-scaled: class 0 needs 0.6, class 1 0.2, the others 0.
  rows = [(0, 0.9), (0, 0.5), (1, 0.3), (1, 0.45), (0, 0.55), (2, 0.25), (3, 0.97), (0, 0.7)]
  weak = np.empty((num_unlabeled, num_classes))
  for row, (c, top) in enumerate(rows):
    weak[row] = (1 - top) / (num_classes - 1)
    weak[row, c] = top
  weak = np.log(weak)
  strong = rng.randn(num_unlabeled, num_classes) * 2
  labels = rng.randint(0, num_classes, 3)
  inputs = np.concatenate([labeled, weak, strong]).astype(np.float32)
  selected = np.array([0] * 4 + [1] * 2 + [-1] * 2, np.int32)  # N = 8: 4, 2, 0, ... unused 2
  state = thresholds.CurriculumState(selected=jnp.asarray(selected),
                                     learning_effect=jnp.float32([1, 0.5, 0, 0, 0]))
  return inputs, labels, state, num_unlabeled


def test_loss_on_a_constructed_batch_matches_numpy():
  inputs, labels, state, num_unlabeled = _constructed_batch()
  tau, weight = 0.6, 1.5
  loss = jax.jit(functools.partial(
      fixmatch.loss_fn, apply_fn=_fake_apply, num_unlabeled=num_unlabeled,
      mask_fn=thresholds.curriculum_mask(tau), unlabeled_weight=weight))
  indices = np.arange(num_unlabeled, dtype=np.int32)
  total, aux = loss({'scale': jnp.float32(1)}, {}, inputs=inputs, labels=labels,
                    dropout_key=jax.random.key(0), mask_state=state, indices=indices)
  x = inputs.astype(np.float64)
  labeled, weak, strong = x[:3], x[3:3 + num_unlabeled], x[3 + num_unlabeled:]
  p = np.exp(_np_log_softmax(weak))
  pseudo = p.argmax(1)
  beta = np.array([1, 0.5, 0, 0, 0])
  keep = p.max(1) >= tau * beta[pseudo] / (2 - beta[pseudo])
  np.testing.assert_array_equal(keep, [1, 0, 1, 1, 0, 1, 1, 1])
  ce_strong = -_np_log_softmax(strong)[np.arange(num_unlabeled), pseudo]
  expected = (-_np_log_softmax(labeled)[np.arange(3), labels].mean()
              + weight * np.sum(np.where(keep, ce_strong, 0)) / num_unlabeled)
  np.testing.assert_allclose(float(total), expected, rtol=1e-6)
  np.testing.assert_array_equal(aux[2], keep.astype(np.float32))
  # The record took in the confident weak views (max p >= tau), beta followed.
  want = np.asarray(state.selected).copy()
  want[p.max(1) >= tau] = pseudo[p.max(1) >= tau]
  np.testing.assert_array_equal(aux[6].selected, want)
  np.testing.assert_array_equal(aux[6].learning_effect,
                                _np_beta(want, 5, True, beta).astype(np.float32))


def test_pseudo_labels_and_thresholds_carry_no_gradient():
  inputs, labels, state, num_unlabeled = _constructed_batch()
  loss = functools.partial(fixmatch.loss_fn, {'scale': jnp.float32(1)}, {}, _fake_apply,
                           labels=labels, dropout_key=jax.random.key(0),
                           num_unlabeled=num_unlabeled, mask_fn=thresholds.curriculum_mask(0.6),
                           mask_state=state, indices=np.arange(num_unlabeled, dtype=np.int32),
                           unlabeled_weight=1.0)
  grad = np.asarray(jax.jit(jax.grad(lambda x: loss(x)[0]))(inputs))
  # The weak views only make targets and thresholds: no gradient reaches them.
  # (The thresholds themselves are counts of the record, integers.)
  assert (grad[3:3 + num_unlabeled] == 0).all()
  assert np.abs(grad[3 + num_unlabeled:]).sum() > 0 and np.abs(grad[:3]).sum() > 0


@pytest.fixture(scope='module')
def built(data_dir):
  # threshold 0: every weak view passes tau, so the first step records every
  # image of its batch.
  # Two RandAugment ops (of 14) and a one-stage CNN: the step compiles in seconds.
  config = tiny_config('flexmatch', **{'data.data_dir': data_dir, 'batch_size': 4,
                                       'flexmatch.mu': 2, 'flexmatch.threshold': 0.0,
                                       'flexmatch.randaugment_ops': ('identity', 'brightness'),
                                       'model.widths': (8,)})
  data = train.load_data(config)
  method = flexmatch.METHOD.make(config, data)
  state = jax.jit(method.init)(jax.random.key(0))
  rng = np.random.RandomState(0)
  pick = rng.randint(0, len(data.labeled_images), method.labeled_batch)
  unlabeled = rng.choice(len(data.unlabeled_images), method.unlabeled_batch, replace=False)
  batch = {'labeled_images': data.labeled_images[pick], 'labels': data.labeled_labels[pick],
           'unlabeled_images': data.unlabeled_images[unlabeled],
           'unlabeled_indices': unlabeled.astype(np.int32)}
  return config, data, method, state, batch


def test_one_step_records_its_batch_and_resumes_exactly(built, tmp_path):
  config, data, method, state, batch = built
  assert isinstance(state.mask_state, thresholds.CurriculumState)
  assert (np.asarray(state.mask_state.selected) == -1).all()
  assert len(state.mask_state.selected) == len(data.unlabeled_images)
  step = jax.jit(method.train_step)
  new, metrics = step(state, batch, jax.random.key(5))
  # beta starts at 0, so every threshold is 0 and every pseudo-label counts.
  assert float(metrics['mask_rate']) == 1
  selected = np.asarray(new.mask_state.selected)
  rows = batch['unlabeled_indices']
  assert (selected[rows] >= 0).all() and (np.delete(selected, rows) == -1).all()
  want_beta = _np_beta(selected, data.num_classes, True, np.zeros(data.num_classes))
  np.testing.assert_array_equal(new.mask_state.learning_effect, want_beta.astype(np.float32))
  assert set(metrics) >= {'loss', 'mask_rate', 'mean_threshold', 'min_threshold',
                          'unused_fraction'}
  np.testing.assert_allclose(float(metrics['unused_fraction']), (selected < 0).mean())
  assert float(metrics['mean_threshold']) == 0  # tau = 0 here
  # The record is checkpointed with the state and restored bit for bit (same tree,
  # dtypes and values), so a resumed run's pure steps go on as an uninterrupted one's.
  saver = checkpoint.Checkpointer(str(tmp_path), every=1, keep=1)
  saver.save(1, new)
  restored = saver.restore(jax.jit(method.init)(jax.random.key(1)))
  saver.close()
  assert jax.tree.structure(restored) == jax.tree.structure(new)
  assert [(x.dtype, x.shape) for x in jax.tree.leaves(restored)] == [
      (x.dtype, x.shape) for x in jax.tree.leaves(new)]
  assert_trees_equal(restored, new)


def test_bad_options_fail_before_compiling(data_dir):
  for overrides, match in (({'flexmatch.threshold': 1.5}, 'threshold'),
                           ({'flexmatch.mu': 0}, 'mu'),
                           ({'flexmatch.randaugment_ops': ('rotate', 'nope')}, 'RandAugment'),
                           ({'augment.out_size': 6}, 'out_size')):
    config = tiny_config('flexmatch', **{'data.data_dir': data_dir, **overrides})
    with pytest.raises(UserError, match=match):
      flexmatch.METHOD.make(config, train.load_data(config), 10)
