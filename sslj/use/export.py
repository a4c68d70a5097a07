"""`--mode=export` and `sslj.load`: a run's reported model as plain, versioned files.

An export is a folder of two files:

  sslj_export.json   {"format_version": 1, "method", "step", "dataset",
                      "reported_model",
                      "model": {"name", "dtype", "num_heads"}, "num_classes",
                      "class_names", "image_shape": [H, W, C],
                      "input_size": int or null (the square size images are
                      resampled to before the network, as in evaluation),
                      "mean": [C], "std": [C] (of images in [0, 1]),
                      "variables": "variables.msgpack"}
  variables.msgpack  the network's {"params", "batch_stats"}, written by
                     `flax.serialization.msgpack_serialize` (arrays and
                     dicts only: loading runs no code, unlike a pickle)

`sslj.load(folder)` rebuilds the model from the JSON with `sslj.models.build`,
checks that every variable has the shape the model expects, and returns an
`ExportedModel`: `model(images)` maps uint8 images [B, H, W, C] to the class
logits [B, num_classes] of the reported model, normalising inside exactly as
the method's `predict` does. Loading needs neither the run directory nor the
dataset.
"""

from __future__ import annotations

import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np

from sslj.data import augment
from sslj.errors import UserError
from sslj.methods import network
from sslj.use import reported

FORMAT_VERSION = 1
META_FILE = 'sslj_export.json'
VARIABLES_FILE = 'variables.msgpack'
DEFAULT_FOLDER = 'export'


def _atomic_write(path: str, data: bytes) -> None:
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def check_out(path: str) -> None:
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f'--out={path} is a file; give a folder to export into.')


def write(path: str, net: reported.ReportedNetwork, *, method: str, step: int, dataset: str,
          reported_model: str, class_names, image_shape) -> None:
  """Writes an export of `net` into folder `path` (created if needed)."""
  check_out(path)
  os.makedirs(path, exist_ok=True)
  variables = jax.tree.map(np.asarray, jax.device_get(net.variables))
  meta = {
      'format_version': FORMAT_VERSION,
      'method': method, 'step': int(step), 'dataset': dataset,
      'reported_model': reported_model,
      'model': dict(net.model_config), 'num_classes': int(net.num_classes),
      'class_names': list(class_names), 'image_shape': [int(s) for s in image_shape],
      'input_size': net.preprocess.spec.out_size,
      # float32 -> Python float is exact, and so is the way back.
      'mean': [float(v) for v in np.asarray(net.preprocess.mean)],
      'std': [float(v) for v in np.asarray(net.preprocess.std)],
      'variables': VARIABLES_FILE,
  }
  # Variables first: a folder whose JSON exists is always complete.
  _atomic_write(os.path.join(path, VARIABLES_FILE), flax.serialization.msgpack_serialize(variables))
  _atomic_write(os.path.join(path, META_FILE),
                (json.dumps(meta, indent=2, sort_keys=True) + '\n').encode())


def export(workdir: str, *, step: int | None = None, out: str | None = None) -> str:
  """Exports the run's reported model at `step` (default: latest); returns the folder."""
  from sslj.use import restore  # pylint: disable=g-import-not-at-top  (needs tfds)
  out = out or os.path.join(os.path.abspath(workdir), DEFAULT_FOLDER)
  check_out(out)  # Before anything is loaded.
  run = restore.restore(workdir, step)
  if not run.network.classifies:
    raise UserError(f"{run.config.method}'s network classifies surrogate classes or clusters, "
                    'not the dataset\'s classes, so there are no class logits to export; use '
                    '--mode=probe to score its features.')
  if jax.process_index() == 0:
    write(out, run.network, method=run.config.method, step=run.step,
          dataset=run.config.data.name, reported_model=run.method.reported_model,
          class_names=run.data.class_names, image_shape=run.data.labeled_images.shape[1:])
  return out


