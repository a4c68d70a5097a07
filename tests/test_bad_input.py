"""What a user can type, class by class: one line, exit 2 (130 for Ctrl-C), nothing lost.

Each test runs the real command line on a copy of one finished tiny run (or
a fresh directory) and checks the exit status, that stderr is exactly one
line with no traceback, and that the workdir's files are byte-for-byte what
they were: results.json, metrics.jsonl and the checkpoints included.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, snapshot, tiny_config
from sslj import logbook, preflight, workdir_lock
from sslj.errors import UserError

# The tiny run's command; `_finished` trains it once for the module.
_ARGS = ['--config=configs/supervised.py', '--config.num_steps=12', '--config.batch_size=16',
         '--config.eval_batch_size=100', '--config.log_every=4', '--config.eval_every=6',
         '--config.checkpoint_every=6']
# absl's log lines (`I1201 22:45:07.49 ... file.py:12] ...`): progress, not messages.
_LOG_LINE = re.compile(r'^[IWEF]\d{4} ')


def _env():
  return dict(os.environ, JAX_PLATFORMS='cpu',
              XLA_FLAGS='--xla_force_host_platform_device_count=1')


def _launch(args, data_dir=None):
  cmd = [sys.executable, os.path.join(ROOT, 'launch.py')] + args
  if data_dir:
    cmd.append(f'--config.data.data_dir={data_dir}')
  return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300, cwd=ROOT)


def _refused(proc, *needles, status=2):
  """Exit `status` and stderr exactly one line, with every needle in it."""
  assert proc.returncode == status, (proc.returncode, proc.stderr[-3000:])
  lines = proc.stderr.splitlines()
  assert len(lines) == 1 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  for needle in needles:
    assert needle in lines[0], lines[0]
  return lines[0]


@pytest.fixture(scope='module')
def finished(data_dir, tmp_path_factory):
  """A finished tiny run, trained once by the real command line."""
  workdir = str(tmp_path_factory.mktemp('finished') / 'run')
  proc = _launch(_ARGS + [f'--workdir={workdir}'], data_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['12', '6']
  return workdir


@pytest.fixture
def copy(finished, tmp_path):
  """A copy of the finished run and the snapshot of its files."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(finished, workdir)
  return workdir, snapshot(workdir)


def test_a_workdir_that_cannot_hold_the_run_is_refused_before_anything(tmp_path, data_dir):
  afile = tmp_path / 'notes.txt'
  afile.write_text('my notes\n')
  long_dir = tmp_path / ('d' * 250) / ('e' * 250) / ('f' * 250)
  # The directory itself fits in PATH_MAX (4096); the checkpoints under it would not.
  long_dir = os.path.join(str(long_dir), *(['g' * 250] * 13))
  cases = [(str(afile), 'is a file'),
           ('/proc/sslj-run', 'cannot write to --workdir=/proc/sslj-run'),
           (long_dir, 'is too long')]
  for workdir, needle in cases:
    _refused(_launch(_ARGS + [f'--workdir={workdir}'], data_dir), needle)
  assert afile.read_text() == 'my notes\n'
  assert not os.path.exists(long_dir)


def test_eval_of_a_workdir_that_cannot_be_written_prints_and_saves_nothing(copy, monkeypatch):
  from sslj.use import evaluate
  workdir, before = copy
  monkeypatch.setattr(preflight, 'can_write', lambda directory: False)
  record = evaluate.evaluate(workdir)
  assert record['file'] is None
  assert 'not saved' in evaluate.summary(record, workdir)
  with open(os.path.join(workdir, 'results.json')) as f:
    assert record['models'] == json.load(f)['models']
  assert snapshot(workdir) == before


@pytest.fixture
def read_only_mount(tmp_path):
  """A fresh tmpfs, filled by the test, then remounted read-only (root only)."""
  mount_point = tmp_path / 'mnt'
  mount_point.mkdir()
  if os.geteuid() != 0 or subprocess.run(
      ['mount', '-t', 'tmpfs', '-o', 'size=64m', 'tmpfs', str(mount_point)],
      capture_output=True).returncode:
    pytest.skip('needs root to mount a file system')

  def make_read_only():
    subprocess.run(['mount', '-o', 'remount,ro', str(mount_point)], check=True)

  yield str(mount_point), make_read_only
  subprocess.run(['umount', '-l', str(mount_point)], capture_output=True)


def test_a_read_only_file_system_is_refused_and_eval_prints_instead(
    read_only_mount, finished, data_dir):
  mount_point, make_read_only = read_only_mount
  run = os.path.join(mount_point, 'run')
  shutil.copytree(finished, run)
  make_read_only()
  before = snapshot(run)
  _refused(_launch(_ARGS + [f'--workdir={os.path.join(mount_point, "new")}'], data_dir),
           'cannot write to --workdir=')
  proc = _launch([f'--workdir={run}', '--mode=eval'])
  assert proc.returncode == 0 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert 'not saved' in proc.stdout + proc.stderr
  with open(os.path.join(run, 'results.json')) as f:
    top1 = json.load(f)['top1']
  assert f'{top1:.2f}' in proc.stdout + proc.stderr
  assert snapshot(run) == before


