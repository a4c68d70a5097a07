"""Checks a training command passes before anything is prepared, compiled or written.

`check_config` range-checks every number and enumerated string of a config
in one place, so a bad value is one line naming the field, the value and
what is allowed, instead of a crash minutes later (or after the workdir
already recorded the bad config). `check_workdir` makes sure the run can
write its directory, with a real write of the longest file name the run
will create there, so a run never trains for an hour and then fails to save.

The rules look at field names, not at methods: counts (`num_*`, `*_size`,
`*_iters`, `*_dim`, ...) are at least 1, rates and decays lie in [0, 1], and
every other number is finite and not negative. A method's own fields follow
the same rules; what only the method knows (e.g. t1 <= t2) it checks in its
`build`, which also runs before the workdir is touched.
"""

from __future__ import annotations

import errno
import math
import os
import socket

from sslj import methods
from sslj import run_files
from sslj.errors import UserError
from sslj.methods import network
from sslj.ops import optim

# Fields with a fixed set of names, as the code that reads them defines it.
_CHOICES = {'model.dtype': tuple(network.DTYPES), 'optimizer.name': optim.OPTIMIZERS,
            'optimizer.schedule': optim.SCHEDULES, 'optimizer.decay': optim.DECAYED}

# Numbers that must be at least 1 (whole fields or leaf-name patterns).
_AT_LEAST_ONE = ('batch_size', 'eval_batch_size', 'log_every', 'keep_checkpoints')
_COUNT_PREFIXES = ('num_',)
_COUNT_SUFFIXES = ('_size', '_iters', '_dim', '_width', '_logs')
_COUNT_LEAVES = ('mu', 'stride')
# Counts where 0 means "off" or "derived": not negative is enough.
_ZERO_ALLOWED = ('num_steps', 'num_epochs', 'steps_per_epoch', 'first_kernel_size',
                 'randaugment_num_ops')
# Numbers that are probabilities, fractions or decay factors: 0 to 1.
_UNIT_LEAVES = ('threshold', 'cutout', 'dropout_rate', 'collapse_fraction', 'translate')
_UNIT_SUFFIXES = ('ema_decay',)
# Momentum-like factors: 0 <= x < 1 (1 would never forget the first gradient,
# or, for a BatchNorm's `bn_momentum`, the initial statistics).
_BELOW_ONE = ('momentum', 'b1', 'b2')
_BELOW_ONE_SUFFIXES = ('_momentum',)

# Checked where they are used, with a message that says more than a range:
# labels_per_class by the label split (it names `labels_per_class=all`).
_CHECKED_ELSEWHERE = ('data.labels_per_class',)

# Seeds seed jax.random.key, which takes an unsigned 32-bit integer.
_SEED_MAX = 2 ** 32 - 1


def _flat(config, prefix=''):
  for key, value in config.items():
    name = f'{prefix}{key}'
    if hasattr(value, 'items'):
      yield from _flat(value, name + '.')
    else:
      yield name, value


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _rule(name: str) -> tuple[float, float, bool, str]:
  """(low, high, high is excluded, text) of what a numeric field allows."""
  leaf = name.rpartition('.')[2]
  if name == 'seed':
    return 0, _SEED_MAX, False, f'an integer from 0 to {_SEED_MAX}'
  if leaf in _BELOW_ONE or leaf.endswith(_BELOW_ONE_SUFFIXES):
    return 0, 1, True, 'at least 0 and below 1'
  if leaf in _UNIT_LEAVES or leaf.endswith(_UNIT_SUFFIXES):
    return 0, 1, False, 'from 0 to 1'
  counted = (name in _AT_LEAST_ONE or leaf.startswith(_COUNT_PREFIXES)
             or leaf.endswith(_COUNT_SUFFIXES) or leaf in _COUNT_LEAVES)
  if counted and leaf not in _ZERO_ALLOWED:
    return 1, math.inf, False, 'at least 1'
  return 0, math.inf, False, 'a finite number >= 0'


def _check_number(name: str, value) -> None:
  low, high, open_high, allowed = _rule(name)
  bad = (not math.isfinite(value) or value < low or value > high
         or (open_high and value >= high))
  if bad:
    raise UserError(f'--config.{name}={value} is out of range: it must be {allowed}.')


