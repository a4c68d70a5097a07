"""sslj.report: the results page is made from constructed runs, cell by cell."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sslj import provenance, report, run_records
from sslj.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(path, value):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    if path.endswith('.jsonl'):
      f.writelines(json.dumps(v) + '\n' for v in value)
    else:
      json.dump(value, f)


def make_run(folder, *, method='fixmatch', seed=0, top1=70.0, top5=95.0, steps=4,
             curve=((2, 60.0), (4, 70.0)), wall=125.0, lr=0.03, commit='abcdef0123',
             dirty=False, load=1.5, command=None):
  command = command or (f'python launch.py --config=configs/{method}.py:seed={seed} '
                        f'--workdir=runs/t/{method}_seed{seed}')
  _write(os.path.join(folder, 'results.json'), {
      'method': method, 'dataset': 'digits', 'labels_per_class': 5, 'seed': seed,
      'num_steps': steps, 'wall_s': wall, 'top1': top1, 'top5': top5,
      'models': {'raw': {'top1': top1 - 1, 'top5': top5}, 'ema': {'top1': top1, 'top5': top5}},
      'provenance': {'sslj_version': '0.1.0', 'commit': commit, 'dirty': dirty,
                     'command': command, 'device_kind': 'cpu', 'device_count': 1,
                     'host_cpu': 'Test CPU', 'host_cores': 2, 'load_average': [load, 1, 1],
                     'jax_version': '0.10.2', 'finished': f'2026-12-0{seed + 1}T10:00:00Z'}})
  _write(os.path.join(folder, 'config.json'),
         {'method': method, 'seed': seed, 'eval_every': 2 + seed,
          'optimizer': {'learning_rate': lr}})
  _write(os.path.join(folder, 'metrics.jsonl'),
         [{'step': 1, 'train/loss': 1.0}]
         + [{'step': s, 'eval/ema/top1': v, 'eval/raw/top1': v - 1} for s, v in curve])


@pytest.fixture
def table(tmp_path):
  folder = tmp_path / 'runs' / 'fm'
  make_run(folder / 'fixmatch_seed0', seed=0, top1=70.0, curve=((2, 60.0), (4, 70.0)), wall=100)
  make_run(folder / 'fixmatch_seed1', seed=1, top1=73.0, top5=97.0, curve=((2, 62.0), (4, 73.0)),
           wall=200, load=3.25)
  make_run(folder / 'supervised' / 'seed0', method='supervised', top1=65.5, curve=((4, 65.5),),
           commit='1234567fff', dirty=True)
  _write(str(folder / 'table.json'),
         {'title': 'Digits, 5 labels per class', 'text': 'Two methods.',
          'rows': [{'key': 'supervised', 'label': 'supervised baseline'},
                   {'key': 'fixmatch', 'label': 'FixMatch', 'note': 'reference draws'}],
          'at_steps': [2, 4], 'models': ['raw'], 'curves': True})
  return folder


def test_a_table_of_runs_is_made_cell_by_cell(table, tmp_path):
  out = tmp_path / 'docs' / 'results.md'
  text = report.report([str(table)], str(out), command='python -m sslj.report --runs=X')
  assert out.read_text() == text
  lines = text.splitlines()
  assert lines[0] == '# Results'
  assert '- [Digits, 5 labels per class](#digits-5-labels-per-class)' in lines
  assert '## Digits, 5 labels per class' in lines
  assert 'Two methods.' in lines
  header = lines.index('| row | method | dataset, labels/class | steps | top-1 | seeds | top-5 '
                       '| top-1 at 2 | top-1 at 4 | top-1 of raw | wall per run | note |')
  mean, std = np.mean([70.0, 73.0]), np.std([70.0, 73.0], ddof=1)
  assert lines[header + 2] == ('| supervised baseline | supervised | digits, 5 | 4 | **65.50** | '
                               '65.50 (seed 0) | 95.00 | — | 65.50 | 64.50 | 2 min 05 s |  |')
  assert lines[header + 3] == (f'| FixMatch | fixmatch | digits, 5 | 4 | **{mean:.2f} ± {std:.2f}** '
                               '| 70.00 (seed 0), 73.00 (seed 1) | 96.00 ± 1.41 | 61.00 ± 1.41 '
                               '| 71.50 ± 2.12 | 70.50 ± 2.12 | 1 min 40 s to 3 min 20 s | reference draws |')
  assert ('- FixMatch: `python launch.py --config=configs/fixmatch.py:seed=S '
          '--workdir=runs/t/fixmatch_seedS`') in lines
  assert '- Code: sslj 0.1.0, commit 1234567 with local changes, abcdef0.' in lines
  assert '- Machine: Test CPU, 1 x cpu; JAX 0.10.2.' in lines
  assert '- Finished: 2026-12-01 to 2026-12-02.' in lines
  assert '- Load average (1 minute) as the runs finished: 1.5 to 3.2, on 2 cores.' in lines
  picture = tmp_path / 'docs' / 'images' / 'fm_curves.png'
  assert picture.stat().st_size > 1000
  assert '![Digits, 5 labels per class: top-1 against steps](images/fm_curves.png)' in lines


def test_records_reproduce_the_table_without_the_run_folders(table, tmp_path):
  (table / 'fixmatch_seed0' / 'checkpoints' / '4').mkdir(parents=True)
  (table / 'fixmatch_seed0' / 'checkpoints' / '4' / 'big').write_bytes(b'x' * 100)
  unfinished = table / 'uda_seed0'
  make_run(unfinished)
  (unfinished / 'results.json').unlink()
  records = tmp_path / 'records'
  first = report.report([str(table)], str(tmp_path / 'a.md'), records=str(records))
  assert not (records / 'fm' / 'fixmatch_seed0' / 'checkpoints').exists()
  assert sorted(os.listdir(records / 'fm' / 'fixmatch_seed0')) == ['config.json', 'metrics.jsonl',
                                                                   'results.json']
  assert not (records / 'fm' / 'uda_seed0').exists()  # unfinished: left out whole
  assert (records / 'fm' / 'table.json').exists()
  again = report.report([str(records)], str(tmp_path / 'b.md'))
  assert again == first


def test_a_sweep_folder_gives_the_sweeps_table(tmp_path):
  sweep = tmp_path / 'sweep'
  _write(str(sweep / 'sweep.json'), {'rows': ['supervised', 'fixmatch']})
  for row, values in (('supervised', (60.0, 64.0)), ('fixmatch', (80.0,))):
    for seed, top1 in enumerate(values):
      make_run(sweep / row / 'lpc2' / f'seed{seed}', method=row, seed=seed, top1=top1,
               command='python -m sslj.sweep --config=configs/x.py --workdir=runs/sweep')
  lines = report.report([str(sweep)], None).splitlines()
  assert '| method | 2 | top-5 (2 per class) |' in lines
  assert '| supervised | 62.00 ± 2.83 | 95.00 ± 0.00 |' in lines
  assert '| fixmatch | 80.00 (n=1) | 95.00 (n=1) |' in lines
  assert '- `python -m sslj.sweep --config=configs/x.py --workdir=runs/sweep`' in lines
  assert '3 runs, 6 min 15 s of training in all (2 min 05 s a run).' in lines


def test_a_gain_column_pairs_each_row_with_its_baseline_seed_by_seed(table):
  make_run(table / 'supervised' / 'seed1', method='supervised', seed=1, top1=74.0)
  make_run(table / 'uda_seed2', method='uda', seed=2, top1=80.0)
  spec = json.loads((table / 'table.json').read_text())
  spec['rows'][0]['short'] = 'the baseline'
  spec['rows'][1]['baseline'] = 'supervised'
  spec['rows'].append({'key': 'uda', 'label': 'UDA', 'baseline': 'supervised'})
  del spec['curves']
  _write(str(table / 'table.json'), spec)
  lines = report.report([str(table)], None).splitlines()
  header = next(i for i, l in enumerate(lines) if l.startswith('| row |'))
  assert lines[header].endswith('| top-1 of raw | gain (same seeds) | wall per run | note |')
  # FixMatch 70, 73 against 65.5, 74 on seeds 0 and 1: +4.5 and -1.
  gains = np.array([4.5, -1.0])
  assert (f'| {gains.mean():+.2f} ± {gains.std(ddof=1):.2f} over the baseline (1 of 2 seeds '
          'ahead) |') in lines[header + 3]
  assert '|  | 2 min 05 s |' in lines[header + 2]  # the baseline row itself has no gain
  assert '| — (no seed in common with the baseline) |' in lines[header + 4]
  assert any('Gain: the row\'s top-1 minus its baseline row\'s on the same seed' in l
             for l in lines)
  spec['rows'][1]['baseline'] = 'mixmatch'
  _write(str(table / 'table.json'), spec)
  with pytest.raises(UserError, match="row 'fixmatch' has baseline 'mixmatch', which is not a row"):
    report.report([str(table)], None)


def test_runs_of_one_row_must_share_their_config(table):
  make_run(table / 'fixmatch_seed2', seed=2, lr=0.1)
  with pytest.raises(UserError, match=r"one row \('fixmatch'\).*optimizer.learning_rate"):
    report.report([str(table)], None)


def test_a_row_with_one_seed_twice_is_refused(table):
  make_run(table / 'fixmatch' / 'seed0', seed=0)
  with pytest.raises(UserError, match='same seed 0'):
    report.report([str(table)], None)


def test_the_seed_part_of_a_path_names_the_row():
  assert run_records.row_key('fixmatch_seed12') == 'fixmatch'
  assert run_records.row_key(os.path.join('fixmatch', 'seed0')) == 'fixmatch'
  assert run_records.row_key('seed3') == '.'
  assert run_records.row_key('mt_w100') == 'mt_w100'


def test_command_line_makes_the_page_and_refuses_bad_folders(table, tmp_path):
  out = tmp_path / 'r.md'
  env = {**os.environ, 'PYTHONPATH': ROOT}
  done = subprocess.run([sys.executable, '-m', 'sslj.report', f'--runs={table}', f'--out={out}'],
                        cwd=ROOT, capture_output=True, text=True, env=env, check=False)
  assert done.returncode == 0, done.stderr
  assert f'Made by `python -m sslj.report --runs={table} --out={out}`' in out.read_text()
  bad = subprocess.run([sys.executable, '-m', 'sslj.report', f'--runs={tmp_path / "none"}'],
                       cwd=ROOT, capture_output=True, text=True, env=env, check=False)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines() == [f'error: --runs={tmp_path / "none"} is not a folder.']


def test_provenance_records_the_machine_and_its_load():
  record = provenance.record()
  assert record['host_cores'] == os.cpu_count()
  assert len(record['load_average']) == 3 and all(v >= 0 for v in record['load_average'])
  assert record['command'].startswith('python ')
  assert set(record) >= {'sslj_version', 'commit', 'dirty', 'device_kind', 'device_count',
                         'host_cpu', 'jax_version', 'finished'}


def test_the_committed_results_page_is_the_tools_output_from_the_committed_records(tmp_path):
  """docs/results.md is exactly what the README's report command makes from docs/records."""
  import shutil
  shutil.copytree(os.path.join(ROOT, 'docs', 'records'), tmp_path / 'docs' / 'records')
  env = {**os.environ, 'PYTHONPATH': ROOT}
  done = subprocess.run([sys.executable, '-m', 'sslj.report', '--runs=docs/records',
                         '--out=docs/results.md'], cwd=tmp_path, capture_output=True, text=True,
                        env=env, check=False)
  assert done.returncode == 0, done.stderr
  with open(os.path.join(ROOT, 'docs', 'results.md'), encoding='utf-8') as f:
    committed = f.read()
  assert (tmp_path / 'docs' / 'results.md').read_text(encoding='utf-8') == committed
  for picture in os.listdir(tmp_path / 'docs' / 'images'):
    assert os.path.exists(os.path.join(ROOT, 'docs', 'images', picture)), picture


