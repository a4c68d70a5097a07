"""MixMatch: sharpened guesses on K weak views, MixUp over labeled and unlabeled together.

Each step draws B labeled images and B unlabeled ones. Every labeled image
gets one weak view and every unlabeled image K (`num_augmentations`), each
drawn independently from the config's `augment` section (small translations,
flips where the dataset allows them). The network's softmax on the K views of
an unlabeled image, averaged and sharpened, is its guessed label

  q = sharpen((1/K) sum_k p(y | u_k), T),  sharpen(p, T)_c = p_c^(1/T) / sum_j p_j^(1/T)

with its gradient stopped. The B labeled views (one-hot targets) and the
K * B unlabeled views (target q) are concatenated, shuffled once, and each
example is mixed with its partner in the shuffle (`sslj.ops.mixup`):
lambda ~ Beta(alpha, alpha) per example, lambda' = max(lambda, 1 - lambda),
x' = lambda' x + (1 - lambda') x_partner and the same for the targets. The loss
on the mixed batch is

  CE(mixed labeled logits, mixed labeled targets)                (mean over B)
    + w(t) * mean over K B examples and the C classes of (q'_c - p_c)^2

with w(t) = unlabeled_weight * min(step / rampup_steps, 1), the linear ramp.
The MixUp coefficients and partners come from the step's key
(`jax.random.beta`, `jax.random.permutation`), so the step stays pure.

Choices, each against the paper and the reference code
(github.com/google-research/mixmatch, `mixmatch.py` and `libml/`):

* The guess comes from the network being trained (not the EMA), in training
  mode: BatchNorm normalises with each pass's batch statistics, and the
  guess passes' running-statistics updates are dropped, as in the code
  (their update ops are in its `skip_ops`, never run; USB freezes BN there
  as well).
* BatchNorm and the interleave (`interleave=True`, the default, as the code):
  the mixed batch (B + K B images) is cut into K + 1 batches of B, these are
  interleaved (`sslj.ops.mixup.interleave`) so that each holds a slice of the
  labeled and of every unlabeled batch, the network runs once per batch
  (one `jax.vmap` of it over the K + 1 batches: each is normalised with its
  own statistics, as separate passes would be, but the network is traced
  and compiled once and runs as one batched computation), and the logits
  are interleaved back. Each pass normalises with its own batch
  statistics, and the running statistics keep the update of the first pass
  only (the code's `post_ops`), whose slices come from every batch. The
  guess passes likewise run once per view, B images each. With
  `interleave=False` the guess is one pass over the K B views and the loss
  one pass over the whole mixed batch, whose statistics (and running
  statistics) cover all of it. The interleave exists so that no pass sees
  a batch of labeled images only, whose statistics differ from the
  unlabeled ones'; a single concatenated pass has the same labeled /
  unlabeled composition by construction and is one larger matrix product
  on an accelerator, but its statistics come from (K + 1) B images instead
  of B, so it is offered as an option, not the default. Measured on digits
  (configs/mixmatch.py, --config.num_steps=300, seeds 0 and 1, a loaded
  2-core CPU): EMA top-1 90.67 / 92.44 interleaved against 90.22 / 92.22 in
  one pass (the raw network 94.44 / 94.89 against 94.44 / 93.56), no
  difference beyond the seeds' spread at that budget; the runs took 53-106 s
  either way, within the shared machine's load noise.
* MixUp draws one lambda per example, as the code (`augment_pair` samples
  [N, 1, 1, 1]) and the paper's per-pair definition; USB draws one per batch.
  Mixing the normalised inputs equals mixing the images: the normalisation
  is affine and lambda' + (1 - lambda') = 1.
* The unlabeled loss is the squared error averaged over the classes as well
  as the examples (the paper's 1 / (L |U'|), the code's `reduce_mean`);
  `unlabeled_weight` is the code's `w_match`.
* Ramp-up: linear over `rampup_steps` steps, counted in steps; the code
  counts images (`warmup_kimg=1024` kibi-images, i.e. 16,384 steps of 64),
  the paper says "the first 16,000 steps". w(0) = 0.
* Weight decay (the `adam` optimiser): decoupled, wd * lr per step on the
  convolution and dense kernels only, as the code's post-update
  `v <- v * (1 - wd * lr)` on the variables named `kernel` (wd = 0.02,
  lr = 0.002). Here it is optax.adamw with a kernel mask:
  v <- v - lr (adam step + wd v), where the code decays the already updated
  kernel, (v - lr adam step)(1 - lr wd); the two differ by lr^2 wd times an
  Adam step, lr wd = 4e-5 of the step at the defaults, not measured.
  BatchNorm scales, offsets and biases are not decayed. Any other
  `optimizer.name` is the library's (`sslj.ops.optim.make_optimizer`).
* The reported model (`ema`) is an exponential moving average of the
  parameters (decay `ema_decay`) with the trained network's BatchNorm
  running statistics, as the code's `ExponentialMovingAverage` over the
  trainable variables (the moving statistics are not trainable) and its EMA
  getter. Departure: the average starts with `ema.decay_at`'s short warm-up
  instead of a fixed decay from the initialisation (not measured; it
  matters only in the first ~1,000 steps).
* The `train_top1` metric is the agreement of the mixed labeled images'
  logits with the labels of the images they are mostly made of (lambda' >=
  1/2), a training signal only.
* Sampling: every step draws its labeled and unlabeled rows uniformly (the
  loop's sampler), where the code reads shuffled repeats of each set.

References: Berthelot et al. 2019, "MixMatch: a holistic approach to
semi-supervised learning", NeurIPS (Algorithm 1, Eqs. 2-11, Sec. 4);
reference code github.com/google-research/mixmatch (`mixmatch.py`,
`libml/layers.py`, `libml/models.py`, `libml/utils.py`, `runs/*.sh`) and USB
(github.com/microsoft/Semi-supervised-learning,
semilearn/algorithms/mixmatch/mixmatch.py).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from sslj.data import augment
from sslj.errors import UserError
from sslj.methods import base, network
from sslj.ops import ema, mixup, optim, soft_targets


class MixMatchState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema: ema.EmaState  # the average of `params`; the reported model uses `batch_stats` with it
  apply_fn: Callable = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)


def guess_labels(view_logits, temperature: float):
  """q [U, C]: the softmax over the K views [K, U, C] averaged, then sharpened; a constant."""
  probs = jax.nn.softmax(jax.lax.stop_gradient(view_logits).astype(jnp.float32), axis=-1)
  return soft_targets.sharpen(jnp.mean(probs, axis=0), temperature)


def mixmatch_loss(logits_x, logits_u, targets_x, targets_u, weight):
  """(loss, labeled CE, unlabeled squared error) on the mixed batch."""
  labeled = soft_targets.soft_cross_entropy(logits_x, targets_x)
  unlabeled = soft_targets.probability_mse(logits_u, targets_u)
  return labeled + weight * unlabeled, labeled, unlabeled


def unlabeled_weight_at(step, *, unlabeled_weight: float, rampup_steps: int):
  """w(t) = unlabeled_weight * clip(step / rampup_steps, 0, 1); the full weight if no ramp."""
  if rampup_steps == 0:
    return jnp.asarray(unlabeled_weight, jnp.float32)
  t = jnp.clip(jnp.asarray(step, jnp.float32) / rampup_steps, 0.0, 1.0)
  return unlabeled_weight * t


def _passes(apply_fn, variables, batches, dropout_key):
  """Training-mode logits [P, n, C] of `batches` [P, n, ...], one pass per batch.

  The passes are one `jax.vmap` of the network over the leading axis, so each
  batch is normalised with its own BatchNorm statistics, exactly as P
  separate passes, while the network is traced (and compiled) once. Returns
  the logits and the running statistics of the first pass.
  """
  keys = jax.vmap(lambda i: jax.random.fold_in(dropout_key, i))(jnp.arange(batches.shape[0]))

  def one(x, key):
    out, updates = apply_fn(variables, x, train=True, mutable=['batch_stats'],
                            rngs={'dropout': key})
    return out, updates['batch_stats']

  logits, stats = jax.vmap(one)(batches, keys)
  return logits, jax.tree.map(lambda v: v[0], stats)


def loss_fn(params, batch_stats, apply_fn, labeled, views, labels, lam, perm, dropout_key, *,
            temperature: float, weight, interleave: bool, targets=None):
  """MixMatch's loss for weak labeled views [B, ...] and unlabeled views [K, U, ...].

  `lam`, `perm` are the MixUp draws for the B + K U examples
  (`mixup.sample_mixup`). `targets`, if given, replaces the guessed labels
  [U, C] (the tests feed constants here). Returns (loss, aux) with aux =
  (labeled loss, unlabeled loss, guessed labels, lambda', labeled logits,
  new batch_stats).
  """
  num_views, num_unlabeled = views.shape[:2]
  num_labeled = labeled.shape[0]
  unlabeled = views.reshape((num_views * num_unlabeled,) + views.shape[2:])
  variables = {'params': params, 'batch_stats': batch_stats}
  guess_key, mixed_key = jax.random.split(dropout_key)
  # The guess: training-mode passes whose running-statistics updates are dropped.
  if interleave:
    view_logits, _ = _passes(apply_fn, variables, views, guess_key)
  else:
    view_logits, _ = _passes(apply_fn, variables, unlabeled[None], guess_key)
    view_logits = view_logits[0].reshape((num_views, num_unlabeled, -1))
  guess = guess_labels(view_logits, temperature)
  if targets is not None:
    guess = targets
  num_classes = guess.shape[-1]
  inputs = jnp.concatenate([labeled, unlabeled])
  target = jnp.concatenate([jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)]
                           + [guess] * num_views)
  mixed_x, mixed_y, lam_used = mixup.mixup(inputs, target, lam, perm)
  if interleave:
    groups = jnp.stack(mixup.interleave(jnp.split(mixed_x, num_views + 1)))
    logits, new_stats = _passes(apply_fn, variables, groups, mixed_key)
    logits = jnp.concatenate(mixup.interleave(list(logits)))
  else:
    logits, new_stats = _passes(apply_fn, variables, mixed_x[None], mixed_key)
    logits = logits[0]
  loss, labeled_loss, unlabeled_loss = mixmatch_loss(
      logits[:num_labeled], logits[num_labeled:], mixed_y[:num_labeled],
      mixed_y[num_labeled:], weight)
  return loss, (labeled_loss, unlabeled_loss, guess, lam_used, logits[:num_labeled], new_stats)


def train_step(state: MixMatchState, batch, key, *, preprocess: network.Preprocess,
               average: ema.ParameterEma, num_augmentations: int, temperature: float,
               alpha: float, unlabeled_weight: float, rampup_steps: int, interleave: bool):
  """One MixMatch step: views, guesses, MixUp, one gradient step, the EMA."""
  k_labeled, k_views, k_mix, k_dropout = jax.random.split(key, 4)
  labeled = preprocess.train(batch['labeled_images'], k_labeled)
  views = jnp.stack([preprocess.train(batch['unlabeled_images'], k)
                     for k in jax.random.split(k_views, num_augmentations)])
  num = labeled.shape[0] + views.shape[0] * views.shape[1]
  lam, perm = mixup.sample_mixup(k_mix, num, alpha)
  weight = unlabeled_weight_at(state.step, unlabeled_weight=unlabeled_weight,
                               rampup_steps=rampup_steps)
  grad_fn = jax.value_and_grad(functools.partial(
      loss_fn, temperature=temperature, weight=weight, interleave=interleave), has_aux=True)
  (loss, aux), grads = grad_fn(state.params, state.batch_stats, state.apply_fn, labeled, views,
                               batch['labels'], lam, perm, k_dropout)
  labeled_loss, unlabeled_loss, guess, lam_used, labeled_logits, batch_stats = aux
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  _, averaged = average.update(params, state.ema)
  state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                        opt_state=opt_state, ema=averaged)
  top1 = base.top_k_correct(labeled_logits, batch['labels'], 1).mean()
  return state, {'loss': loss, 'labeled_loss': labeled_loss, 'unlabeled_loss': unlabeled_loss,
                 'unlabeled_weight': weight, 'guess_max_prob': jnp.max(guess, -1).mean(),
                 'mixup_lambda': lam_used.mean(), 'train_top1': 100 * top1,
                 # Every guess is a target, at weight 1.
                 base.PSEUDO_LABELS: jnp.argmax(guess, -1).astype(jnp.int32),
                 base.PSEUDO_LABEL_WEIGHTS: jnp.ones(guess.shape[0], jnp.float32)}


def predict(state: MixMatchState, images, *, preprocess: network.Preprocess):
  x = preprocess.eval(images)
  model = state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats},
                         x, train=False)
  averaged = state.apply_fn({'params': state.ema.average, 'batch_stats': state.batch_stats},
                            x, train=False)
  return {'model': model, 'ema': averaged}


def optimizer(cfg, num_steps: int) -> optax.GradientTransformation:
  """Adam with the code's decoupled, kernel-only weight decay; else the library's optimiser."""
  if cfg.name != 'adam' or not cfg.weight_decay:
    return optim.make_optimizer(cfg, num_steps)
  return optax.adamw(optim.learning_rate(cfg, num_steps), b1=cfg.b1, b2=cfg.b2,
                     weight_decay=cfg.weight_decay, mask=optim.kernel_mask)


def batch_split(config) -> tuple[int, int]:
  """(labeled, unlabeled) images per step: `batch_size` of each, as the code."""
  if config.batch_size < 1:
    raise UserError(f'batch_size={config.batch_size} (labeled images per step, and as many '
                    'unlabeled) must be at least 1.')
  return config.batch_size, config.batch_size


def steps_per_epoch(config, data) -> int:
  """An epoch is one pass over the unlabeled pool."""
  return base.unlabeled_epoch_steps(config, data, batch_split(config)[1])


def build(config, data, steps: base.Steps) -> base.Method:
  mm = config.mixmatch
  if mm.num_augmentations < 1:
    raise UserError(f'mixmatch.num_augmentations={mm.num_augmentations} (K, weak views per '
                    'unlabeled image) must be at least 1.')
  if not mm.temperature > 0:
    raise UserError(f'mixmatch.temperature={mm.temperature} must be above 0 (the paper: 0.5; '
                    '1 leaves the guesses unsharpened).')
  if not mm.alpha >= 0:
    raise UserError(f'mixmatch.alpha={mm.alpha} (MixUp\'s Beta(alpha, alpha)) must be at '
                    'least 0; 0 turns MixUp off.')
  if mm.rampup_steps < 0:
    raise UserError(f'mixmatch.rampup_steps={mm.rampup_steps} must be at least 0 (0: no '
                    'ramp-up).')
  labeled, unlabeled = batch_split(config)
  model = network.build_model(config, data.num_classes)
  spec = augment.AugmentSpec.from_config(config.augment)
  preprocess = network.Preprocess(spec, data.mean, data.std)
  tx = optimizer(config.optimizer, steps.total)
  average = ema.parameter_ema(mm.ema_decay)

  def init(key):
    variables = network.init_variables(model, key, data.labeled_images.shape[1:], spec)
    params, stats = variables['params'], variables.get('batch_stats', {})
    return MixMatchState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                         opt_state=tx.init(params), ema=average.init(params),
                         apply_fn=model.apply, tx=tx)

  step = functools.partial(
      train_step, preprocess=preprocess, average=average,
      num_augmentations=int(mm.num_augmentations), temperature=float(mm.temperature),
      alpha=float(mm.alpha), unlabeled_weight=float(mm.unlabeled_weight),
      rampup_steps=int(mm.rampup_steps), interleave=bool(mm.interleave))
  return base.Method(init=init, train_step=step,
                     predict=functools.partial(predict, preprocess=preprocess),
                     reported_model='ema', labeled_batch=labeled, unlabeled_batch=unlabeled)


def reported(state: MixMatchState, config, data) -> base.Reported:
  """The EMA of the parameters with the trained network's BatchNorm statistics."""
  del config, data
  return base.Reported({'params': state.ema.average, 'batch_stats': state.batch_stats})


METHOD = base.register(base.Definition(
    name='mixmatch',
    summary='sharpened guesses on K weak views, MixUp over labeled and unlabeled, EMA model',
    steps_per_epoch=steps_per_epoch, build=build, reported=reported))