def test_a_number_out_of_range_is_one_line_before_anything_is_written(copy, tmp_path, data_dir):
  workdir, before = copy
  line = _refused(_launch(_ARGS + [f'--workdir={workdir}', '--config.batch_size=-8'], data_dir),
                  'batch_size=-8', 'at least 1')
  assert line.startswith('error: ')
  assert snapshot(workdir) == before
  fresh = tmp_path / 'fresh'
  _refused(_launch(_ARGS + [f'--workdir={fresh}', '--config.batch_size=0'], data_dir),
           'batch_size=0')
  assert not fresh.exists()  # nothing was written, not even the directory
  # The one place checks every field (the command line above is one example).
  for field, value, needle in [('eval_every', -1, 'eval_every=-1'), ('seed', -1, 'seed=-1'),
                               ('model.dtype', 'float16', 'float32, bfloat16'),
                               ('optimizer.momentum', 1.0, 'below 1'),
                               ('optimizer.decay', 'bn', 'use one of all, kernels'),
                               ('optimizer.learning_rate', float('nan'), 'finite'),
                               ('augment.scale', (0.5, -1.0), 'augment.scale=-1.0'),
                               ('mean_teacher.ema_decay', 1.5, 'from 0 to 1'),
                               ('mean_teacher.labeled_batch_size', 0, 'at least 1')]:
    with pytest.raises(UserError, match=re.escape(needle)):
      preflight.check_config(tiny_config('mean_teacher', **{field: value}))
  preflight.check_config(tiny_config('mean_teacher'))
  for method in ('fixmatch', 'ssl_gan', 'deep_cluster', 'exemplar_cnn', 'kmeans_svm',
                 'kmeans_pseudo_label', 'pseudo_label'):
    preflight.check_config(tiny_config(method))  # every preset is in range


def test_a_second_process_in_a_workdir_is_refused_naming_the_first(tmp_path, data_dir):
  workdir = tmp_path / 'run'
  log = open(tmp_path / 'first.log', 'w')
  first = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, 'launch.py'), f'--workdir={workdir}'] + _ARGS +
      ['--config.num_steps=100000', f'--config.data.data_dir={data_dir}'],
      stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)
  try:
    lock = workdir / workdir_lock.LOCK_FILE
    deadline = time.time() + 120
    while not (lock.exists() and lock.read_text().strip() == str(first.pid)):
      assert first.poll() is None and time.time() < deadline, (tmp_path / 'first.log').read_text()
      time.sleep(0.2)
    os.kill(first.pid, signal.SIGSTOP)  # holds the lock and writes nothing meanwhile
    before = snapshot(workdir)
    _refused(_launch(_ARGS + ['--config.num_steps=100000', f'--workdir={workdir}'], data_dir),
             f'{workdir} is in use by process {first.pid}')
    assert snapshot(workdir) == before
  finally:
    first.kill()  # SIGKILL: the kernel drops its lock
    first.wait()
    log.close()
  assert lock.exists()  # left behind by the killed run, but not locked:
  with workdir_lock.held(str(workdir)):
    assert lock.read_text().strip() == str(os.getpid())
  assert not lock.exists()
  with workdir_lock.held(str(workdir), enabled=False):  # processes 1.. of a multi-host run
    assert not lock.exists()


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path, data_dir, finished):
  del finished  # digits are prepared: tfds's progress bars would be lines of their own
  workdir = tmp_path / 'run'
  log_path = tmp_path / 'run.log'
  with open(log_path, 'w') as log:
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, 'launch.py'), f'--workdir={workdir}'] + _ARGS +
        ['--config.num_steps=100000', '--config.checkpoint_every=100000',
         '--config.eval_every=0', '--config.log_every=50', f'--config.data.data_dir={data_dir}'],
        stdout=subprocess.DEVNULL, stderr=log, env=_env(), cwd=ROOT)
    deadline = time.time() + 120
    while 'Compiled;' not in log_path.read_text():
      assert proc.poll() is None and time.time() < deadline, log_path.read_text()
      time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, log_path.read_text()[-3000:]
  text = log_path.read_text()
  said = [l for l in text.splitlines() if not _LOG_LINE.match(l)]
  assert 'Traceback' not in text and len(said) == 1, text[-3000:]
  step = int(re.fullmatch(r'Stopped at step (\d+) on Ctrl-C after saving a checkpoint; run the '
                          r'same command to resume\.', said[0]).group(1))
  assert os.listdir(workdir / 'checkpoints') == [str(step)]
  assert not (workdir / 'results.json').exists() and not (workdir / '.lock').exists()
  # What was said from the start: data, then the compile; the ETA after it.
  assert text.index('Preparing digits') < text.index('Compiling') < text.index('Compiled;')


