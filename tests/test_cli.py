"""Bad input: one clear line on stderr, exit status 2, nothing written or lost."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


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
