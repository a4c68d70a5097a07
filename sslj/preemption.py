"""Stopping a run at a step boundary on SIGTERM or Ctrl-C (SIGINT), with a checkpoint.

A signal only sets a flag; the training loop reads it between steps, saves
a checkpoint there and ends. SIGTERM (a preemption) ends with status 0 and
Ctrl-C with 130 (`Interrupted`); a second Ctrl-C stops at once.
"""

from __future__ import annotations

import signal

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

# With several processes, how often (in steps) they agree whether any of them
# got SIGTERM. Every process checks at the same steps, so all stop at the same
# step and save the same checkpoint; a check costs one small all-gather and
# stalls the dispatch queue, so it is not done every step.
STOP_CHECK_EVERY = 10


class Interrupted(KeyboardInterrupt):
  """Ctrl-C stopped the run after it saved a checkpoint; the message says how to resume."""


# Signals that stop a run at the next step boundary, with a checkpoint.
_STOP_SIGNALS = {signal.SIGTERM: 'SIGTERM', signal.SIGINT: 'SIGINT (Ctrl-C)'}


class Preemption:
  """Turns SIGTERM and SIGINT into a flag the loop checks at step boundaries.

  One process reads its own flag at every step. Several processes stop only
  at an agreed step (`should_stop`): a host that stopped alone would leave
  the others waiting in the next collective. A second Ctrl-C is Python's
  usual KeyboardInterrupt: it stops at once, without the checkpoint.
  """

  def __init__(self):
    self.requested = False
    self.signal = None
    self._previous = {}

  def should_stop(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.requested
    if step % STOP_CHECK_EVERY:
      return False
    flags = multihost_utils.process_allgather(np.int32(self.requested))
    return bool(np.max(flags))

  def __enter__(self):
    def handler(signum, frame):
      del frame
      if self.requested and signum == signal.SIGINT:
        raise KeyboardInterrupt  # the second Ctrl-C: stop now
      self.requested = True
      self.signal = self.signal or signum
      logging.warning('%s received: saving a checkpoint at the next step boundary%s.',
                      _STOP_SIGNALS[signum],
                      ' (Ctrl-C again stops at once)' if signum == signal.SIGINT else '')
    for signum in _STOP_SIGNALS:
      try:
        self._previous[signum] = signal.signal(signum, handler)
      except ValueError:  # not the main thread (e.g. under a test runner thread)
        pass
    return self

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)

  @property
  def signal_name(self) -> str:
    # Processes of a multi-host run that were not signalled themselves stop
    # on a peer's signal; the agreement does not carry which, and SIGTERM is
    # what preempts a multi-host job.
    return _STOP_SIGNALS.get(self.signal, 'SIGTERM')

  def stopped(self, step: int):
    """None after SIGTERM (the caller exits 0); raises Interrupted after Ctrl-C."""
    if self.signal == signal.SIGINT:
      raise Interrupted(f'Stopped at step {step} on Ctrl-C after saving a checkpoint; run the '
                        'same command to resume.')
    return None
