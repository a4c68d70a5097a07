r"""Labels-per-class sweep: every method x label count x seed, and the table.

  python -m sslj.sweep --config=configs/supervised.py --config=configs/<method>.py \
      --labels_per_class=1,2,4,8,16,32,64 --seeds=0,1,2 --workdir=runs/sweep \
      [--config.num_steps=2000 ...]
  python -m sslj.sweep --table_only --workdir=runs/sweep   # rebuild the tables

Each `--config` (a config file with an optional config string, as for
`launch.py`) is one row; `labels_per_class` and `seed` are added to its config
string for every cell, so the presets keyed on them apply, and every
`--config.x=y` override applies to every cell. `--labels_per_class` takes
integers >= 1 and `all`. Each cell is a normal run (`sslj.train`, in this
process, one after another, on one host) in `DIR/<row>/lpc<N>/seed<S>`, where
`<row>` is the config file's name followed by its config string (`supervised`,
`supervised_model=resnet18`).

Writes `DIR/table.md` and `DIR/table.csv` (also printed at the end) from every
cell under DIR, rows in `DIR/sweep.json`'s order: a row per method, a column
per label count holding the top-1 accuracy (%) as mean ± sample std (ddof=1)
over the seeds (one seed: its value), and a last column with the top-5
accuracy at the largest label count that has results. A label count larger
than the dataset's smallest class is shown as `n/a (> M per class)` (M that
class's training images) and recorded in `DIR/<row>/lpc<N>/unavailable.json`;
a cell not run yet shows `—`, and a cell with fewer seeds than others `(n=K)`.

Resumption: run the same command again. A cell whose `results.json` exists is
skipped, one with checkpoints resumes where it stopped, and the rest run. A
finished cell whose recorded config differs from the current one (say, a new
`--config.num_steps`) is refused before anything runs: use a new `--workdir`.
SIGTERM stops the running cell at a checkpoint and the sweep after it. Any
other error in a cell stops the sweep with one line, after writing the tables.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import glob
import json
import os
import re
import sys

from absl import app, flags, logging
import numpy as np

from sslj import cli, preflight
from sslj.errors import UserError


@dataclasses.dataclass(frozen=True)
class Cell:
  row: str
  labels_per_class: int | None  # None: all labels
  seed: int
  config: object
  workdir: str

  def finished(self) -> str | None:
    """Why the cell needs no run, or None."""
    if os.path.exists(os.path.join(self.workdir, 'results.json')):
      return 'skipped, results.json exists'
    if os.path.exists(self.unavailable):
      return f'n/a, see {self.unavailable}'
    return None

  @property
  def unavailable(self) -> str:
    return os.path.join(os.path.dirname(self.workdir), 'unavailable.json')


def _lpc_name(lpc) -> str:
  return 'all' if lpc is None else str(lpc)


def parse_list(flag: str, text: str) -> list:
  """`--labels_per_class=1,2,all` -> [1, 2, None], `--seeds=0,1` -> [0, 1]; else a UserError."""
  lpc = flag == 'labels_per_class'
  items = [item.strip() for item in (text or '').split(',')]
  if not all((item.isdigit() and int(item) >= lpc) or (lpc and item == 'all') for item in items):
    what, example = ("integers >= 1 or 'all'", '1,2,4,8') if lpc else ('integers >= 0', '0,1,2')
    raise UserError(f'--{flag}={text} must be {what} separated by commas, '
                    f'e.g. --{flag}={example}.')
  values = [None if item == 'all' else int(item) for item in items]
  if len(set(values)) != len(values):
    raise UserError(f'--{flag}={text} repeats a value.')
  return values


def row_name(spec: str) -> str:
  """`configs/supervised.py:model=x,dataset=y` -> `supervised_model=x_dataset=y`."""
  path, _, arg = spec.partition(':')
  stem = os.path.splitext(os.path.basename(path))[0]
  return re.sub(r'[^\w.=-]+', '_', f'{stem}_{arg}' if arg else stem).strip('_')


def load_config(spec: str, overrides, labels_per_class, seed: int):
  """The locked config of one cell, parsed as `launch.py --config=... --config.x=y` would be."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise UserError(f'config file {path} does not exist; e.g. --config=configs/supervised.py.')
  for item in filter(None, arg.split(',')):
    if item.partition('=')[0].strip() in ('labels_per_class', 'seed'):
      raise UserError(f"--config={spec}: leave '{item}' out of the config string; the sweep "
                      'sets labels_per_class and seed from --labels_per_class and --seeds.')
  cell_arg = ','.join(filter(None, [arg, f'labels_per_class={_lpc_name(labels_per_class)}',
                                    f'seed={seed}']))
  argv = ['sweep', f'--config={path}:{cell_arg}', *overrides]
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file('config', flag_values=values, sys_argv=argv)
  try:
    values(argv)
    config = holder.value
    config.method  # pylint: disable=pointless-statement  (a failed load raises here)
    return config
  except flags.Error as e:  # Worded as `sslj.cli.parse_flags` words them.
    cause = e.__cause__ or e.__context__
    raise UserError(str(cause) if isinstance(cause, UserError) else cli.one_line(str(e))) from None
  except KeyError as e:
    raise UserError(cli.unknown_field(e)) from None
  except (AttributeError, TypeError, ValueError, OSError) as e:
    raise UserError(f'--config={spec}: ' + ' '.join(str(e).split())) from None


