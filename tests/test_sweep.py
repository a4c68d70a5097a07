"""The labels-per-class sweep: its table, skipping finished cells, one real tiny sweep."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from sslj import run_files, sweep
from sslj.errors import UserError

SUPERVISED = os.path.join(ROOT, 'configs', 'supervised.py')
MEAN_TEACHER = os.path.join(ROOT, 'configs', 'mean_teacher.py')


def _write_result(workdir, row, lpc, seed, top1, top5):
  cell = os.path.join(workdir, row, f'lpc{lpc}', f'seed{seed}')
  os.makedirs(cell, exist_ok=True)
  with open(os.path.join(cell, 'results.json'), 'w') as f:
    json.dump({'top1': top1, 'top5': top5, 'labels_per_class': lpc, 'seed': seed}, f)
  return cell


def _read_csv(path):
  with open(path, newline='', encoding='utf-8') as f:
    return list(csv.reader(f))


def test_table_from_results_files(tmp_path):
  rng = np.random.default_rng(0)
  top1 = {}
  for row in ('supervised', 'mean_teacher'):
    for lpc in (1, 4):
      top1[row, lpc] = rng.uniform(10, 90, 3)
      for seed, value in enumerate(top1[row, lpc]):
        _write_result(tmp_path, row, lpc, seed, float(value), float(value) + 5)
  # A hand-computed cell: mean 92, sample std 2 (the population std is 1.63).
  for seed, value in enumerate([90.0, 92.0, 94.0]):
    _write_result(tmp_path, 'supervised', 16, seed, value, 99.0 + seed / 2)
  _write_result(tmp_path, 'mean_teacher', 16, 0, 95.5, 99.75)  # one seed only
  os.makedirs(tmp_path / 'supervised' / 'lpc500')
  (tmp_path / 'supervised' / 'lpc500' / 'unavailable.json').write_text(
      '{"labels_per_class": 500, "smallest_class": 130}')
  (tmp_path / 'sweep.json').write_text('{"rows": ["supervised", "mean_teacher"]}')

  markdown = sweep.write_tables(str(tmp_path))
  assert (tmp_path / 'table.md').read_text(encoding='utf-8') == markdown

  def stat(values):
    return f'{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}'
  header = ['method', '1', '4', '16', '500', 'top-5 (16 per class)']
  expected = [
      header,
      ['supervised', stat(top1['supervised', 1]), stat(top1['supervised', 4]), '92.00 ± 2.00',
       'n/a (> 130 per class)', '99.50 ± 0.50'],
      # One seed shows just its value, marked as fewer seeds than the rest; no
      # lpc500 directory for this row: not run.
      ['mean_teacher', stat(top1['mean_teacher', 1]), stat(top1['mean_teacher', 4]),
       '95.50 (n=1)', '—', '99.75 (n=1)'],
  ]
  assert _read_csv(tmp_path / 'table.csv') == expected
  lines = markdown.splitlines()
  table = lines[lines.index('| ' + ' | '.join(header) + ' |'):]
  assert table[1] == '|---|---|---|---|---|---|'
  assert table[2:] == ['| ' + ' | '.join(r) + ' |' for r in expected[1:]]
  assert 'top-5 at the largest label count with results (16)' in markdown


def test_table_of_an_empty_or_missing_workdir_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match='no sweep cells'):
    sweep.write_tables(str(tmp_path))
  with pytest.raises(UserError, match='does not exist'):
    sweep.write_tables(str(tmp_path / 'nothing'))


@pytest.mark.parametrize('flag,text,needle', [
    ('labels_per_class', '0,1', 'integers >= 1'),
    ('labels_per_class', '4,x', 'integers >= 1'),
    ('labels_per_class', '1,,2', 'integers >= 1'),
    ('labels_per_class', '2,2', 'repeats'),
    ('seeds', '-1', 'integers >= 0'),
    ('seeds', '', 'integers >= 0'),
    ('seeds', '0,1,0', 'repeats'),
])
def test_bad_lists_are_one_line_user_errors(flag, text, needle):
  with pytest.raises(UserError, match=needle) as info:
    sweep.parse_list(flag, text)
  assert '\n' not in str(info.value) and f'--{flag}=' in str(info.value)


def test_good_lists():
  assert sweep.parse_list('labels_per_class', '1, 2,64,all') == [1, 2, 64, None]
  assert sweep.parse_list('seeds', '0,1,2') == [0, 1, 2]


class _Recorder:
  """Stands in for train_and_evaluate: records the cells and writes results."""

  def __init__(self):
    self.calls = []

  def __call__(self, config, workdir):
    self.calls.append((os.path.relpath(workdir, self.root), config))
    result = {'top1': 50.0 + config.seed, 'top5': 90.0}
    run_files.claim_workdir(workdir, config)
    run_files.write_results(workdir, result)
    return result


def test_finished_cells_are_skipped_and_configs_carry_the_cell(tmp_path):
  train = _Recorder()
  train.root = str(tmp_path)
  done = _write_result(tmp_path, 'supervised', 2, 1, 11.0, 22.0)
  mtime = os.stat(os.path.join(done, 'results.json')).st_mtime_ns
  specs = [SUPERVISED, f'{MEAN_TEACHER}:dataset=cifar10,model=convlarge']
  table = sweep.run_sweep(specs, ['--config.num_steps=7'], [2, 400], [0, 1], str(tmp_path),
                          train_fn=train)
  ran = [path for path, _ in train.calls]
  mt = 'mean_teacher_dataset=cifar10_model=convlarge'
  assert ran == [os.path.join('supervised', 'lpc2', 'seed0'),
                 os.path.join('supervised', 'lpc400', 'seed0'),
                 os.path.join('supervised', 'lpc400', 'seed1'),
                 os.path.join(mt, 'lpc2', 'seed0'), os.path.join(mt, 'lpc2', 'seed1'),
                 os.path.join(mt, 'lpc400', 'seed0'), os.path.join(mt, 'lpc400', 'seed1')]
  assert os.stat(os.path.join(done, 'results.json')).st_mtime_ns == mtime
  for path, config in train.calls:
    lpc, seed = path.split(os.sep)[1:]
    assert config.data.labels_per_class == int(lpc[3:]) and config.seed == int(seed[4:])
    assert config.num_steps == 7
  # The labels_per_class-keyed preset of the CIFAR-10 Mean Teacher applied.
  ema = {c.data.labels_per_class: c.mean_teacher.ema_decay
         for p, c in train.calls if p.startswith(mt)}
  assert ema == {2: 0.97, 400: 0.99}
  assert '| supervised | 30.50 ± 27.58 | 50.50 ± 0.71 | 90.00 ± 0.00 |' in table
  assert json.loads((tmp_path / 'sweep.json').read_text())['rows'] == ['supervised', mt]

  train.calls.clear()
  sweep.run_sweep(specs, ['--config.num_steps=7'], [2, 400], [0, 1], str(tmp_path), train_fn=train)
  assert train.calls == []


def test_eta_is_the_mean_recorded_training_time_of_finished_cells(tmp_path, caplog):
  """Cells finished earlier (or resumed) count with their whole recorded wall_s."""
  caplog.set_level('INFO')
  done = _write_result(tmp_path, 'supervised', 2, 0, 11.0, 22.0)
  with open(os.path.join(done, 'results.json')) as f:
    recorded = dict(json.load(f), wall_s=600.0)
  with open(os.path.join(done, 'results.json'), 'w') as f:
    json.dump(recorded, f)

  def train(config, workdir):
    run_files.claim_workdir(workdir, config)
    result = {'top1': 50.0, 'top5': 90.0, 'wall_s': 60.0}
    run_files.write_results(workdir, result)
    return result

  sweep.run_sweep([SUPERVISED], ['--config.num_steps=7'], [2], [0, 1, 2], str(tmp_path),
                  train_fn=train)
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith('Cell ')]
  # Seed 0 is done (600 s): 2 x 600 s left; seed 1 then runs in 60 s: seed 2's ETA is
  # their mean.
  assert lines[0].startswith('Cell 1/3') and 'skipped' in lines[0]
  assert lines[1].startswith('Cell 2/3') and 'ETA 20:00 (2 to run)' in lines[1]
  assert lines[2].startswith('Cell 3/3') and 'ETA 5:30 (1 to run)' in lines[2]


def test_a_changed_config_is_refused_before_anything_runs(tmp_path):
  train = _Recorder()
  train.root = str(tmp_path)
  sweep.run_sweep([SUPERVISED], ['--config.num_steps=7'], [2], [0], str(tmp_path), train_fn=train)
  os.remove(tmp_path / 'sweep.json')
  train.calls.clear()
  with pytest.raises(UserError, match='num_steps: 7 there, 8 now'):
    sweep.run_sweep([SUPERVISED], ['--config.num_steps=8'], [2, 4], [0], str(tmp_path),
                    train_fn=train)
  assert train.calls == [] and not os.path.exists(tmp_path / 'sweep.json')


@pytest.mark.parametrize('specs,overrides,needle', [
    ([f'{SUPERVISED}:seed=3'], [], "leave 'seed=3' out"),
    ([f'{SUPERVISED}:labels_per_class=3'], [], "leave 'labels_per_class=3' out"),
    ([SUPERVISED, SUPERVISED], [], 'same row'),
    ([], [], 'at least one --config'),
    (['configs/nope.py'], [], 'does not exist'),
    ([SUPERVISED], ['--config.optimiser.lr=1'], 'no field'),
    ([SUPERVISED], ['--config.num_steps=many'], 'num_steps'),
])
def test_bad_configs_are_user_errors(tmp_path, specs, overrides, needle):
  with pytest.raises(UserError, match=needle):
    sweep.run_sweep(specs, overrides, [2], [0], str(tmp_path), train_fn=None)
  assert os.listdir(tmp_path) == []


def test_tiny_sweep_on_digits_end_to_end(tmp_path, data_dir):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1')
  workdir = tmp_path / 'sweep'
  proc = subprocess.run(
      [sys.executable, '-m', 'sslj.sweep', '--config=configs/supervised.py',
       '--labels_per_class=2,500', '--seeds=0', f'--workdir={workdir}',
       '--config.num_steps=5', '--config.batch_size=16', '--config.log_every=5',
       '--config.eval_every=0', '--config.eval_batch_size=150',
       f'--config.data.data_dir={data_dir}'],
      capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Cell 1/2' in proc.stderr and 'Cell 2/2' in proc.stderr and 'ETA' in proc.stderr
  with open(workdir / 'supervised' / 'lpc2' / 'seed0' / 'results.json') as f:
    result = json.load(f)
  assert (result['labels_per_class'], result['seed'], result['num_steps']) == (2, 0, 5)
  # Digits' 1,347 training images hold 130 of the rarest class.
  assert json.loads((workdir / 'supervised' / 'lpc500' / 'unavailable.json').read_text()) == {
      'labels_per_class': 500, 'smallest_class': 130}
  assert not os.path.exists(workdir / 'supervised' / 'lpc500' / 'seed0')
  expected = ['supervised', f"{result['top1']:.2f}", 'n/a (> 130 per class)',
              f"{result['top5']:.2f}"]
  assert _read_csv(workdir / 'table.csv')[1] == expected
  assert '| ' + ' | '.join(expected) + ' |' in proc.stdout

  os.remove(workdir / 'table.csv')
  proc = subprocess.run(
      [sys.executable, '-m', 'sslj.sweep', '--table_only', f'--workdir={workdir}'],
      capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert _read_csv(workdir / 'table.csv')[1] == expected
