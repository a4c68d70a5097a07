"""What a run refuses to do: save a diverged state, mix two configs, hide a full disk."""

import dataclasses
import errno
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, replace_method, tiny_config
from sslj import checkpoint, run_files, train
from sslj.errors import UserError
from sslj.ops import optim
from sslj.methods import supervised


def test_a_diverged_state_is_never_checkpointed(data_dir, tmp_path, monkeypatch):
  """Parameters turn NaN in update 5; every loss up to it is finite.

  The checkpoint of step 6 would hold them: it is refused and step 3 kept.
  """
  real_build = supervised.build

  def build(config, data, num_steps):
    method = real_build(config, data, num_steps)

    def train_step(state, batch, key):
      new, metrics = method.train_step(state, batch, key)
      params = jax.tree.map(lambda p: jnp.where(state.step >= 5, jnp.nan, p), new.params)
      return new.replace(params=params), metrics

    return dataclasses.replace(method, train_step=train_step)

  replace_method(monkeypatch, 'supervised', build=build)
  config = tiny_config(**{'data.data_dir': data_dir, 'checkpoint_every': 3, 'log_every': 12,
                          'eval_every': 0})
  workdir = str(tmp_path / 'run')
  with pytest.raises(UserError, match=r'non-finite by step 6; the last good checkpoint '
                     r'\(step 3\) is kept\. Lower optimizer\.learning_rate'):
    train.train_and_evaluate(config, workdir)
  ckpt = checkpoint.Checkpointer(workdir, every=0, keep=3, read_only=True)
  assert ckpt.all_steps() == [3]
  ckpt.close()
  assert not os.path.exists(os.path.join(workdir, 'results.json'))


def test_is_finite_looks_at_floating_leaves_only():
  state = {'w': jnp.ones(3), 'step': jnp.array(7), 'key': jax.random.key(0)}
  assert checkpoint.is_finite(state)
  assert not checkpoint.is_finite({**state, 'w': jnp.array([1.0, jnp.inf, 0.0])})
  assert not checkpoint.is_finite({**state, 'b': jnp.array(jnp.nan, jnp.bfloat16)})


def test_a_workdir_refuses_another_config_but_not_other_run_control(tmp_path):
  workdir = str(tmp_path / 'run')
  run_files.claim_workdir(workdir, tiny_config())
  # How often to log, evaluate and save, and where data live, may change.
  run_files.claim_workdir(workdir, tiny_config(**{
      'log_every': 1, 'eval_every': 3, 'checkpoint_every': 2, 'keep_checkpoints': 9,
      'eval_batch_size': 50, 'data.data_dir': '/elsewhere'}))
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['log_every'] == 4  # The first claim's record stays.
  other = tiny_config(**{'seed': 1, 'optimizer.learning_rate': 0.5, 'num_steps': 99,
                         'batch_size': 32})
  with pytest.raises(UserError) as error:
    run_files.claim_workdir(workdir, other)
  message = str(error.value)
  assert '\n' not in message and 'use a new --workdir or the same config' in message
  assert 'batch_size: 16 there, 32 now' in message
  assert 'num_steps: 12 there, 99 now' in message
  assert 'optimizer.learning_rate' in message and 'seed' in message


def _record_without(workdir, config, *fields):
  """config.json as a run recorded before `fields` existed."""
  recorded = json.loads(config.to_json_best_effort())
  for name in fields:
    *sections, key = name.split('.')
    node = recorded
    for section in sections:
      node = node[section]
    del node[key]
  os.makedirs(workdir, exist_ok=True)
  run_files.atomic_write_json(os.path.join(workdir, 'config.json'), recorded)


def test_a_run_recorded_before_a_field_existed_resumes_as_it_trained(tmp_path):
  """A missing added field reads as FIELDS_ADDED's value, the old behaviour, and only that."""
  workdir = str(tmp_path / 'old')
  _record_without(workdir, tiny_config(), 'optimizer.decay')
  run_files.claim_workdir(workdir, tiny_config())  # 'all': what the old run did
  with pytest.raises(UserError, match="optimizer.decay: 'all' there, 'kernels' now"):
    run_files.claim_workdir(workdir, tiny_config(**{'optimizer.decay': 'kernels'}))
  # A default that changed: the old k-means SVM standardised by the labeled images.
  svm = str(tmp_path / 'svm')
  _record_without(svm, tiny_config('kmeans_svm'), 'kmeans_features.standardize')
  with pytest.raises(UserError, match="kmeans_features.standardize: 'labeled' there, 'train' now"):
    run_files.claim_workdir(svm, tiny_config('kmeans_svm'))
  run_files.claim_workdir(svm, tiny_config('kmeans_svm',
                                           **{'kmeans_features.standardize': 'labeled'}))
  # Sections a method does not have gain nothing.
  filled = run_files.as_current(json.loads(tiny_config().to_json_best_effort()))
  assert 'mean_teacher' not in filled and 'kmeans_features' not in filled
  # A method's own added fields fill only its own runs' configs.
  recorded = json.loads(tiny_config('deep_cluster').to_json_best_effort())
  del recorded['deep_cluster']['head_init']
  assert run_files.as_current(recorded)['deep_cluster']['head_init'] == 'lecun_normal'
  recorded['method'] = 'supervised'
  assert 'head_init' not in run_files.as_current(recorded)['deep_cluster']


