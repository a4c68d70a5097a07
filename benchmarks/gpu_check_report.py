"""What `benchmarks/gpu_check.py` writes at the end: summary.md, summary.json, the bundle.

Each part's result (status, figures, tables, notes, log tail) becomes one row
of the summary table with its headline figures and one section of the
Markdown; `bundle` packs the small files of the output folder.
"""

from __future__ import annotations

import json
import os
import tarfile

from benchmarks import common


def headline(name: str, result: dict) -> str:
  """The part's main figures in one line."""
  if result['status'] != 'ok':
    return result.get('error') or result.get('skipped', '')
  fig = result['figures']
  num = lambda v, f='{:.3g}': 'n/a' if v is None else f.format(v)
  if name == 'race':
    return (f"best sslj / best PyTorch {num(fig['ratio_best_sslj_vs_best_pytorch'], '{:.2f}')}, "
            f"sslj float32 / best PyTorch {num(fig['ratio_sslj_f32_vs_best_pytorch'], '{:.2f}')}"
            + (f"; not run: {', '.join(fig['skipped'])}" if fig.get('skipped') else ''))
  if name == 'mfu':
    return '; '.join(f"{dtype} {num(f['tflops'])} TFLOP/s, MFU {num(f['mfu_pct'], '{:.3g}%')}"
                     for dtype, f in fig.items() if dtype != 'device_kind')
  if name == 'kmeans':
    return '; '.join(f"{case} {num(f['tflops'])} TFLOP/s ({num(f['pct_fp32_peak'], '{:.3g}%')} "
                     'of fp32 peak)'
                     for case, f in fig.items() if case != 'device_kind')
  return (f"{fig['steps_done']} of {fig['num_steps']} steps planned "
          f"(probe {num(fig['probe_steps_per_s'])} steps/s), top-1 {num(fig.get('top1'))}%, "
          f"run {num(fig.get('run_wall_s'), '{:.0f}')} s")


def markdown(summary: dict) -> str:
  lines = ['# sslj GPU check', '', f"`{summary['command']}`", '',
           f"Device: {', '.join(summary['device_kinds']) or 'unknown'}"
           + (f" ({summary['nvidia_smi']})" if summary.get('nvidia_smi') else '')
           + f"; started {summary['started']}, {summary['wall_s']:.0f} s of "
           f"{summary['total_s']:.0f} s planned" + (' (--quick: toy sizes, not figures)'
                                                    if summary['quick'] else '') + '.', '',
           '| part | device | status | wall (s) | budget (s) | timeout (s) | figures |',
           '|---|---|---|---|---|---|---|']
  for name, r in summary['parts'].items():
    kind = r.get('environment', {}).get('device_kind', '')
    lines.append(f"| {name} | {kind} | {r['status']} | {r.get('wall_s', 0):.0f} | "
                 f"{r.get('budget_s', '')} | {r.get('timeout_s', '')} | "
                 f"{headline(name, r).replace('|', '/')} |")
  lines.append('')
  for name, r in summary['parts'].items():
    lines += [f'## {name}', '']
    if r.get('command'):
      lines += [f"`python {r['command']}`", '']
    for table in r.get('tables', []):
      lines += [f"### {table['title']}", '', common.markdown_table(table), '']
    lines += [f'- {note}' for note in r.get('notes', [])]
    if r.get('log_tail'):
      lines += ['', 'End of its log:', '', '```', r['log_tail'].rstrip(), '```']
    lines.append('')
  return '\n'.join(lines)


def write_summary(summary: dict, out: str) -> None:
  with open(os.path.join(out, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  with open(os.path.join(out, 'summary.md'), 'w') as f:
    f.write(markdown(summary))


def bundle(out: str) -> None:
  """bundle.tar.gz: the small files of OUT (no checkpoints, caches or data)."""
  keep = ('.json', '.md', '.log', '.jsonl')
  with tarfile.open(os.path.join(out, 'bundle.tar.gz'), 'w:gz') as tar:
    for root, dirs, files in os.walk(out):
      dirs[:] = [d for d in dirs if d not in ('jax_cache', 'tfds', 'checkpoints', 'tensorboard',
                                              'toy-fashion-mnist')]
      for name in sorted(files):
        if name.endswith(keep):
          path = os.path.join(root, name)
          tar.add(path, arcname=os.path.relpath(path, out))
