"""The one training loop every gradient method runs in.

Data flows one way: config -> dataset -> uint8 arrays resident on the devices
(sharded over `data`) -> a jitted step that samples indices, gathers and
augments on the devices and updates the state -> metrics to the host every
`log_every` steps -> checkpoints and evaluation. The step key is
`fold_in(base_key, state.step)`, so a resumed run draws exactly the batches
and noise an uninterrupted run would have.
"""

from __future__ import annotations

import collections
import functools
import time

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np

from sslj import checkpoint, logbook, methods, parallel, provenance, run_files
from sslj import preemption as preemption_lib
from sslj.data import sources, splits
from sslj.errors import UserError
from sslj.methods import base
# Re-exported: what the loop raises on Ctrl-C and how often hosts agree to stop.
from sslj.preemption import STOP_CHECK_EVERY, Interrupted  # pylint: disable=unused-import


@flax.struct.dataclass
class TrainData:
  """The training images on the devices; `labels` is replicated.

  `unlabeled_labels` (replicated int32 [U], -1 where unknown) is the pool's
  hidden classes, None when the method draws no unlabeled images or none is
  known; only `score_pseudo_labels` reads it, never the method.
  """
  labeled: parallel.ResidentImages
  labels: jax.Array
  unlabeled: parallel.ResidentImages | None
  unlabeled_labels: jax.Array | None = None


def put_train_data(data, method: base.Method, mesh) -> TrainData:
  """Copies the run's training images to the devices, once.

  The unlabeled pool goes only to methods that sample from it.
  """
  hidden = getattr(data, 'unlabeled_labels', None)
  return TrainData(
      labeled=parallel.put_resident(data.labeled_images, mesh),
      labels=parallel.to_global(data.labeled_labels.astype(np.int32),
                                parallel.replicated(mesh)),
      unlabeled=(parallel.put_resident(data.unlabeled_images, mesh)
                 if method.unlabeled_batch else None),
      unlabeled_labels=(parallel.to_global(hidden, parallel.replicated(mesh))
                        if method.unlabeled_batch and hidden is not None and (hidden >= 0).any()
                        else None))


def sample_batch(data: TrainData, key, state=None, *, mesh, labeled_batch: int,
                 unlabeled_batch: int, sample_unlabeled=None) -> base.Batch:
  """Draws a batch on the devices: uniform indices, then a sharded gather.

  The unlabeled rows are uniform over the pool, or the method's draw from
  `state` with `sample_unlabeled` (`Method.sample_unlabeled`); either way
  their indices join the batch as 'unlabeled_indices'.
  """
  labeled_key, unlabeled_key = jax.random.split(key)
  batch = {}
  if labeled_batch:
    batch['labeled_images'], batch['labels'] = parallel.sample_rows(
        mesh, data.labeled, labeled_key, labeled_batch, data.labels)
  if unlabeled_batch:
    if sample_unlabeled is not None:
      idx = sample_unlabeled(state, unlabeled_key, unlabeled_batch)
    else:
      idx = parallel.uniform_rows(data.unlabeled, unlabeled_key, unlabeled_batch)
    batch['unlabeled_images'] = parallel.gather_rows(mesh, data.unlabeled.images, idx)
    batch['unlabeled_indices'] = jax.lax.with_sharding_constraint(
        idx, parallel.batch_sharded(mesh))
  return batch


def score_pseudo_labels(metrics: dict, batch, hidden) -> jax.Array:
  """Removes a step's per-image pseudo-labels from `metrics` and scores them.

  Returns float32 [4]: the sum over the batch's unlabeled rows whose class
  `hidden` knows of (weight x right, weight, right, 1), where right is the
  pseudo-label being the hidden class and weight its weight in the loss
  (`base.PSEUDO_LABELS`, `base.PSEUDO_LABEL_WEIGHTS`); zeros when the step
  gives none or `hidden` is None.
  """
  targets = metrics.pop(base.PSEUDO_LABELS, None)
  weights = metrics.pop(base.PSEUDO_LABEL_WEIGHTS, None)
  if targets is None or hidden is None:
    return jnp.zeros(4, jnp.float32)
  truth = hidden[batch['unlabeled_indices'][:targets.shape[0]]]
  known = (truth >= 0).astype(jnp.float32)
  right = (targets == truth).astype(jnp.float32) * known
  weight = known if weights is None else weights.astype(jnp.float32) * known
  return jnp.stack([jnp.sum(weight * right), jnp.sum(weight), jnp.sum(right), jnp.sum(known)])


