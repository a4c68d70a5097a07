"""Bad input to the use modes: exit status 2, one `error:` line, nothing written.

Every case fails before any data is loaded or anything compiled, so no run
needs training: a config.json alone stands for a run without checkpoints.
"""

import os
import re

import pytest

from conftest import tiny_config
from sslj.errors import UserError
from sslj.use import commands
from test_use_cli import _finish, _start


def _assert_one_clear_line(proc, *needles):
  assert proc.returncode == 2, (proc.returncode, proc.stderr_text[-2000:])
  errors = [l for l in proc.stderr_text.splitlines() if l.startswith('error: ')]
  assert len(errors) == 1 and 'Traceback' not in proc.stderr_text, proc.stderr_text[-2000:]
  for needle in needles:
    assert needle in errors[0], errors[0]


def test_bad_input_exits_with_one_line(tmp_path):
  """No run, no checkpoint, an unknown split, missing images: each fails before loading."""
  config = tiny_config()
  empty = tmp_path / 'empty'
  empty.mkdir()
  untrained = tmp_path / 'untrained'
  untrained.mkdir()
  (untrained / 'config.json').write_text(config.to_json_best_effort())
  bad = [
      (['--mode=eval', f'--workdir={empty}'], ('config.json',)),
      (['--mode=export', f'--workdir={untrained}'], ('no checkpoint',)),
      (['--mode=probe', f'--workdir={untrained}', '--split=validation'], ("'validation'",)),
      (['--mode=predict', f'--workdir={untrained}', f'--images={tmp_path / "missing"}'],
       ('does not exist',)),
      (['--mode=eval', f'--workdir={untrained}', '--images=x.png'], ('--images',)),
  ]
  # They fail before loading data, so they run side by side to save time.
  started = [(_start(*args), needles) for args, needles in bad]
  for proc, needles in started:
    _assert_one_clear_line(_finish(proc), *needles)
  assert os.listdir(empty) == [] and os.listdir(untrained) == ['config.json']


@pytest.mark.parametrize('mode, flags, needle', [
    ('eval', {'images': 'x'}, '--images does not apply to --mode=eval'),
    ('export', {'split': 'train'}, '--split does not apply'),
    ('predict', {}, 'needs --images'),
    ('eval', {'config': object()}, 'drop --config'),
    ('eval', {'step': -1}, '--step=-1'),
])
def test_flags_a_mode_cannot_use_are_refused(mode, flags, needle, tmp_path):
  with pytest.raises(UserError, match=re.escape(needle)):
    commands.run(mode, str(tmp_path), **flags)
  assert os.listdir(tmp_path) == []