def test_a_second_ctrl_c_stops_at_once():
  from sslj import preemption as preemption_lib, train
  with preemption_lib.Preemption() as preemption:
    os.kill(os.getpid(), signal.SIGINT)
    assert preemption.requested
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(train.Interrupted, match='Stopped at step 7 on Ctrl-C'):
      preemption.stopped(7)


def test_damaged_or_finished_run_files_change_nothing(copy, data_dir, tmp_path):
  workdir, before = copy
  again = _launch(_ARGS + [f'--workdir={workdir}'], data_dir)
  assert again.returncode == 0 and again.stderr == '', again.stderr[-3000:]
  assert 'holds a finished run; nothing to do' in again.stdout
  assert snapshot(workdir) == before  # no second evaluation, the same wall_s

  config_json = os.path.join(workdir, 'config.json')
  with open(config_json, 'rb') as f:
    whole = f.read()
  with open(config_json, 'wb') as f:
    f.write(whole[:len(whole) // 2])
  damaged = snapshot(workdir)
  _refused(_launch(_ARGS + [f'--workdir={workdir}'], data_dir), f'{config_json} is damaged')
  assert snapshot(workdir) == damaged

  # metrics.jsonl cut off mid-line (a power cut): that line goes, with a warning.
  metrics = tmp_path / 'metrics.jsonl'
  metrics.write_text('{"step": 4, "train/loss": 2.2}\n{"step": 8, "train/lo')
  book = logbook.Logbook(str(tmp_path), resume_step=6, total_steps=12)
  book.close()
  assert metrics.read_text() == '{"step": 4, "train/loss": 2.2}\n'
  metrics.write_text('{"step": 4\n{"step": 5}\n')
  with pytest.raises(UserError, match='damaged at line 1'):
    logbook.Logbook(str(tmp_path), resume_step=6, total_steps=12)
  assert metrics.read_text() == '{"step": 4\n{"step": 5}\n'


def test_settings_that_would_be_silently_ignored_are_refused_up_front(
    tmp_path, data_dir, caplog):
  workdir = tmp_path / 'dc'
  _refused(_launch(['--config=configs/deep_cluster.py', f'--workdir={workdir}',
                    '--config.num_steps=200'], data_dir),
           'num_steps=200 would be ignored', '--config.num_epochs=0')
  assert not workdir.exists()

  # Pseudo-Label whose ramp starts after the last step: said, not hidden.
  from sslj import methods, train
  config = tiny_config('pseudo_label', **{'data.data_dir': data_dir})
  with caplog.at_level('WARNING'):
    methods.get('pseudo_label').make(config, train.load_data(config))
  assert any('trains on the labels only' in r.getMessage() for r in caplog.records)

  # A sweep refuses an impossible cell before it trains any other.
  from sslj import sweep
  with pytest.raises(UserError, match='fixmatch, all labels per class, seed 0: .*nothing was '
                     'trained'):
    sweep.run_sweep(['configs/fixmatch.py'], [f'--config.data.data_dir={data_dir}',
                                              '--config.num_steps=2'], [2, None], [0],
                    str(tmp_path / 'sweep'))
  assert not (tmp_path / 'sweep').exists()


def test_the_eta_starts_after_the_first_step(tmp_path):
  book = logbook.Logbook(str(tmp_path), resume_step=0, total_steps=1000)
  time.sleep(1.0)  # what compiling the first step costs
  book.first_step_done(1)
  rate = book.progress(100, {'loss': 1.0})['steps_per_s']
  book.close()
  assert rate > 200  # 99 steps in well under the compile's second


def test_a_long_feature_pass_says_how_far_it_is_and_when_it_ends(monkeypatch):
  """logbook.Progress: a line every 30 s with the rate from the first chunk on and the ETA."""
  clock = iter([0.0, 5.0, 10.0, 20.0, 40.0, 45.0, 75.0, 200.0])
  monkeypatch.setattr(logbook.time, 'perf_counter', lambda: next(clock))
  lines = []
  monkeypatch.setattr(logbook.logging, 'info', lambda fmt, *args: lines.append(fmt % args))
  progress = logbook.Progress('Feature statistics', 1000)  # t=0
  progress.update(100)   # t=5: the first chunk (its compile) starts the rate's clock
  progress.update(200)   # t=10: under 30 s since the start: quiet
  progress.update(300)   # t=20
  progress.update(500)   # t=40: 400 images in 35 s
  progress.update(600)   # t=45: 5 s after the last line: quiet
  progress.update(800)   # t=75: 700 images in 70 s
  progress.update(1000)  # t=200: done: the caller's own line says how long it took
  assert lines == ['Feature statistics: 500/1000 images (11 images/s, ETA 0:44)',
                   'Feature statistics: 800/1000 images (10 images/s, ETA 0:20)']