@functools.lru_cache(maxsize=None)
def _smallest_class(name, data_dir, manual_dir, fold, image_size) -> int:
  """Training images of the dataset's smallest class (within `fold` if set)."""
  from sslj.data import sources  # pylint: disable=g-import-not-at-top
  arrays = sources.load_arrays(name, data_dir=data_dir, manual_dir=manual_dir, fold=fold,
                               image_size=image_size)
  if fold is None:
    return int(np.bincount(arrays.train_labels, minlength=len(arrays.class_names)).min())
  return int(np.unique(arrays.train_labels[arrays.folds[fold]], return_counts=True)[1].min())


def _too_many_labels(config) -> int | None:
  """The smallest class's size if the config asks for more labels than that."""
  lpc, data = config.data.labels_per_class, config.data
  if lpc is None:
    return None
  size = data.image_size
  size = tuple(size) if size is not None and not isinstance(size, int) else size
  smallest = _smallest_class(data.name, data.data_dir, data.manual_dir, data.fold, size)
  return smallest if lpc > smallest else None


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def _write_json(path, value):
  from sslj import run_files  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(path), exist_ok=True)
  run_files.atomic_write_json(path, value)


def _duration(seconds: float) -> str:
  m, s = divmod(int(round(seconds)), 60)
  return f'{m // 60}:{m % 60:02d}:{s:02d}' if m >= 60 else f'{m}:{s:02d}'


def _run_wall(cell: Cell) -> float | None:
  """A finished cell's whole training time: results.json's `wall_s`, or None.

  `wall_s` adds up every process that trained the run, so a cell resumed
  from a checkpoint counts in full and cells finished by an earlier sweep
  count too (the ETA is their mean times the cells left).
  """
  path = os.path.join(cell.workdir, 'results.json')
  try:
    wall = _read_json(path).get('wall_s')
  except (OSError, ValueError, AttributeError):
    return None
  return float(wall) if isinstance(wall, (int, float)) and wall > 0 else None


