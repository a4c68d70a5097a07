r"""Results tables made from the runs' own files, not by hand.

  python -m sslj.report --runs=docs/records --out=docs/results.md
  python -m sslj.report --runs=runs/fm10 --runs=runs/sweep_digits --records=docs/records \
      --out=docs/results.md

Each `--runs` folder is one table, or a folder of tables (its sub-folders
that are tables, in the order their `table.json` gives). A table is:

- a sweep folder (`sslj.sweep`'s `sweep.json` and `<row>/lpc<N>/seed<S>`):
  the sweep's own method x labels-per-class table;
- any other folder of runs: every `results.json` up to three levels below.
  Runs whose path differs only in a last `seed<N>` part (`fixmatch_seed0`,
  `fixmatch/seed1`) are one row, and must have the same `config.json` but
  for the seed and the fields that only watch or store a run. A row shows
  the reported model's top-1 (mean ± sample std over seeds, then each seed),
  top-5, steps, wall time per run, and optionally the reported model's
  top-1 at chosen steps from `metrics.jsonl`.

Under every table: the commands (from each run's `provenance`, a seed
written S), the commits, the machines and JAX versions, the dates, and the
load average of the machine when runs finished, where recorded.

A `table.json` in a table folder (optional) holds
  {"title": "...", "text": "Markdown shown under the title", "order": 1,
   "rows": [{"key": "fixmatch", "label": "FixMatch", "note": "..."}, ...],
   "at_steps": [500, 1000, 2000, 3000], "models": ["raw"], "curves": true,
   "lines": [{"value": 81.11, "label": "the target"}]}
`rows` names and orders rows (others follow by name; a `note` adds a note
column; a `baseline`, another row's key, adds a gain column: the row's
top-1 minus the baseline's on the same seed, mean ± sample std over the
seeds both have, and on how many of them the row is ahead; the baseline is
named by its `short` name, else its key); `models` adds a column of top-1 for each named model of
`results.json` besides the reported one; `curves` draws every row's reported top-1 against steps (seed
mean) into `images/<table>_curves.png` beside `--out`, with a dashed
horizontal line at each of `lines` (a target, a baseline), named under the picture.

`--records=DIR` first copies each table's small files (config.json,
results.json, metrics.jsonl, table.json, sweep.json, unavailable.json; no
checkpoints; a run's only once it has finished) to `DIR/<table folder's
name>/`, so a table can be made again from a checkout after its run folders
are gone, and a sweep continued from a copy of them.
"""

from __future__ import annotations

import glob
import os
import re
import sys
import textwrap
from typing import Sequence

from absl import app, flags
import numpy as np

from sslj import cli, sweep
from sslj.run_records import Run, group_rows, read_json, read_run, save_records
from sslj.errors import UserError

def _stat(values: list[float]) -> str:
  if not values:
    return '—'
  if len(values) == 1:
    return f'{values[0]:.2f}'
  return f'{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}'


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  if seconds < 60:
    return f'{seconds} s'
  if seconds < 3600:
    return f'{seconds // 60} min {seconds % 60:02d} s'
  return f'{seconds // 3600} h {seconds % 3600 // 60:02d} min'


def _span(seconds: list[float]) -> str:
  """'2 min 05 s', or the range of several durations."""
  if not seconds:
    return '—'
  low, high = _duration(min(seconds)), _duration(max(seconds))
  return low if low == high else f'{low} to {high}'


def _generic_command(command: str) -> str:
  """A run's command with its seed written S (`seed=1` -> `seed=S`, `seed1` -> `seedS`).

  A module that an older sslj recorded by its file path (`python /x/sslj/sweep.py`)
  is shown as it was run, `python -m sslj.sweep`.
  """
  command = re.sub(r'^python \S*/sslj/(\w+)\.py\b', r'python -m sslj.\1', command)
  command = re.sub(r'\bseed=\d+', 'seed=S', command)
  return re.sub(r'seed\d+\b', 'seedS', command)


