"""A run directory, loaded once for every picture: config, data, checkpoint, network.

Loading never fails because a part is missing: a run with no checkpoint yet,
a pipeline method (no checkpoint at all) or a dataset that cannot be read
leaves that part empty with the reason, and each picture that needs it
raises `Skip` with that reason. Only input that names no run at all (no
directory, no config.json, an unknown method, a --step that was not saved)
is a `UserError`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from absl import logging
import ml_collections

from sslj import methods
from sslj.data import sources, splits
from sslj.errors import UserError
from sslj.methods import base
from sslj.use import reported, restore


class Skip(Exception):
  """This picture does not apply to the run (yet); the message says why."""


@dataclasses.dataclass(frozen=True)
class Options:
  """What the command line can change.

  Attributes:
    tsne_points: test images in the t-SNE map (a seeded subsample).
    thumbnails: draw image thumbnails over the t-SNE map.
    seed: seed of every subsample and random draw of the pictures.
  """
  tsne_points: int = 2000
  thumbnails: bool = False
  seed: int = 0


@dataclasses.dataclass
class Context:
  """Everything the pictures read, loaded once.

  Attributes:
    workdir: the run directory.
    out_dir: where pictures and index.html go.
    config: the run's config (from config.json).
    method: the run's registered method (`sslj.methods.base.Definition`).
    options: command-line options.
    results: results.json, or None before the run has finished.
    run: the restored run (state at a checkpoint), or None.
    run_reason: why `run` is None.
    arrays / data: the run's dataset and split, or None.
    data_reason: why `data` is None.
  """
  workdir: str
  out_dir: str
  config: ml_collections.ConfigDict
  method: base.Definition
  options: Options
  results: dict | None = None
  run: restore.RestoredRun | None = None
  run_reason: str = ''
  arrays: sources.ArraySplits | None = None
  data: splits.SemiSupervisedData | None = None
  data_reason: str = ''
  _network: Any = None

  @property
  def is_pipeline(self) -> bool:
    """A method that is not trained by gradient steps (k-means + SVM): no checkpoint."""
    return self.method.is_pipeline

  def need_data(self) -> splits.SemiSupervisedData:
    if self.data is None:
      raise Skip(self.data_reason)
    return self.data

  def need_run(self) -> restore.RestoredRun:
    if self.run is None:
      raise Skip(self.run_reason)
    return self.run

  def network(self) -> reported.ReportedNetwork:
    """The reported network of the restored state; Skip if the method has none."""
    run = self.need_run()
    if self._network is None:
      try:
        self._network = run.network
      except UserError as e:
        raise Skip(str(e)) from None
    return self._network

  def checkpoint_source(self) -> str:
    run = self.need_run()
    latest = run.step == (self.results or {}).get('num_steps')
    return f'checkpoint of step {run.step}' + (' (the final one)' if latest else '')

  def class_names(self) -> tuple[str, ...]:
    return tuple(self.need_data().class_names)


def _read_results(workdir: str) -> dict | None:
  path = os.path.join(workdir, 'results.json')
  try:
    with open(path) as f:
      results = json.load(f)
    return results if isinstance(results, dict) and 'top1' in results else None
  except (OSError, ValueError):
    return None


def load(workdir: str, *, step: int | None, out_dir: str, options: Options) -> Context:
  """Loads what exists of the run in `workdir` (see the module docstring).

  Raises:
    UserError: `workdir` is not a directory, has no readable config.json or
      names an unknown method, or `step` was given and cannot be restored.
  """
  if not os.path.isdir(workdir):
    raise UserError(f'{workdir} does not exist: pass the --workdir of a run made with '
                    '--mode=train.')
  config = restore.read_config(workdir)
  method = methods.get(config.method)
  if step is not None and step < 0:
    raise UserError(f'--step={step} must be a checkpoint step (>= 0).')
  ctx = Context(workdir=workdir, out_dir=out_dir, config=config, method=method, options=options,
                results=_read_results(workdir))
  if ctx.is_pipeline:
    if step is not None:
      raise UserError(f'--step does not apply to a {config.method} run: it keeps no checkpoints.')
    ctx.run_reason = (f'{config.method} is not trained by gradient steps and keeps no checkpoint '
                      'or network')
  else:
    try:
      ctx.run = restore.restore(workdir, step)
    except UserError as e:
      if step is not None:
        raise
      ctx.run_reason = str(e)
    except Exception as e:  # pylint: disable=broad-except
      # E.g. a checkpoint of an older version of the method: the pictures
      # that need no checkpoint are still drawn.
      if step is not None:
        raise UserError(f'checkpoint step {step} of {workdir} cannot be restored: '
                        f'{type(e).__name__}: {e}') from None
      logging.warning('viz: the checkpoint of %s cannot be restored', workdir, exc_info=True)
      ctx.run_reason = f'the checkpoint cannot be restored ({type(e).__name__}: {e})'
  if ctx.run is not None:
    ctx.arrays, ctx.data = ctx.run.arrays, ctx.run.data
  else:
    try:
      ctx.arrays, ctx.data = restore.load_data(config)
    except Exception as e:  # pylint: disable=broad-except
      ctx.data_reason = f"the run's dataset '{config.data.name}' cannot be loaded ({e})"
  return ctx

