"""Plots of numbers: training curves from `metrics.jsonl`, and a confusion matrix.

Drawn with matplotlib's object API on an Agg canvas (no pyplot, no display,
no global figure state). Sizes are fixed in pixels (inches x DPI, no tight
bounding box), so every picture has a known size.
"""

from __future__ import annotations

import json
import math

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np

DPI = 100
CURVES_PX = (1200, 450)
CONFUSION_PX = (760, 680)


def new_figure(size_px: tuple[int, int]) -> Figure:
  """A matplotlib Figure of exactly `size_px` (width, height) pixels on an Agg canvas."""
  fig = Figure(figsize=(size_px[0] / DPI, size_px[1] / DPI), dpi=DPI)
  FigureCanvasAgg(fig)
  return fig


def save_figure(fig: Figure, path: str) -> tuple[int, int]:
  fig.savefig(path, dpi=DPI)
  width, height = fig.canvas.get_width_height()
  return int(width), int(height)


def read_metrics(path: str) -> list[dict]:
  """The records of `metrics.jsonl`; a line being written by a running run is skipped."""
  records = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if isinstance(record, dict) and 'step' in record:
        records.append(record)
  return records


def series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of `key` where it is a finite number (non-finite are logged as strings)."""
  pairs = [(r['step'], r[key]) for r in records
           if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
  pairs.sort()
  return (np.array([p[0] for p in pairs], np.int64), np.array([p[1] for p in pairs], np.float64))


def eval_models(records: list[dict]) -> list[str]:
  """Models with an `eval/<model>/top1` entry, in order of first appearance."""
  names = []
  for r in records:
    for key in r:
      if key.startswith('eval/') and key.endswith('/top1'):
        name = key[len('eval/'):-len('/top1')]
        if name not in names:
          names.append(name)
  return names


def loss_keys(records: list[dict]) -> list[str]:
  """`train/...loss` keys with some non-zero value ('train/loss' first)."""
  keys = sorted({k for r in records for k in r if k.startswith('train/') and k.endswith('loss')})
  keys.sort(key=lambda k: k != 'train/loss')
  return [k for k in keys if np.any(series(records, k)[1] != 0)]


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
  if len(values) < window:
    return values
  kernel = np.ones(window) / window
  padded = np.concatenate([np.full(window - 1, values[0]), values])
  return np.convolve(padded, kernel, mode='valid')


# The top-1 panel's step axis is logarithmic when the first evaluation comes
# at least this many times earlier than the last.
EARLY_EVAL_RATIO = 50


def draw_curves(records: list[dict], path: str, *, title: str,
                reported_model: str | None) -> tuple[tuple[int, int], dict]:
  """Loss (left, log scale) and top-1 (right) against steps.

  The top-1 panel's steps are on a log scale when the run evaluated early
  (first evaluation at most 1/EARLY_EVAL_RATIO of the last), so the start of
  training is readable.

  Every evaluated model's test top-1 shares the right axes (Mean Teacher's
  student and teacher together); the top-1 the method logs on its training
  batches (`train_top1`: the labelled images of the batch, or the surrogate
  classes of Exemplar-CNN) is drawn faintly, smoothed over 5 log points.

  Returns:
    ((width, height), numbers) with numbers['top1'][model] = [(step, top1), ...].
  """
  losses = loss_keys(records)
  models = eval_models(records)
  if not losses and not models:
    raise ValueError('metrics.jsonl has no train/*loss or eval/*/top1 entries')
  fig = new_figure(CURVES_PX)
  ax_loss, ax_top1 = fig.subplots(1, 2)
  for key in losses:
    steps, values = series(records, key)
    ax_loss.plot(steps, values, lw=1.8 if key == 'train/loss' else 1.0,
                 label=key[len('train/'):].replace('_', ' '))
  if losses and all(np.all(series(records, k)[1] > 0) for k in losses):
    ax_loss.set_yscale('log')
  ax_loss.set(xlabel='step', ylabel='loss (training batches)', title='Training loss')
  ax_loss.grid(alpha=0.3)
  if losses:
    ax_loss.legend(fontsize=8)

  numbers = {'top1': {}}
  steps, values = series(records, 'train/train_top1')
  if len(steps):
    ax_top1.plot(steps, _moving_average(values, 5), color='0.6', lw=1, ls='--',
                 label='training batches (train_top1, smoothed)')
  for name in models:
    steps, values = series(records, f'eval/{name}/top1')
    numbers['top1'][name] = [(int(s), float(v)) for s, v in zip(steps, values)]
    label = f'{name} (test)' + (', reported' if name == reported_model else '')
    ax_top1.plot(steps, values, marker='o', ms=4, lw=2 if name == reported_model else 1.4,
                 label=label)
  numbers['step_scale'] = 'linear'
  eval_steps = [s for points in numbers['top1'].values() for s, _ in points if s > 0]
  if eval_steps and min(eval_steps) * EARLY_EVAL_RATIO <= max(eval_steps):
    # Dense early evaluations (`eval_at`): a log axis shows the start of training.
    ax_top1.set_xscale('log')
    numbers['step_scale'] = 'log'
  xlabel = 'step' + (' (log scale)' if numbers['step_scale'] == 'log' else '')
  ax_top1.set(xlabel=xlabel, ylabel='top-1 accuracy (%)', title='Top-1 accuracy')
  ax_top1.grid(alpha=0.3)
  ax_top1.legend(fontsize=8, loc='lower right')
  fig.suptitle(title)
  fig.subplots_adjust(left=0.08, right=0.98, bottom=0.12, top=0.86, wspace=0.22)
  return save_figure(fig, path), numbers


def teacher_lead(student, teacher) -> tuple[list[int], int | None]:
  """(steps where the teacher's top-1 is above the student's, the step from
  which it stays above to the last evaluation, or None) for [(step, top1)] lists."""
  pairs = list(zip(student, teacher))
  ahead = [t[0] for s, t in pairs if t[1] > s[1]]
  stays = None
  for s, t in reversed(pairs):
    if t[1] <= s[1]:
      break
    stays = t[0]
  return ahead, stays


def confusion_counts(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """counts[i, j]: images of true class i predicted as class j."""
  counts = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(counts, (np.asarray(labels, np.int64), np.asarray(predictions, np.int64)), 1)
  return counts


def draw_confusion(counts: np.ndarray, class_names, path: str, *, title: str) -> tuple[int, int]:
  """The confusion matrix, coloured by the fraction of each true class (rows sum to 1).

  Cells hold the counts when there are at most 20 classes.
  """
  n = len(counts)
  fractions = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
  fig = new_figure(CONFUSION_PX)
  ax = fig.add_axes((0.17, 0.15, 0.64, 0.75))
  image = ax.imshow(fractions, cmap='Blues', vmin=0, vmax=1)
  colorbar_ax = fig.add_axes((0.85, 0.15, 0.03, 0.75))
  fig.colorbar(image, cax=colorbar_ax, label='fraction of the true class')
  names = [str(c) for c in class_names]
  if n <= 40:
    ax.set_xticks(range(n), names, rotation=45, ha='right', fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
  if n <= 20:
    for i in range(n):
      for j in range(n):
        if counts[i, j]:
          ax.text(j, i, str(counts[i, j]), ha='center', va='center', fontsize=7,
                  color='white' if fractions[i, j] > 0.5 else 'black')
  ax.set(xlabel='predicted class', ylabel='true class')
  ax.set_title(title, fontsize=10)
  return save_figure(fig, path)
