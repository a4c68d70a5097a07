"""Mean Teacher: EMA, consistency costs and ramp against numpy; gradients; BN choice."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import config_of, tiny_config
from sslj import train
from sslj.errors import UserError
from sslj.methods import mean_teacher
from sslj.ops import consistency, ema


def _np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def test_ema_matches_closed_form_with_warmup():
  decay = 0.9
  rng = np.random.RandomState(0)
  student = [rng.randn(3, 2).astype(np.float32) for _ in range(12)]
  transform = ema.parameter_ema(decay)
  update = jax.jit(transform.update)
  state = transform.init({'w': student[0]})
  expected = student[0].astype(np.float64)
  for t, params in enumerate(student[1:], start=1):
    teacher, state = update({'w': params}, state)
    d = min(1 - 1 / (t + 1), decay)
    expected = d * expected + (1 - d) * params
    np.testing.assert_allclose(teacher['w'], expected, rtol=1e-6, atol=1e-6)
  assert int(state.count) == 11
  # The warm-up: 0.5, 0.667, 0.75, ... until the configured decay takes over.
  np.testing.assert_allclose([ema.decay_at(t, decay) for t in (1, 2, 3, 20)],
                             [0.5, 2 / 3, 0.75, 0.9], rtol=1e-6)


def test_ema_uses_the_rampup_decay_then_the_final_one():
  rng = np.random.RandomState(2)
  student = [rng.randn(4).astype(np.float32) for _ in range(30)]
  transform = ema.parameter_ema(0.95, rampup_decay=0.6, rampup_steps=10)
  update = jax.jit(transform.update)
  state = transform.init({'w': student[0]})
  expected = student[0].astype(np.float64)
  for t, params in enumerate(student[1:], start=1):
    teacher, state = update({'w': params}, state)
    d = min(1 - 1 / (t + 1), 0.6 if t <= 10 else 0.95)
    expected = d * expected + (1 - d) * params
    np.testing.assert_allclose(teacher['w'], expected, rtol=1e-6, atol=1e-6)


def test_consistency_costs_match_numpy():
  rng = np.random.RandomState(1)
  s, t = rng.randn(2, 8, 5).astype(np.float32) * 3
  ps, pt = _np_softmax(s.astype(np.float64)), _np_softmax(t.astype(np.float64))
  mse = np.mean(np.sum((ps - pt) ** 2, -1)) / 5
  kl = np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), -1))
  dist = np.mean(np.sum((s - t) ** 2, -1)) / 5
  np.testing.assert_allclose(jax.jit(consistency.softmax_mse)(s, t), mse, rtol=1e-5)
  np.testing.assert_allclose(jax.jit(consistency.softmax_kl)(s, t), kl, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(jax.jit(consistency.logit_distance)(s, t), dist, rtol=1e-5)
  assert float(consistency.softmax_kl(s, s)) == pytest.approx(0, abs=1e-6)


def test_sigmoid_rampup_matches_formula():
  ramp = jax.jit(consistency.sigmoid_rampup, static_argnums=1)
  for progress in (0.0, 1.0, 2.5, 5.0, 7.0):
    t = np.clip(progress / 5.0, 0, 1)
    np.testing.assert_allclose(ramp(progress, 5.0), np.exp(-5 * (1 - t) ** 2), rtol=1e-6)
  assert float(consistency.sigmoid_rampup(3.0, 0)) == 1.0


def _built(data_dir, arg='', **overrides):
  config = tiny_config('mean_teacher', arg, **{'data.data_dir': data_dir,
                                          'mean_teacher.labeled_batch_size': 4, **overrides})
  data = train.load_data(config)
  method = mean_teacher.METHOD.make(config, data)
  state = jax.jit(method.init)(jax.random.key(0))
  rng = np.random.RandomState(0)
  labeled, unlabeled = mean_teacher.batch_split(config)
  batch = {'labeled_images': data.labeled_images[rng.randint(0, len(data.labeled_images), labeled)],
           'labels': None,
           'unlabeled_images': data.unlabeled_images[rng.randint(0, len(data.unlabeled_images), unlabeled)]}
  batch['labels'] = data.labeled_labels[rng.randint(0, len(data.labeled_labels), labeled)]
  return config, method, state, batch


def _assert_refused(data_dir, field, value, match):
  """Building Mean Teacher with `mean_teacher.<field>=value` is one UserError matching `match`."""
  config = tiny_config('mean_teacher', **{'data.data_dir': data_dir,
                                          'mean_teacher.labeled_batch_size': 4,
                                          f'mean_teacher.{field}': value})
  with pytest.raises(UserError, match=match):
    mean_teacher.METHOD.make(config, train.load_data(config))


def test_no_gradient_flows_into_the_teacher(data_dir):
  config, method, state, batch = _built(data_dir)
  step = method.train_step.func
  kw = method.train_step.keywords
  # Differentiate the total loss with respect to the teacher's parameters: the
  # teacher only provides a stop_gradient target, so the gradient is zero.
  def loss_of_teacher(teacher_params):
    s = state.replace(teacher=state.teacher._replace(average=teacher_params))
    _, metrics = step(s, batch, jax.random.key(3), **kw)
    return metrics['loss']
  grads = jax.jit(jax.grad(loss_of_teacher))(state.teacher.average)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_teacher_is_the_average_and_keeps_its_own_batchnorm_statistics(data_dir):
  config, method, state, batch = _built(data_dir)
  new, metrics = jax.jit(method.train_step)(state, batch, jax.random.key(5))
  # Parameters: the first update averages with decay 0.5.
  expected = jax.tree.map(lambda t, s: 0.5 * t + 0.5 * s, state.teacher.average, new.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               new.teacher.average, expected)
  # BatchNorm statistics: the teacher's moved away from its initial values, and
  # are not the student's (nor their average): they come from its own passes.
  leaves = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
  t0, t1, s1 = (leaves(x) for x in (state.teacher_batch_stats, new.teacher_batch_stats,
                                     new.batch_stats))
  assert not np.allclose(t1, t0)
  assert not np.allclose(t1, s1)
  assert not np.allclose(t1, 0.5 * t0 + 0.5 * s1)
  assert np.isfinite(float(metrics['loss']))
  assert float(metrics['consistency_weight']) == pytest.approx(
      config.mean_teacher.consistency_weight * np.exp(-5.0), rel=1e-5)


def test_class_loss_over_the_batch_is_the_reference_codes_normalisation(data_dir):
  losses = {}
  for over in ('labeled', 'batch'):
    config, method, state, batch = _built(data_dir, **{'mean_teacher.class_loss_over': over})
    _, metrics = jax.jit(method.train_step)(state, batch, jax.random.key(5))
    losses[over] = metrics
  labeled, total = len(batch['labels']), config.batch_size
  # Same images, same noise: the summed cross-entropy over all images of the batch.
  np.testing.assert_allclose(float(losses['batch']['class_loss']),
                             float(losses['labeled']['class_loss']) * labeled / total, rtol=1e-6)
  np.testing.assert_array_equal(float(losses['batch']['consistency_loss']),
                                float(losses['labeled']['consistency_loss']))
  _assert_refused(data_dir, 'class_loss_over', 'all', 'class_loss_over')


def test_cifar10_preset_trains_convlarge_with_input_noise(data_dir):
  # The paper's recipe (ConvLarge, dropout, Gaussian input noise 0.15), run on
  # digits: one step trains, and the noise comes from the preprocessing.
  config, method, state, batch = _built(
      data_dir, 'dataset=cifar10,labels_per_class=100,model=convlarge',
      **{'data.name': 'digits', 'data.labels_per_class': 5, 'augment.pad_crop': 1,
         'augment.flip': False})
  assert config.model.name == 'convlarge' and config.augment.noise_std == 0.15
  new, metrics = jax.jit(method.train_step)(state, batch, jax.random.key(1))
  assert np.isfinite(float(metrics['loss'])) and int(new.step) == 1


def test_fashion_mnist_preset_has_the_papers_noise_and_digits_has_none():
  fashion = config_of('mean_teacher', 'dataset=fashion_mnist,labels_per_class=10')
  assert (fashion.augment.noise_std, fashion.model.dropout_rate) == (0.15, 0.5)
  digits = config_of('mean_teacher')
  assert (digits.augment.noise_std, digits.model.dropout_rate) == (0.0, 0.0)


def _numpy_weight(steps, steps_per_epoch, rampup_epochs, weight, floor):
  epoch = np.asarray(steps, np.float64) / steps_per_epoch
  t = np.clip((np.floor(epoch) if floor else epoch) / rampup_epochs, 0, 1)
  return weight * np.exp(-5 * (1 - t) ** 2)


def test_rampup_per_epoch_reads_the_floored_epoch_and_per_step_is_unchanged():
  spe, length, w = 7, 3.0, 30.0
  steps = jnp.arange(5 * spe, dtype=jnp.int32)

  def weights(epoch_of):
    return jax.jit(jax.vmap(lambda s: w * consistency.sigmoid_rampup(epoch_of(s), length)))(steps)

  per_epoch = weights(lambda s: mean_teacher.rampup_epoch(s, spe, 'epoch'))
  np.testing.assert_allclose(per_epoch, _numpy_weight(steps, spe, length, w, floor=True),
                             rtol=1e-6)
  assert len(np.unique(np.asarray(per_epoch)[:3 * spe])) == 3  # one value per epoch
  # The default is the expression the step used before the option existed.
  np.testing.assert_array_equal(weights(lambda s: mean_teacher.rampup_epoch(s, spe)),
                                weights(lambda s: s / spe))
  np.testing.assert_allclose(weights(lambda s: s / spe),
                             _numpy_weight(steps, spe, length, w, floor=False), rtol=1e-6)
  # A quotient that float32 rounds up to a whole epoch is still the epoch before.
  big = 2 ** 23 + 1
  assert float(jnp.int32(3 * big - 1) / big) == 3.0
  assert float(mean_teacher.rampup_epoch(jnp.int32(3 * big - 1), big, 'epoch')) == 2.0


def test_the_train_step_ramps_per_epoch_when_asked(data_dir):
  overrides = {'mean_teacher.rampup_epochs': 3.0}
  config, default, state, batch = _built(data_dir, **overrides)
  _, per_epoch, _, _ = _built(data_dir, **overrides, **{'mean_teacher.rampup_granularity': 'epoch'})
  spe = mean_teacher.steps_per_epoch(config, train.load_data(config))
  chosen = [0, 1, spe - 1, spe, spe + 1, 2 * spe + 5, 3 * spe - 1, 3 * spe, 4 * spe]
  got = {}
  for granularity, method in (('step', default), ('epoch', per_epoch)):
    step = jax.jit(method.train_step)
    got[granularity] = [float(step(state.replace(step=jnp.int32(k)), batch,
                                   jax.random.key(1))[1]['consistency_weight']) for k in chosen]
  w = config.mean_teacher.consistency_weight
  np.testing.assert_allclose(got['epoch'], _numpy_weight(chosen, spe, 3.0, w, floor=True),
                             rtol=1e-6)
  np.testing.assert_allclose(got['step'], _numpy_weight(chosen, spe, 3.0, w, floor=False),
                             rtol=1e-6)
  _assert_refused(data_dir, 'rampup_granularity', 'epochs',
                  "rampup_granularity='epochs' is unknown; use 'step'")


def test_a_strong_student_view_changes_only_the_students_unlabeled_images(data_dir):
  overrides = {'mean_teacher.student_view': 'strong', 'augment.noise_std': 0.15}
  config, method, state, batch = _built(data_dir, **overrides)
  kw = method.train_step.keywords
  preprocess, strong = kw['preprocess'], kw['strong']
  assert strong is not None
  key = jax.random.key(7)
  x = jax.jit(lambda k: mean_teacher._strong_student_view(batch, k, preprocess, strong))(key)
  k_labeled, k_strong = jax.random.split(key)
  n = len(batch['labeled_images'])
  # The labeled images: the weak view with its noise, as without the option.
  np.testing.assert_allclose(x[:n], preprocess.train(batch['labeled_images'], k_labeled),
                             rtol=1e-6, atol=1e-6)
  # The unlabeled ones: the strong view plus the same input noise (its residual
  # is standard normal noise times noise_std).
  views = strong(batch['unlabeled_images'], k_strong)
  residual = np.asarray(x[n:] - views) / 0.15
  assert abs(residual.mean()) < 0.05 and abs(residual.std() - 1.0) < 0.05
  weak = preprocess.train(batch['unlabeled_images'], k_strong)
  assert float(jnp.abs(views - weak).mean()) > 0.05
  new, metrics = jax.jit(method.train_step)(state, batch, jax.random.key(5))
  assert np.isfinite(float(metrics['loss'])) and int(new.step) == 1
  # The default has no strong augmentation at all.
  _, default, _, _ = _built(data_dir)
  assert default.train_step.keywords['strong'] is None
  _assert_refused(data_dir, 'student_view', 'randaugment',
                  "student_view='randaugment' is unknown; use 'weak'")


def test_a_mean_teacher_run_recorded_before_the_student_view_resumes(tmp_path):
  """Older runs' config.json lack the strong-view fields; they read as the weak view."""
  import json
  from sslj import run_files
  recorded = json.loads(tiny_config('mean_teacher').to_json_best_effort())
  for key in [k for k in recorded['mean_teacher']
              if k == 'student_view' or k.startswith(('randaugment_', 'cutout'))]:
    del recorded['mean_teacher'][key]
  workdir = tmp_path / 'old'
  workdir.mkdir()
  run_files.atomic_write_json(str(workdir / 'config.json'), recorded)
  run_files.check_recorded(str(workdir), tiny_config('mean_teacher'))
  with pytest.raises(UserError, match="mean_teacher.student_view: 'weak' there, 'strong' now"):
    run_files.check_recorded(str(workdir),
                             tiny_config('mean_teacher', **{'mean_teacher.student_view': 'strong'}))
