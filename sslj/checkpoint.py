"""Orbax checkpoints of the training state: save, keep N, resume automatically.

Only arrays are written (Orbax's standard PyTree format: tensorstore/zarr
files plus JSON metadata); restoring never unpickles anything. The state's
structure, dtypes and shardings come from the freshly initialised state, so a
checkpoint restores straight onto the current mesh.
"""

from __future__ import annotations

import os

from absl import logging
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves the state every `every` steps under `<workdir>/checkpoints`."""

  def __init__(self, workdir: str, *, every: int, keep: int):
    self.every = every
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True,
            # Synchronous saves: a save has finished (and its directory been
            # renamed into place, which is what makes it atomic) before the
            # next step runs, so a kill can never leave a half-written "latest".
            enable_async_checkpointing=False))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def restore(self, template, step: int | None = None):
    """The state saved at `step` (default: latest), shaped like `template`."""
    step = self.latest_step() if step is None else step
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
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
