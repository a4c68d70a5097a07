"""Pseudo-Label: the alpha(t) schedule, threshold masking, constant targets, a run."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import config_of, tiny_config
from sslj import train
from sslj.errors import UserError
from sslj.methods import pseudo_label


def _np_alpha(t, t1, t2, final):
  """Lee 2013, Eq. 16."""
  if t < t1:
    return 0.0
  if t < t2:
    return (t - t1) / (t2 - t1) * final
  return final


def test_alpha_schedule_matches_the_paper_in_steps_and_epochs():
  weight = jax.jit(functools.partial(pseudo_label.unlabeled_weight, t1=100.0, t2=600.0,
                                     final_weight=3.0))
  for t in (0, 99, 100, 101, 350, 599, 600, 900):
    np.testing.assert_allclose(weight(t), _np_alpha(t, 100, 600, 3.0), rtol=1e-6, atol=1e-7)
  # In epochs of 7 steps: step s is epoch s / 7.
  per_epoch = jax.jit(functools.partial(pseudo_label.unlabeled_weight, t1=2.0, t2=5.0,
                                        final_weight=3.0, steps_per_unit=7.0))
  for step in (0, 13, 14, 15, 28, 34, 35, 70):
    np.testing.assert_allclose(per_epoch(step), _np_alpha(step / 7, 2, 5, 3.0), rtol=1e-6,
                               atol=1e-6)
  # T1 == T2 is a step from 0 to alpha_f.
  jump = functools.partial(pseudo_label.unlabeled_weight, t1=10.0, t2=10.0, final_weight=2.0)
  assert [float(jump(s)) for s in (9, 10, 11)] == [0.0, 2.0, 2.0]


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _fake_apply(variables, x, train, mutable, rngs):
  del train, mutable, rngs
  return x * variables['params']['scale'], {'batch_stats': variables['batch_stats']}


@pytest.mark.parametrize('threshold', [0.0, 0.6])
def test_loss_with_threshold_matches_numpy(threshold):
  rng = np.random.RandomState(1)
  labeled, unlabeled = rng.randn(4, 6) * 2, rng.randn(10, 6) * 2
  unlabeled[:4, 2] += 6  # confident rows, so a threshold of 0.6 keeps some, not all
  labels = rng.randint(0, 6, 4)
  inputs = np.concatenate([labeled, unlabeled]).astype(np.float32)
  total, aux = jax.jit(functools.partial(pseudo_label.loss_fn, apply_fn=_fake_apply,
                                         threshold=threshold))(
      {'scale': jnp.float32(1)}, {}, inputs=inputs, labels=labels,
      dropout_key=jax.random.key(0), weight=jnp.float32(2.5))
  x = inputs.astype(np.float64)
  log_l, log_u = _np_log_softmax(x[:4]), _np_log_softmax(x[4:])
  keep = np.exp(log_u).max(-1) >= threshold
  assert keep.all() if threshold == 0 else 0 < keep.mean() < 1
  unlabeled_ce = np.where(keep, -log_u.max(-1), 0.0).mean()  # argmax target: -max log p
  expected = -log_l[np.arange(4), labels].mean() + 2.5 * unlabeled_ce
  np.testing.assert_allclose(float(total), expected, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(aux[2]), keep.astype(np.float32))


def _built(data_dir, **overrides):
  config = tiny_config('pseudo_label', **{'data.data_dir': data_dir, 'batch_size': 4,
                                          'pseudo_label.mu': 2, **overrides})
  data = train.load_data(config)
  method = pseudo_label.METHOD.make(config, data)
  state = jax.jit(method.init)(jax.random.key(0))
  rng = np.random.RandomState(0)
  pick = rng.randint(0, len(data.labeled_images), method.labeled_batch)
  batch = {'labeled_images': data.labeled_images[pick], 'labels': data.labeled_labels[pick],
           'unlabeled_images': data.unlabeled_images[
               rng.randint(0, len(data.unlabeled_images), method.unlabeled_batch)]}
  return config, method, state, batch


def test_targets_carry_no_gradient(data_dir):
  _, method, state, batch = _built(data_dir)
  preprocess = method.train_step.keywords['preprocess']
  inputs = jax.jit(preprocess.train)(
      jnp.concatenate([batch['labeled_images'], batch['unlabeled_images']]), jax.random.key(2))
  logits, _ = jax.jit(lambda p: state.apply_fn(
      {'params': p, 'batch_stats': state.batch_stats}, inputs, train=True,
      mutable=['batch_stats'], rngs={'dropout': jax.random.key(3)}))(state.params)
  targets = (np.asarray(logits[4:]).argmax(-1).astype(np.int32), np.ones(8, np.float32))
  loss = functools.partial(pseudo_label.loss_fn, batch_stats=state.batch_stats,
                           apply_fn=state.apply_fn, inputs=inputs, labels=batch['labels'],
                           dropout_key=jax.random.key(3), weight=1.0, threshold=0.0)
  g = jax.jit(jax.grad(lambda p: loss(p)[0]))(state.params)
  g_const = jax.jit(jax.grad(lambda p, t: loss(p, targets=t)[0]))(state.params, targets)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g, g_const)


def test_weight_is_zero_before_t1_in_a_step(data_dir):
  _, method, state, batch = _built(data_dir, **{'pseudo_label.t1': 1.0, 'pseudo_label.t2': 3.0})
  step = jax.jit(method.train_step)
  state, first = step(state, batch, jax.random.key(0))
  _, second = step(state.replace(step=jnp.int32(2)), batch, jax.random.key(1))
  assert float(first['unlabeled_weight']) == 0.0
  np.testing.assert_allclose(float(first['loss']), float(first['labeled_loss']), rtol=1e-6)
  np.testing.assert_allclose(float(second['unlabeled_weight']), 1.5, rtol=1e-6)  # (2-1)/(3-1)*3
  np.testing.assert_allclose(float(second['loss']), float(second['labeled_loss'])
                             + 1.5 * float(second['unlabeled_loss']), rtol=1e-5)


def test_separate_passes_normalise_each_part_alone_and_only_labeled_statistics_move(data_dir):
  _, method, state, batch = _built(data_dir)
  preprocess = method.train_step.keywords['preprocess']
  inputs = jax.jit(preprocess.train)(
      jnp.concatenate([batch['labeled_images'], batch['unlabeled_images']]), jax.random.key(2))
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  forward = jax.jit(lambda x: state.apply_fn(variables, x, train=True, mutable=['batch_stats']))
  labeled, labeled_updates = forward(inputs[:4])
  unlabeled, _ = forward(inputs[4:])
  total, aux = jax.jit(functools.partial(
      pseudo_label.loss_fn, apply_fn=state.apply_fn, weight=2.0, threshold=0.0,
      bn_passes='separate'))(state.params, state.batch_stats, inputs=inputs,
                             labels=batch['labels'], dropout_key=jax.random.key(3))
  # The running statistics are the labeled pass's alone.
  # (rounded by another fusion of the same jitted arithmetic: equal to float32 precision)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), aux[5],
               labeled_updates["batch_stats"])
  joint, joint_aux = jax.jit(functools.partial(
      pseudo_label.loss_fn, apply_fn=state.apply_fn, weight=2.0, threshold=0.0))(
      state.params, state.batch_stats, inputs=inputs, labels=batch['labels'],
      dropout_key=jax.random.key(3))
  assert not np.allclose(np.asarray(joint_aux[4]), np.asarray(labeled))  # BatchNorm saw all 12
  log_l = _np_log_softmax(np.asarray(labeled, np.float64))
  log_u = _np_log_softmax(np.asarray(unlabeled, np.float64))
  expected = -log_l[np.arange(4), batch['labels']].mean() + 2.0 * (-log_u.max(-1)).mean()
  np.testing.assert_allclose(float(total), expected, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(aux[4]), np.asarray(labeled), rtol=1e-6, atol=1e-6)


def test_bad_options_fail_before_compiling(data_dir):
  for overrides, match in (({'pseudo_label.bn_passes': 'twice'}, 'bn_passes'),
                           ({'pseudo_label.ramp_unit': 'hours'}, 'ramp_unit'),
                           ({'pseudo_label.t1': 5.0, 'pseudo_label.t2': 2.0}, 't1'),
                           ({'pseudo_label.threshold': -0.1}, 'threshold')):
    config = tiny_config('pseudo_label', **{'data.data_dir': data_dir, **overrides})
    with pytest.raises(UserError, match=match):
      pseudo_label.METHOD.make(config, train.load_data(config), 10)


def test_tiny_run_writes_results(tmp_path, data_dir):
  config = tiny_config('pseudo_label', **{
      'data.data_dir': data_dir, 'batch_size': 4, 'pseudo_label.mu': 2, 'num_steps': 4,
      'eval_every': 0, 'pseudo_label.ramp_unit': 'epochs', 'pseudo_label.t1': 0.0,
      'pseudo_label.t2': 1.0})
  results = train.train_and_evaluate(config, str(tmp_path))
  written = json.loads((tmp_path / 'results.json').read_text())
  assert written['method'] == 'pseudo_label' and written['num_steps'] == 4
  assert written['top1'] == written['models']['model']['top1'] == results['top1']
  lines = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  # 1,297 unlabeled images at 8 per step: 163 steps per epoch, so alpha is
  # 3 * 4 / 163 after 4 steps (logged with the step's metrics, before it ran: 3/163).
  logged = [l['train/unlabeled_weight'] for l in lines if 'train/unlabeled_weight' in l]
  np.testing.assert_allclose(logged[-1], 3.0 * 3 / 163, rtol=1e-5)


def test_fashion_mnist_preset_ramps_in_the_papers_proportions():
  fashion = config_of('pseudo_label', 'dataset=fashion_mnist,labels_per_class=10')
  pl = fashion.pseudo_label
  assert (pl.t1, pl.t2, fashion.num_steps) == (250.0, 1500.0, 4000)
  assert pl.t2 / pl.t1 == 600 / 100 and pl.bn_passes == 'separate'
