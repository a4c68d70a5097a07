"""Shared test set-up: a tfds data dir and an XLA compilation cache per session, a tiny config."""

import os
import shutil
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# One persistent XLA compilation cache for the session, in a fresh directory.
# Dozens of tests (and the launch.py processes they start) compile the same
# tiny programs: the 12-step supervised run's init, step and eval above all.
# Each program is now compiled once per session and then loaded, bit for bit
# the same executable. Set in the environment before jax is imported, so every
# subprocess (whose env starts from os.environ) shares it; fresh per session,
# so nothing carries over from an earlier run or another checkout. (A driver
# script a test runs imports this file too: it joins the session's cache.)
_XLA_CACHE = os.environ.get('SSLJ_TESTS_XLA_CACHE')
_OWN_XLA_CACHE = not _XLA_CACHE
if _OWN_XLA_CACHE:
  _XLA_CACHE = tempfile.mkdtemp(prefix='sslj-tests-xla-cache-')
  os.environ['SSLJ_TESTS_XLA_CACHE'] = _XLA_CACHE
os.environ['JAX_COMPILATION_CACHE_DIR'] = _XLA_CACHE
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
if 'jax' in sys.modules:  # imported before this file (a plugin): set it there too
  sys.modules['jax'].config.update('jax_compilation_cache_dir', _XLA_CACHE)
  sys.modules['jax'].config.update('jax_persistent_cache_min_compile_time_secs', 0.0)


def pytest_unconfigure(config):
  del config
  if _OWN_XLA_CACHE:
    shutil.rmtree(_XLA_CACHE, ignore_errors=True)


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """One tfds data dir for the whole session, so `digits` is prepared once."""
  return str(tmp_path_factory.mktemp('tensorflow_datasets'))


@pytest.fixture(scope='session')
def tiny_run(data_dir, tmp_path_factory):
  """(workdir, results) of one finished `tiny_config()` supervised run, trained once.

  Several tests check the same 12-step run; they read copies of it
  (`copy_of_tiny_run`), so none sees another's changes.
  """
  from sslj import train
  workdir = str(tmp_path_factory.mktemp('tiny_run') / 'run')
  results = train.train_and_evaluate(tiny_config(**{'data.data_dir': data_dir}), workdir)
  return workdir, results


def copy_of_tiny_run(tiny_run, workdir):
  """Copies the session's tiny run to `workdir` (new); its results dict."""
  import copy
  shutil.copytree(tiny_run[0], str(workdir))
  return copy.deepcopy(tiny_run[1])


def snapshot(folder):
  """{relative path: bytes} of every file under `folder`: what "unchanged" is compared by."""
  files = {}
  for root, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        files[os.path.relpath(path, folder)] = f.read()
  return files


def config_of(method, arg=''):
  """`configs/<method>.py`'s `get_config(arg)`, unlocked."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      f'config_{method}', os.path.join(ROOT, 'configs', f'{method}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  config.unlock()
  return config


def tiny_config(method='supervised', arg='', **overrides):
  """A config of `configs/<method>.py` shrunk to seconds on a CPU."""
  config = config_of(method, arg)
  config.num_steps = 12
  config.batch_size = 16
  config.eval_batch_size = 100
  config.log_every = 4
  config.eval_every = 6
  config.checkpoint_every = 6
  from sslj import configlib
  configlib.set_fields(config, overrides)
  config.lock()
  return config


def train_until_first_checkpoint(config, workdir, monkeypatch):
  """Trains `config` in `workdir` and stops it as a kill would, right after
  its first checkpoint is saved (KeyboardInterrupt); saving works again after."""
  from sslj import checkpoint, train
  real_save = checkpoint.Checkpointer.save

  def save_then_die(self, step, state, force=False):
    saved = real_save(self, step, state, force=force)
    if saved:
      raise KeyboardInterrupt('killed after the first checkpoint')
    return saved

  monkeypatch.setattr(checkpoint.Checkpointer, 'save', save_then_die)
  try:
    with pytest.raises(KeyboardInterrupt):
      train.train_and_evaluate(config, str(workdir))
  finally:
    monkeypatch.setattr(checkpoint.Checkpointer, 'save', real_save)


def latest_checkpoint(workdir):
  """(step, the whole restored state tree) of a run's latest checkpoint."""
  import orbax.checkpoint as ocp
  from sslj import checkpoint
  ckpt = checkpoint.Checkpointer(str(workdir), every=0, keep=10)
  step = ckpt.latest_step()
  restored = ocp.PyTreeCheckpointer().restore(os.path.join(ckpt.directory, str(step), 'default'))
  ckpt.close()
  return step, restored


def replace_method(monkeypatch, name, **fields):
  """Registers `name` with some of its `Definition` fields replaced, for one test."""
  import dataclasses
  from sslj import methods
  from sslj.methods import base
  definition = dataclasses.replace(methods.get(name), **fields)
  monkeypatch.setitem(base._REGISTRY, name, definition)  # pylint: disable=protected-access
  return definition


def mean_teacher_states(num_steps=3):
  """The Mean Teacher state after `num_steps` train steps of the Fashion-MNIST config
  (batch 32) on synthetic 28x28 images with black bands, as Fashion-MNIST's
  backgrounds: ties in every max-pool window and ReLU."""
  from benchmarks import common
  config = common.load_config(
      'configs/mean_teacher.py:dataset=fashion_mnist,labels_per_class=10', {'batch_size': 32})
  data = common.synthetic_data((28, 28, 1), labeled=40, unlabeled=64)
  data.labeled_images[:, :9] = 0
  data.unlabeled_images[:, :9] = 0
  step = common.TrainStep(config, data, donate=False)
  carry = step.fresh_carry()
  for _ in range(num_steps):
    *carry, _ = step.jitted(*carry, step.train_data, step.base_key)
  state = carry[0]
  return state


def assert_trees_equal(a, b):
  """Every leaf of `a` equals `b`'s exactly (`==`; typed keys by their data)."""
  import jax
  import jax.numpy as jnp
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    assert bool((x == y).all()), float(jnp.abs(x - y).max())


def logits_and_gradients(model, x):
  """(logits, (parameter gradients, input gradient)) of a mean log-likelihood of
  `model` on `x` in training mode, computed under `jax.jit` (a fresh trace each call,
  so a patched op in between is traced anew)."""
  import jax
  import jax.numpy as jnp
  variables = model.init(jax.random.key(0), x, train=False)
  labels = jnp.arange(len(x)) % 10

  def loss(params, x):
    logits, _ = model.apply({**variables, 'params': params}, x, train=True,
                            mutable=['batch_stats'])
    return jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(x)), labels]), logits

  grads, logits = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(variables['params'], x)
  return logits, grads


# The files that take longest go first, so that with two workers taking whole
# files (pyproject's addopts) neither is left with a long file at the end.
_LONGEST_FIRST = ('test_method_contract.py', 'test_pooling.py', 'test_benchmarks.py',
                  'test_multihost.py', 'test_ssl_gan.py')


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
