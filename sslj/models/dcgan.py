"""DCGAN-style generator and discriminator for the semi-supervised GAN.

Generator: z [B, latent_dim] -> Dense -> reshape to the smallest map ->
BN, ReLU -> upsampling stages (x2 each, BN + ReLU, channels halving) -> the
last stage gives the image channels -> sigmoid. The output is an image in
[0, 1], the scale of `uint8 / 255`, so the method normalises generated and
real images with the same per-channel mean and std before the discriminator
sees them (a tanh output would need a different affine map for each). The
number of stages is the largest that keeps the smallest map at least 4
pixels high with the image size divisible by 2^stages (at most 4): 8x8 digits
start at 4x4, 28x28 Fashion-MNIST at 7x7, 32x32 at 4x4, 96x96 at 6x6.

Two upsampling variants:
  'transpose': a stride-2 transposed convolution (DCGAN, Salimans et al.).
  'resize': nearest-neighbour x2 resize, then a stride-1 convolution (Odena
    et al.; no checkerboard artefacts, but 4x the multiply-adds at equal
    kernel size).
Measured with `python -m benchmarks.gan_generator --batch=100 --steps=20
--repeats=3` (jitted forward + backward, kernel 5, float32, best of 3) on a
2-core CPU with nothing else running (docs/PERFORMANCE.md):
  8x8x1:   transpose 22,270 img/s   resize 4,309 img/s
  28x28x1: transpose     36 img/s   resize   107 img/s
  32x32x3: transpose     81 img/s   resize   115 img/s
'transpose' stays the model's default (the DCGAN one, and the faster at 8x8);
the semi-supervised GAN's config selects 'resize' for every dataset but digits. XLA:CPU's
transposed convolutions are slow although resize-convolution does 4x the
multiply-adds of the last stages at equal kernel size.

Discriminator: [input Gaussian noise] -> input dropout -> stages of
[conv 3x3 stride 1, conv 3x3 stride 2] with LeakyReLU 0.2, each stage
followed by dropout (and optional Gaussian noise) -> conv 3x3, two 1x1
(network-in-network) convs -> global average pool = the feature layer that
feature matching uses (`return_features=True`) -> K dense logits. Weight
normalisation (on by default) replaces BatchNorm: the paper's D has no
batch statistics, which would otherwise mix real and generated batches.
The Gaussian noise draws from the 'dropout' rng stream, so training needs
only that rng.

References:
  Radford, Metz, Chintala. Unsupervised Representation Learning with Deep
    Convolutional Generative Adversarial Networks. ICLR 2016.
  Salimans, Goodfellow, Zaremba, Cheung, Radford, Chen. Improved Techniques
    for Training GANs. NeurIPS 2016 (the CIFAR-10 generator and
    discriminator; weight norm, dropout, Gaussian noise layers).
  Salimans, Kingma. Weight Normalization. NeurIPS 2016.
  Odena, Dumoulin, Olah. Deconvolution and Checkerboard Artifacts.
    Distill 2016 (resize-convolution).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sslj.models.heads import classifier_heads

UPSAMPLING = ('transpose', 'resize')
MAX_STAGES = 4
MIN_START = 4  # the generator's smallest map is at least this many pixels high


def num_stages(height: int, width: int) -> int:
  """Upsampling stages for an image size (see the module docstring)."""
  n = 0
  while (n < MAX_STAGES and height % 2 ** (n + 1) == 0 and width % 2 ** (n + 1) == 0
         and height // 2 ** (n + 1) >= MIN_START and width // 2 ** (n + 1) >= MIN_START):
    n += 1
  return n


class DCGANGenerator(nn.Module):
  """Latent vectors -> images in [0, 1].

  Attributes:
    image_shape: (H, W, C) of the output.
    base_width: channels of the smallest map; each stage halves them
      (never below 32); the last stage gives C.
    upsample: 'transpose' or 'resize' (see the module docstring).
    kernel_size: kernel of every upsampling convolution.
    bn_momentum: decay of BatchNorm's running averages (Flax's convention:
      running = m * running + (1 - m) * batch; PyTorch's momentum is 1 - m).
    dtype: compute dtype; parameters and the output stay float32.
  """
  image_shape: Sequence[int]
  base_width: int = 256
  upsample: str = 'transpose'
  kernel_size: int = 5
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z, train: bool = False):
    if self.upsample not in UPSAMPLING:
      raise ValueError(f"upsample={self.upsample!r}; use one of {UPSAMPLING}")
    h, w, c = self.image_shape
    stages = num_stages(h, w)
    h0, w0 = h // 2 ** stages, w // 2 ** stages
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, epsilon=1e-5, dtype=self.dtype,
                             param_dtype=jnp.float32)
    k = (self.kernel_size, self.kernel_size)
    x = nn.Dense(h0 * w0 * self.base_width, use_bias=False, dtype=self.dtype,
                 param_dtype=jnp.float32)(jnp.asarray(z, self.dtype))
    x = nn.relu(norm()(x.reshape(z.shape[0], h0, w0, self.base_width)))
    if stages == 0:  # an image too small to upsample into: one convolution
      x = nn.Conv(c, k, padding='SAME', dtype=self.dtype, param_dtype=jnp.float32)(x)
    for i in range(stages):
      last = i == stages - 1
      width = c if last else max(32, self.base_width // 2 ** (i + 1))
      if self.upsample == 'transpose':
        x = nn.ConvTranspose(width, k, strides=(2, 2), padding='SAME', use_bias=last,
                             dtype=self.dtype, param_dtype=jnp.float32)(x)
      else:
        b, hh, ww, cc = x.shape
        x = jax.image.resize(x, (b, 2 * hh, 2 * ww, cc), 'nearest')
        x = nn.Conv(width, k, padding='SAME', use_bias=last, dtype=self.dtype,
                    param_dtype=jnp.float32)(x)
      if not last:
        x = nn.relu(norm()(x))
    return nn.sigmoid(x.astype(jnp.float32))


class DCGANDiscriminator(nn.Module):
  """The K-logit discriminator/classifier (the K+1-th logit is fixed at 0).

  Attributes:
    num_classes: K.
    num_heads: linear heads on the pooled features.
    widths: channels of each [conv, conv stride 2] stage; (32, 64) is sized
      for CPU runs on digits and Fashion-MNIST (the paper's CIFAR-10 D has
      three convs per stage at 96 and 192 channels).
    dropout_rate: dropout after each stage (0.5 in the paper).
    input_dropout: dropout on the input image (0.2 in the paper).
    input_noise_std / noise_std: Gaussian noise on the input / after each
      stage in training (the paper's MNIST D used 0.3 / 0.5).
    weight_norm: weight-normalised convolutions (the paper's choice).
    negative_slope: of the LeakyReLUs.
    dtype: compute dtype; parameters stay float32, features and logits are
      float32.
  """
  num_classes: int
  num_heads: int = 1
  widths: Sequence[int] = (32, 64)
  dropout_rate: float = 0.5
  input_dropout: float = 0.2
  input_noise_std: float = 0.0
  noise_std: float = 0.0
  weight_norm: bool = True
  negative_slope: float = 0.2
  dtype: Any = jnp.float32

  def _noise(self, x, std, train):
    if not train or std <= 0:
      return x
    return x + std * jax.random.normal(self.make_rng('dropout'), x.shape, x.dtype)

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    def conv(y, features, kernel, stride=1):
      layer = nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding='SAME',
                      dtype=self.dtype, param_dtype=jnp.float32)
      if self.weight_norm:
        layer = nn.WeightNorm(layer)
      return nn.leaky_relu(layer(y), negative_slope=self.negative_slope)

    x = jnp.asarray(x, self.dtype)
    x = self._noise(x, self.input_noise_std, train)
    x = nn.Dropout(self.input_dropout, deterministic=not train)(x)
    for width in self.widths:
      x = conv(x, width, 3)
      # Halve the map while it is at least 4 high, so 8x8 digits keep 2x2.
      x = conv(x, width, 3, stride=2 if min(x.shape[1], x.shape[2]) >= 4 else 1)
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
      x = self._noise(x, self.noise_std, train)
    x = conv(x, self.widths[-1], 3)
    x = conv(x, self.widths[-1], 1)
    x = conv(x, self.widths[-1], 1)
    # Pool in float32: a bf16 mean over many positions loses precision.
    features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return classifier_heads(self, features, return_features)


def data_dependent_init(model: nn.Module, variables, images, dropout_key, *,
                        head_stdv: float = 0.1):
  """Weight normalisation's data-dependent initialisation of a discriminator.

  Salimans & Kingma (2016, section 2.2), as improved-gan runs it once on 500
  training images before training (`nn.py`, `WeightNormLayer` with
  `init=True`; `train_cifar_feature_matching.py`, `init_param`): layer by
  layer in the order of the forward pass, each weight-normalised
  convolution's pre-activations t on `images` are made zero-mean and unit-
  variance per channel by setting its scale g <- g / s and bias
  b <- (b - m) / s, with m and s their mean and (population) deviation over
  the batch and positions; the next layer then sees the normalised output.
  The K-logit head, a plain Dense here, gets the same with deviation
  `head_stdv` (the CIFAR script's `init_stdv=0.1` for its output layer), by
  scaling its kernel.

  The passes run in training mode with one `dropout_key` for all, so every
  layer sees the dropout and noise draws a single pass of the reference
  would. A deviation below 1e-8 (a constant channel) is taken as 1e-8.

  Args:
    model: a `DCGANDiscriminator` with `weight_norm=True` (any module whose
      parameters hold `WeightNorm_<i>` scales of `Conv_<j>` kernels, and
      `head`).
    variables: its initial variables.
    images: normalised float inputs [N, H, W, C].
    dropout_key: the 'dropout' rng of the passes.
    head_stdv: the head's target deviation.

  Returns:
    The variables with the scales, conv biases and head replaced.
  """
  params = jax.tree_util.tree_map(lambda a: a, dict(variables['params']))
  layers = sorted((k for k in params if k.startswith('WeightNorm_')),
                  key=lambda k: int(k.rsplit('_', 1)[1]))
  if not layers:
    raise ValueError('data_dependent_init needs weight-normalised layers (weight_norm=True)')

  def pre_activations(params, name):
    _, state = model.apply({**variables, 'params': params}, images, train=True,
                           rngs={'dropout': dropout_key},
                           capture_intermediates=lambda m, method: (m.name == name
                                                                    and method == '__call__'))
    return state['intermediates'][name]['__call__'][0].astype(jnp.float32)

  for name in layers + ['head']:
    t = pre_activations(params, name)
    axes = tuple(range(t.ndim - 1))
    mean = t.mean(axes)
    inv = (head_stdv if name == 'head' else 1.0) / jnp.maximum(
        jnp.sqrt(jnp.mean(jnp.square(t - mean), axes)), 1e-8)
    if name == 'head':
      params['head'] = {'kernel': params['head']['kernel'] * inv,
                        'bias': (params['head']['bias'] - mean) * inv}
      continue
    (scale_name,) = params[name]  # 'Conv_<j>/kernel/scale'
    conv = scale_name.split('/')[0]
    params[name] = {scale_name: params[name][scale_name] * inv}
    params[conv] = {**params[conv], 'bias': (params[conv]['bias'] - mean) * inv}
  return {**variables, 'params': params}
