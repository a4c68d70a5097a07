"""Tests for sslj.models: shapes, dtypes, parameter counts, BN and dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslj import models
from sslj.errors import UserError
from sslj.models import resnet as resnet_lib


def _init_key():
  # Real (not abstract) inits use an 'rbg' key: XLA:CPU compiles threefry
  # slowly for every initialiser (~15 s for ResNet-18, under 3 s with rbg),
  # and no test here depends on which random initial values come out.
  return jax.random.key(0, impl='rbg')


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract_init(model, shape):
  return jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x), jax.ShapeDtypeStruct(shape, jnp.float32))


def _abstract_apply(model, variables, shape, **kw):
  return jax.eval_shape(lambda v, x: model.apply(v, x, **kw), variables,
                        jax.ShapeDtypeStruct(shape, jnp.float32))


def test_unknown_model_lists_valid_names():
  with pytest.raises(UserError, match='resnet152') as err:
    models.build('resnet19', num_classes=10)
  assert 'small_cnn' in str(err.value) and '\n' not in str(err.value)
  with pytest.raises(UserError, match='no_such_option'):
    models.build('small_cnn', num_classes=10, no_such_option=1)
  with pytest.raises(UserError):
    models.build('small_cnn', num_classes=0)


@pytest.mark.parametrize('depth,expected', [(18, 11_689_512), (50, 25_557_032)])
def test_resnet_param_count_matches_published(depth, expected):
  # torchvision's counts for the ImageNet models (1000 classes, 224x224).
  model = models.build(f'resnet{depth}', num_classes=1000, stem='imagenet')
  variables = _abstract_init(model, (1, 224, 224, 3))
  assert _count(variables['params']) == expected


@pytest.mark.parametrize('name,features', [
    ('resnet18', 512), ('resnet34', 512), ('resnet50', 2048),
    ('resnet101', 2048), ('resnet152', 2048)])
def test_resnet_shapes(name, features):
  shape = (2, 32, 32, 3)
  model = models.build(name, num_classes=7)
  variables = _abstract_init(model, shape)
  logits = _abstract_apply(model, variables, shape)
  assert (logits.shape, logits.dtype) == ((2, 7), jnp.float32)
  feats = _abstract_apply(model, variables, shape, return_features=True)
  assert (feats.shape, feats.dtype) == ((2, features), jnp.float32)
  # A second head adds one Dense(features -> 7) and shares everything else.
  two = models.build(name, num_classes=7, num_heads=2)
  two_vars = _abstract_init(two, shape)
  assert (_count(two_vars['params']) - _count(variables['params'])
          == features * 7 + 7)
  outs = _abstract_apply(two, two_vars, shape)
  assert [(o.shape, o.dtype) for o in outs] == [((2, 7), jnp.float32)] * 2


def test_resnet_stem_rule():
  assert resnet_lib.resolve_stem('auto', 32) == 'small'
  assert resnet_lib.resolve_stem('auto', 64) == 'small'
  assert resnet_lib.resolve_stem('auto', 96) == 'imagenet'
  assert resnet_lib.resolve_stem('small', 224) == 'small'
  with pytest.raises(UserError, match='stem'):
    models.build('resnet18', num_classes=10, stem='large')
  for size, kernel in ((32, 3), (96, 7)):
    model = models.build('resnet18', num_classes=10)
    params = _abstract_init(model, (1, size, size, 3))['params']
    assert params['stem_conv']['kernel'].shape == (kernel, kernel, 3, 64)


def test_resnet_zero_init_residual():
  model = models.build('resnet18', num_classes=10, zero_init_residual=True,
                       width=8)
  variables = jax.jit(model.init)(_init_key(), jnp.ones((1, 8, 8, 1)))
  block = variables['params']['stage1_block1']
  # Last BN of the branch starts at zero (identity block); others at one.
  assert np.all(np.asarray(block['BatchNorm_1']['scale']) == 0)
  assert np.all(np.asarray(block['BatchNorm_0']['scale']) == 1)
  plain = _abstract_init(models.build('resnet18', num_classes=10), (1, 8, 8, 1))
  assert _count(plain['params']) > _count(variables['params'])  # width 8 < 64


@pytest.mark.parametrize('name,shape', [
    ('small_cnn', (3, 8, 8, 1)), ('small_cnn', (3, 28, 28, 1)),
    ('convlarge', (3, 8, 8, 1)), ('convlarge', (3, 12, 12, 3)),
    ('resnet18', (3, 8, 8, 1)), ('wrn28_2', (3, 8, 8, 1)), ('wrn37_2', (3, 12, 12, 3))])
def test_model_output_shapes(name, shape):
  for num_heads in (1, 2):
    model = models.build(name, num_classes=5, num_heads=num_heads)
    variables = _abstract_init(model, shape)
    logits = _abstract_apply(model, variables, shape)
    outs = logits if num_heads == 2 else (logits,)
    assert len(outs) == num_heads
    assert all((o.shape, o.dtype) == ((3, 5), jnp.float32) for o in outs)
    feats = _abstract_apply(model, variables, shape, return_features=True)
    width = {'resnet18': 512, 'wrn37_2': 256}.get(name, 128)
    assert (feats.shape, feats.dtype) == ((3, width), jnp.float32)


def test_two_heads_run_on_shared_features():
  # The heads code is shared by all models (sslj/models/heads.py).
  model = models.build('small_cnn', num_classes=5, num_heads=2)
  x = jax.random.uniform(jax.random.key(1), (3, 8, 8, 1))
  variables = jax.jit(model.init)(_init_key(), x)

  @jax.jit
  def run(v, x):
    return model.apply(v, x), model.apply(v, x, return_features=True)

  (head0, head1), feats = run(variables, x)
  assert np.all(np.isfinite(head0)) and not np.allclose(head0, head1)
  for k, out in enumerate((head0, head1)):  # each head is Dense(features)
    dense = variables['params'][f'head_{k}']
    np.testing.assert_allclose(
        out, np.asarray(feats) @ np.asarray(dense['kernel']) + np.asarray(dense['bias']),
        rtol=1e-5, atol=1e-5)


def test_convlarge_paper_shapes():
  # On 32x32 the 512 conv is 'valid': 8x8 -> 6x6 maps, as in the paper.
  model = models.build('convlarge', num_classes=10)
  variables = _abstract_init(model, (2, 32, 32, 3))
  assert variables['params']['Conv_6']['kernel'].shape == (3, 3, 256, 512)
  out, state = jax.eval_shape(
      lambda v, x: model.apply(v, x, capture_intermediates=True,
                               mutable=['intermediates']),
      variables, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
  assert state['intermediates']['Conv_6']['__call__'][0].shape == (2, 6, 6, 512)
  assert out.shape == (2, 10)


def test_init_with_return_features_still_gives_logits():
  model = models.build('small_cnn', num_classes=4)
  variables = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, return_features=True),
      jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32))
  assert _abstract_apply(model, variables, (1, 8, 8, 1)).shape == (1, 4)


@pytest.mark.parametrize('name', ['small_cnn', 'resnet18', 'convlarge', 'wrn28_2'])
def test_bf16_compute_keeps_f32_params_and_logits(name):
  model = models.build(name, num_classes=3, dtype=jnp.bfloat16, num_heads=2)
  shape = (2, 8, 8, 3)
  variables = _abstract_init(model, shape)
  leaves = jax.tree.leaves(variables)
  assert leaves and all(l.dtype == jnp.float32 for l in leaves)
  outs, state = _abstract_apply(model, variables, shape,
                                capture_intermediates=True,
                                mutable=['intermediates'])
  assert all(o.dtype == jnp.float32 for o in outs)
  feats = _abstract_apply(model, variables, shape, return_features=True)
  assert feats.dtype == jnp.float32
  # The convolutions really run in bfloat16.
  conv_dtypes = {v.dtype for path, v in jax.tree_util.tree_leaves_with_path(
      state['intermediates']) if 'conv' in jax.tree_util.keystr(path).lower()}
  assert conv_dtypes == {jnp.dtype(jnp.bfloat16)}


def test_batchnorm_updates_in_train_only():
  model = models.build('small_cnn', num_classes=3)
  x = jax.random.normal(jax.random.key(2), (4, 8, 8, 1)) * 3 + 1
  variables = jax.jit(model.init)(_init_key(), x)

  @jax.jit
  def run(v, x):
    train = model.apply(v, x, train=True, capture_intermediates=True,
                        mutable=['batch_stats', 'intermediates'])[1]
    return train, model.apply(v, x, train=False, mutable=['batch_stats'])[1]

  train_state, eval_state = run(variables, x)
  # First BN: running mean = 0.9 * 0 + 0.1 * batch mean of the conv output,
  # running var = 0.9 * 1 + 0.1 * batch variance.
  conv_out = np.asarray(train_state['intermediates']['Conv_0']['__call__'][0])
  np.testing.assert_allclose(
      train_state['batch_stats']['BatchNorm_0']['mean'],
      0.1 * conv_out.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      train_state['batch_stats']['BatchNorm_0']['var'],
      0.9 + 0.1 * conv_out.var(axis=(0, 1, 2)), rtol=1e-4)
  for a, b in zip(jax.tree.leaves(eval_state['batch_stats']),
                  jax.tree.leaves(variables['batch_stats'])):
    np.testing.assert_array_equal(a, b)


def test_convlarge_trains_with_the_dropout_rng_alone():
  # The methods pass only a 'dropout' rng; the papers' input noise is the
  # preprocessing's augment.noise_std, not a layer needing its own rng.
  x = jax.random.uniform(jax.random.key(3), (2, 8, 8, 1))
  model = models.build('convlarge', num_classes=3)
  quiet = models.build('convlarge', num_classes=3, dropout_rate=0.0)
  variables = jax.jit(model.init)(_init_key(), x)

  @jax.jit
  def run(dropout_key):
    train = lambda m: m.apply(variables, x, train=True, rngs={'dropout': dropout_key},
                              mutable=['batch_stats'])[0]
    # Eval needs no rngs; the quiet model draws none in training either.
    return (model.apply(variables, x), train(model), train(quiet),
            quiet.apply(variables, x, train=True, mutable=['batch_stats'])[0])

  k = jax.random.key
  eval_a, train_a, quiet_a, quiet_no_rng = run(k(0))
  eval_b, train_b, quiet_b, _ = run(k(1))
  np.testing.assert_array_equal(eval_a, eval_b)
  np.testing.assert_array_equal(train_a, run(k(0))[1])
  assert not np.allclose(train_a, train_b)
  np.testing.assert_array_equal(quiet_a, quiet_b)
  np.testing.assert_array_equal(quiet_a, quiet_no_rng)