def pseudo_label_scalars(sums) -> dict:
  """The logged accuracies (%) of summed `score_pseudo_labels` over a log interval.

  `pseudo_label_accuracy`: of the targets, weighted by their weight in the
  loss (those above a threshold, for a hard mask); `pseudo_label_accuracy_all`:
  of every unlabeled image's target, used or not. Absent without weight or rows.
  """
  weighted, weight, right, rows = (float(v) for v in sums)
  out = {}
  if weight > 0:
    out['pseudo_label_accuracy'] = 100.0 * weighted / weight
  if rows > 0:
    out['pseudo_label_accuracy_all'] = 100.0 * right / rows
  return out


def sampled_step(state, first_bad, label_scores, data, base_key, *, method_step, sampler):
  """Sample + method step + non-finite watch, as one compiled function.

  `first_bad` is the first step whose loss was not finite (-1 if none); it is
  kept on the device so that watching costs no host round trip per step.
  `label_scores` sums `score_pseudo_labels` over the steps since the last log.
  """
  step = state.step
  sample_key, step_key = jax.random.split(jax.random.fold_in(base_key, step))
  batch = sampler(data, sample_key, state)
  state, metrics = method_step(state, batch, step_key)
  label_scores = label_scores + score_pseudo_labels(metrics, batch, data.unlabeled_labels)
  finite = jnp.isfinite(metrics['loss'])
  first_bad = jnp.where((first_bad < 0) & ~finite, step, first_bad)
  return state, first_bad, label_scores, metrics


def count_correct(state, images, labels, mask, *, predict):
  """Top-1 and top-5 hits of every model on one padded eval batch."""
  out = {}
  for name, logits in predict(state, images).items():
    out[name] = jnp.stack([jnp.sum(base.top_k_correct(logits, labels, k) * mask)
                           for k in (1, 5)])
  return out


def evaluate(state, count_fn, images: np.ndarray, labels: np.ndarray, mesh,
             batch_size: int) -> dict:
  """Top-1/top-5 (percent) of every model on a whole split, in padded batches."""
  totals = None
  sharding = parallel.batch_sharded(mesh)
  for start in range(0, len(images), batch_size):
    x = images[start:start + batch_size]
    y = labels[start:start + batch_size]
    mask = np.ones(len(x), np.float32)
    if len(x) < batch_size:  # pad the last batch; padding is masked out
      pad = batch_size - len(x)
      x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
      y = np.concatenate([y, np.zeros(pad, y.dtype)])
      mask = np.concatenate([mask, np.zeros(pad, np.float32)])
    hits = count_fn(state, *(parallel.to_global(a, sharding) for a in (x, y, mask)))
    totals = hits if totals is None else jax.tree.map(jnp.add, totals, hits)
  totals = jax.device_get(totals)
  return {name: {'top1': 100 * float(h[0]) / len(images),
                 'top5': 100 * float(h[1]) / len(images)} for name, h in totals.items()}


def load_data(config):
  """The dataset the config names, split into labeled / unlabeled / test."""
  arrays = sources.load_arrays(config.data.name, data_dir=config.data.data_dir,
                               manual_dir=config.data.manual_dir, fold=config.data.fold,
                               image_size=config.data.image_size)
  return splits.semi_supervised(arrays, config.data.labels_per_class, config.seed,
                                fold=config.data.fold,
                                unlabeled_from_train=config.data.unlabeled_from_train)


def extra_eval_steps(config) -> frozenset:
  """The steps of `eval_at` ('10,20,50'): evaluations besides every `eval_every`."""
  text = config.get('eval_at') or ''
  try:
    steps = frozenset(int(part) for part in text.split(',') if part.strip())
  except ValueError:
    steps = frozenset({0})
  if any(step < 1 for step in steps):
    raise UserError(f"eval_at='{text}' must be comma-separated steps >= 1, e.g. "
                    "--config.eval_at=10,20,50,100 (the early part of a training curve).")
  return steps