def run_sweep(specs, overrides, lpcs, seeds, workdir: str, train_fn=None) -> str:
  """Runs every cell not finished yet, then writes and returns the Markdown table.

  `train_fn(config, workdir) -> results | None` defaults to
  `sslj.train.train_and_evaluate`. Every cell's config is built (and every
  finished cell's recorded config checked) before anything is trained.
  """
  from sslj import run_files  # pylint: disable=g-import-not-at-top  (imports JAX)
  import jax  # pylint: disable=g-import-not-at-top
  if not specs:
    raise UserError('give at least one --config=configs/<method>.py[:key=value,...].')
  rows = [row_name(spec) for spec in specs]
  if len(set(rows)) != len(rows):
    raise UserError(f'two --config flags name the same row {rows}: give each a different config.')
  cells = [Cell(row, lpc, seed, load_config(spec, overrides, lpc, seed),
                os.path.join(workdir, row, f'lpc{_lpc_name(lpc)}', f'seed{seed}'))
           for spec, row in zip(specs, rows) for lpc in lpcs for seed in seeds]
  for cell in cells:
    if cell.finished() and os.path.exists(os.path.join(cell.workdir, 'config.json')):
      run_files.claim_workdir(cell.workdir, cell.config)  # refuses a changed config
  for cell in cells:
    if not cell.finished():
      preflight.check_config(cell.config)
  if train_fn is None:
    from sslj import train  # pylint: disable=g-import-not-at-top
    train_fn = train.train_and_evaluate
    # Every cell that will run is checked (data read, method built) before
    # the first trains: an impossible cell is refused now, not hours in.
    for cell in cells:
      if cell.finished() or _too_many_labels(cell.config) is not None:
        continue  # the loop below marks a label count the data cannot give n/a
      try:
        train.check(cell.config)
      except UserError as e:
        raise UserError(f'{cell.row}, {_lpc_name(cell.labels_per_class)} labels per class, '
                        f'seed {cell.seed}: {e} (nothing was trained)') from None
  manifest = os.path.join(workdir, 'sweep.json')
  listed = _read_json(manifest)['rows'] if os.path.exists(manifest) else []
  _write_json(manifest, {'rows': listed + [row for row in rows if row not in listed]})

  # Recorded training times of finished cells, read once per cell.
  walls = [w for w in map(_run_wall, cells) if w is not None]
  failure = None
  for i, cell in enumerate(cells, 1):
    name = f'{cell.row}, {_lpc_name(cell.labels_per_class)} labels per class, seed {cell.seed}'
    if cell.finished():
      logging.info('Cell %d/%d (%s): %s.', i, len(cells), name, cell.finished())
      continue
    left = sum(not c.finished() for c in cells[i - 1:])
    eta = f', ETA {_duration(np.mean(walls) * left)} ({left} to run)' if walls else ''
    logging.info('Cell %d/%d (%s) -> %s%s', i, len(cells), name, cell.workdir, eta)
    try:
      results = train_fn(cell.config, cell.workdir)
    except UserError as e:
      smallest = _too_many_labels(cell.config)
      if smallest is None:
        failure = UserError(f'{name}: {e}')
        break
      logging.warning('Cell %d/%d (%s): n/a, the smallest class has %d training images.',
                      i, len(cells), name, smallest)
      _write_json(cell.unavailable, {'labels_per_class': cell.labels_per_class,
                                     'smallest_class': smallest})
      continue
    if results is None:
      logging.warning('Stopped on SIGTERM in cell %d/%d; run the same command to resume.',
                      i, len(cells))
      break
    wall = _run_wall(cell)
    if wall is not None:
      walls.append(wall)
    # Every cell jits fresh closures: drop the old executables so a long sweep
    # does not keep a set per cell.
    jax.clear_caches()
  table = write_tables(workdir)
  if failure is not None:
    raise failure
  return table


def collect(workdir: str):
  """Rows (manifest order, then by name), label counts and per-cell numbers on disk.

  Returns `(rows, lpcs, cells)` with `cells[(row, lpc)]` a dict of `top1` and
  `top5` lists over seeds and `na` (the smallest class's size, or None).
  """
  cells = {}
  for path in sorted(glob.glob(os.path.join(glob.escape(workdir), '*', 'lpc*', ''))):
    row, lpc_dir = path.split(os.sep)[-3:-1]
    match = re.fullmatch(r'lpc(\d+|all)', lpc_dir)
    if not match:
      continue
    cell = cells.setdefault((row, None if match[1] == 'all' else int(match[1])),
                            {'top1': [], 'top5': [], 'na': None})
    if os.path.exists(os.path.join(path, 'unavailable.json')):
      cell['na'] = _read_json(os.path.join(path, 'unavailable.json'))['smallest_class']
    for result in sorted(glob.glob(os.path.join(glob.escape(path), 'seed*', 'results.json'))):
      values = _read_json(result)
      cell['top1'].append(float(values['top1']))
      cell['top5'].append(float(values['top5']))
  manifest = os.path.join(workdir, 'sweep.json')
  listed = _read_json(manifest)['rows'] if os.path.exists(manifest) else []
  found = {row for row, _ in cells}
  rows = [r for r in listed if r in found] + sorted(found - set(listed))
  lpcs = sorted({lpc for _, lpc in cells}, key=lambda v: (v is None, v or 0))
  return rows, lpcs, cells


def _stat(values, most: int) -> str:
  if not values:
    return '—'
  text = f'{np.mean(values):.2f}'
  if len(values) > 1:
    text += f' ± {np.std(values, ddof=1):.2f}'
  return text + (f' (n={len(values)})' if len(values) < most else '')


def _cell_text(cell, key: str, most: int) -> str:
  if cell is None:
    return '—'
  if cell['na'] is not None:
    return f"n/a (> {cell['na']} per class)"
  return _stat(cell[key], most)


