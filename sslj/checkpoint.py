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
`<step>.unreadable` and restores the one before.
"""

from __future__ import annotations

import os

from absl import logging
import jax
import orbax.checkpoint as ocp

from sslj.errors import UserError


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
    """Saves if `step` is on the interval (or `force`); returns whether it did."""
    if not force and (self.every <= 0 or step % self.every):
      return False
    if step in self._manager.all_steps():
      return False
    saved = self._manager.save(step, args=ocp.args.StandardSave(state),
                               force=True)
    self._manager.wait_until_finished()
    return saved

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()
