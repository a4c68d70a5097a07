"""Run records: the small files a finished run leaves, read, grouped into rows and kept.

`sslj.report` builds its tables from these; `save_records` copies a table's
records into the checkout (`docs/records`) so the tables can be made again
after the run folders are gone.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shutil

from sslj import run_files
from sslj.errors import UserError

RECORD_FILES = ('config.json', 'results.json', 'metrics.jsonl', 'table.json', 'sweep.json',
                'unavailable.json')
# Files that describe a table rather than one run.
TABLE_FILES = ('table.json', 'sweep.json', 'unavailable.json')
_SEED_PART = re.compile(r'(?:^|[_/.-])seed(\d+)$')
# Config fields that may differ between the runs of one row besides the seed.
_NOT_COMPARED = ('seed',) + run_files.RUN_CONTROL


def read_json(path: str):
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except ValueError as e:
    raise UserError(f'{path} is not readable JSON ({e}): restore it or move that run away.'
                    ) from None


@dataclasses.dataclass
class Run:
  path: str
  seed: int
  results: dict
  config: dict
  metrics: list

  @property
  def reported(self) -> str | None:
    """The model whose figures are the run's `top1`/`top5`."""
    for name, scores in self.results.get('models', {}).items():
      if scores.get('top1') == self.results['top1'] and scores.get('top5') == self.results['top5']:
        return name
    return None

  def top1_at(self, step: int) -> float | None:
    key = f'eval/{self.reported}/top1'
    for record in self.metrics:
      if record.get('step') == step and isinstance(record.get(key), (int, float)):
        return float(record[key])
    return None

  def curve(self) -> list[tuple[int, float]]:
    key = f'eval/{self.reported}/top1'
    return sorted((int(r['step']), float(r[key])) for r in self.metrics
                  if isinstance(r.get(key), (int, float)))


def read_run(path: str) -> Run:
  results = read_json(os.path.join(path, 'results.json'))
  config_path = os.path.join(path, 'config.json')
  config = (run_files.as_current(read_json(config_path))
            if os.path.exists(config_path) else {})
  metrics_path = os.path.join(path, 'metrics.jsonl')
  metrics = []
  if os.path.exists(metrics_path):
    from sslj.viz import curves  # pylint: disable=g-import-not-at-top
    metrics = curves.read_metrics(metrics_path)
  return Run(path, int(results.get('seed', 0)), results, config, metrics)


def row_key(relative: str) -> str:
  """A run's path within its table less a last `seed<N>` part: its row."""
  key = _SEED_PART.sub('', relative.replace(os.sep, '/'))
  return key or '.'


def group_rows(folder: str) -> dict[str, list[Run]]:
  """{row key: runs sorted by seed} of every results.json up to 3 levels below `folder`."""
  rows = {}
  found = sorted({p for depth in (1, 2, 3)
                  for p in glob.glob(os.path.join(glob.escape(folder), *['*'] * depth,
                                                  'results.json'))})
  for path in found:
    run = read_run(os.path.dirname(path))
    rows.setdefault(row_key(os.path.relpath(run.path, folder)), []).append(run)
  for key, runs in rows.items():
    runs.sort(key=lambda r: r.seed)
    first = run_files.flatten(runs[0].config)
    for run in runs[1:]:
      other = run_files.flatten(run.config)
      differ = sorted(k for k in set(first) | set(other)
                      if k not in _NOT_COMPARED and first.get(k) != other.get(k))
      if differ:
        raise UserError(f"{run.path} and {runs[0].path} are one row ('{key}') but their configs "
                        f'differ in {differ[:3]}: give them folders whose names differ by more '
                        'than the seed.')
      if run.seed == runs[0].seed:
        raise UserError(f"{run.path} and {runs[0].path} are one row ('{key}') with the same "
                        f'seed {run.seed}: keep one of them.')
  return rows


def save_records(table: str, records: str) -> str:
  """Copies a table's small files to `records/<table name>/`; returns that folder.

  A run's files are copied only once it has finished (its results.json
  exists): an unfinished run is left out whole, so the records never hold
  half a run.
  """
  dest = os.path.join(records, os.path.basename(os.path.normpath(table)))
  if os.path.abspath(dest) == os.path.abspath(table):
    return dest
  for root, dirs, files in os.walk(table):
    dirs[:] = sorted(d for d in dirs if d not in ('checkpoints', 'tensorboard', 'pictures'))
    finished = 'results.json' in files
    for name in files:
      if name in RECORD_FILES and (finished or name in TABLE_FILES):
        target = os.path.join(dest, os.path.relpath(root, table), name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(os.path.join(root, name), target)
  return dest
