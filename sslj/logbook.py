"""Where a run's numbers go: `metrics.jsonl`, TensorBoard events, a progress line.

Only process 0 writes. On resume, lines of `metrics.jsonl` past the restored
step are dropped first, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import time

from absl import logging
import jax
import numpy as np


def _scalar(value):
  value = np.asarray(value).item()
  return value if math.isfinite(value) else str(value)


class Logbook:
  """Appends one JSON object per logged step and mirrors it to TensorBoard."""

  def __init__(self, workdir: str, *, resume_step: int, total_steps: int):
    self.enabled = jax.process_index() == 0
    self.total_steps = total_steps
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    self._clock = (time.perf_counter(), resume_step)
    if not self.enabled:
      return
    self._truncate_after(resume_step)
    from tensorboardX import SummaryWriter  # pure Python; no TensorFlow
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def _truncate_after(self, step: int):
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [l for l in f if l.strip()]
    keep = [l for l in lines if json.loads(l).get('step', 0) <= step]
    if len(keep) != len(lines):
      tmp = self.path + '.tmp'
      with open(tmp, 'w') as f:
        f.writelines(keep)
      os.replace(tmp, self.path)

  def write(self, step: int, scalars: dict):
    if not self.enabled:
      return
    record = {'step': int(step), **{k: _scalar(v) for k, v in scalars.items()}}
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    for key, value in record.items():
      if key != 'step' and isinstance(value, (int, float)):
        self._tb.add_scalar(key, value, step)
    self._tb.flush()

  def progress(self, step: int, scalars: dict) -> dict:
    """Logs `step N/T | metrics | steps/s | ETA` and returns the rate figures."""
    now = time.perf_counter()
    then, then_step = self._clock
    self._clock = (now, step)
    rate = (step - then_step) / max(now - then, 1e-9)
    eta = (self.total_steps - step) / rate if rate > 0 else float('inf')
    shown = ' '.join(f'{k} {_fmt(v)}' for k, v in scalars.items())
    logging.info('step %d/%d | %s | %.1f steps/s | ETA %s', step, self.total_steps,
                 shown, rate, _duration(eta))
    return {'steps_per_s': rate}

  def close(self):
    if self._tb is not None:
      self._tb.close()


def _fmt(value):
  value = float(np.asarray(value))
  return f'{value:.4g}'


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f'{h}:{m:02d}:{s:02d}' if h else f'{m}:{s:02d}'