def _check_batches(config, method) -> None:
  for what, size in (('batch_size', method.labeled_batch + method.unlabeled_batch),
                     ('labeled batch', method.labeled_batch),
                     ('unlabeled batch', method.unlabeled_batch),
                     ('eval_batch_size', config.eval_batch_size)):
    if size:
      parallel.check_divisible(size, what)


def check(config) -> None:
  """What `train_and_evaluate` refuses before compiling, without training or writing.

  Reads the data and builds the method (nothing is compiled), so a sweep can
  refuse an impossible cell before it trains any other.

  Raises:
    UserError: whatever `train_and_evaluate` would refuse up front.
  """
  definition = methods.get(config.method)
  data = load_data(config)
  if definition.is_pipeline:
    return
  steps = definition.steps(config, data)
  extra_eval_steps(config)
  _check_batches(config, definition.build(config, data, steps))


# How many steps the host may dispatch ahead of the device. JAX dispatches
# asynchronously and the runtime would queue dozens of steps; queued work
# cannot be cancelled, so on SIGTERM it would all run before the checkpoint
# (tens of seconds with slow steps). One step queued behind the running one
# keeps the device busy.
DISPATCH_AHEAD = 1


def train_and_evaluate(config, workdir: str) -> dict | None:
  """Trains (resuming if `workdir` holds a checkpoint), evaluates, writes results.

  Returns the results dict, or None when the run stopped early on SIGTERM
  after saving a checkpoint.

  Raises:
    Interrupted: Ctrl-C stopped the run after saving a checkpoint.
  """
  started = time.perf_counter()
  provenance.code_version()  # the checkout as this process loaded it, not as it is at the end
  definition = methods.get(config.method)
  logging.info('Preparing %s (%s labels per class)...', config.data.name,
               config.data.labels_per_class or 'all')
  data = load_data(config)
  if definition.is_pipeline:
    return _run_pipeline(definition, config, data, workdir, started)
  steps = definition.steps(config, data)
  num_steps, epoch_steps = steps
  eval_at = extra_eval_steps(config)
  method = definition.build(config, data, steps)
  _check_batches(config, method)
  run_files.claim_workdir(workdir, config)

  mesh = parallel.make_mesh()
  replicated = parallel.replicated(mesh)
  train_data = put_train_data(data, method, mesh)
  init_key, base_key = jax.random.split(jax.random.key(config.seed))
  state = jax.jit(method.init, out_shardings=replicated)(init_key)

  ckpt = checkpoint.Checkpointer(workdir, every=config.checkpoint_every,
                                 keep=config.keep_checkpoints)
  if ckpt.latest_step() is not None:
    state = ckpt.restore(state)
  start_step = int(jax.device_get(state.step))
  wall_before = run_files.wall_time_at(workdir, start_step)

  sampler = functools.partial(sample_batch, mesh=mesh, labeled_batch=method.labeled_batch,
                              unlabeled_batch=method.unlabeled_batch,
                              sample_unlabeled=method.sample_unlabeled)
  step_fn = jax.jit(functools.partial(sampled_step, method_step=method.train_step,
                                      sampler=sampler),
                    donate_argnums=(0, 1, 2))
  count_fn = jax.jit(functools.partial(count_correct, predict=method.predict))
  book = logbook.Logbook(workdir, resume_step=start_step, total_steps=num_steps)
  first_bad = jax.device_put(jnp.array(-1, jnp.int32), replicated)
  # A new buffer each time: the step donates (consumes) the one it is given.
  no_scores = lambda: jax.device_put(np.zeros(4, np.float32), replicated)
  label_scores = no_scores()

  def check_finite():
    bad = int(jax.device_get(first_bad))
    if bad >= 0:
      last = ckpt.latest_step()
      kept = f'the last good checkpoint (step {last}) is kept' if last is not None else 'no checkpoint was saved'
      raise UserError(f'loss became non-finite at step {bad}; {kept}. Lower '
                      'optimizer.learning_rate or check the data.')

  def run_eval(step, final=False):
    scores = evaluate(state, count_fn, data.test_images, data.test_labels, mesh,
                      config.eval_batch_size)
    if final and method.finalize is not None:
      scores.update(method.finalize(state, data))
    book.write(step, {f'eval/{m}/{k}': v for m, s in scores.items() for k, v in s.items()})
    logging.info('eval at step %d: %s', step, ', '.join(
        f"{m} top1 {s['top1']:.2f}% top5 {s['top5']:.2f}%" for m, s in scores.items()))
    if method.on_eval is not None and jax.process_index() == 0:
      method.on_eval(state, step, workdir)
    return scores

  def save(step, force=False):
    if force or (config.checkpoint_every > 0 and step % config.checkpoint_every == 0):
      check_finite()
      if ckpt.save(step, state, force=True):
        run_files.record_wall_time(workdir, step, wall_before + time.perf_counter() - started)

  def eval_due(step):
    every = config.eval_every > 0 and step % config.eval_every == 0
    return (every or step in eval_at) and 0 < step < num_steps

  if start_step:
    logging.info('Resuming at step %d of %d.', start_step, num_steps)
    if eval_due(start_step) and not run_files.logged_eval(workdir, start_step):
      run_eval(start_step)  # Skipped when SIGTERM stopped the run here.
  in_flight = collections.deque()
  with preemption_lib.Preemption() as preemption:
    for step in range(start_step, num_steps):
      if method.on_epoch_start and step % epoch_steps == 0:
        if step == start_step:  # it can take a minute (clustering), so say so
          logging.info("Epoch %d: %s's work before the epoch...", step // epoch_steps,
                       config.method)
        state = method.on_epoch_start(state, step // epoch_steps)
      if step == start_step:  # after the first epoch's own work, which logs itself
        logging.info('Compiling the training step (the first step takes longest)...')
      state, first_bad, label_scores, metrics = step_fn(state, first_bad, label_scores,
                                                        train_data, base_key)
      in_flight.append(metrics['loss'])
      if step == start_step:  # compiled and run once: the rate is measured from here
        metrics['loss'].block_until_ready()
        book.first_step_done(step + 1)
        logging.info('Compiled; training %d steps.', num_steps - start_step)
      if len(in_flight) > DISPATCH_AHEAD:
        in_flight.popleft().block_until_ready()
      done = step + 1
      if done % config.log_every == 0 or done == num_steps:
        check_finite()
        scalars = jax.device_get(metrics)
        scalars.update(pseudo_label_scalars(jax.device_get(label_scores)))
        label_scores = no_scores()
        scalars.update(book.progress(done, scalars))
        if method.on_log is not None:
          scalars.update(method.on_log(done, scalars))
        book.write(done, {f'train/{k}': v for k, v in scalars.items()})
      stop = done < num_steps and preemption.should_stop(done)
      if eval_due(done) and not stop:
        run_eval(done)  # On SIGTERM the resumed run evaluates this step first.
      save(done)
      if stop:
        save(done, force=True)
        logging.warning('Stopped at step %d on %s; run the same command to resume.', done,
                        preemption.signal_name)
        book.close()
        ckpt.close()
        return preemption.stopped(done)

  check_finite()
  save(num_steps, force=True)
  scores = run_eval(num_steps, final=True)
  book.close()
  ckpt.close()
  return _finish(config, workdir, scores, method.reported_model, num_steps,
                 wall_before + time.perf_counter() - started)


def _run_pipeline(definition, config, data, workdir, started):
  """A method that is not gradient training: it evaluates itself.

  `definition.run_pipeline(config, data, workdir)` returns
  `(scores {model: {'top1', 'top5'}}, reported_model)`.
  """
  run_files.claim_workdir(workdir, config)
  scores, reported_model = definition.run_pipeline(config, data, workdir)
  return _finish(config, workdir, scores, reported_model, config.num_steps,
                 time.perf_counter() - started)


def _finish(config, workdir, scores, reported_model, num_steps, wall_s):
  """Writes `results.json` in the fields every method shares."""
  reported = scores[reported_model]
  results = {
      'method': config.method, 'dataset': config.data.name,
      'labels_per_class': config.data.labels_per_class
      if config.data.labels_per_class is not None else 'all',
      'seed': config.seed, 'num_steps': num_steps, 'wall_s': round(wall_s, 2),
      'top1': reported['top1'], 'top5': reported['top5'], 'models': scores,
      'provenance': provenance.record()}
  run_files.write_results(workdir, results)
  return results
