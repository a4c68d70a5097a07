"""`--mode=predict`: classify image files with a run's reported model.

`--images` is a folder (searched recursively; hidden files and folders are
skipped) or a text file listing image paths, one a line (relative paths are
relative to the list's folder; blank lines and lines starting with `#` are
skipped). Each file is decoded as the image-folder datasets decode their
files (PIL, EXIF orientation, RGB, bilinear resize to the run's training
image size, decompression-bomb guard), then converted to one grey channel if
the model was trained on grey images. The uint8 images go through the
method's own `predict`, which normalises them as in training.

Writes `DIR/predictions.csv` (or `--out`) with the columns
`file, class_index, class_name, probability` (the softmax probability of the
predicted class); `file` is relative to the folder, or as listed. Files that
cannot be decoded are skipped and counted in one log line.
"""

from __future__ import annotations

import csv
import functools
import os

from absl import logging
import jax
import numpy as np
from PIL import Image

from sslj.data.builders import image_folder
from sslj.errors import UserError
from sslj.use import reported, restore

PREDICTIONS_FILE = 'predictions.csv'
COLUMNS = ('file', 'class_index', 'class_name', 'probability')
# Unreadable files named in the log line; the rest are only counted.
NAMES_SHOWN = 5


def list_images(path: str) -> list[tuple[str, str]]:
  """(name to report, path to read) of every image `path` names.

  Raises:
    UserError: the path does not exist, or names no files.
  """
  if not os.path.exists(path):
    raise UserError(f'--images={path} does not exist: pass a folder of images or a text file '
                    'listing image paths.')
  if os.path.isdir(path):
    files = [(os.path.relpath(p, path), p) for p in image_folder.list_files(path)]
  else:
    try:
      with open(path, encoding='utf-8') as f:
        lines = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as e:
      raise UserError(f'--images={path} is not a folder or a readable text list of image '
                      f'paths ({type(e).__name__}).') from None
    base = os.path.dirname(os.path.abspath(path))
    files = [(line, os.path.join(base, os.path.expanduser(line))) for line in lines
             if line and not line.startswith('#')]
  if not files:
    raise UserError(f'--images={path} names no files: put images in the folder, or list their '
                    'paths one a line.')
  return files


def decode(path: str, image_shape: tuple[int, int, int]) -> np.ndarray:
  """uint8 [H, W, C] for a model of `image_shape`; raises on a bad file."""
  height, width, channels = image_shape
  rgb = image_folder.decode_image(path, (height, width))
  if channels == 3:
    return rgb
  # ITU-R 601 luma, as PIL's 'L' conversion (equal R, G, B stay exact).
  return np.asarray(Image.fromarray(rgb, 'RGB').convert('L'), np.uint8)[..., None]


def read_images(files, image_shape) -> tuple[list[str], np.ndarray, list[str]]:
  """(names read, uint8 images [N, H, W, C], names skipped as unreadable)."""
  names, images, skipped = [], [], []
  for name, path in files:
    try:
      images.append(decode(path, image_shape))
    except Exception:  # pylint: disable=broad-except
      # PIL raises many types for a bad file (OSError, ValueError,
      # SyntaxError, DecompressionBombError, ...); all mean "skip it".
      skipped.append(name)
      continue
    names.append(name)
  stacked = np.stack(images) if images else np.zeros((0, *image_shape), np.uint8)
  return names, stacked, skipped


def _probabilities(predict, reported_model, state, images):
  return jax.nn.softmax(predict(state, images)[reported_model].astype(np.float32), axis=-1)


def predict(workdir: str, images_path: str, *, step: int | None = None,
            out: str | None = None) -> tuple[str, int, int]:
  """Writes the predictions CSV; returns (its path, images predicted, skipped).

  Raises:
    UserError: images_path missing or empty, no readable image, the model's
      images are neither grey nor RGB, or the run cannot be restored.
  """
  files = list_images(images_path)  # Checked before anything is loaded.
  if out is not None:
    check_out_folder(out)
  run = restore.restore(workdir, step)
  image_shape = run.data.labeled_images.shape[1:]
  if image_shape[-1] not in (1, 3):
    raise UserError(f'the run was trained on {image_shape[-1]}-channel images; predicting from '
                    'image files needs grey (1) or RGB (3) ones.')
  predicted = jax.eval_shape(run.method.predict, run.state,
                             jax.ShapeDtypeStruct((1, *image_shape), np.uint8))
  if run.method.reported_model not in predicted:
    raise UserError(f"{run.config.method} reports '{run.method.reported_model}', a model fitted "
                    "after training rather than the network's logits; predict cannot run it yet.")
  names, images, skipped = read_images(files, image_shape)
  if skipped:
    logging.warning('predict: skipped %d unreadable files: %s%s', len(skipped),
                    ', '.join(skipped[:NAMES_SHOWN]), ', ...' if len(skipped) > NAMES_SHOWN else '')
  if not names:
    raise UserError(f'none of the {len(files)} files under --images={images_path} is a readable '
                    'image.')
  fn = reported.replicated_outputs(
      functools.partial(_probabilities, run.method.predict, run.method.reported_model), run.mesh)
  probs = reported.apply_in_batches(fn, (run.state,), images, run.mesh, run.config.eval_batch_size)
  out = out or os.path.join(run.workdir, PREDICTIONS_FILE)
  if jax.process_index() == 0:
    write_csv(out, names, probs, run.data.class_names)
  return out, len(names), len(skipped)


def write_csv(path: str, names, probs: np.ndarray, class_names) -> None:
  """The CSV of predictions, written to a temporary file and renamed into place."""
  index = np.argmax(probs, axis=1)
  check_out_folder(path)
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w', newline='', encoding='utf-8') as f:
    writer = csv.writer(f)
    writer.writerow(COLUMNS)
    for name, i, p in zip(names, index, probs):
      writer.writerow([name, int(i), class_names[i], f'{float(p[i]):.6f}'])
  os.replace(tmp, path)


def check_out_folder(path: str) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    raise UserError(f'--out={path}: the folder {directory} does not exist; create it first.')
