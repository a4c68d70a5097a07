"""Nothing lost: damaged checkpoints, kills and restarts."""

import json
import os

import numpy as np

import pytest

from conftest import copy_of_tiny_run, tiny_config
from sslj import run_files, train


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


def test_unreadable_latest_checkpoint_falls_back_to_the_previous(data_dir, tmp_path, tiny_run,
                                                                 caplog):
  config = _config(data_dir)  # = tiny_config(): the session's tiny run, copied
  workdir = str(tmp_path / 'run')
  reference = copy_of_tiny_run(tiny_run, workdir)
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
      method = methods.get('supervised').make(config, data, 18)
      template = jax.eval_shape(method.init, jax.random.key(0))
    restored.append(ckpt.restore(template))
    ckpt.close()
  for a, b in zip(jax.tree.leaves(restored[0]), jax.tree.leaves(restored[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# The command line (launch.py) in a process that hurts itself once:
#   term:N   sends itself SIGTERM right after logging step N's training scalars
#   full:N   the disk fills up while checkpoint N is written (tensorstore's
#            error, as it reports ENOSPC)
#   none     runs as is
_CLI_DRIVER = r'''
import os, signal, sys, time
root, point, stamp = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path.insert(0, root)
where, _, at = point.partition(':')
at = int(at or -1)
from sslj import checkpoint, logbook

if where == 'term':
  write = logbook.Logbook.write
  def write_then_term(self, step, scalars):
    write(self, step, scalars)
    if step == at and not os.path.exists(stamp):
      with open(stamp, 'w') as f:
        f.write(repr(time.time()))
      os.kill(os.getpid(), signal.SIGTERM)
  logbook.Logbook.write = write_then_term

if where == 'full':
  from orbax.checkpoint._src.serialization import serialization
  saving = {}
  save = checkpoint.Checkpointer.save
  def save_noting_step(self, step, state, **kw):
    saving['step'] = step
    return save(self, step, state, **kw)
  checkpoint.Checkpointer.save = save_noting_step
  write_arrays = serialization.async_serialize_from_host
  async def write_arrays_until_full(*args, **kw):
    if saving.get('step') == at:
      raise ValueError('RESOURCE_EXHAUSTED: Error writing "params" in OCDBT database: Failed '
                       'to write 4096 bytes: No space left on device [os_error_code=\'28\']')
    return await write_arrays(*args, **kw)
  serialization.async_serialize_from_host = write_arrays_until_full

sys.argv = ['launch.py'] + sys.argv[4:]
import launch
from absl import app
from sslj import cli
app.run(launch.main, flags_parser=cli.parse_flags)
'''

# One config for the command-line runs below and the runs they are compared with.
_CLI_OVERRIDES = {'num_steps': 18, 'batch_size': 16, 'eval_batch_size': 100, 'log_every': 2,
                  'eval_every': 4, 'checkpoint_every': 6}


def _cli_run(tmp_path, point, workdir, data_dir):
  import subprocess
  import sys
  from conftest import ROOT
  driver = tmp_path / 'cli_driver.py'
  driver.write_text(_CLI_DRIVER)
  stamp = tmp_path / f'stamp_{os.path.basename(workdir)}'
  args = ['--config=configs/supervised.py', f'--workdir={workdir}',
          f'--config.data.data_dir={data_dir}']
  args += [f'--config.{k}={v}' for k, v in _CLI_OVERRIDES.items()]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, str(driver), ROOT, point, str(stamp)] + args,
                        env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
  return proc, stamp


@pytest.fixture(scope='module')
def uninterrupted(data_dir, tmp_path_factory):
  """results.json, the metrics' shape and the final state of a run never stopped."""
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  results = train.train_and_evaluate(_config(data_dir, **_CLI_OVERRIDES), workdir)
  return results, _metric_keys(workdir), _final_leaves(workdir, data_dir)


def _metric_keys(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [(r['step'], sorted(r)) for r in map(json.loads, f)]


def _final_leaves(workdir, data_dir):
  import jax
  from sslj import checkpoint, methods
  config = _config(data_dir, **_CLI_OVERRIDES)
  method = methods.get('supervised').make(config, train.load_data(config))
  ckpt = checkpoint.Checkpointer(workdir, every=0, keep=3, read_only=True)
  state = ckpt.restore(jax.eval_shape(method.init, jax.random.key(0)))
  ckpt.close()
  return [np.asarray(x) for x in jax.tree.leaves(state)]


def _assert_same_end(workdir, data_dir, uninterrupted):
  results, metric_keys, leaves = uninterrupted
  with open(os.path.join(workdir, 'results.json')) as f:
    got = json.load(f)
  for key in ('top1', 'top5', 'models', 'num_steps'):
    assert got[key] == results[key]
  assert _metric_keys(workdir) == metric_keys
  for a, b in zip(_final_leaves(workdir, data_dir), leaves, strict=True):
    np.testing.assert_array_equal(a, b)


def test_sigterm_checkpoints_at_the_step_boundary_and_exits_0(data_dir, tmp_path, uninterrupted):
  import time
  workdir = tmp_path / 'run'
  # Step 8 is an evaluation step but not a checkpoint step (every 6): the run
  # saves step 8 anyway and leaves its evaluation to the resumed run.
  proc, stamp = _cli_run(tmp_path, 'term:8', workdir, data_dir)
  exited = time.time()
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Stopped early on SIGTERM' in proc.stderr and 'Traceback' not in proc.stderr
  assert exited - float(stamp.read_text()) < 20
  assert sorted(os.listdir(workdir / 'checkpoints'), key=int) == ['6', '8']
  assert not (workdir / 'results.json').exists()
  assert not run_files.logged_eval(str(workdir), 8) and run_files.logged_eval(str(workdir), 4)

  again = train.train_and_evaluate(_config(data_dir, **_CLI_OVERRIDES), str(workdir))
  assert again is not None
  _assert_same_end(str(workdir), data_dir, uninterrupted)


def test_full_disk_at_a_checkpoint_is_one_line_and_the_same_command_resumes(
    data_dir, tmp_path, uninterrupted):
  workdir = tmp_path / 'run'
  proc, _ = _cli_run(tmp_path, 'full:12', workdir, data_dir)
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
  checkpoints = workdir / 'checkpoints'
  assert errors == [f'error: no space left on device while saving checkpoint 12 in '
                    f'{checkpoints}; free space and run the same command to resume.']
  assert 'Traceback' not in proc.stderr
  assert [p for p in os.listdir(checkpoints) if p.isdigit()] == ['6']
  assert not (workdir / 'results.json').exists()

  # Space freed: the same command resumes from step 6 and ends as if never stopped.
  proc, _ = _cli_run(tmp_path, 'none', workdir, data_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Resuming at step 6 of 18' in proc.stderr
  assert sorted(os.listdir(checkpoints), key=int) == ['6', '12', '18']
  _assert_same_end(str(workdir), data_dir, uninterrupted)
