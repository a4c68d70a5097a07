"""Adaptive confidence masks: FlexMatch's, FreeMatch's and SoftMatch's.

Each is a `pseudo_labels.ConfidenceMask` whose state (a NamedTuple of arrays,
checkpointed with the train state) holds the statistics of the predictions so
far. `probs` are the weak views' class probabilities [B, K] from the network
being trained (a constant for autodiff: nothing here carries a gradient);
the pseudo-label stays the argmax of `probs`, and the mask says which count
(FlexMatch, FreeMatch: 0 or 1) or how much (SoftMatch: a weight in [0, 1]).

* `curriculum_mask` (FlexMatch): a per-image record of the class each
  unlabeled image was last predicted as with confidence >= tau (-1: never),
  from which each class's learning effect sigma_c (the count of images
  recorded with it) gives the normalised effect
  beta_c = sigma_c / max(max_c' sigma_c', N - sum_c' sigma_c') (with the
  warm-up over unused images; without, / max_c' sigma_c') and the class
  threshold M(beta_c) * tau, M(x) = x / (2 - x).
* `self_adaptive_mask` (FreeMatch): the global threshold tau_t, an EMA of
  the mean max probability, and the local thresholds
  tau_t(c) = tau_t * p~_t(c) / max_c' p~_t(c'), p~ the EMA of the mean
  probability vector; with `fairness_loss`, the self-adaptive fairness term.
* `truncated_gaussian_mask` (SoftMatch): the weight
  exp(-(min(max p - mu_t, 0))^2 / (2 sigma_t^2 / n_sigma^2)) with mu_t, sigma_t^2
  EMAs of the batch mean and (unbiased) variance of max p, computed on the
  probabilities after uniform alignment.

References: Zhang et al. 2021, "FlexMatch: boosting semi-supervised learning
with curriculum pseudo labeling" (Sec. 3); Wang et al. 2023, "FreeMatch:
self-adaptive thresholding for semi-supervised learning" (Sec. 3); Chen et
al. 2023, "SoftMatch: addressing the quantity-quality trade-off in
semi-supervised learning" (Sec. 3). Reference code: TorchSSL
(github.com/TorchSSL/TorchSSL, models/flexmatch, models/freematch_entropy,
models/softmatch) and USB (github.com/microsoft/Semi-supervised-learning,
semilearn/algorithms/{flexmatch,freematch,softmatch}, hooks/dist_align.py).
Where the two codes differ, the method modules (sslj/methods/flexmatch.py,
freematch.py, softmatch.py) say which is followed.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from sslj.ops import pseudo_labels


def _max_and_label(probs):
  probs = jax.lax.stop_gradient(probs).astype(jnp.float32)
  return probs, jnp.max(probs, axis=-1), jnp.argmax(probs, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------- FlexMatch


def convex_mapping(x):
  """FlexMatch's non-linear mapping M(x) = x / (2 - x) ('convex' in its code)."""
  return x / (2.0 - x)


class CurriculumState(NamedTuple):
  selected: jax.Array       # int32 [N]: last confident class of each unlabeled image, -1 none
  learning_effect: jax.Array  # float32 [K]: beta_c, from `selected` as of the last update


def normalized_learning_effect(selected, num_classes: int, warmup: bool, previous):
  """beta_c from the per-image record `selected` (int32 [N], -1 = unused).

  sigma_c counts the images recorded with class c. With `warmup`,
  beta_c = sigma_c / max(max_c sigma_c, #unused); without, / max_c sigma_c.
  As both reference codes do, beta is left at `previous` while one entry
  (a class or 'unused') holds every image (at the start: all unused, beta 0).
  """
  counts = jnp.bincount(selected + 1, length=num_classes + 1)  # [unused, class 0..K-1]
  sigma = counts[1:].astype(jnp.float32)
  denominator = counts.max() if warmup else counts[1:].max()
  beta = sigma / jnp.maximum(denominator, 1).astype(jnp.float32)
  return jnp.where(counts.max() < selected.shape[0], beta, previous)


def _record(selected, indices, labels, keep):
  """`selected` with selected[indices[b]] = labels[b] where keep[b]; where the batch
  holds an image twice, the last kept view wins (a scatter with repeated indices
  has no defined order, so the others are dropped)."""
  b = indices.shape[0]
  later = jnp.arange(b)[None, :] > jnp.arange(b)[:, None]
  overwritten = ((indices[:, None] == indices[None, :]) & later & keep[None, :]).any(axis=1)
  write = keep & ~overwritten
  rows = jnp.where(write, indices, selected.shape[0])  # out of range: dropped
  return selected.at[rows].set(labels, mode='drop')