def test_a_run_recorded_under_a_renamed_value_resumes_and_reads_as_the_new_name(tmp_path):
  """FixMatch's runs recorded `fixmatch_cosine`, today's `truncated_cosine`: the same schedule."""
  workdir = str(tmp_path / 'old')
  config = tiny_config('fixmatch')
  assert config.optimizer.schedule == 'truncated_cosine'
  recorded = json.loads(config.to_json_best_effort())
  recorded['optimizer']['schedule'] = 'fixmatch_cosine'
  os.makedirs(workdir)
  run_files.atomic_write_json(os.path.join(workdir, 'config.json'), recorded)
  run_files.claim_workdir(workdir, config)
  assert run_files.as_current(recorded)['optimizer']['schedule'] == 'truncated_cosine'
  with pytest.raises(UserError, match="optimizer.schedule: 'truncated_cosine' there, 'cosine' now"):
    run_files.claim_workdir(workdir, tiny_config('fixmatch', **{'optimizer.schedule': 'cosine'}))
  # Every old name's new name is a schedule today.
  for field, renamed in run_files.VALUES_RENAMED.items():
    assert field == 'optimizer.schedule' and set(renamed.values()) <= set(optim.SCHEDULES)


def test_every_added_field_is_a_field_of_its_methods_config():
  """A misspelt added field would never apply: FIELDS_ADDED's are in every config,
  a method's own (`Definition.fields_added`) in its config."""
  import glob
  from conftest import config_of
  from sslj import methods
  declared = set()
  for path in glob.glob(os.path.join(ROOT, 'configs', '*.py')):
    config = json.loads(config_of(os.path.basename(path)[:-3], '').to_json_best_effort())
    own = methods.get(config['method']).fields_added
    declared |= set(own)
    missing = set(run_files.fields_added(config['method'])) - set(run_files.flatten(config))
    assert not missing, (path, missing)
  assert declared == {name for d in methods.registry().values() for name in d.fields_added}


def test_eval_rebuilds_a_run_recorded_before_a_field_existed(tmp_path):
  from sslj.use import restore
  workdir = str(tmp_path / 'old_mt')
  _record_without(workdir, tiny_config('mean_teacher'), 'optimizer.decay',
                  'mean_teacher.rampup_granularity')
  config = restore.read_config(workdir)
  assert config.optimizer.decay == 'all'
  assert config.mean_teacher.rampup_granularity == 'step'


@pytest.mark.parametrize('error, reason', [
    (OSError(errno.ENOSPC, 'No space left on device'), 'no space left on device'),
    (OSError(errno.EDQUOT, 'Disk quota exceeded'), 'disk quota exceeded'),
    (ValueError('OUT_OF_RANGE: Failed to write 264836 bytes to file 7: File too large '
                "[os_error_code='27']"), 'file size limit exceeded'),
    (ValueError('RESOURCE_EXHAUSTED: ... [os_error_code=28]'), 'no space left on device'),
    (OSError(errno.EACCES, 'Permission denied'), None),
    (ValueError("NOT_FOUND: [os_error_code='2']"), None),
])
def test_disk_full_reason(error, reason):
  assert checkpoint.disk_full_reason(error) == reason
  try:  # Found through the chain of causes too.
    raise RuntimeError('the save failed') from error
  except RuntimeError as wrapped:
    assert checkpoint.disk_full_reason(wrapped) == reason


# Saves checkpoint 1, then checkpoint 2 with a 4 KiB file size limit: the
# arrays' own writer (tensorstore) fails with EFBIG as it would with ENOSPC.
_LIMITED_SAVE = r'''
import resource, signal, sys
sys.path.insert(0, sys.argv[1])
import jax.numpy as jnp
import numpy as np
from sslj import checkpoint
from sslj.errors import UserError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
ckpt = checkpoint.Checkpointer(sys.argv[2], every=1, keep=3)
tree = {'w': jnp.arange(50000.0)}
ckpt.save(1, tree)
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
try:
  ckpt.save(2, {'w': tree['w'] + 1})
  print('saved')
except UserError as e:
  print('error: ' + str(e))
finally:
  resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
print('steps', ckpt.all_steps())
restored = ckpt.restore(tree)
print('restored', bool(np.array_equal(np.asarray(restored['w']), np.arange(50000.0))))
'''


@pytest.mark.skipif(sys.platform != 'linux', reason='needs RLIMIT_FSIZE and SIGXFSZ')
def test_a_real_write_failure_during_a_save_is_one_error_and_keeps_the_last(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', _LIMITED_SAVE, ROOT, str(tmp_path)],
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert lines == [f'error: file size limit exceeded while saving checkpoint 2 in '
                   f'{tmp_path}/checkpoints; free space and run the same command to resume.',
                   'steps [1]', 'restored True']
  # Orbax's own logged traceback of the failed write is not shown.
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  np.testing.assert_equal(sorted(p for p in os.listdir(tmp_path / 'checkpoints')
                                 if p.isdigit()), ['1'])


def test_a_full_disk_outside_checkpoints_is_one_line(tmp_path, monkeypatch, capsys):
  """Metrics, events and results.json: a full disk there is the same one line."""
  from sslj import cli

  def fill_disk(config, workdir):
    raise OSError(errno.ENOSPC, 'No space left on device', f'{workdir}/metrics.jsonl')

  monkeypatch.setattr(train, 'train_and_evaluate', fill_disk)
  with pytest.raises(SystemExit) as exit_:
    cli.run(config=tiny_config(), workdir=str(tmp_path), mode='train')
  assert exit_.value.code == 2
  assert capsys.readouterr().err == (
      f'error: no space left on device while writing {tmp_path}/metrics.jsonl; free space and '
      'run the same command to resume.\n')
