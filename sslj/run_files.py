"""The small files of a run directory: its config, wall time and results.

Every write goes to a temporary file that is then renamed over the old one,
so a kill never leaves a half-written file behind.
"""

from __future__ import annotations

import json
import os

import jax

from sslj import methods
from sslj.errors import UserError
from sslj.ops import optim

# Fields that change how a run is watched or stored, not what it computes:
# they may differ when a run is resumed.
RUN_CONTROL = ('log_every', 'eval_every', 'eval_at', 'checkpoint_every', 'keep_checkpoints',
                'eval_batch_size', 'data.data_dir', 'data.manual_dir')


# Config fields added after runs were recorded without them, each with the
# value that reproduces what those runs did. A recorded config that lacks one
# (and has its section) reads as having that value: such a run still resumes,
# sweeps over it continue, and eval/probe/export rebuild it as it trained. A
# field whose new default changes what a run computes is listed with the old
# behaviour's value, so resuming an old run under the new default is refused.
# These are the fields every method's config has; a method's own are its
# `Definition.fields_added`, and a section a method gained with them is added
# to its old runs' configs too.
FIELDS_ADDED = {
    'optimizer.decay': 'all',
}


def own_fields_added(method: str | None) -> dict:
  """The recorded method's own added fields (none for an unknown name)."""
  known = methods.registry().get(method) if isinstance(method, str) else None
  return dict(known.fields_added) if known is not None else {}


def fields_added(method: str | None) -> dict:
  """FIELDS_ADDED and the recorded method's own added fields."""
  return {**FIELDS_ADDED, **own_fields_added(method)}


# Config values renamed after runs were recorded with the old name: field ->
# {old name: new name}. A recorded config reads as having the new name, so the
# run still resumes and rebuilds; preflight tells a command line the new name.
VALUES_RENAMED = {
    'optimizer.schedule': optim.RENAMED_SCHEDULES,
}


def as_current(recorded: dict) -> dict:
  """`recorded` (a config.json's dict) as today's code names it.

  Every added field of its method that it lacks is filled in with the value
  that reproduces the run (a section only the method's own added fields
  need is added; the sections of FIELDS_ADDED are filled only where the
  config has them), and every renamed value reads as its new name.
  """
  filled = json.loads(json.dumps(recorded))
  own = own_fields_added(filled.get('method'))

  def section_of(name, create=False):
    *sections, key = name.split('.')
    node = filled
    for section in sections:
      if create and isinstance(node, dict) and section not in node:
        node[section] = {}
      node = node.get(section) if isinstance(node, dict) else None
    return node, key

  for name, value in {**FIELDS_ADDED, **own}.items():
    node, key = section_of(name, create=name in own)
    if isinstance(node, dict) and key not in node:
      node[key] = value
  for name, renamed in VALUES_RENAMED.items():
    node, key = section_of(name)
    if isinstance(node, dict) and isinstance(node.get(key), str) and node[key] in renamed:
      node[key] = renamed[node[key]]
  return filled


# How many differing config fields a refusal shows with their values.
_KEYS_SHOWN = 3


def _short(value, limit: int = 60) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit - 3] + '...'


def atomic_write_json(path: str, value) -> None:
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write('\n')
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _read_json(path: str):
  """The JSON in `path`; a damaged file is one UserError that names it."""
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:
    raise UserError(f'{path} is damaged (not readable JSON: {e}); restore it from a copy, or '
                    'move the workdir away to start the run from scratch.') from None


def flatten(tree, prefix=''):
  flat = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, dict):
      flat.update(flatten(value, name + '.'))
    else:
      flat[name] = value
  return flat


def check_recorded(workdir: str, config) -> None:
  """Refuses a workdir whose recorded config differs from `config`; writes nothing.

  A workdir holding a run of a different config is refused rather than mixed
  with it: resuming there would continue someone else's training.

  Raises:
    UserError: the recorded config differs (the first fields named), or
      config.json is damaged.
  """
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    return
  recorded = _read_json(path)
  if not isinstance(recorded, dict):
    raise UserError(f'{path} is damaged (not a JSON object); restore it from a copy, or move '
                    'the workdir away to start the run from scratch.')
  current = json.loads(config.to_json_best_effort())
  a, b = flatten(as_current(recorded)), flatten(current)
  differ = sorted(k for k in set(a) | set(b)
                  if k not in RUN_CONTROL and a.get(k) != b.get(k))
  if differ:
    shown = '; '.join(f'{k}: {_short(a.get(k))} there, {_short(b.get(k))} now'
                      for k in differ[:_KEYS_SHOWN])
    more = differ[_KEYS_SHOWN:]
    if more:
      shown += f'; also {", ".join(more)}'
    raise UserError(f'{workdir} holds a run with a different config ({shown}); use a new '
                    '--workdir or the same config.')


def finished_results(workdir: str) -> dict | None:
  """results.json of a finished run of this workdir's recorded config, else None.

  Only a workdir with both config.json and results.json holds a finished run.
  """
  path = os.path.join(workdir, 'results.json')
  if not (os.path.isfile(path) and os.path.isfile(os.path.join(workdir, 'config.json'))):
    return None
  results = _read_json(path)
  if not isinstance(results, dict) or 'top1' not in results:
    raise UserError(f'{path} is damaged (it has no "top1"); move it away to evaluate the run '
                    'again.')
  return results


def claim_workdir(workdir: str, config) -> None:
  """Records the run's config in `workdir`, or checks it matches on resume."""
  os.makedirs(workdir, exist_ok=True)
  check_recorded(workdir, config)
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path) and jax.process_index() == 0:
    atomic_write_json(path, json.loads(config.to_json_best_effort()))


def record_wall_time(workdir: str, step: int, wall_s: float) -> None:
  if jax.process_index() == 0:
    atomic_write_json(os.path.join(workdir, 'wall_time.json'),
                       {'step': step, 'wall_s': wall_s})


def wall_time_at(workdir: str, step: int) -> float:
  """Seconds spent before `step` by earlier, interrupted invocations."""
  path = os.path.join(workdir, 'wall_time.json')
  if step == 0 or not os.path.exists(path):
    return 0.0
  return float(_read_json(path)['wall_s'])


def logged_eval(workdir: str, step: int) -> bool:
  """Whether `metrics.jsonl` holds an evaluation at `step` (damaged lines skipped)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return False
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line) if line.strip() else {}
      except ValueError:
        continue
      if record.get('step') == step and any(k.startswith('eval/') for k in record):
        return True
  return False


def write_results(workdir: str, results: dict) -> None:
  if jax.process_index() == 0:
    atomic_write_json(os.path.join(workdir, 'results.json'), results)
