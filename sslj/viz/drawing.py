"""Draws every picture that applies to a run, then `index.html`; what `--mode=viz` runs.

Each picture is drawn on its own: one that does not apply (no checkpoint
yet, no centroids, ...) or that fails is recorded with its reason in the log
and on the page, and the others are still drawn.
"""

from __future__ import annotations

import importlib.util
import os

from absl import logging
import jax
import numpy as np

from sslj.errors import UserError
from sslj.methods import base
from sslj.use import reported
from sslj.viz import context, page, pictures
from sslj.viz.context import Context, Options, Skip
from sslj.viz.page import Picture, Skipped


def curves_picture(ctx: Context) -> list:
  """Loss and top-1 against steps from `metrics.jsonl`."""
  from sslj.viz import curves  # pylint: disable=g-import-not-at-top
  path = os.path.join(ctx.workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    if ctx.is_pipeline:
      raise Skip(f'{ctx.config.method} is not trained by gradient steps and logs no curves')
    raise Skip('no metrics.jsonl yet (the run has not logged a step)')
  records = curves.read_metrics(path)
  if not records:
    raise Skip('metrics.jsonl has no records yet')
  reported_model = ctx.run.method.reported_model if ctx.run is not None else None
  size, numbers = curves.draw_curves(
      records, os.path.join(ctx.out_dir, 'curves.png'), reported_model=reported_model,
      title=f'{ctx.config.method} on {ctx.config.data.name}, '
            f'{ctx.config.data.labels_per_class or "all"} labels per class')
  caption = ('Left: the training losses on the training batches, log scale. Right: the test '
             'top-1 of every model the run evaluates, and (dashed) the top-1 the method logs on '
             'its training batches (train_top1).')
  top1 = numbers['top1']
  pair = ctx.method.compare_models
  if pair is not None and pair[0] in top1 and pair[1] in top1:
    trained, averaged = pair
    ahead, stays = curves.teacher_lead(top1[trained], top1[averaged])
    numbers['averaged_ahead_at'], numbers['averaged_ahead_from'] = ahead, stays
    caption += (f" '{trained}' and '{averaged}' share the axes; '{averaged}' is ahead at "
                f'{len(ahead)} of {len(top1[averaged])} evaluations'
                + (f', first at step {ahead[0]}' if ahead else '')
                + (f', and at every one from step {stays} to the end.' if stays is not None
                   else ', and not at the last.'))
  if numbers.get('step_scale') == 'log':
    caption += ' The top-1 steps are on a log scale (the run evaluated early, eval_at).'
  steps = [r['step'] for r in records]
  return [Picture('curves', 'curves.png', 'Training curves', caption,
                  f'metrics.jsonl, steps {min(steps)} to {max(steps)}', size, numbers)]


def trained_features(ctx: Context, images: np.ndarray) -> tuple[str, np.ndarray, str]:
  """(panel name, features [n, D], source) of the run's learned representation."""
  if ctx.is_pipeline:
    if ctx.method.features is None:
      raise Skip(f'{ctx.config.method} declares no learned features')
    try:
      return ctx.method.features(ctx.config, ctx.workdir, images)
    except base.NotApplicable as e:
      raise Skip(str(e)) from None
  run = ctx.need_run()
  net = ctx.network()
  fn = reported.replicated_outputs(net.features, run.mesh)
  feats = reported.apply_in_batches(fn, (net.variables,), images, run.mesh,
                                    ctx.config.eval_batch_size)
  return (f"pooled features of the trained '{run.method.reported_model}'", feats,
          ctx.checkpoint_source())


def tsne_picture(ctx: Context) -> list:
  """t-SNE of a test subsample: raw pixels, and the trained representation when there is one."""
  from sslj.viz import tsne  # pylint: disable=g-import-not-at-top
  data = ctx.need_data()
  opts = ctx.options
  index = tsne.subsample(len(data.test_images), opts.tsne_points, opts.seed)
  images, labels = data.test_images[index], data.test_labels[index]
  numbers = {'points': len(index)}
  pixels = tsne.embed(images.reshape(len(images), -1) / 255.0, opts.seed)
  numbers['knn_pixels'] = tsne.knn_agreement(pixels, labels)
  panels = [(f"raw pixels: 5-NN agreement {numbers['knn_pixels']:.1f}%", pixels)]
  sources = ['the test split']
  try:
    name, feats, source = trained_features(ctx, images)
    points = tsne.embed(feats, opts.seed)
    numbers['knn_features'] = tsne.knn_agreement(points, labels)
    panels.append((f"{name}: 5-NN agreement {numbers['knn_features']:.1f}%", points))
    sources.append(source)
    note = ''
  except Skip as e:
    note = f' No map of learned features: {e}.'
  size = tsne.draw_maps(panels, labels, data.class_names, os.path.join(ctx.out_dir, 'tsne.png'),
                        images=images if opts.thumbnails else None, seed=opts.seed,
                        title=f't-SNE of {len(index)} test images of {ctx.config.data.name}')
  caption = (f't-SNE maps of {len(index)} test images (a seeded subsample), coloured by class: '
             'from raw pixels' + (' (left) and from the learned representation (right)'
                                  if len(panels) > 1 else '') +
             '. Inputs with more than 50 dimensions are reduced by PCA first. "5-NN agreement" '
             'is the share of points whose 5 nearest neighbours in the map are mostly of their '
             'own class.' + note)
  return [Picture('tsne', 'tsne.png', 't-SNE map of test images', caption, ', '.join(sources),
                  size, numbers)]


def confusion_picture(ctx: Context) -> list:
  """Confusion matrix of the reported network on the whole test split."""
  from sslj.viz import curves  # pylint: disable=g-import-not-at-top
  run = ctx.need_run()
  data = run.data
  name = run.method.reported_model
  net = ctx.network()
  if not net.classifies:
    raise Skip(f"the network's head classifies clusters or surrogate classes, not the test "
               f"classes; the reported model ('{name}') is fitted on its features after "
               'training and its accuracy is in results.json')
  predicted = jax.eval_shape(run.method.predict, run.state, data.test_images[:1])
  if name not in predicted:
    # The reported model is fitted after training (Method.finalize, e.g. a
    # linear probe on the features): the network's own head is another
    # model, and drawing it under the reported name would be wrong.
    raise Skip(f"the reported model ('{name}') is fitted on the features after training "
               "and is not the network's output; its accuracy is in results.json")
  fn = reported.replicated_outputs(net.logits, run.mesh)
  logits = reported.apply_in_batches(fn, (net.variables,), data.test_images, run.mesh,
                                     ctx.config.eval_batch_size)
  counts = curves.confusion_counts(data.test_labels, logits.argmax(-1), data.num_classes)
  top1 = 100 * float(np.trace(counts)) / len(data.test_labels)
  size = curves.draw_confusion(
      counts, data.class_names, os.path.join(ctx.out_dir, 'confusion.png'),
      title=f"'{name}' at step {run.step} on the {len(data.test_labels)} test images: "
            f'top-1 {top1:.2f}%')
  return [Picture('confusion', 'confusion.png', 'Confusion matrix',
                  f"Predictions of the reported network ('{name}') on the whole test split: "
                  'rows are true classes, columns predicted ones; colour is the fraction of the '
                  'row, numbers are image counts.', ctx.checkpoint_source(), size,
                  {'top1': top1, 'counts': counts})]


# How the page and the summary line start the reason of a picture that raised.
FAILED = 'drawing it failed'

# (name, title, function): the order of the page.
PICTURES = (
    ('curves', 'Training curves', curves_picture),
    ('tsne', 't-SNE map of test images', tsne_picture),
    ('confusion', 'Confusion matrix', confusion_picture),
    ('filters', 'First-layer convolution filters', pictures.filters),
    ('centroids', 'k-means centroids', pictures.centroids),
    ('augmentations', 'Augmentation samples', pictures.augmentations),
    ('method_pictures', "The method's own pictures", pictures.method_pictures),
)


def _draw_one(ctx: Context, name: str, title: str, fn) -> list:
  try:
    entries = fn(ctx)
  except Skip as e:
    logging.info('viz: %s not drawn: %s', title, e)
    return [Skipped(name, title, str(e))]
  except Exception as e:  # pylint: disable=broad-except
    # One broken picture must not cost the others.
    logging.warning('viz: drawing %s failed', title, exc_info=True)
    return [Skipped(name, title, f'{FAILED}: {type(e).__name__}: {e}')]
  for entry in entries:
    if isinstance(entry, Picture):
      logging.info('viz: wrote %s (%dx%d)', os.path.join(ctx.out_dir, entry.file), *entry.size)
  return entries


def draw(workdir: str, *, step: int | None = None, out: str | None = None,
         options: Options = Options()) -> tuple[str, list]:
  """Draws the run in `workdir` into `out` (default `workdir/pictures`).

  Returns:
    (path of index.html, entries: a `page.Picture` or `page.Skipped` per picture).
  Raises:
    UserError: no run in `workdir`, or a `step` that cannot be restored.
  """
  if importlib.util.find_spec('matplotlib') is None:
    raise UserError('pictures need matplotlib: pip install matplotlib')
  if options.tsne_points < 5:
    raise UserError(f'--tsne_points={options.tsne_points} must be at least 5.')
  workdir = os.path.abspath(workdir)
  out = os.path.abspath(out or os.path.join(workdir, 'pictures'))
  ctx = context.load(workdir, step=step, out_dir=out, options=options)
  os.makedirs(out, exist_ok=True)
  entries = []
  for name, title, fn in PICTURES:
    entries += _draw_one(ctx, name, title, fn)
  summary = page.run_summary(ctx.config, ctx.results, ctx.run.step if ctx.run else None)
  return page.write_index(out, entries, workdir=workdir, summary=summary), entries


def run_command(workdir: str, *, config=None, step: int | None = None, split=None, dataset=None,
                images=None, out: str | None = None, thumbnails: bool = False,
                tsne_points: int = Options.tsne_points) -> str:
  """`launch.py --mode=viz` / `python -m sslj.viz`: draws, returns the line to print."""
  if config is not None:
    raise UserError(f'--mode=viz uses the config recorded in {workdir}/config.json; drop --config.')
  for flag, value in (('split', split), ('dataset', dataset), ('images', images)):
    if value is not None:
      raise UserError(f'--{flag} does not apply to --mode=viz; it takes --workdir, --step, --out.')
  index, entries = draw(workdir, step=step, out=out,
                        options=Options(tsne_points=tsne_points, thumbnails=thumbnails))
  drawn = [e.name for e in entries if isinstance(e, Picture)]
  # A picture that raised is named as failed (its error is on the page),
  # not passed off as one that does not apply to the run.
  failed = [e.name for e in entries if isinstance(e, Skipped)
            and e.reason.startswith(FAILED)]
  skipped = [e.name for e in entries if isinstance(e, Skipped) and e.name not in failed]
  also = f"; {len(failed)} failed ({', '.join(failed)})" if failed else ''
  return (f"Drew {len(drawn)} pictures ({', '.join(drawn) or 'none'}); "
          f"{len(skipped)} not applicable ({', '.join(skipped) or 'none'}){also}: {index}")