def test_provenance_writes_a_module_run_as_python_dash_m(tmp_path):
  (tmp_path / 'show_command.py').write_text('from sslj import provenance\nprint(provenance.command())\n')
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join([ROOT, str(tmp_path)])}
  done = subprocess.run([sys.executable, '-m', 'show_command', '--runs=a b'], capture_output=True,
                        text=True, env=env, check=True)
  assert done.stdout.strip() == "python -m show_command '--runs=a b'"
  assert report._generic_command('python /x/sslj/sweep.py --seeds=1') == (
      'python -m sslj.sweep --seeds=1')


def test_reference_lines_are_drawn_and_named_under_the_curves(table, tmp_path):
  plain = report.report([str(table)], str(tmp_path / 'plain' / 'results.md'))
  spec = json.loads((table / 'table.json').read_text())
  spec['lines'] = [{'value': 71, 'label': 'the target'}]
  _write(str(table / 'table.json'), spec)
  lined = report.report([str(table)], str(tmp_path / 'lined' / 'results.md'))
  assert 'Dashed: the target (71.00).' in lined.splitlines()
  assert 'Dashed:' not in plain
  from matplotlib import image  # pylint: disable=g-import-not-at-top
  before = image.imread(str(tmp_path / 'plain' / 'images' / 'fm_curves.png'))
  after = image.imread(str(tmp_path / 'lined' / 'images' / 'fm_curves.png'))
  # Rows of the picture that are dark across a third of its width: the axes' top and bottom
  # edges, and with the line drawn, the dashed line.
  def long_dark_rows(picture):
    return int(((picture[..., :3] < 0.45).all(axis=-1).mean(axis=1) > 0.3).sum())
  assert long_dark_rows(after) > long_dark_rows(before)
  assert after.shape[0] > before.shape[0]  # the legend's entry for the line
  spec['lines'] = [{'value': 'high', 'label': 'the target'}]
  _write(str(table / 'table.json'), spec)
  with pytest.raises(UserError, match='each of "lines" needs a number "value"'):
    report.report([str(table)], str(tmp_path / 'bad' / 'results.md'))