def curriculum_mask(threshold: float, *, warmup: bool = True) -> pseudo_labels.ConfidenceMask:
  """FlexMatch's curriculum pseudo-labelling mask.

  update(probs, indices, state): mask = [max p >= tau * M(beta[argmax p])]
  with beta as of the state (the batch's own predictions do not count
  yet); then every image with max p >= tau records argmax p in `selected`,
  and beta is recomputed from the new record.
  """

  def init(num_unlabeled: int, num_classes: int) -> CurriculumState:
    return CurriculumState(selected=jnp.full((num_unlabeled,), -1, jnp.int32),
                           learning_effect=jnp.zeros((num_classes,), jnp.float32))

  def update(probs, indices, state: CurriculumState):
    probs, max_prob, label = _max_and_label(probs)
    class_threshold = threshold * convex_mapping(state.learning_effect)
    mask = (max_prob >= class_threshold[label]).astype(jnp.float32)
    selected = _record(state.selected, indices, label, max_prob >= threshold)
    beta = normalized_learning_effect(selected, probs.shape[-1], warmup, state.learning_effect)
    return mask, CurriculumState(selected=selected, learning_effect=beta)

  def describe(state: CurriculumState):
    class_threshold = threshold * convex_mapping(state.learning_effect)
    return {'mean_threshold': class_threshold.mean(), 'min_threshold': class_threshold.min(),
            'unused_fraction': (state.selected < 0).mean()}

  return pseudo_labels.ConfidenceMask(init, update, describe)


# ----------------------------------------------------------------- FreeMatch


class SelfAdaptiveState(NamedTuple):
  global_threshold: jax.Array  # float32 []: tau_t
  class_probs: jax.Array       # float32 [K]: p~_t, EMA of the mean probability vector
  label_histogram: jax.Array   # float32 [K]: h~_t, EMA of the histogram of argmax p


def local_thresholds(state: SelfAdaptiveState):
  """tau_t(c) = MaxNorm(p~_t)(c) * tau_t, FreeMatch's local thresholds."""
  return state.global_threshold * state.class_probs / state.class_probs.max()


def self_adaptive_mask(momentum: float) -> pseudo_labels.ConfidenceMask:
  """FreeMatch's self-adaptive thresholds (global and per class).

  State starts at tau_0 = p~_0(c) = h~_0(c) = 1/K. update(probs, ...):
  first the EMAs take in the batch, tau <- m tau + (1 - m) mean_b max p_b,
  p~ <- m p~ + (1 - m) mean_b p_b, h~ <- m h~ + (1 - m) hist(argmax p) / B;
  then mask = [max p >= tau(argmax p)] with the updated thresholds.
  """

  def init(num_unlabeled: int, num_classes: int) -> SelfAdaptiveState:
    del num_unlabeled
    uniform = jnp.full((num_classes,), 1.0 / num_classes, jnp.float32)
    return SelfAdaptiveState(global_threshold=uniform.mean(), class_probs=uniform,
                             label_histogram=uniform)

  def update(probs, indices, state: SelfAdaptiveState):
    del indices
    probs, max_prob, label = _max_and_label(probs)
    num_classes = probs.shape[-1]
    histogram = jnp.bincount(label, length=num_classes).astype(jnp.float32) / label.shape[0]
    state = SelfAdaptiveState(
        global_threshold=momentum * state.global_threshold + (1 - momentum) * max_prob.mean(),
        class_probs=momentum * state.class_probs + (1 - momentum) * probs.mean(axis=0),
        label_histogram=momentum * state.label_histogram + (1 - momentum) * histogram)
    mask = (max_prob >= local_thresholds(state)[label]).astype(jnp.float32)
    return mask, state

  def describe(state: SelfAdaptiveState):
    return {'global_threshold': state.global_threshold,
            'mean_threshold': local_thresholds(state).mean()}

  return pseudo_labels.ConfidenceMask(init, update, describe)


def _sum_normalized(x):
  return x / x.sum(axis=-1, keepdims=True)


def _inverse_or_zero(x):
  """1 / x where x > 0, else 0 (the reference's 1/x with inf replaced by 0)."""
  return jnp.where(x > 0, 1.0 / jnp.where(x > 0, x, 1.0), 0.0)


