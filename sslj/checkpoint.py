"""Orbax checkpoints of the training state: save, keep N, resume automatically.

Only arrays are written (Orbax's standard PyTree format: tensorstore/zarr
files plus JSON metadata); restoring never unpickles anything. The state's
structure, dtypes and shardings come from the freshly initialised state, so a
checkpoint restores straight onto the current mesh.

A save is written to a temporary directory and renamed into place when it
is complete, so a run killed mid-save leaves the previous checkpoints as
they were (the temporary directory is removed on the next start). If the
latest checkpoint cannot be read all the same (a damaged disk, a file
truncated by hand), resuming warns, names it, moves it aside to
`<step>.unreadable` and restores the one before. A save that fails because
the disk is full is one clear `UserError`; the checkpoints before it stay
as they were, so running the same command after freeing space resumes.
"""

from __future__ import annotations

import contextlib
import errno
import logging as pylogging
import os
import re

from absl import logging
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from sslj.errors import UserError

# OS errors that mean the disk, the quota or the file size limit is full, as
# the error line names them.
_DISK_FULL = {errno.ENOSPC: 'no space left on device',
              errno.EDQUOT: 'disk quota exceeded',
              errno.EFBIG: 'file size limit exceeded'}
# Tensorstore, which writes the arrays, reports the OS error inside a
# ValueError's message: `... No space left on device [os_error_code='28']`.
_OS_ERROR_CODE = re.compile(r"os_error_code\W*(\d+)")


def disk_full_reason(error: BaseException) -> str | None:
  """What is full if `error` (or what caused it) is a full disk, else None."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _DISK_FULL:
      return _DISK_FULL[error.errno]
    text = str(error)
    for code in map(int, _OS_ERROR_CODE.findall(text)):
      if code in _DISK_FULL:
        return _DISK_FULL[code]
    for code, reason in _DISK_FULL.items():
      if os.strerror(code) in text:
        return reason
    error = error.__cause__ or error.__context__
  return None


@jax.jit
def _all_finite(leaves):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def is_finite(state) -> bool:
  """Whether every floating-point array of `state` is free of NaN and inf."""
  leaves = [x for x in jax.tree.leaves(state)
            if hasattr(x, 'dtype') and jnp.issubdtype(x.dtype, jnp.inexact)]
  return not leaves or bool(_all_finite(leaves))


class _DropOrbaxTracebacks(pylogging.Filter):
  """Drops Orbax's logged traceback of a failed save: the error is raised anyway."""

  def filter(self, record):
    return not (record.exc_info and 'orbax' in record.pathname.replace(os.sep, '/'))


@contextlib.contextmanager
def _quiet_orbax_failures():
  quiet = _DropOrbaxTracebacks()
  logger = pylogging.getLogger('absl')
  logger.addFilter(quiet)
  try:
    yield
  finally:
    logger.removeFilter(quiet)


class Checkpointer:
  """Saves the state every `every` steps under `<workdir>/checkpoints`.

  `read_only=True` (for using a run that may still be training) never
  deletes, moves or writes anything.
  """

  def __init__(self, workdir: str, *, every: int, keep: int, read_only: bool = False):
    self.every = every
    self.keep = keep
    self.read_only = read_only
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self._manager = self._open()

  def _open(self):
    return ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=self.keep, create=not self.read_only,
            # Synchronous saves: a save has finished (and its directory been
            # renamed into place, which is what makes it atomic) before the
            # next step runs, so a kill can never leave a half-written "latest".
            enable_async_checkpointing=False,
            # What a kill in the middle of a save left behind.
            cleanup_tmp_directories=not self.read_only,
            read_only=self.read_only))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def restore(self, template, step: int | None = None):
    """The state saved at `step`, shaped like `template`.

    With `step=None`, the latest readable checkpoint: an unreadable one is
    reported, moved aside and the previous one tried.

    Raises:
      UserError: no checkpoint could be read.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    if step is not None:
      try:
        return self._restore(step, abstract)
      except Exception as e:  # pylint: disable=broad-except
        raise UserError(f'the checkpoint of step {step} in {self.directory} cannot be read '
                        f'({type(e).__name__}); choose another --step.') from e
    for candidate in sorted(self.all_steps(), reverse=True):
      try:
        return self._restore(candidate, abstract)
      except Exception as e:  # pylint: disable=broad-except
        # Orbax and tensorstore raise many types for damaged files.
        reason = f'{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ""}'
        if self.read_only:
          logging.warning('The checkpoint of step %d in %s cannot be read (%s); trying the '
                          'previous one.', candidate, self.directory, reason)
          continue
        aside = os.path.join(self.directory, f'{candidate}.unreadable')
        logging.warning('The checkpoint of step %d in %s cannot be read (%s); moved it to %s '
                        'and trying the previous one.', candidate, self.directory, reason, aside)
        self._manager.close()
        if jax.process_index() == 0:
          os.replace(os.path.join(self.directory, str(candidate)), aside)
        self._manager = self._open()
    raise UserError(f'no checkpoint in {self.directory} can be read; move the directory '
                    'away to start the run from scratch.')

  def _restore(self, step, abstract):
    restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    logging.info('Restored checkpoint of step %d from %s.', step, self.directory)
    return restored

  def save(self, step: int, state, *, force: bool = False) -> bool:
    """Saves if `step` is on the interval (or `force`); returns whether it did.

    Raises:
      UserError: the state holds NaN or inf (a diverged run), or the disk is
        full; the checkpoints before `step` are intact either way.
    """
    if not force and (self.every <= 0 or step % self.every):
      return False
    if step in self._manager.all_steps():
      return False
    if not is_finite(state):
      # A diverged state would be resumed from; the earlier ones stay.
      last = self.latest_step()
      kept = (f'the last good checkpoint (step {last}) is kept' if last is not None
              else 'no checkpoint was saved')
      raise UserError(f'the training state became non-finite by step {step}; {kept}. Lower '
                      'optimizer.learning_rate or check the data.')
    try:
      with _quiet_orbax_failures():
        saved = self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
        self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      reason = disk_full_reason(e)
      if reason is None:
        raise
      raise UserError(f'{reason} while saving checkpoint {step} in {self.directory}; '
                      'free space and run the same command to resume.') from e
    return saved

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()
