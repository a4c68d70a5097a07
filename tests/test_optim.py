"""The optimisers against numpy written from their formulas; which parameters decay."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from conftest import tiny_config
from sslj import configlib, models, preflight
from sslj.errors import UserError
from sslj.ops import optim

# Flax's names for a convolution, a BatchNorm and a dense layer without bias.
_SHAPES = {'Conv_0': {'kernel': (3, 3, 1, 2), 'bias': (2,)},
           'BatchNorm_0': {'scale': (2,), 'bias': (2,)},
           'Dense_0': {'kernel': (2, 3)}}
_KERNELS = {'Conv_0': {'kernel': 1.0, 'bias': 0.0}, 'BatchNorm_0': {'scale': 0.0, 'bias': 0.0},
            'Dense_0': {'kernel': 1.0}}


def _tree(seed):
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda shape: rng.randn(*shape).astype(np.float32), _SHAPES,
                      is_leaf=lambda x: isinstance(x, tuple))


def _optimizer_config(**fields):
  cfg = configlib.base_config('supervised', configlib.parse_arg(None)).optimizer
  cfg.update(schedule='constant', **fields)
  return cfg


def _run(tx, params, grads_list):
  """Parameters after one update per gradient tree, every update jitted."""
  state = tx.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for grads in grads_list:
    params, state = step(params, state, grads)
  return params


def _numpy_sgd(params, grads_list, *, lr, momentum, nesterov, wd, decayed):
  """PyTorch's SGD: weight decay joins the gradient before the momentum buffer."""
  params = jax.tree.map(np.float64, params)
  buf = None
  for grads in grads_list:
    d = jax.tree.map(lambda g, p, m: g + wd * m * p, grads, params, decayed)
    buf = d if buf is None else jax.tree.map(lambda b, x: momentum * b + x, buf, d)
    step = jax.tree.map(lambda x, b: x + momentum * b, d, buf) if nesterov else buf
    params = jax.tree.map(lambda p, s: p - lr * s, params, step)
  return params


def _numpy_adamw(params, grads_list, *, lr, b1, b2, wd, decayed, eps=1e-8):
  """Adam with bias correction, then the decoupled decay lr * wd * p."""
  params = jax.tree.map(np.float64, params)
  mu = jax.tree.map(np.zeros_like, params)
  nu = jax.tree.map(np.zeros_like, params)
  for t, grads in enumerate(grads_list, start=1):
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, mu, grads)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, nu, grads)
    params = jax.tree.map(
        lambda p, m, v, k: p - lr * ((m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
                                     + wd * k * p),
        params, mu, nu, decayed)
  return params


def _all(value):
  return jax.tree.map(lambda _: value, _KERNELS)


def _assert_close(actual, expected):
  jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=2e-6, atol=1e-7),
               actual, expected)


@pytest.mark.parametrize('decay, decayed', [('all', _all(1.0)), ('kernels', _KERNELS)])
def test_sgd_steps_match_pytorch_sgd_with_weight_decay(decay, decayed):
  params, grads = _tree(0), [_tree(1), _tree(2)]
  for nesterov in (True, False):
    cfg = _optimizer_config(learning_rate=0.1, momentum=0.9, nesterov=nesterov,
                            weight_decay=0.05, decay=decay)
    got = _run(optim.make_optimizer(cfg, num_steps=10), params, grads)
    _assert_close(got, _numpy_sgd(params, grads, lr=0.1, momentum=0.9, nesterov=nesterov,
                                  wd=0.05, decayed=decayed))
    # Kernels only: the other parameters move exactly as without weight decay.
    cfg.weight_decay = 0.0
    plain = _run(optim.make_optimizer(cfg, num_steps=10), params, grads)
    for layer, name in (('Conv_0', 'bias'), ('BatchNorm_0', 'scale'), ('BatchNorm_0', 'bias')):
      same = np.array_equal(got[layer][name], plain[layer][name])
      assert same == (decay == 'kernels'), (layer, name)