def provenance_lines(runs: list[Run]) -> list[str]:
  """Commands, commits, machines, dates and load of a table's runs, as Markdown lines."""
  provs = [r.results.get('provenance') or {} for r in runs]
  commits = sorted({(p['commit'][:7] + (' with local changes' if p.get('dirty') else ''))
                    for p in provs if p.get('commit')})
  versions = sorted({p['sslj_version'] for p in provs if p.get('sslj_version')})
  machines = sorted({f"{p.get('host_cpu') or 'unknown CPU'}, "
                     f"{p.get('device_count', 1)} x {p.get('device_kind', '?')}"
                     for p in provs if p})
  jax_versions = sorted({p['jax_version'] for p in provs if p.get('jax_version')})
  dates = sorted(p['finished'][:10] for p in provs if p.get('finished'))
  loads = [(p['load_average'][0], p.get('host_cores')) for p in provs if p.get('load_average')]
  lines = []
  if commits or versions:
    lines.append(f"- Code: sslj {', '.join(versions) or '?'}, commit "
                 f"{', '.join(commits) or 'not recorded'}.")
  if machines:
    lines.append(f"- Machine: {'; '.join(machines)}; JAX {', '.join(jax_versions) or '?'}.")
  if dates:
    lines.append(f'- Finished: {dates[0]}' + (f' to {dates[-1]}.' if dates[-1] != dates[0]
                                               else '.'))
  if loads:
    cores = sorted({c for _, c in loads if c})
    lines.append(f'- Load average (1 minute) as the runs finished: {min(l for l, _ in loads):.1f} '
                 f"to {max(l for l, _ in loads):.1f}, on {'/'.join(map(str, cores)) or '?'} "
                 'cores.')
  elif provs:
    lines.append('- Load while the runs trained: not recorded; wall times are upper bounds.')
  if len(provs) != len(runs) or not all(provs):
    lines.append(f'- {sum(not p for p in provs)} of {len(runs)} runs record no provenance.')
  return lines


def _order(rows: dict, spec: dict) -> list[tuple[str, dict]]:
  named = [(r['key'], r) for r in spec.get('rows', []) if r['key'] in rows]
  missing = [r['key'] for r in spec.get('rows', []) if r['key'] not in rows]
  rest = [(k, {}) for k in sorted(rows) if k not in {n for n, _ in named}]
  if missing:
    print(f'note: table.json names rows with no runs yet: {missing}', file=sys.stderr)
  return named + rest


def _gain(runs: list[Run], baseline: list[Run], name: str) -> str:
  """'+1.23 ± 0.45 over NAME (2 of 3 seeds ahead)': top-1 differences on shared seeds."""
  base = {r.seed: r.results['top1'] for r in baseline}
  diffs = [r.results['top1'] - base[r.seed] for r in runs if r.seed in base]
  if not diffs:
    return f'— (no seed in common with {name})'
  mean = f'{np.mean(diffs):+.2f}' + (f' ± {np.std(diffs, ddof=1):.2f}' if len(diffs) > 1 else '')
  ahead = sum(d > 0 for d in diffs)
  return f'{mean} over {name} ({ahead} of {len(diffs)} seed{"s" if len(diffs) > 1 else ""} ahead)'


def runs_table(folder: str, spec: dict, images_dir: str | None, name: str) -> list[str]:
  """Markdown lines of a folder of runs (a row per run group)."""
  rows = group_rows(folder)
  if not rows:
    raise UserError(f'{folder} holds no runs (no results.json up to 3 levels below).')
  at_steps = [int(s) for s in spec.get('at_steps', [])]
  models = list(spec.get('models', []))
  ordered = _order(rows, spec)
  has_notes = any(info.get('note') for _, info in ordered)
  infos = dict(ordered)
  for key, info in ordered:
    if info.get('baseline') is not None and info['baseline'] not in rows:
      raise UserError(f"{folder}/table.json: row {key!r} has baseline {info['baseline']!r}, "
                      'which is not a row with runs.')
  has_gains = any(info.get('baseline') for _, info in ordered)
  header = ['row', 'method', 'dataset, labels/class', 'steps', 'top-1', 'seeds', 'top-5',
            *(f'top-1 at {s:,}' for s in at_steps), *(f'top-1 of {m}' for m in models),
            *(['gain (same seeds)'] if has_gains else []), 'wall per run']
  header += ['note'] if has_notes else []
  table, commands, all_runs = [], [], []
  for key, info in ordered:
    runs = rows[key]
    all_runs += runs
    first = runs[0].results
    label = info.get('label', key)
    seeds = ', '.join(f'{r.results["top1"]:.2f} (seed {r.seed})' for r in runs)
    walls = [r.results['wall_s'] for r in runs if 'wall_s' in r.results]
    wall = _span(walls)
    at = []
    for step in at_steps:
      values = [v for v in (r.top1_at(step) for r in runs) if v is not None]
      at.append(_stat(values) if len(values) in (0, len(runs)) else
                f'{_stat(values)} (n={len(values)})')
    cells = [label, str(first['method']), f"{first['dataset']}, {first['labels_per_class']}",
             f"{first['num_steps']:,}", f"**{_stat([r.results['top1'] for r in runs])}**", seeds,
             _stat([r.results['top5'] for r in runs]), *at,
             *(_stat([r.results['models'][m]['top1'] for r in runs
                      if m in r.results.get('models', {})]) for m in models)]
    if has_gains:
      base = info.get('baseline')
      cells.append(_gain(runs, rows[base], infos[base].get('short', base)) if base else '')
    cells.append(wall)
    table.append(cells + ([info.get('note', '')] if has_notes else []))
    for command in dict.fromkeys(_generic_command((r.results.get('provenance') or {})
                                                  .get('command', '')) for r in runs):
      if command:
        commands.append(f'- {label}: `{command}`')
  lines = sweep.markdown_table(header, table)
  lines += ['', 'Top-1 and top-5 (%) on the test split of the model each method reports, at '
            'the end of training: mean ± sample std (ddof=1) over seeds; `top-1 at N`: the '
            "same model's evaluation at step N, from `metrics.jsonl`."
            + (' Gain: the row\'s top-1 minus its baseline row\'s on the same seed (the same '
               'labels), mean ± sample std over the seeds both have, and on how many of them '
               'the row is ahead.' if has_gains else ''), '']
  if spec.get('curves'):
    if images_dir is None:
      raise UserError('a table with "curves" needs --out (its picture goes beside it).')
    references = _reference_lines(spec, folder)
    picture = draw_curves(ordered, rows, os.path.join(images_dir, f'{name}_curves.png'),
                          title=spec.get('title', name), references=references)
    lines += [f'![{spec.get("title", name)}: top-1 against steps](images/{picture})', '']
    if references:
      lines += ['Dashed: ' + '; '.join(_reference_text(*r) for r in references) + '.', '']
  lines += ['Commands:', '', *commands, '',
            *provenance_lines(all_runs)]
  return lines


