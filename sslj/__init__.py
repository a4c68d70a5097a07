"""sslj: semi-supervised image classification in JAX/Flax.

Train with `python launch.py --config=configs/<method>.py --workdir=DIR`;
use a run with `--mode=eval|probe|predict|export` (see `sslj.use`).
Importing `sslj` imports nothing heavy: `load` imports JAX on first call.
"""


def load(path):
  """Loads a model exported with `launch.py --mode=export` as a callable.

    model = sslj.load('runs/sup/export')
    logits = model(images)          # uint8 [B, H, W, C] -> float32 [B, classes]
    names = [model.class_names[i] for i in logits.argmax(-1)]

  Normalisation (and any resize the run evaluated with) happens inside.
  Returns an `sslj.use.export.ExportedModel`; raises `sslj.errors.UserError`
  for a folder that is not an export of this format version.
  """
  from sslj.use import export  # pylint: disable=g-import-not-at-top
  return export.load(path)