def check_config(config) -> None:
  """Raises a one-line UserError for the first field out of its range.

  Raises:
    UserError: a number out of range (named with its value and the range),
      a string outside its choices, a `model.<field>` its model does not
      have (naming the fields it has), or `num_steps` < 1 with no `num_epochs`.
  """
  methods.registry()
  for name, value in _flat(config):
    if name in _CHECKED_ELSEWHERE:
      continue
    if name in _CHOICES and value not in _CHOICES[name]:
      new = run_files.VALUES_RENAMED.get(name, {}).get(value)
      renamed = f" ('{value}' is now called '{new}'.)" if new else ''
      raise UserError(f"--config.{name}='{value}' is not allowed: use one of "
                      f"{', '.join(_CHOICES[name])}.{renamed}")
    if _is_number(value):
      _check_number(name, value)
    elif isinstance(value, (tuple, list)):
      for item in value:
        if _is_number(item):
          _check_number(name, item)
  if config.num_epochs <= 0 and config.num_steps < 1:
    raise UserError(f'--config.num_steps={config.num_steps} is out of range: it must be at '
                    'least 1 (or set num_epochs > 0).')
  network.check_model_options(config)
  fold = config.data.get('fold')
  if fold is not None and not 0 <= fold <= 9:
    raise UserError(f'--config.data.fold={fold} is out of range: STL-10 has folds 0 to 9.')


def ignored_overrides(config, overridden) -> None:
  """Refuses a command-line `num_steps` that `num_epochs` would silently replace.

  `overridden` are the dotted field names given as `--config.NAME=...`.
  """
  if 'num_steps' in overridden and 'num_epochs' not in overridden and config.num_epochs > 0:
    raise UserError(f'--config.num_steps={config.num_steps} would be ignored: this config sets '
                    f'num_epochs={config.num_epochs:g}, which decides the steps; add '
                    '--config.num_epochs=0 to train for num_steps.')


def longest_relative_path(process_count: int = 1) -> str:
  """The longest path a run creates under its workdir, with generous widths.

  Orbax writes a step into `<step>.orbax-checkpoint-tmp-<timestamp>/` before
  renaming it; tensorBoardX names event files after the host.
  """
  step, stamp = '9' * 12, '9' * 20
  checkpoint = (f'checkpoints/{step}.orbax-checkpoint-tmp-{stamp}/default/'
                f'ocdbt.process_{process_count - 1}/d/{"f" * 32}')
  events = f'tensorboard/events.out.tfevents.{stamp}.{socket.gethostname()}'
  return max(checkpoint, events, key=len)


def _unwritable(workdir: str, error: OSError) -> UserError:
  reason = {errno.EROFS: 'it is on a read-only file system',
            errno.EACCES: 'permission denied', errno.EPERM: 'permission denied',
            errno.ENAMETOOLONG: 'its path is too long for the file system'}.get(
                error.errno, error.strerror or str(error))
  return UserError(f'cannot write to --workdir={workdir}: {reason}; choose a directory you '
                   'can write, with a shorter path if it is long.')


def check_workdir(workdir: str, process_count: int = 1) -> None:
  """Makes sure the run can create `workdir` and write every file it will.

  Writes (and removes) a small file whose name is as long as the longest name
  the run creates, and checks the longest path against the file system's
  limit. A workdir that does not exist is created.

  Raises:
    UserError: the path is a file, cannot be created or written, or the
      run's longest path would exceed the file system's limits.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f'--workdir={workdir} is a file, not a directory; choose another --workdir.')
  # The limits come from the nearest directory that exists, and are checked
  # before creating any: a too-long path must not leave half of itself behind.
  existing = os.path.abspath(workdir)
  while not os.path.isdir(existing):
    existing = os.path.dirname(existing)
  try:
    name_max = os.pathconf(existing, 'PC_NAME_MAX')
    path_max = os.pathconf(existing, 'PC_PATH_MAX')
  except (OSError, ValueError):
    name_max, path_max = 255, 4096
  longest = longest_relative_path(process_count)
  full = os.path.join(os.path.abspath(workdir), longest)
  if (max(map(len, full.encode().split(b'/'))) > name_max
      or len(full.encode()) >= path_max):
    raise UserError(f'--workdir={workdir} is too long: the run writes paths of '
                    f'{len(full.encode())} bytes under it, with names of up to '
                    f'{max(map(len, longest.split("/")))}, and the file system allows '
                    f'{path_max - 1} and {name_max}; choose a shorter --workdir.')
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise _unwritable(workdir, e) from None
  try:
    _write_probe(workdir, len(max(longest.split('/'), key=len)))
  except OSError as e:
    raise _unwritable(workdir, e) from None


def _write_probe(directory: str, name_length: int = 0) -> None:
  """Writes, syncs and removes a small file named `name_length` long (at least
  its stem); raises OSError where that fails."""
  # The PID keeps the processes of a multi-host run, which share the
  # workdir, from removing each other's test file.
  stem = f'.sslj-write-test-{os.getpid()}-'
  probe = os.path.join(directory, (stem + 'x' * name_length)[:max(name_length, len(stem))])
  with open(probe, 'w') as f:
    f.write('sslj write test\n')
    f.flush()
    os.fsync(f.fileno())
  os.remove(probe)


def can_write(directory: str) -> bool:
  """Whether a small file can be created (and removed) in `directory`."""
  try:
    _write_probe(directory)
    return True
  except OSError:
    return False