@pytest.mark.parametrize('decay, decayed', [('all', _all(1.0)), ('kernels', _KERNELS)])
def test_adamw_steps_match_the_formula(decay, decayed):
  params, grads = _tree(3), [_tree(4), _tree(5)]
  cfg = _optimizer_config(name='adam', learning_rate=0.01, weight_decay=0.1, decay=decay,
                          b1=0.9, b2=0.99)
  got = _run(optim.make_optimizer(cfg, num_steps=10), params, grads)
  _assert_close(got, _numpy_adamw(params, grads, lr=0.01, b1=0.9, b2=0.99, wd=0.1,
                                  decayed=decayed))


def _todays_make_optimizer(cfg, num_steps):
  """`make_optimizer` as it was before `decay` existed, kept verbatim."""
  schedule = optim.learning_rate(cfg, num_steps)
  if cfg.name == 'sgd':
    return optax.chain(
        optax.add_decayed_weights(cfg.weight_decay) if cfg.weight_decay else optax.identity(),
        optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov))
  if cfg.weight_decay:
    return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
  return optax.adam(schedule, b1=cfg.b1, b2=cfg.b2)


@pytest.mark.parametrize('name', ['sgd', 'adam'])
def test_the_default_decay_is_bit_identical_to_the_optimizer_before_it(name):
  params, grads = _tree(6), [_tree(7 + i) for i in range(4)]
  cfg = configlib.base_config('supervised', configlib.parse_arg(None)).optimizer
  cfg.name = name
  assert cfg.decay == 'all'
  absent = cfg.to_dict()
  del absent['decay']  # a config recorded before the field existed
  before = _run(_todays_make_optimizer(cfg, 4), params, grads)
  for config in (cfg, absent):
    config = ml_collections.ConfigDict(config)
    jax.tree.map(np.testing.assert_array_equal,
                 _run(optim.make_optimizer(config, 4), params, grads), before)


def test_kernels_are_the_leaves_the_references_decay():
  # FixMatch's code decays the variables named `kernel`; USB skips every 1-D
  # parameter and bias. On the library's networks both are the kernels.
  for name in ('small_cnn', 'convlarge', 'wrn28_2', 'dcgan_discriminator'):
    model = models.build(name, num_classes=10)
    variables = jax.eval_shape(lambda m=model: m.init(
        {'params': jax.random.key(0), 'dropout': jax.random.key(1)},
        jnp.zeros((1, 32, 32, 3)), train=False))
    leaves = jax.tree_util.tree_leaves_with_path(variables['params'])
    mask = jax.tree.leaves(optim.kernel_mask(variables['params']))
    assert mask == [leaf.ndim >= 2 and not jax.tree_util.keystr(path).endswith("['bias']")
                    for (path, leaf) in leaves], name
    assert any(mask) and not all(mask), name
  # Weight norm's scale (`Conv_0/kernel/scale`) is not a kernel.
  assert optim.kernel_mask({'WeightNorm_0': {'Conv_0/kernel/scale': 1.0}}) == {
      'WeightNorm_0': {'Conv_0/kernel/scale': False}}


def test_an_unknown_decay_is_refused_in_one_line_before_anything_is_built():
  with pytest.raises(UserError, match=r"optimizer.decay='bn' is unknown; use 'all'") as e:
    optim.make_optimizer(_optimizer_config(decay='bn'), 10)
  assert '\n' not in str(e.value)
  with pytest.raises(UserError, match=r"--config.optimizer.decay='kernel' is not allowed: "
                     'use one of all, kernels'):
    preflight.check_config(tiny_config('fixmatch', **{'optimizer.decay': 'kernel'}))
  preflight.check_config(tiny_config('fixmatch', **{'optimizer.decay': 'kernels'}))


def test_a_renamed_schedule_on_the_command_line_is_told_its_new_name():
  with pytest.raises(UserError, match=r"--config.optimizer.schedule='fixmatch_cosine' is not "
                     r"allowed: use one of cosine, constant, truncated_cosine\. "
                     r"\('fixmatch_cosine' is now called 'truncated_cosine'\.\)$"):
    preflight.check_config(tiny_config('fixmatch', **{'optimizer.schedule': 'fixmatch_cosine'}))
