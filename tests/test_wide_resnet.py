"""The FixMatch/MixMatch Wide ResNets: parameter counts, layout, BN momentum, a step."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_config
from sslj import models, preflight
from sslj.errors import UserError
from sslj.methods import network
from sslj.models import wide_resnet


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract_init(model, shape):
  return jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x), jax.ShapeDtypeStruct(shape, jnp.float32))


def _reference_count(filters, scales, num_classes, repeat=4, stem=16, channels=3):
  """Trainable parameters of `ResNet.classifier` in google-research/fixmatch
  libml/models.py, layer by layer: every conv has a bias, every BN a gamma
  and a beta, the first block of a scale a 1x1 conv where channels change."""
  n = 3 * 3 * channels * stem + stem
  c_in = stem
  for scale in range(scales):
    c = filters << scale
    for _ in range(repeat):
      n += 2 * c_in + (9 * c_in * c + c) + 2 * c + (9 * c * c + c)
      if c_in != c:
        n += c_in * c + c
      c_in = c
  return n + 2 * c_in + c_in * num_classes + num_classes


@pytest.mark.parametrize('name,num_classes,size,filters,scales,expected', [
    # The papers' "1.5M" (MixMatch: "Wide ResNet-28-2 with 1.5 million parameters").
    ('wrn28_2', 10, 32, 32, 3, 1_469_642),
    # CIFAR-100, --filters=128 (fixmatch issues #25, #26): "about 23M".
    ('wrn28_8', 100, 32, 128, 3, 23_409_092),
    # STL-10, --scales=4 (fixmatch issue #34): "a ~6M parameter model".
    ('wrn37_2', 10, 96, 32, 4, 5_933_770),
])
def test_parameter_counts_match_the_reference_code(name, num_classes, size, filters, scales,
                                                   expected):
  assert _reference_count(filters, scales, num_classes) == expected
  variables = _abstract_init(models.build(name, num_classes=num_classes), (1, size, size, 3))
  assert _count(variables['params']) == expected


def test_layout_follows_the_reference():
  params = _abstract_init(models.build('wrn28_2', num_classes=10), (1, 32, 32, 3))['params']
  assert params['stem_conv']['kernel'].shape == (3, 3, 3, 16)
  blocks = [k for k in params if k.startswith('group')]
  assert len(blocks) == 12
  # A 1x1 shortcut conv only where the channels change: each group's first block.
  with_shortcut = sorted(k for k in blocks if 'shortcut' in params[k])
  assert with_shortcut == ['group1_block1', 'group2_block1', 'group3_block1']
  assert params['group1_block1']['shortcut']['kernel'].shape == (1, 1, 16, 32)
  assert params['group3_block1']['conv1']['kernel'].shape == (3, 3, 64, 128)
  assert params['group3_block4']['conv2']['bias'].shape == (128,)
  assert params['final_bn']['scale'].shape == (128,)
  assert params['head']['kernel'].shape == (128, 10)


@pytest.mark.parametrize('activate_before_residual', [True, False])
def test_the_shortcut_sees_the_activation_only_in_the_first_block(activate_before_residual):
  # With the residual branch's last conv zeroed, a block returns its
  # shortcut: a 1x1 conv (set to the identity) of lrelu(BN(x)) in the
  # network's first block, of x itself in the first blocks of later groups.
  conv = functools.partial(nn.Conv, padding='SAME')
  norm = functools.partial(nn.BatchNorm, use_running_average=True, epsilon=1e-3)
  block = wide_resnet.PreActBlock(4, strides=1, activate_before_residual=activate_before_residual,
                                  conv=conv, norm=norm)
  x = jax.random.normal(jax.random.key(1), (2, 4, 4, 2))
  variables = jax.jit(block.init)(jax.random.key(0, impl='rbg'), x)
  params = jax.tree.map(np.asarray, variables['params'])
  params['conv2']['kernel'] = np.zeros_like(params['conv2']['kernel'])
  params['shortcut']['kernel'] = np.eye(2, 4, dtype=np.float32)[None, None]
  out = np.asarray(jax.jit(block.apply)({**variables, 'params': params}, x))
  x = np.asarray(x)
  # BN at its initial statistics (mean 0, variance 1) is x / sqrt(1 + eps).
  a = x / np.sqrt(1 + 1e-3)
  a = np.where(a > 0, a, 0.1 * a)
  expected = np.concatenate([a if activate_before_residual else x, np.zeros_like(x)], -1)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('bn_momentum', [None, 0.9])
def test_bn_momentum_is_the_decay_of_the_running_averages(bn_momentum):
  # One training pass from the initial statistics (mean 0, variance 1):
  # running = m * initial + (1 - m) * batch, in Flax's (and TF's) convention;
  # 0.999 is the default, the reference's tf.layers.batch_normalization(momentum=0.999).
  kw = {} if bn_momentum is None else {'bn_momentum': bn_momentum}
  m = 0.999 if bn_momentum is None else bn_momentum
  model = wide_resnet.WideResNet(num_classes=3, groups=1, blocks_per_group=1, widen_factor=1,
                                 **kw)
  assert models.build('wrn28_2', num_classes=3, **kw).bn_momentum == m
  x = jax.random.normal(jax.random.key(2), (4, 6, 6, 3))
  variables = jax.jit(model.init)(jax.random.key(0, impl='rbg'), x)
  _, state = jax.jit(lambda v, x: model.apply(v, x, train=True, capture_intermediates=True,
                                              mutable=['batch_stats', 'intermediates']))(
                                                  variables, x)
  stem = np.asarray(state['intermediates']['stem_conv']['__call__'][0])
  stats = state['batch_stats']['group1_block1']['bn1']
  np.testing.assert_allclose(stats['mean'], (1 - m) * stem.mean(axis=(0, 1, 2)),
                             rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(stats['var'], m + (1 - m) * stem.var(axis=(0, 1, 2)), rtol=1e-5)


def test_every_model_with_batchnorm_has_bn_momentum_at_its_old_value():
  # Today's values, so every existing config trains exactly as before.
  expected = {'small_cnn': 0.9, 'alexnet': 0.9, 'convlarge': 0.9, 'resnet18': 0.9,
              'resnet152': 0.9, 'wrn28_2': 0.999, 'wrn28_8': 0.999, 'wrn37_2': 0.999,
              'dcgan': 0.9}
  for name, value in expected.items():
    assert models.fields(name)['bn_momentum'] == value, name
  # The models without BatchNorm do not take it.
  for name in ('exemplar_small', 'dcgan_discriminator'):
    assert 'bn_momentum' not in models.fields(name)


def _numpy_variables(model, shape, seed=0):
  """Variables of `model` drawn in numpy (He-scaled normal weights, zero
  biases, BN's initial statistics): no initialiser to compile, which on a
  2-core CPU takes as long as the train step itself."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if 'kernel' in name:
      fan_in = int(np.prod(leaf.shape[:-1]))
      return (rng.standard_normal(leaf.shape) * np.sqrt(2 / fan_in)).astype(np.float32)
    one = 'scale' in name or "['var']" in name
    return np.full(leaf.shape, 1.0 if one else 0.0, np.float32)

  return jax.tree_util.tree_map_with_path(draw, _abstract_init(model, shape))


def test_one_jitted_train_step_on_32x32_images():
  model = models.build('wrn28_2', num_classes=10)
  images = jax.random.uniform(jax.random.key(3), (4, 32, 32, 3))
  labels = jnp.array([0, 1, 2, 3])
  variables = _numpy_variables(model, (1, 32, 32, 3))
  tx = optax.sgd(0.03, momentum=0.9, nesterov=True)
  opt_state = tx.init(variables['params'])

  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def step(params, batch_stats, opt_state, x, y):
    def loss_fn(p):
      logits, updates = model.apply({'params': p, 'batch_stats': batch_stats}, x, train=True,
                                    mutable=['batch_stats'])
      return network.cross_entropy(logits, y), updates['batch_stats']
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  before = jax.tree.map(np.asarray, variables)
  params, stats, _, loss = step(variables['params'], variables['batch_stats'], opt_state,
                                images, labels)
  assert np.isfinite(float(loss))
  # A fresh head gives about uniform probabilities: the loss is near log(10).
  assert abs(float(loss) - np.log(10)) < 1.0
  for new, old in ((params, before['params']), (stats, before['batch_stats'])):
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(new))
    assert any(not np.array_equal(a, b)
               for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old)))


