"""UDA: a strong view trained towards the sharpened prediction on a weak view.

Each step draws B labeled images and mu * B unlabeled ones. The labeled and
the unlabeled images get the weak augmentation of the config's `augment`
section; the unlabeled images also get a strong view, the weak one followed
by RandAugment and Cutout (FixMatch's `StrongAugment`, `sslj.data.randaugment`).
With z_w, z_s the network's logits on the weak and the strong view,

  loss = CE_TSA(labeled) + lambda * mean_b [max softmax(z_w(b)) >= beta]
                                        * KL(softmax(z_w(b) / T) || softmax(z_s(b)))

The target softmax(z_w / T) is sharpened by the temperature T (0.4) and is
a constant (its gradient stopped); the mask keeps the images whose
*unsharpened* weak prediction reaches the confidence beta (0.8), and the mean
runs over every unlabeled image, kept or not (`sslj.ops.soft_targets`).
CE_TSA is the labeled cross-entropy under training signal annealing
(`sslj.ops.signal_annealing`, `uda.tsa`: 'none', 'linear', 'log' or 'exp'):
examples whose probability of their own label is above eta_t are dropped
and the loss is averaged over the kept ones, with t = step / total steps.
All three kinds of image go through the network in one training-mode pass,
so BatchNorm normalises them together and its running statistics come from
that pass. An exponential moving average of the parameters and of the
BatchNorm statistics is the reported model (`ema`).

Choices and departures, against the paper and the reference code
(github.com/google-research/uda, `image/main.py`, `image/data.py`,
`image/preprocess.py`, `image/utils.py`):

* The target comes from the weak view of the network being trained (the
  code's `ori_image`, flipped and cropped at load time), in the same pass,
  with `tf.stop_gradient`; the temperature divides the weak logits for the
  target only (`uda_softmax_temp`), and the mask reads the unsharpened
  softmax (`uda_confidence_thresh`), as the code.
* The unlabeled loss divides by all unlabeled images (the code's
  `reduce_mean(aug_loss * mask)`), and is the KL divergence itself (the
  code's `_kl_divergence_with_logits`; its gradient is the soft
  cross-entropy's).
* TSA: the code's schedules and threshold, the code's mask (p(label) >
  eta_t is dropped) and its mean over the kept examples; USB's TSA uses the
  largest probability instead of the label's and averages over the batch.
  The FixMatch code's reimplementation rescales t (`tsa_pos`); not followed.
* Mask: the images with max probability >= beta are kept
  (`pseudo_labels.fixed_threshold`, the `ConfidenceMask` FixMatch uses, so
  adaptive masks plug in); the code keeps those > beta. They differ on exact
  ties only.
* Strong view: FixMatch's RandAugment variant (`randaugment_num_ops` ops
  drawn from 14 at uniformly random magnitudes, then Cutout of up to
  `cutout` of the side), drawn afresh every step on top of the weak view.
  The code instead precomputes `aug_copy` copies of every unlabeled image
  offline with its own RandAugment policies (two ops, each applied with
  probability 0.5 at a magnitude 1-9 of 10, from 15 ops with Invert and
  Cutout), adds Cutout of half the side, and flips and crops the result at
  load time. Not measured against each other.
* Sharpening and masking: the paper's T = 0.4 and beta = 0.8 for CIFAR-10
  (Sec. 3.2); the released image scripts leave both off (-1).
* EMA: the newest code averages every variable, BatchNorm's moving
  statistics included (`get_all_variable`), and evaluates the average; so
  does this module (`ema.parameter_ema`), starting with `ema.decay_at`'s
  warm-up instead of a fixed decay from the initialisation (not measured;
  it matters in the first ~1,000 steps only).
* Weight decay: the code adds 5e-4 * sum of `tf.nn.l2_loss` over every
  trainable variable, i.e. 5e-4 * w in every gradient, which is the
  library's SGD weight decay on every parameter (`decay='all'`; USB's
  version skips BatchNorm parameters and biases); Nesterov momentum 0.9
  and the code's lr * cos(7 pi t / 16) (`truncated_cosine`) with no
  warm-up.
* Not implemented: the code's entropy-minimisation term (`ent_min_coeff`,
  0 by default).
* Network (cifar10 preset): the library's WRN-28-2 of the FixMatch /
  MixMatch code (leaky ReLU 0.1, BatchNorm decay 0.999), the network the
  later benchmark tables use, not UDA's own (`randaugment/wrn.py`: ReLU,
  BatchNorm decay 0.9, epsilon 1e-5).

References: Xie, Dai, Hovy, Luong, Le 2020, "Unsupervised data augmentation
for consistency training", NeurIPS (Sec. 2-3.2, Eq. 1); reference code
github.com/google-research/uda (image/) and USB
(github.com/microsoft/Semi-supervised-learning, semilearn/algorithms/uda/uda.py);
the FixMatch code's reimplementation (github.com/google-research/fixmatch, uda.py).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from sslj.data import augment, randaugment
from sslj.errors import UserError
from sslj.methods import base, network
from sslj.methods.fixmatch import StrongAugment
from sslj.ops import ema, optim, pseudo_labels, signal_annealing, soft_targets


class UdaState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema: ema.EmaState  # the reported model: ema.average = {'params', 'batch_stats'}
  mask_state: Any  # the confidence mask's state; () for the fixed threshold
  apply_fn: Callable = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)


def unlabeled_loss(weak_logits, strong_logits, mask, *, temperature: float):
  """mean_b mask_b * KL(softmax(z_w / T) || softmax(z_s)), over all B; the target is a constant."""
  kl = soft_targets.kl_divergence(soft_targets.temperature_log_targets(weak_logits, temperature),
                                  strong_logits)
  return jnp.mean(jax.lax.stop_gradient(mask) * kl)


def loss_fn(params, batch_stats, apply_fn, inputs, labels, dropout_key, *, num_unlabeled: int,
            mask_fn: pseudo_labels.ConfidenceMask, mask_state=(), indices=None,
            temperature: float, unlabeled_weight: float, eta=1.0):
  """UDA's loss on `inputs` = [labeled; weak unlabeled; strong unlabeled].

  `eta` is the TSA threshold of this step (1: no annealing). Returns (loss,
  aux) with aux = (labeled loss, unlabeled loss, mask, max probability,
  TSA kept, labeled logits, new batch_stats, new mask state, the weak views'
  most probable classes).
  """
  logits, updates = apply_fn({'params': params, 'batch_stats': batch_stats}, inputs,
                             train=True, mutable=['batch_stats'], rngs={'dropout': dropout_key})
  num_labeled = inputs.shape[0] - 2 * num_unlabeled
  labeled = logits[:num_labeled]
  weak = logits[num_labeled:num_labeled + num_unlabeled]
  strong = logits[num_labeled + num_unlabeled:]
  probs = pseudo_labels.class_probabilities(weak)
  if indices is None:
    indices = jnp.zeros(num_unlabeled, jnp.int32)
  mask, mask_state = mask_fn.update(probs, indices, mask_state)
  labeled_loss, kept = signal_annealing.annealed_cross_entropy(labeled, labels, eta)
  consistency = unlabeled_loss(weak, strong, mask, temperature=temperature)
  loss = labeled_loss + unlabeled_weight * consistency
  return loss, (labeled_loss, consistency, mask, jnp.max(probs, -1), kept, labeled,
                updates['batch_stats'], mask_state, jnp.argmax(probs, -1).astype(jnp.int32))


def train_step(state: UdaState, batch, key, *, preprocess: network.Preprocess,
               strong: StrongAugment, average: ema.ParameterEma,
               mask_fn: pseudo_labels.ConfidenceMask, temperature: float,
               unlabeled_weight: float, tsa: str, total_steps: int, num_classes: int):
  """One UDA step: SGD on the loss above, then the EMA."""
  num_unlabeled = batch['unlabeled_images'].shape[0]
  k_labeled, k_weak, k_strong, k_dropout = jax.random.split(key, 4)
  inputs = jnp.concatenate([preprocess.train(batch['labeled_images'], k_labeled),
                            preprocess.train(batch['unlabeled_images'], k_weak),
                            strong(batch['unlabeled_images'], k_strong)])
  eta = signal_annealing.threshold(tsa, state.step / total_steps, num_classes)
  grad_fn = jax.value_and_grad(functools.partial(
      loss_fn, num_unlabeled=num_unlabeled, mask_fn=mask_fn, mask_state=state.mask_state,
      indices=batch['unlabeled_indices'], temperature=temperature,
      unlabeled_weight=unlabeled_weight, eta=eta), has_aux=True)
  (loss, aux), grads = grad_fn(state.params, state.batch_stats, state.apply_fn, inputs,
                               batch['labels'], k_dropout)
  (labeled_loss, consistency, mask, max_prob, kept, labeled_logits, batch_stats, mask_state,
   pseudo) = aux
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  _, averaged = average.update({'params': params, 'batch_stats': batch_stats}, state.ema)
  state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                        opt_state=opt_state, ema=averaged, mask_state=mask_state)
  top1 = base.top_k_correct(labeled_logits, batch['labels'], 1).mean()
  return state, {'loss': loss, 'labeled_loss': labeled_loss, 'unlabeled_loss': consistency,
                 'mask_rate': mask.mean(), 'max_prob': max_prob.mean(), 'tsa_threshold': eta,
                 'tsa_kept': kept.mean(), 'train_top1': 100 * top1,
                 base.PSEUDO_LABELS: pseudo, base.PSEUDO_LABEL_WEIGHTS: mask}


def predict(state: UdaState, images, *, preprocess: network.Preprocess):
  x = preprocess.eval(images)
  model = state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats},
                         x, train=False)
  return {'model': model, 'ema': state.apply_fn(state.ema.average, x, train=False)}


def batch_split(config) -> tuple[int, int]:
  """(labeled, unlabeled) images per step: batch_size and mu * batch_size."""
  return base.labeled_times_mu(config, config.uda.mu, 'uda')


def steps_per_epoch(config, data) -> int:
  """An epoch is one pass over the unlabeled pool."""
  return base.unlabeled_epoch_steps(config, data, batch_split(config)[1])


def build(config, data, steps: base.Steps) -> base.Method:
  u = config.uda
  if not 0 <= u.threshold <= 1:
    raise UserError(f'uda.threshold={u.threshold} is a probability; use 0 to 1 (the paper: '
                    '0.8; 0 keeps every unlabeled image).')
  if not u.temperature > 0:
    raise UserError(f'uda.temperature={u.temperature} must be above 0 (the paper: 0.4; 1 '
                    'leaves the targets unsharpened).')
  if u.tsa not in signal_annealing.SCHEDULES:
    raise UserError(f"uda.tsa='{u.tsa}' is unknown; use one of "
                    f"{', '.join(signal_annealing.SCHEDULES)}.")
  labeled, unlabeled = batch_split(config)
  spec = augment.AugmentSpec.from_config(config.augment)
  if spec.out_size:
    raise UserError('uda does not support augment.out_size; resize the data instead.')
  randaugment.check_options(tuple(u.randaugment_ops), u.cutout, randaugment.options_from(u))
  model = network.build_model(config, data.num_classes)
  preprocess = network.Preprocess(spec, data.mean, data.std)
  strong = StrongAugment(spec, data.mean, data.std, num_ops=u.randaugment_num_ops,
                         cutout=u.cutout, ops=tuple(u.randaugment_ops),
                         options=randaugment.options_from(u))
  tx = optim.make_optimizer(config.optimizer, steps.total)
  average = ema.parameter_ema(u.ema_decay)
  mask_fn = pseudo_labels.fixed_threshold(u.threshold)

  def init(key):
    variables = network.init_variables(model, key, data.labeled_images.shape[1:], spec)
    params, stats = variables['params'], variables.get('batch_stats', {})
    return UdaState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                    opt_state=tx.init(params),
                    ema=average.init({'params': params, 'batch_stats': stats}),
                    mask_state=mask_fn.init(len(data.unlabeled_images), data.num_classes),
                    apply_fn=model.apply, tx=tx)

  step = functools.partial(
      train_step, preprocess=preprocess, strong=strong, average=average, mask_fn=mask_fn,
      temperature=float(u.temperature), unlabeled_weight=float(u.unlabeled_weight), tsa=u.tsa,
      total_steps=steps.total, num_classes=data.num_classes)
  return base.Method(init=init, train_step=step,
                     predict=functools.partial(predict, preprocess=preprocess),
                     reported_model='ema', labeled_batch=labeled, unlabeled_batch=unlabeled)


def reported(state: UdaState, config, data) -> base.Reported:
  """The EMA of the parameters and of the BatchNorm statistics."""
  del config, data
  return base.Reported(dict(state.ema.average))


METHOD = base.register(base.Definition(
    name='uda', summary='sharpened, confidence-masked weak-view targets for RandAugment views, '
                        'with training signal annealing',
    steps_per_epoch=steps_per_epoch, build=build, reported=reported))