class ExportedModel:
  """A trained sslj classifier loaded from an export folder.

  Call it on uint8 images [B, H, W, C] of the training size (`image_shape`)
  to get float32 class logits [B, num_classes]; `class_names[i]` names logit
  i. `features(images)` gives the pooled penultimate features [B, D].

  Attributes:
    class_names: tuple of class names, in logit order.
    image_shape: (H, W, C) the model takes.
    meta: the export's JSON, as a dict.
    network: the underlying `ReportedNetwork` (module, variables, preprocess).
  """

  def __init__(self, net: reported.ReportedNetwork, meta: dict):
    self.network = net
    self.meta = meta
    self.class_names = tuple(meta['class_names'])
    self.image_shape = tuple(meta['image_shape'])
    self._variables = jax.device_put(net.variables)
    self._logits = jax.jit(net.logits)
    self._features = jax.jit(net.features)

  def _checked(self, images):
    if not hasattr(images, 'dtype'):
      images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
      raise UserError(f'the model takes uint8 images [B, {", ".join(map(str, self.image_shape))}]; '
                      f'got {images.dtype} {tuple(images.shape)}.')
    return images

  def __call__(self, images) -> jax.Array:
    return self._logits(self._variables, self._checked(images))

  def features(self, images) -> jax.Array:
    return self._features(self._variables, self._checked(images))

  def __repr__(self):
    return (f"ExportedModel({self.meta['method']} {self.meta['model']['name']}, "
            f'{len(self.class_names)} classes, images {self.image_shape})')


def _read_meta(path: str) -> dict:
  meta_path = os.path.join(path, META_FILE)
  if not os.path.isfile(meta_path):
    raise UserError(f'{path} holds no {META_FILE}: pass a folder written by --mode=export.')
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'{meta_path} is not readable JSON ({e}); export the run again.') from None
  version = meta.get('format_version') if isinstance(meta, dict) else None
  if version != FORMAT_VERSION:
    raise UserError(f'{meta_path} has format_version {version!r}; this sslj reads version '
                    f'{FORMAT_VERSION}: load it with the sslj that wrote it, or export again.')
  return meta


def _check_shapes(template, restored, path: str) -> None:
  """Every expected variable present with its shape, and nothing else."""
  want = {jax.tree_util.keystr(k): tuple(v.shape)
          for k, v in jax.tree_util.tree_flatten_with_path(template)[0]}
  got = {jax.tree_util.keystr(k): tuple(np.shape(v))
         for k, v in jax.tree_util.tree_flatten_with_path(restored)[0]}
  if want != got:
    bad = sorted(set(want) ^ set(got)) or sorted(k for k in want if want[k] != got[k])
    raise UserError(f'{os.path.join(path, VARIABLES_FILE)} does not fit the model its JSON '
                    f'describes (first difference: {bad[0]}); export the run again.')


def load(path: str) -> ExportedModel:
  """Loads an export folder as a callable model (see `ExportedModel`).

  Raises:
    UserError: not an export folder, another format version, or variables
      that do not fit the model.
  """
  path = os.fspath(path)
  meta = _read_meta(path)
  variables_path = os.path.join(path, meta.get('variables', VARIABLES_FILE))
  try:
    with open(variables_path, 'rb') as f:
      variables = flax.serialization.msgpack_restore(f.read())
  except (OSError, ValueError) as e:
    raise UserError(f'{variables_path} cannot be read ({type(e).__name__}); export the run '
                    'again.') from None
  h, w, c = meta['image_shape']
  spec = augment.AugmentSpec(out_size=meta['input_size'])
  preprocess = network.Preprocess(spec, np.asarray(meta['mean'], np.float32),
                                  np.asarray(meta['std'], np.float32))
  net = reported.build_network(meta['model'], meta['num_classes'], variables, preprocess)
  size = (meta['input_size'],) * 2 if meta['input_size'] else (h, w)
  template = jax.eval_shape(
      lambda: net.model.init(jax.random.key(0), jnp.zeros((1, *size, c), jnp.float32)))
  _check_shapes(template, variables, path)
  return ExportedModel(net, meta)