def _reference_lines(spec, folder: str) -> list[tuple[float, str]]:
  """`lines` of a table.json as (value, label) pairs; a malformed entry is a UserError."""
  references = []
  for entry in spec.get('lines', []):
    if not (isinstance(entry, dict) and isinstance(entry.get('label'), str)
            and isinstance(entry.get('value'), (int, float))
            and not isinstance(entry.get('value'), bool)):
      raise UserError(f'{folder}/table.json: each of "lines" needs a number "value" and a text '
                      f'"label", e.g. {{"value": 81.11, "label": "the target"}}; got {entry!r}.')
    references.append((float(entry['value']), entry['label']))
  return references


def _reference_text(value: float, label: str) -> str:
  return f'{label} ({value:.2f})'


def draw_curves(ordered, rows, path: str, *, title: str,
                references: Sequence[tuple[float, str]] = ()) -> str:
  """Every row's reported top-1 against steps (mean over the seeds evaluated at a step),
  and a dashed horizontal line at each (value, label) of `references`.

  The legend goes under the axes, its long labels wrapped, and the picture
  grows with it, so many rows with long labels never cover the curves.
  """
  from sslj.viz import curves  # pylint: disable=g-import-not-at-top
  series = []
  for key, info in ordered:
    by_step = {}
    for run in rows[key]:
      for step, value in run.curve():
        by_step.setdefault(step, []).append(value)
    if by_step:
      steps = sorted(by_step)
      series.append((steps, [np.mean(by_step[s]) for s in steps],
                     f"{info.get('label', key)} (n={len(rows[key])})"))
  labels = [textwrap.fill(label, 130) for label in
            [label for _, _, label in series] + [_reference_text(*r) for r in references]]
  legend_px = 16 * sum(label.count('\n') + 1 for label in labels) + 12
  plot_px, top_px, bottom_px = 460, 40, 64  # axes; title; tick labels and the x label
  height = plot_px + top_px + bottom_px + legend_px
  fig = curves.new_figure((1000, height))
  ax = fig.subplots()
  for i, ((steps, means, _), label) in enumerate(zip(series, labels)):
    # The colour cycle has 10 colours: the 11th row on takes another marker.
    ax.plot(steps, means, marker='os^Dv'[i // 10 % 5], ms=3, label=label)
  for i, ((value, _), label) in enumerate(zip(references, labels[len(series):])):
    ax.axhline(value, color=('0.2', '0.55')[i % 2], linestyle=('--', '-.')[i % 2],
               linewidth=1.2, label=label)
  ax.set(xlabel='step', ylabel='top-1 accuracy (%), test split', title=title)
  ax.grid(alpha=0.3)
  fig.subplots_adjust(left=0.08, right=0.98, bottom=(bottom_px + legend_px) / height,
                      top=1 - top_px / height)
  if labels:
    fig.legend(loc='lower left', bbox_to_anchor=(0.08, 0.0), fontsize=8, frameon=False)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  curves.save_figure(fig, path)
  return os.path.basename(path)


def sweep_table(folder: str) -> list[str]:
  header, table, note = sweep.build_table(folder)
  runs = [read_run(os.path.dirname(p)) for p in
          sorted(glob.glob(os.path.join(glob.escape(folder), '*', 'lpc*', 'seed*',
                                        'results.json')))]
  commands = sorted({(r.results.get('provenance') or {}).get('command', '') for r in runs} - {''})
  walls = [r.results['wall_s'] for r in runs if 'wall_s' in r.results]
  lines = [*sweep.markdown_table(header, table), '', note, '']
  if walls:
    lines += [f'{len(runs)} runs, {_duration(sum(walls))} of training in all '
              f'({_span(walls)} a run).', '']
  lines += ['Commands:', '', *(f'- `{c}`' for c in commands), '', *provenance_lines(runs)]
  return lines


def is_table(folder: str) -> bool:
  return (os.path.exists(os.path.join(folder, 'table.json'))
          or os.path.exists(os.path.join(folder, 'sweep.json'))
          or bool(glob.glob(os.path.join(glob.escape(folder), '*', 'results.json')))
          or bool(glob.glob(os.path.join(glob.escape(folder), '*', 'seed*', 'results.json'))))


def tables_in(folders: list[str]) -> list[str]:
  """The table folders named by `--runs` (a table, or a folder of tables)."""
  tables = []
  for folder in folders:
    if not os.path.isdir(folder):
      raise UserError(f'--runs={folder} is not a folder.')
    if is_table(folder):
      tables.append(folder)
      continue
    inner = [p for p in sorted(glob.glob(os.path.join(glob.escape(folder), '*', '')))
             if is_table(p.rstrip(os.sep))]
    if not inner:
      raise UserError(f'--runs={folder} holds no runs and no tables of runs.')
    inner.sort(key=lambda p: (_spec(p.rstrip(os.sep)).get('order', 1e9), p))
    tables += [p.rstrip(os.sep) for p in inner]
  return tables


def _spec(folder: str) -> dict:
  path = os.path.join(folder, 'table.json')
  return read_json(path) if os.path.exists(path) else {}


def report(folders: list[str], out: str | None, records: str | None = None,
           command: str | None = None) -> str:
  """The Markdown page of every table; written to `out` when given."""
  tables = tables_in(folders)
  if records:
    tables = [save_records(t, records) for t in tables]
  images_dir = os.path.join(os.path.dirname(os.path.abspath(out)), 'images') if out else None
  lines = ['# Results', '',
           f'Made by `{command or "python -m sslj.report"}` from the runs\' own files '
           '(`results.json`, `config.json`, `metrics.jsonl`); do not edit by hand. '
           'Accuracies are percentages on the test split.', '']
  sections = []
  for folder in tables:
    spec = _spec(folder)
    name = os.path.basename(os.path.normpath(folder))
    title = spec.get('title', name)
    sections.append(title)
    body = (sweep_table(folder) if os.path.exists(os.path.join(folder, 'sweep.json'))
            else runs_table(folder, spec, images_dir, name))
    lines += [f'## {title}', '']
    lines += [spec['text'], ''] if spec.get('text') else []
    lines += [*body, '']
  contents = [f'- [{t}](#{slug(t)})' for t in sections]
  lines[4:4] = [*contents, '']
  text = '\n'.join(lines).rstrip('\n') + '\n'
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, 'w', encoding='utf-8') as f:
      f.write(text)
  return text


def slug(heading: str) -> str:
  """GitHub's anchor for a Markdown heading."""
  text = re.sub(r'[^\w\- ]', '', heading.strip().lower())
  return text.replace(' ', '-')


_RUNS = flags.DEFINE_multi_string('runs', [], 'A folder of runs (one table) or of tables.')
_OUT = flags.DEFINE_string('out', None, 'The Markdown file to write (default: print it).')
_RECORDS = flags.DEFINE_string('records', None,
                               "Copy each table's small files here first, and report from "
                               'the copies.')


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}.')
  if not _RUNS.value:
    cli.fail('give at least one --runs=DIR (a folder of runs, a sweep, or a folder of tables).')
  argv_text = ' '.join(['python -m sslj.report', *sys.argv[1:]])
  try:
    text = report(_RUNS.value, _OUT.value, _RECORDS.value, command=argv_text)
  except UserError as e:
    cli.fail(str(e))
  if _OUT.value:
    print(f'Wrote {_OUT.value}.')
  else:
    print(text)
  return 0


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
