"""Nothing lost: damaged checkpoints, kills and restarts."""

import json
import os

import numpy as np

import pytest

from conftest import tiny_config
from sslj import train


def _config(data_dir, **overrides):
  return tiny_config('supervised', **{'data.data_dir': data_dir, 'checkpoint_every': 6,
                                      **overrides})


def _damage(checkpoint_dir):
  """Overwrites every file of a checkpoint with garbage of the same size."""
  for root, _, files in os.walk(checkpoint_dir):
    for name in files:
      path = os.path.join(root, name)
      size = os.path.getsize(path)
      with open(path, 'wb') as f:
        f.write(b'\x00garbage' * (size // 8 + 1))


def test_unreadable_latest_checkpoint_falls_back_to_the_previous(data_dir, tmp_path, caplog):
  config = _config(data_dir)
  workdir = str(tmp_path / 'run')
  reference = train.train_and_evaluate(config, workdir)
  checkpoints = os.path.join(workdir, 'checkpoints')
  assert sorted(os.listdir(checkpoints)) == ['12', '6']
  _damage(os.path.join(checkpoints, '12'))
  os.remove(os.path.join(workdir, 'results.json'))

  with caplog.at_level('WARNING'):
    again = train.train_and_evaluate(config, workdir)
  warning = [r.getMessage() for r in caplog.records if 'cannot be read' in r.getMessage()]
  assert len(warning) == 1 and 'step 12' in warning[0] and '12.unreadable' in warning[0]
  # Resumed from step 6 and ended exactly where the first run did.
  assert sorted(os.listdir(checkpoints)) == ['12', '12.unreadable', '6']
  for key in ('top1', 'top5', 'models'):
    assert again[key] == reference[key]
  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f)['top1'] == reference['top1']


def test_no_readable_checkpoint_is_one_clear_error(data_dir, tmp_path):
  from sslj.errors import UserError
  config = _config(data_dir, num_steps=6)
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  _damage(os.path.join(workdir, 'checkpoints', '6'))
  with pytest.raises(UserError, match='no checkpoint .* can be read'):
    train.train_and_evaluate(config, workdir)


# A training process that kills itself with SIGKILL once, at a chosen point:
#   eval:N   inside the evaluation at step N
#   log:N    while logging step N (between checkpoints: steps since the last
#            checkpoint are lost)
#   commit:N inside the save of step N, after its files are written and before
#            the rename that commits them
_DRIVER = r'''
import json, os, signal, sys
sys.path.insert(0, sys.argv[1])
from conftest import tiny_config
from sslj import checkpoint, logbook, train
from orbax.checkpoint._src.path import async_path

point, workdir, overrides = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
where, _, at = point.partition(':')
at = int(at or -1)
die = lambda: os.kill(os.getpid(), signal.SIGKILL)

evaluate = train.evaluate
def evaluate_then_die(state, *args, **kw):
  if where == 'eval' and int(state.step) == at:
    die()
  return evaluate(state, *args, **kw)
train.evaluate = evaluate_then_die

write = logbook.Logbook.write
def write_then_die(self, step, scalars):
  if where == 'log' and step == at:
    die()
  return write(self, step, scalars)
logbook.Logbook.write = write_then_die

rename = async_path.rename
async def rename_then_die(src, dst):
  if where == 'commit' and os.path.basename(str(dst)) == str(at):
    die()
  return await rename(src, dst)
async_path.rename = rename_then_die

train.train_and_evaluate(tiny_config('supervised', **overrides), workdir)
'''


def test_killed_anywhere_and_restarted_ends_as_an_uninterrupted_run(data_dir, tmp_path):
  import subprocess
  import sys

  import jax
  from sslj import checkpoint
  from sslj import methods

  tests_dir = os.path.dirname(os.path.abspath(__file__))
  driver = tmp_path / 'driver.py'
  driver.write_text(_DRIVER)
  overrides = {'data.data_dir': data_dir, 'num_steps': 18, 'eval_every': 6,
               'checkpoint_every': 6, 'log_every': 2}

  def run(point, workdir):
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    return subprocess.run([sys.executable, str(driver), tests_dir, point, str(workdir),
                           json.dumps(overrides)], env=env, capture_output=True, text=True,
                          timeout=600)

  straight = tmp_path / 'straight'
  assert run('none', straight).returncode == 0
  killed = tmp_path / 'killed'
  # Killed in the eval of step 12 (checkpoint 6 exists), while logging step 16
  # (checkpoint 12 exists), and in the middle of saving step 18; each restart
  # runs the same command.
  for point in ('eval:12', 'log:16', 'commit:18'):
    proc = run(point, killed)
    assert proc.returncode == -9, (point, proc.stderr[-2000:])
    assert not os.path.exists(killed / 'results.json')
  assert os.listdir(killed / 'checkpoints') != []
  final = run('none', killed)
  assert final.returncode == 0, final.stderr[-2000:]

  with open(straight / 'results.json') as f:
    expected = json.load(f)
  with open(killed / 'results.json') as f:
    got = json.load(f)
  for key in ('top1', 'top5', 'models', 'num_steps'):
    assert got[key] == expected[key]
  # The final parameters are identical, bit for bit.
  config = tiny_config('supervised', **overrides)
  template = None
  restored = []
  for workdir in (straight, killed):
    ckpt = checkpoint.Checkpointer(str(workdir), every=0, keep=3, read_only=True)
    assert ckpt.latest_step() == 18
    if template is None:
      data = train.load_data(config)
      method = methods.get('supervised').build(config, data, 18)
      template = jax.eval_shape(method.init, jax.random.key(0))
    restored.append(ckpt.restore(template))
    ckpt.close()
  for a, b in zip(jax.tree.leaves(restored[0]), jax.tree.leaves(restored[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
