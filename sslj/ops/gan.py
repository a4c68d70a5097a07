"""Losses and diagnostics of the K+1-class semi-supervised GAN.

The discriminator outputs K class logits l; the (K+1)-th logit, "generated",
is fixed at 0 (softmax is unchanged by shifting every logit, so fixing one
loses nothing). With Z(x) = sum_k exp(l_k):

  D(x) = P(real | x) = Z / (Z + 1) = sigmoid(logsumexp(l))
  log D(x)     = logsumexp(l) - softplus(logsumexp(l))
  -log(1 - D(x)) = softplus(logsumexp(l))

written with logsumexp and softplus (never exp(l) or log(1 - D)) so that
logits in the hundreds or thousands neither overflow nor lose the answer to
cancellation, in float32 as in bfloat16. Every function computes in the dtype
of its input.

References: Salimans, Goodfellow, Zaremba, Cheung, Radford, Chen. Improved
Techniques for Training GANs. NeurIPS 2016 (Sections 3.1 and 5: feature
matching, the K+1-class discriminator and its losses). Lecouat, Foo, Zenati,
Chandrasekhar. Manifold regularization with GANs for semi-supervised
learning. arXiv:1807.04307, 2018 (the latent-perturbation penalty).
"""

from __future__ import annotations

from absl import logging
import jax
import jax.numpy as jnp

from sslj.errors import UserError


def log_real_probability(logits: jax.Array) -> jax.Array:
  """log D(x) = log P(real | x) per example, from K logits [B, K]."""
  lse = jax.nn.logsumexp(logits, axis=-1)
  return lse - jax.nn.softplus(lse)


def real_probability(logits: jax.Array) -> jax.Array:
  """D(x) = P(real | x) = sigmoid(logsumexp(l)) per example."""
  return jax.nn.sigmoid(jax.nn.logsumexp(logits, axis=-1))


def unlabeled_loss(logits: jax.Array) -> jax.Array:
  """-mean log D(x) over real unlabeled images: they are some real class.

  References: Salimans et al. 2016, Section 5 (L_unsupervised, first term).
  """
  return -jnp.mean(log_real_probability(logits))


def generated_loss(logits: jax.Array) -> jax.Array:
  """-mean log(1 - D(G(z))) = mean softplus(logsumexp(l)) over generated images.

  References: Salimans et al. 2016, Section 5 (L_unsupervised, second term).
  """
  return jnp.mean(jax.nn.softplus(jax.nn.logsumexp(logits, axis=-1)))


def feature_matching(real_features: jax.Array, fake_features: jax.Array) -> jax.Array:
  """||mean f(x) - mean f(G(z))||^2 over the batch, features [B, D].

  sum_d (m_real[d] - m_fake[d])^2 with m = the batch mean of the features.
  The released MNIST code (`train_mnist_feature_matching.py`) takes the mean
  over the D features instead of the sum, `T.mean(T.square(mom_gen -
  mom_real))`; that only scales the loss by 1/D, which Adam's update ignores.
  References: Salimans et al. 2016, Section 3.1, Eq. (feature matching).
  """
  diff = jnp.mean(real_features, axis=0) - jnp.mean(fake_features, axis=0)
  return jnp.sum(diff * diff)


def feature_matching_l1(real_features: jax.Array, fake_features: jax.Array) -> jax.Array:
  """mean_d |mean f(x) - mean f(G(z))| over the batch, features [B, D].

  The released CIFAR-10 code's distance (`train_cifar_feature_matching.py`:
  `T.mean(abs(m1 - m2))`, m1 and m2 the batch means of the features); its
  gradient is sign(m_fake - m_real) / D per feature, 0 where they are equal.
  References: Salimans et al. 2016, code: github.com/openai/improved-gan.
  """
  diff = jnp.mean(real_features, axis=0) - jnp.mean(fake_features, axis=0)
  return jnp.mean(jnp.abs(diff))


# `ssl_gan.feature_matching` -> the distance between the batch-mean features.
FEATURE_MATCHING = {'l2': feature_matching, 'l1': feature_matching_l1}


def manifold_penalty(logits: jax.Array, perturbed_logits: jax.Array) -> jax.Array:
  """mean ||D(G(z)) - D(G(z + delta))||^2 over the batch, on the K logits.

  A finite-difference estimate of the discriminator's gradient along the
  generated image manifold (scaled by |delta|^2), which it penalises so that
  D is smooth along the data manifold.
  References: Lecouat et al. 2018, Section 3 (Eq. 3 and the stochastic
  finite-difference approximation).
  """
  diff = logits - perturbed_logits
  return jnp.mean(jnp.sum(diff * diff, axis=-1))


def perturb_latent(z: jax.Array, key: jax.Array, eps: float) -> jax.Array:
  """z + eps * d / |d| with d ~ N(0, I): a random latent step of length eps."""
  d = jax.random.normal(key, z.shape, z.dtype)
  d = d / jnp.linalg.norm(d, axis=-1, keepdims=True)
  return z + eps * d


def batch_spread(images: jax.Array) -> jax.Array:
  """Per-pixel standard deviation across the batch, averaged over pixels.

  Zero when every image of the batch is the same (mode collapse); compared
  with the same number on a real batch, it says how varied the generator's
  samples are.
  """
  return jnp.mean(jnp.std(images.reshape(images.shape[0], -1), axis=0))


class CollapseWatch:
  """Host-side: warns when the generated batch's spread stays too small.

  `__call__(step, scalars)` is the loop's `on_log` hook: it counts
  consecutive logs whose `spread_ratio` is under `fraction` and returns
  `{'low_spread_logs': count, 'collapse': 0 or 1}`; at `patience` logs it
  logs a warning (and, with `stop`, raises UserError).
  """

  def __init__(self, fraction: float, patience: int, stop: bool = False):
    self.fraction, self.patience, self.stop = fraction, patience, stop
    self.count = 0

  def __call__(self, step: int, scalars: dict) -> dict:
    ratio = float(scalars['spread_ratio'])
    self.count = self.count + 1 if ratio < self.fraction else 0
    collapsed = self.patience > 0 and self.count >= self.patience
    if collapsed:
      message = (f'GAN MODE COLLAPSE at step {step}: the generated batch spread has been under '
                 f'{self.fraction:g} of the real batch spread for {self.count} consecutive logs '
                 f'(now {ratio:.3f}): the generator makes nearly the same image for every z. Lower '
                 'the learning rates or restart from an earlier checkpoint.')
      logging.warning(message)
      if self.stop:
        raise UserError(message + ' Stopped (ssl_gan.collapse_stop=True).')
    return {'low_spread_logs': float(self.count), 'collapse': float(collapsed)}
