"""Bad input: one clear line on stderr, exit status 2, nothing written or lost."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, snapshot


def _launch(args, data_dir, devices=1, timeout=300):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             JAX_PLATFORMS='cpu')
  cmd = [sys.executable, os.path.join(ROOT, 'launch.py')] + args
  if data_dir and not any(a.startswith('--config=') and 'data_dir' in a for a in args):
    cmd.append(f'--config.data.data_dir={data_dir}')
  return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout,
                        cwd=ROOT)


def _assert_one_clear_line(proc, *needles):
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  errors = [l for l in lines if l.startswith('error: ')]
  assert len(errors) == 1, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  for needle in needles:
    assert needle in errors[0], errors[0]


CASES = {
    'unknown dataset': (['--config=configs/supervised.py:dataset=mnist_typo'], 1, ('mnist_typo',)),
    'unknown method': (['--config=configs/supervised.py', '--config.method=mean_teecher'], 1,
                       ('mean_teecher',)),
    'unknown config-string key': (['--config=configs/supervised.py:labels=10'], 1, ('labels=10',)),
    'misspelt config field': (['--config=configs/supervised.py', '--config.optimiser.lr=0.1'], 1,
                              ('optimiser',)),
    'labels per class 0': (['--config=configs/supervised.py:labels_per_class=0'], 1,
                           ('labels_per_class',)),
    'labels per class negative': (['--config=configs/supervised.py:labels_per_class=-3'], 1,
                                  ('labels_per_class',)),
    'more labels than the data has': (['--config=configs/supervised.py:labels_per_class=500'], 1,
                                      ('labels_per_class',)),
    'missing image folder': (['--config=configs/supervised.py:dataset=image_folder:/nonexistent/imgs'],
                             1, ('/nonexistent/imgs',)),
    'batch not dividing over devices': (['--config=configs/supervised.py', '--config.batch_size=30'],
                                        4, ('batch_size=30', '4 devices')),
    'unknown model': (['--config=configs/supervised.py:model=resnet9000'], 1, ('resnet9000',)),
    'model field the model lacks': (['--config=configs/supervised.py', '--config.model.stem=small'],
                                    1, ('model.stem', 'model small_cnn has no field stem',
                                        'bn_momentum, dropout_rate, first_kernel_size, widths')),
    'missing config file': (['--config=configs/nonexistent.py'], 1,
                            ('configs/nonexistent.py', 'No such file')),
}


@pytest.mark.parametrize('name', sorted(CASES))
def test_bad_input_exits_with_one_line(name, tmp_path, data_dir):
  args, devices, needles = CASES[name]
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'results.json').write_text('{"earlier": true}\n')
  proc = _launch(args + [f'--workdir={workdir}'], data_dir, devices=devices)
  _assert_one_clear_line(proc, *needles)
  # Earlier results are untouched and nothing new was written.
  assert json.loads((workdir / 'results.json').read_text()) == {'earlier': True}
  assert sorted(os.listdir(workdir)) == ['results.json']


def _empty_data_directory(tmp_path, workdir):
  del workdir
  folder = tmp_path / 'my_images'
  folder.mkdir()
  return [f'--config=configs/supervised.py:dataset=image_folder:{folder}'], (f'{folder} is empty',)


def _every_image_unreadable(tmp_path, workdir):
  del workdir
  from PIL import Image
  root = tmp_path / 'pets'
  for sub in ('train/cat', 'train/dog', 'val/cat'):
    (root / sub).mkdir(parents=True)
  Image.new('RGB', (8, 8)).save(root / 'val' / 'cat' / 'ok.png')
  whole = (root / 'val' / 'cat' / 'ok.png').read_bytes()
  (root / 'train' / 'cat' / 'cut.png').write_bytes(whole[:len(whole) // 2])
  (root / 'train' / 'dog' / 'notes.txt').write_text('not an image')
  return ([f'--config=configs/supervised.py:dataset=image_folder:{root}'],
          (f'no readable images in {root}/train', 'cat/cut.png', 'dog/notes.txt'))


def _workdir_of_another_config(tmp_path, workdir):
  """A run of seed 1 with another learning rate, with its results and a checkpoint."""
  import importlib.util
  del tmp_path
  spec = importlib.util.spec_from_file_location('supervised_config',
                                                os.path.join(ROOT, 'configs', 'supervised.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config('seed=1')
  config.unlock()
  config.optimizer.learning_rate = 0.5
  (workdir / 'config.json').write_text(config.to_json_best_effort())
  (workdir / 'checkpoints' / '500').mkdir(parents=True)
  (workdir / 'checkpoints' / '500' / 'state').write_bytes(b'earlier state')
  return (['--config=configs/supervised.py'],
          (f'{workdir} holds a run with a different config', 'optimizer.learning_rate: 0.5 there',
           'seed: 1 there, 0 now'))


FILE_CASES = {
    'empty data directory': _empty_data_directory,
    'every image unreadable': _every_image_unreadable,
    'workdir of another config': _workdir_of_another_config,
}


@pytest.mark.parametrize('name', sorted(FILE_CASES))
def test_bad_files_exit_with_one_line(name, tmp_path, data_dir):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'results.json').write_text('{"earlier": true}\n')
  args, needles = FILE_CASES[name](tmp_path, workdir)
  before = snapshot(workdir)
  proc = _launch(args + [f'--workdir={workdir}'], data_dir)
  _assert_one_clear_line(proc, *needles)
  assert snapshot(workdir) == before


def test_a_diverging_learning_rate_stops_with_one_line(tmp_path, data_dir):
  """The run diverges a few steps in: the step is named, good checkpoints kept."""
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'results.json').write_text('{"earlier": true}\n')
  proc = _launch(['--config=configs/supervised.py', '--config.optimizer.learning_rate=1e6',
                  '--config.num_steps=60', '--config.log_every=10',
                  '--config.checkpoint_every=5', '--config.eval_every=0',
                  f'--workdir={workdir}'], data_dir)
  # Caught by the loss, or (first, here) by the state checked before each save.
  _assert_one_clear_line(proc, 'non-finite', 'Lower optimizer.learning_rate')
  error = next(l for l in proc.stderr.splitlines() if l.startswith('error: '))
  bad_step = int(re.search(r'non-finite (?:at|by) step (\d+);', error).group(1))
  assert (workdir / 'results.json').read_text() == '{"earlier": true}\n'
  saved = sorted(int(s) for s in os.listdir(workdir / 'checkpoints') if s.isdigit())
  # Every checkpoint holds a state from before the loss was first not finite.
  assert all(step <= bad_step for step in saved)
  if saved:
    assert f'last good checkpoint (step {saved[-1]}) is kept' in error
