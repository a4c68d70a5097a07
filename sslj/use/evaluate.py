"""`--mode=eval` and `--mode=probe`: score a run's checkpoint, write a JSON file of it.

eval: top-1/top-5 of every model of the method (the same compiled counting
and padded batches as the training loop, so the checkpoint of the last step
gives exactly the accuracies of `results.json`) on any split of the run's
dataset or of another dataset with the same classes. Models a method fits
after training (`Method.finalize`) are refitted and scored the same way,
with the evaluated split in place of the test split.

probe: the same, plus frozen-feature probes of the reported network (the
teacher for Mean Teacher): a linear classifier and a weighted kNN classifier
fitted on the labelled images (the run's labelled subset, or the same
labels_per_class and seed drawn from the other dataset) and tested on the
split; see `sslj.ops.probes`. The linear probe's features are standardised
with the mean and deviation of every training image's features (the
labelled images and the run's unlabeled pool; for another dataset its
training images), as DeepCluster's, Exemplar-CNN's and the k-means SVM's are
by default.

Each evaluation goes to its own file, named by what was evaluated, so one
never replaces another: `DIR/<mode>_<split>_step<N>.json` (`eval_test_step1500.json`,
`probe_train_step500.json`), with `_<dataset>` before `.json` for another
dataset. A workdir that cannot be written (a read-only copy of a run) is
said up front; the result is then printed and not saved.

Each file holds:
  {"method", "step", "split", "dataset", "reported_model",
   "models": {"<name>": {"top1", "top5"}},
   "probes": {"linear": {"top1", "top5", "C", "standardize"},   (probe mode only)
              "knn": {"top1", "top5", "k", "temperature"},
              "feature_dim", "num_labeled"}}
Accuracies are percentages (0-100).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re

from absl import logging
import jax

from sslj import preflight, run_files, train
from sslj.methods import frozen_features
from sslj.ops import probes
from sslj.use import reported, restore



def output_name(mode: str, split: str, step: int, dataset: str, run_dataset: str) -> str:
  """The file an evaluation is written to, named by what it evaluated."""
  other = ''
  if dataset != run_dataset:  # e.g. image_folder:/data/pets -> _image-folder-data-pets
    other = '_' + re.sub(r'[^A-Za-z0-9.-]+', '-', dataset).strip('-')
  return f'{mode}_{split}_step{step}{other}.json'


def model_scores(run: restore.RestoredRun, images, labels) -> dict:
  """{model: {'top1', 'top5'}} of every model the method predicts with."""
  count_fn = jax.jit(functools.partial(train.count_correct, predict=run.method.predict))
  return train.evaluate(run.state, count_fn, images, labels, run.mesh, run.config.eval_batch_size)


def features_of(run: restore.RestoredRun):
  """images -> pooled features [N, D] of the reported network, on the host (one compile)."""
  net = run.network
  fn = reported.replicated_outputs(net.features, run.mesh)
  return lambda images: reported.apply_in_batches(fn, (net.variables,), images, run.mesh,
                                                  run.config.eval_batch_size)


def features(run: restore.RestoredRun, *image_sets) -> list:
  """Pooled features [N, D] of the reported network for each image set, on the host."""
  return list(map(features_of(run), image_sets))


def probe_scores(run: restore.RestoredRun, evaluated: restore.EvalSet, *,
                 k: int = probes.KNN_K, temperature: float = probes.KNN_TEMPERATURE,
                 c: float = probes.LINEAR_C, standardize: str = 'train') -> dict:
  """Linear and kNN probes of the reported network's features.

  `standardize`: 'train' scales the linear probe's features by the statistics
  of the labelled and unlabeled images' features, 'labeled' by the labelled
  images' own.
  """
  frozen_features.check_standardize(standardize, 'standardize')
  features_fn = features_of(run)
  fit_x, test_x = features_fn(evaluated.labeled_images), features_fn(evaluated.images)
  num_classes = run.data.num_classes
  standardizer = None
  if standardize == 'train':
    moments = probes.Moments()
    moments.add(fit_x)
    pool = evaluated.unlabeled_images
    for start in range(0, len(pool), frozen_features.MOMENTS_CHUNK):
      moments.add(features_fn(pool[start:start + frozen_features.MOMENTS_CHUNK]))
    standardizer = moments.standardizer()
  linear = probes.linear_probe(fit_x, evaluated.labeled_labels, test_x, evaluated.labels,
                               num_classes=num_classes, c=c, standardizer=standardizer)
  knn = probes.knn_probe(fit_x, evaluated.labeled_labels, test_x, evaluated.labels,
                         num_classes=num_classes, k=k, temperature=temperature)
  return {'linear': {**linear, 'C': c, 'standardize': standardize},
          'knn': {**knn, 'k': min(k, len(fit_x)), 'temperature': temperature},
          'feature_dim': int(fit_x.shape[1]), 'num_labeled': int(len(fit_x))}


def evaluate(workdir: str, *, step: int | None = None, split: str = 'test',
             dataset: str | None = None, with_probes: bool = False) -> dict:
  """Restores `workdir` at `step`, scores it on `split`, writes and returns the record.

  The record's `file` is where it was written (None if the workdir is
  read-only).

  Raises:
    UserError: an unknown split, no config.json or checkpoint (of that step),
      a dataset of other classes or channels.
  """
  restore.check_split(split)  # Before any loading.
  writable = preflight.can_write(workdir) if os.path.isdir(workdir) else True
  if not writable:
    logging.warning('%s cannot be written: the evaluation is printed, not saved.', workdir)
  run = restore.restore(workdir, step)
  evaluated = restore.eval_set(run, dataset, split)
  models = model_scores(run, evaluated.images, evaluated.labels)
  if run.method.finalize is not None:
    # Models the method fits after training (e.g. a classifier on features)
    # score as in training, with the evaluated images in the test's place.
    models.update(run.method.finalize(run.state, dataclasses.replace(
        run.data, test_images=evaluated.images, test_labels=evaluated.labels,
        labeled_images=evaluated.labeled_images, labeled_labels=evaluated.labeled_labels,
        unlabeled_images=evaluated.unlabeled_images)))
  record = {'method': run.config.method, 'step': run.step, 'split': split,
            'dataset': evaluated.dataset, 'reported_model': run.method.reported_model,
            'models': models}
  if with_probes:
    record['probes'] = probe_scores(run, evaluated)
  record['file'] = None
  if writable and jax.process_index() == 0:
    name = output_name('probe' if with_probes else 'eval', split, run.step, evaluated.dataset,
                       run.config.data.name)
    record['file'] = os.path.join(run.workdir, name)
    # The same atomic, process-0-only JSON write as results.json gets.
    run_files.atomic_write_json(record['file'], {k: v for k, v in record.items() if k != 'file'})
  logging.info('Evaluated step %d on %s/%s.', run.step, evaluated.dataset, split)
  return record


def summary(record: dict, workdir: str) -> str:
  """One line for the terminal."""
  reported_name = record['reported_model']
  parts = [f"{name}{' (reported)' if name == reported_name else ''} top-1 {s['top1']:.2f}% "
           f"top-5 {s['top5']:.2f}%" for name, s in record['models'].items()]
  for name in ('linear', 'knn'):
    if 'probes' in record:
      s = record['probes'][name]
      parts.append(f"{name} probe top-1 {s['top1']:.2f}% top-5 {s['top5']:.2f}%")
  saved = record.get('file') or f'not saved: {workdir} cannot be written'
  return (f"{record['method']} step {record['step']} on {record['dataset']}/{record['split']}: "
          f"{', '.join(parts)} ({saved})")