def build_table(workdir: str) -> tuple[list[str], list[list[str]], str]:
  """(header, rows, note) of the sweep's table, from the results on disk."""
  if not os.path.isdir(workdir):
    raise UserError(f'--workdir={workdir} does not exist: run a sweep there first.')
  rows, lpcs, cells = collect(workdir)
  if not rows:
    raise UserError(f'{workdir} holds no sweep cells (<row>/lpc<N>/seed<S>): '
                    'run a sweep there first.')
  most = max(len(c['top1']) for c in cells.values())
  # Top-5 at the largest label count with results (the reports' Table 1 shows
  # one top-5 figure per method).
  done = [lpc for lpc in lpcs if any(cells.get((row, lpc), {}).get('top1') for row in rows)]
  top5_lpc = (done or lpcs)[-1]
  top5_header = 'top-5 (all labels)' if top5_lpc is None else f'top-5 ({top5_lpc} per class)'
  header = ['method', *map(_lpc_name, lpcs), top5_header]
  table = [[row, *(_cell_text(cells.get((row, lpc)), 'top1', most) for lpc in lpcs),
            _cell_text(cells.get((row, top5_lpc)), 'top5', most)] for row in rows]
  note = ('Top-1 accuracy (%) on the test split by labels per class: mean ± sample '
          'std (ddof=1) over seeds; a single seed shows its value, `(n=K)` a cell '
          'with fewer seeds than the others. The last column is top-5 at the largest '
          f'label count with results ({_lpc_name(top5_lpc)}). `n/a (> M per class)`: the '
          'smallest class has M training images. `—`: not run yet.')
  return header, table, note


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
  return ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header),
          *('| ' + ' | '.join(r) + ' |' for r in rows)]


def write_tables(workdir: str) -> str:
  """Writes `table.md` and `table.csv` from the results on disk; returns the Markdown."""
  header, table, note = build_table(workdir)
  with open(os.path.join(workdir, 'table.csv'), 'w', newline='', encoding='utf-8') as f:
    csv.writer(f).writerows([header, *table])
  text = '\n'.join([note, '', *markdown_table(header, table)]) + '\n'
  with open(os.path.join(workdir, 'table.md'), 'w', encoding='utf-8') as f:
    f.write(text)
  return text


def split_config_args(argv):
  """Takes `--config=...` specs and `--config.x=y` overrides out of argv."""
  specs, overrides, rest = [], [], [argv[0]]
  args = iter(argv[1:])
  for arg in args:
    if arg == '--':
      rest += ['--', *args]
    elif arg == '--config':
      specs.append(next(args, ''))
    elif arg.startswith('--config='):
      specs.append(arg.partition('=')[2])
    elif arg.startswith(('--config.', '--noconfig.')):
      overrides.append(arg)
    else:
      rest.append(arg)
  return specs, overrides, rest


def define_flags():
  """The sweep's own flags (`--config` is taken out of argv before absl sees it)."""
  flags.DEFINE_string('workdir', None, 'Directory of the sweep: one sub-directory per cell.')
  flags.DEFINE_string('labels_per_class', '1,2,4,8,16,32,64',
                      'Label counts per class, e.g. 1,2,4,all.')
  flags.DEFINE_string('seeds', '0,1,2', 'Seeds, e.g. 0,1,2.')
  flags.DEFINE_bool('table_only', False, 'Only rebuild table.md and table.csv from DIR.')


def main(argv, specs=(), overrides=()):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}: give overrides as --config.x=y.')
  f = flags.FLAGS
  if not f.workdir:
    cli.fail('--workdir=DIR is required, e.g. --workdir=runs/sweep.')
  cli.log_sslj_info()
  workdir = os.path.abspath(f.workdir)
  try:
    if f.table_only:
      print(write_tables(workdir))
    else:
      lpcs = parse_list('labels_per_class', f.labels_per_class)
      print(run_sweep(list(specs), list(overrides), lpcs, parse_list('seeds', f.seeds), workdir))
    print(f'Tables: {os.path.join(workdir, "table.md")}, {os.path.join(workdir, "table.csv")}')
  except UserError as e:
    cli.fail(str(e))
  except KeyboardInterrupt as e:  # as in launch.py: the finished cells and checkpoints stay
    print(str(e) or 'Interrupted (Ctrl-C); run the same command to resume.', file=sys.stderr)
    cli.exit_now(cli.EXIT_INTERRUPTED)
  return 0


if __name__ == '__main__':
  define_flags()
  _specs, _overrides, _rest = split_config_args(sys.argv)
  app.run(functools.partial(main, specs=_specs, overrides=_overrides), argv=_rest,
          flags_parser=cli.parse_flags)
