"""A finished (or interrupted) run, back in memory: config, data, method, state.

Everything is rebuilt the way `sslj.train` built it, so a restored state
computes exactly what it computed in training: the config from
`DIR/config.json`, the dataset and its labelled split from that config (the
normalisation statistics come from the training split, as in training), the
method from `methods.get(config.method).make(config, data)` and
the state from the Orbax checkpoint of the asked-for step.

Cheap checks (config present, method known and checkpointed, checkpoint
present) run before any data is read or anything is compiled.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from sslj import checkpoint, methods, parallel, run_files
from sslj.data import sources, splits
from sslj.errors import UserError
from sslj.methods import base
from sslj.use import reported

# Splits `--split` accepts: the dataset's test split, its whole train split,
# and the labelled subset the run trained on.
SPLITS = ('test', 'train', 'labeled')


@dataclasses.dataclass(frozen=True)
class RestoredRun:
  """A run rebuilt from its directory.

  Attributes:
    workdir: the run directory.
    config: the run's config (locked ConfigDict).
    arrays: every split of the run's dataset.
    data: the labelled/unlabelled split and normalisation the run used.
    method: the method, built as training built it.
    state: the training state restored from the checkpoint, replicated.
    step: the checkpoint's step.
    mesh: the device mesh the state lives on.
  """
  workdir: str
  config: ml_collections.ConfigDict
  arrays: sources.ArraySplits
  data: splits.SemiSupervisedData
  method: base.Method
  state: Any
  step: int
  mesh: jax.sharding.Mesh

  @property
  def network(self) -> reported.ReportedNetwork:
    """The reported network (`Definition.reported`) as variables + module."""
    return reported.reported_network(self.config, self.data, self.state)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run recorded in `workdir/config.json`, locked."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise UserError(f'{workdir} has no config.json, so it holds no sslj run: pass the --workdir '
                    'of a run made with --mode=train.')
  try:
    with open(path) as f:
      recorded = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'{path} is not readable JSON ({e}); it was written by --mode=train, so '
                    'restore it from a copy or train again.') from None
  if not isinstance(recorded, dict) or 'method' not in recorded:
    raise UserError(f'{path} is not an sslj run config (it has no "method").')
  # JSON turned tuples into lists; every consumer (AugmentSpec) accepts both.
  # Fields added since the run was recorded read as what the run did.
  config = ml_collections.ConfigDict(run_files.as_current(recorded))
  config.lock()
  return config


def check_restorable(config) -> None:
  """UserError unless the run's method keeps a checkpoint (every method that does has a
  reported network)."""
  if methods.get(config.method).is_pipeline:
    raise UserError(f"method '{config.method}' is not trained by gradient steps and keeps no "
                    'checkpoint; eval, probe, predict and export need a run of a gradient '
                    'method.')


def checkpoint_step(ckpt: checkpoint.Checkpointer, step: int | None, workdir: str) -> int:
  """The step to restore: `step` if saved, else the latest; UserError if none."""
  steps = ckpt.all_steps()
  if not steps:
    raise UserError(f'{workdir} has no checkpoint yet: train it first (--mode=train).')
  if step is None:
    return max(steps)
  if step not in steps:
    raise UserError(f'{workdir} has no checkpoint of step {step}; it has steps '
                    f'{", ".join(map(str, sorted(steps)))}.')
  return step


def load_data(config) -> tuple[sources.ArraySplits, splits.SemiSupervisedData]:
  """The run's dataset and split, as `train.load_data` makes them.

  Same calls with the same arguments as `train.load_data`; also returns the
  raw splits, which `--split=train` evaluates on.
  """
  arrays = sources.load_arrays(config.data.name, data_dir=config.data.data_dir,
                               manual_dir=config.data.manual_dir, fold=config.data.fold,
                               image_size=config.data.image_size)
  data = splits.semi_supervised(arrays, config.data.labels_per_class, config.seed,
                                fold=config.data.fold,
                                unlabeled_from_train=config.data.unlabeled_from_train)
  return arrays, data


def restore(workdir: str, step: int | None = None) -> RestoredRun:
  """Rebuilds the run in `workdir` at checkpoint `step` (default: the latest).

  Raises:
    UserError: no config.json, a method without a checkpointed network, no
      checkpoint (of that step), or the run's data cannot be loaded.
  """
  workdir = os.path.abspath(workdir)
  config = read_config(workdir)
  check_restorable(config)
  # Checked before constructing the Checkpointer, which would create the folder.
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise UserError(f'{workdir} has no checkpoint yet: train it first (--mode=train).')
  ckpt = checkpoint.Checkpointer(workdir, every=0, keep=config.keep_checkpoints,
                                 read_only=True)
  try:
    step = checkpoint_step(ckpt, step, workdir)
    arrays, data = load_data(config)
    method = methods.get(config.method).make(config, data)
    parallel.check_divisible(config.eval_batch_size, 'eval_batch_size')
    mesh = parallel.make_mesh()
    replicated = parallel.replicated(mesh)
    # Only shapes, dtypes and shardings are needed to restore into; no
    # initialisation is computed.
    abstract = jax.eval_shape(method.init, jax.random.key(config.seed))
    template = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated), abstract)
    state = ckpt.restore(template, step)
  finally:
    ckpt.close()
  return RestoredRun(workdir=workdir, config=config, arrays=arrays, data=data, method=method,
                     state=state, step=step, mesh=mesh)


@dataclasses.dataclass(frozen=True)
class EvalSet:
  """Images to evaluate on, the labelled images probes fit on, and the rest of the pool.

  `unlabeled_images` join the labelled ones for the probes' feature statistics
  (the run's unlabeled pool; for another dataset, its training images).
  """
  dataset: str
  split: str
  images: np.ndarray
  labels: np.ndarray
  labeled_images: np.ndarray
  labeled_labels: np.ndarray
  unlabeled_images: np.ndarray


def eval_set(run: RestoredRun, dataset: str | None, split: str) -> EvalSet:
  """The `split` of `dataset` (default: the run's own), shaped for the model.

  Another dataset is read with its images resized to the run's image size; it
  must have the run's number of channels and classes, so the classifier's
  outputs mean its classes. Its labelled subset (for the probes) is drawn
  with the run's labels_per_class and seed.
  """
  check_split(split)
  config, data = run.config, run.data
  if dataset is None or dataset == config.data.name:
    arrays = run.arrays
    labeled = (data.labeled_images, data.labeled_labels)
    test = (data.test_images, data.test_labels)
    pool = data.unlabeled_images
    dataset = config.data.name
  else:
    shape = data.labeled_images.shape[1:]
    arrays = sources.load_arrays(dataset, data_dir=config.data.data_dir, image_size=shape[:2])
    if arrays.train_images.shape[-1] != shape[-1]:
      raise UserError(f'{dataset} has {arrays.train_images.shape[-1]}-channel images but the run '
                      f'was trained on {shape[-1]}-channel ones; evaluate on a dataset of the '
                      'same kind.')
    if len(arrays.class_names) != data.num_classes:
      raise UserError(f'{dataset} has {len(arrays.class_names)} classes but the run was trained '
                      f'on {data.num_classes}; evaluate on a dataset with the same classes.')
    ours, theirs = list(run.arrays.class_names), list(arrays.class_names)
    if ours != theirs:
      # Same count, other classes: the accuracy would only say how often
      # class i of one dataset lands on class i of the other.
      raise UserError(f"{dataset}'s classes ({_few(theirs)}) are not the run's "
                      f"({config.data.name}: {_few(ours)}); evaluate on a dataset with the "
                      'same classes in the same order.')
    index = splits.labeled_subset(arrays.train_labels, config.data.labels_per_class, config.seed,
                                  num_classes=data.num_classes)
    labeled = (arrays.train_images[index], arrays.train_labels[index].astype(np.int32))
    test = (arrays.test_images, arrays.test_labels.astype(np.int32))
    pool = arrays.train_images
  images, labels = {'test': test, 'labeled': labeled,
                    'train': (arrays.train_images, arrays.train_labels.astype(np.int32))}[split]
  if not len(images):
    raise UserError(f'the {split} split of {dataset} has no images; pick another --split.')
  return EvalSet(dataset=dataset, split=split, images=images, labels=labels,
                 labeled_images=labeled[0], labeled_labels=labeled[1], unlabeled_images=pool)


def _few(names, shown: int = 3) -> str:
  return ', '.join(map(str, names[:shown])) + (', ...' if len(names) > shown else '')


def check_split(split: str) -> None:
  if split not in SPLITS:
    raise UserError(f"unknown split '{split}'; use one of {', '.join(SPLITS)}.")
