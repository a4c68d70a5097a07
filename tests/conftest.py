"""Shared test set-up: a tfds data dir per session, and a tiny supervised config."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """One tfds data dir for the whole session, so `digits` is prepared once."""
  return str(tmp_path_factory.mktemp('tensorflow_datasets'))


def snapshot(folder):
  """{relative path: bytes} of every file under `folder`: what "unchanged" is compared by."""
  files = {}
  for root, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        files[os.path.relpath(path, folder)] = f.read()
  return files


def tiny_config(method='supervised', arg='', **overrides):
  """A config of `configs/<method>.py` shrunk to seconds on a CPU."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      f'config_{method}', os.path.join(ROOT, 'configs', f'{method}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  config.unlock()
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


def replace_method(monkeypatch, name, **fields):
  """Registers `name` with some of its `Definition` fields replaced, for one test."""
  import dataclasses
  from sslj import methods
  from sslj.methods import base
  definition = dataclasses.replace(methods.get(name), **fields)
  monkeypatch.setitem(base._REGISTRY, name, definition)  # pylint: disable=protected-access
  return definition
