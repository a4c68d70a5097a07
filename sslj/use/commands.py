"""What `launch.py --mode=eval|probe|predict|export` runs; returns the line to print.

Flags that a mode does not use are refused rather than ignored, so that a
typo such as `--mode=eval --images=...` does not silently do something else.
"""

from __future__ import annotations

from sslj.errors import UserError

MODES = ('eval', 'probe', 'predict', 'export')
# Flags each mode reads (besides --workdir and --step).
_USES = {'eval': ('split', 'dataset'), 'probe': ('split', 'dataset'),
         'predict': ('images', 'out'), 'export': ('out',)}


def run(mode: str, workdir: str, *, config=None, step: int | None = None,
        split: str | None = None, dataset: str | None = None, images: str | None = None,
        out: str | None = None) -> str:
  """Runs one mode on the run in `workdir`.

  Raises:
    UserError: an unknown mode, a flag the mode does not use, --config given
      (the run's own config is used), or whatever the mode refuses.
  """
  if mode not in MODES:
    raise UserError(f"unknown mode '{mode}'; use train or one of {', '.join(MODES)}.")
  if config is not None:
    raise UserError(f'--mode={mode} uses the config recorded in {workdir}/config.json; '
                    'drop --config.')
  given = {'split': split, 'dataset': dataset, 'images': images, 'out': out}
  unused = [name for name, value in given.items()
            if value is not None and name not in _USES[mode]]
  if unused:
    raise UserError(f'--{unused[0]} does not apply to --mode={mode}; it takes --workdir, --step'
                    f"{''.join(', --' + n for n in _USES[mode])}.")
  if step is not None and step < 0:
    raise UserError(f'--step={step} must be a checkpoint step (>= 0).')
  # Imported here: each pulls in JAX, and `sslj.use.restore` TensorFlow Datasets.
  if mode in ('eval', 'probe'):
    from sslj.use import evaluate  # pylint: disable=g-import-not-at-top
    record = evaluate.evaluate(workdir, step=step, split=split or 'test', dataset=dataset,
                               with_probes=mode == 'probe')
    return evaluate.summary(record, workdir)
  if mode == 'predict':
    if not images:
      raise UserError('--mode=predict needs --images=FOLDER (searched recursively) or a text '
                      'file listing image paths.')
    from sslj.use import predict  # pylint: disable=g-import-not-at-top
    path, done, skipped = predict.predict(workdir, images, step=step, out=out)
    return (f'Predicted {done} images ({skipped} unreadable files skipped): {path}')
  from sslj.use import export  # pylint: disable=g-import-not-at-top
  path = export.export(workdir, step=step, out=out)
  return f"Exported to {path}; load it with sslj.load('{path}')."
