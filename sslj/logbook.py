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

from sslj.errors import UserError


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
    # The rate and ETA count from the end of the first step, so the compile
    # (often most of a short run's first minute) does not inflate them.
    self._clock = None
    if not self.enabled:
      return
    self._truncate_after(resume_step)
    from tensorboardX import SummaryWriter  # pure Python; no TensorFlow
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def _truncate_after(self, step: int):
    """Drops lines past `step`, and a half-written last line (a power cut's)."""
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [l for l in f if l.strip()]
    records = []
    for number, line in enumerate(lines, 1):
      try:
        records.append(json.loads(line))
      except ValueError:
        if number < len(lines):
          raise UserError(f'{self.path} is damaged at line {number} (not JSON); restore it '
                          'from a copy, or move the workdir away to start from scratch.') from None
        logging.warning('The last line of %s was half-written (the run was cut off while '
                        'writing it); dropped it.', self.path)
        records.append(None)
    keep = [l for l, r in zip(lines, records) if r is not None and r.get('step', 0) <= step]
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

  def first_step_done(self, step: int):
    """Starts the clock the rate and ETA are measured from."""
    self._clock = (time.perf_counter(), step)

  def progress(self, step: int, scalars: dict) -> dict:
    """Logs `step N/T | metrics | steps/s | ETA` and returns the rate figures."""
    now = time.perf_counter()
    if self._clock is None:
      self._clock = (now, step)
    then, then_step = self._clock
    self._clock = (now, step)
    rate = (step - then_step) / max(now - then, 1e-9) if step > then_step else 0.0
    eta = (self.total_steps - step) / rate if rate > 0 else float('inf')
    shown = ' '.join(f'{k} {_fmt(v)}' for k, v in scalars.items())
    logging.info('step %d/%d | %s | %.1f steps/s | ETA %s', step, self.total_steps,
                 shown, rate, _duration(eta))
    return {'steps_per_s': rate}

  def close(self):
    if self._tb is not None:
      self._tb.close()


class Progress:
  """`label: done/total images (N images/s, ETA m:ss)` at most every `every_s` seconds.

  For long host-side loops outside the training steps (feature passes over a
  pool): `update(done)` after each chunk. The rate counts from the first
  update, so a compile in the first chunk does not inflate it; nothing is
  logged for work that ends within `every_s`.
  """

  def __init__(self, label: str, total: int, *, unit: str = 'images', every_s: float = 30.0):
    self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
    self._first = None  # (time, done) at the first update
    self._last_log = time.perf_counter()

  def update(self, done: int) -> None:
    now = time.perf_counter()
    if self._first is None:
      self._first = (now, done)
      return
    if now - self._last_log < self.every_s or done >= self.total:
      return
    self._last_log = now
    then, then_done = self._first
    rate = (done - then_done) / max(now - then, 1e-9)
    eta = (self.total - done) / rate if rate > 0 else float('inf')
    logging.info('%s: %d/%d %s (%.0f %s/s, ETA %s)', self.label, done, self.total, self.unit,
                 rate, self.unit, _duration(eta))


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