def fairness_loss(strong_logits, mask, state: SelfAdaptiveState):
  """FreeMatch's self-adaptive fairness loss L_f, as its code computes it.

  Over the strong views that the mask keeps: p_bar, their mean probability
  vector, and h_bar, the histogram of their argmax; then
  L_f = sum_c SumNorm(p~ / h~)(c) * log(SumNorm(p_bar / h_bar)(c) + 1e-12),
  i.e. minus the cross-entropy H(SumNorm(p~/h~), SumNorm(p_bar/h_bar)), with
  1/0 read as 0. Only p_bar carries a gradient; 0 when the mask keeps nothing.
  """
  keep = (mask > 0).astype(jnp.float32)
  kept = keep.sum()
  denominator = jnp.maximum(kept, 1.0)
  probs = jax.nn.softmax(strong_logits.astype(jnp.float32), axis=-1)
  num_classes = probs.shape[-1]
  mean_probs = (keep[:, None] * probs).sum(axis=0) / denominator
  labels = jnp.argmax(jax.lax.stop_gradient(probs), axis=-1)
  histogram = (keep[:, None] * jax.nn.one_hot(labels, num_classes)).sum(axis=0) / denominator
  target = _sum_normalized(state.class_probs * _inverse_or_zero(state.label_histogram))
  modulated = _sum_normalized(mean_probs * _inverse_or_zero(histogram))
  loss = jnp.sum(jax.lax.stop_gradient(target) * jnp.log(modulated + 1e-12))
  return jnp.where(kept > 0, loss, 0.0)


# ----------------------------------------------------------------- SoftMatch


class TruncatedGaussianState(NamedTuple):
  class_probs: jax.Array  # float32 [K]: EMA of the mean probability vector (uniform alignment)
  count: jax.Array        # int32 []: batches seen (the first one sets class_probs)
  mean: jax.Array         # float32 []: mu_t
  variance: jax.Array     # float32 []: sigma_t^2


def uniform_alignment(probs, class_probs):
  """UA(p) = SumNorm(p * (1/K + 1e-6) / (p_hat + 1e-6)): SoftMatch's uniform alignment
  as USB computes it (the 1e-6 keeps an unseen class finite)."""
  num_classes = probs.shape[-1]
  return _sum_normalized(probs * (1.0 / num_classes + 1e-6) / (class_probs + 1e-6))


def gaussian_weight(max_prob, mean, variance, n_sigma: float):
  """lambda(p) = exp(-(min(max p - mu, 0))^2 / (2 sigma^2 / n_sigma^2)): 1 at or above mu."""
  return jnp.exp(-jnp.square(jnp.minimum(max_prob - mean, 0.0))
                 / (2.0 * variance / n_sigma ** 2))


def truncated_gaussian_mask(momentum: float, *, n_sigma: float = 2.0,
                            align: bool = True) -> pseudo_labels.ConfidenceMask:
  """SoftMatch's soft weight on each pseudo-label.

  update(probs, ...): with `align`, the EMA p_hat of the mean probability
  vector takes in the batch (the first batch sets it) and the weights are
  computed on UA(probs); then mu <- m mu + (1 - m) mean_b max UA(p)_b,
  sigma^2 <- m sigma^2 + (1 - m) var_b max UA(p)_b (unbiased, B - 1), and
  the weight is `gaussian_weight` of each max UA(p) with the updated mu,
  sigma^2. State starts at mu_0 = 1/K, sigma_0^2 = 1.
  """

  def init(num_unlabeled: int, num_classes: int) -> TruncatedGaussianState:
    del num_unlabeled
    return TruncatedGaussianState(
        class_probs=jnp.full((num_classes,), 1.0 / num_classes, jnp.float32),
        count=jnp.zeros((), jnp.int32), mean=jnp.full((), 1.0 / num_classes, jnp.float32),
        variance=jnp.ones((), jnp.float32))

  def update(probs, indices, state: TruncatedGaussianState):
    del indices
    probs = jax.lax.stop_gradient(probs).astype(jnp.float32)
    class_probs = state.class_probs
    if align:
      batch_mean = probs.mean(axis=0)
      class_probs = jnp.where(state.count == 0, batch_mean,
                              momentum * class_probs + (1 - momentum) * batch_mean)
      probs = uniform_alignment(probs, class_probs)
    max_prob = probs.max(axis=-1)
    mean = momentum * state.mean + (1 - momentum) * max_prob.mean()
    variance = momentum * state.variance + (1 - momentum) * jnp.var(max_prob, ddof=1)
    weight = gaussian_weight(max_prob, mean, variance, n_sigma)
    return weight, TruncatedGaussianState(class_probs=class_probs, count=state.count + 1,
                                          mean=mean, variance=variance)

  def describe(state: TruncatedGaussianState):
    return {'gaussian_mean': state.mean, 'gaussian_std': jnp.sqrt(state.variance)}

  return pseudo_labels.ConfidenceMask(init, update, describe)