@pytest.mark.parametrize('method', ['fixmatch', 'pseudo_label', 'mean_teacher'])
def test_cifar10_and_stl10_presets_train_the_reference_networks(method):
  cifar = tiny_config(method, 'dataset=cifar10,labels_per_class=25')
  stl = tiny_config(method, 'dataset=stl10')
  assert (cifar.model.name, stl.model.name) == ('wrn28_2', 'wrn37_2')
  for config, groups in ((cifar, 3), (stl, 4)):
    preflight.check_config(config)
    assert network.build_model(config, 10, num_heads=2).groups == groups
  # `model=` still picks another network; the CPU datasets keep theirs.
  assert tiny_config(method, 'dataset=cifar10,model=resnet18').model.name == 'resnet18'
  for dataset in ('digits', 'fashion_mnist'):
    assert tiny_config(method, f'dataset={dataset}').model.name == 'small_cnn'


def test_fixmatch_cifar10_25_labels_builds_a_wrn28_2():
  config = tiny_config('fixmatch', 'dataset=cifar10,labels_per_class=25')
  model = network.build_model(config, num_classes=10)
  assert isinstance(model, wide_resnet.WideResNet)
  assert (model.groups, model.blocks_per_group, model.widen_factor) == (3, 4, 2)
  assert model.bn_momentum == 0.999
  assert _count(_abstract_init(model, (1, 32, 32, 3))['params']) == 1_469_642


def test_wrn_fields_reach_the_model_and_others_are_refused():
  config = tiny_config('fixmatch', 'dataset=cifar10', **{'model.bn_momentum': 0.99})
  assert network.model_options(config) == {'bn_momentum': 0.99}
  assert network.build_model(config, 10).bn_momentum == 0.99
  # A field the model lacks: one line naming the field and the allowed ones.
  bad = tiny_config('fixmatch', 'dataset=cifar10', **{'model.first_kernel_size': 7})
  with pytest.raises(UserError) as err:
    preflight.check_config(bad)
  line = str(err.value)
  assert '\n' not in line
  assert line == ('--config.model.first_kernel_size=7 is not allowed: model wrn28_2 has no '
                  'field first_kernel_size; its fields are bn_momentum, dropout_rate.')
  with pytest.raises(UserError, match='its fields are bn_momentum, dropout_rate'):
    network.build_model(bad, 10)
