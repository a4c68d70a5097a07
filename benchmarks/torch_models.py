"""PyTorch twins of sslj's small CNN and ResNets, for the Mean Teacher race.

Same layers, widths, pooling rule, heads and parameter counts as
`sslj.models.small_cnn.SmallCNN` and `sslj.models.resnet.ResNet` (NCHW
modules meant to run on channels_last tensors). `copy_small_cnn` loads a
Flax SmallCNN's parameters and BatchNorm statistics into the twin, so a test
can check that both compute the same losses and updates.

Known differences that do not change a training step's losses or
parameters: PyTorch's BatchNorm keeps the *unbiased* batch variance in its
running statistics (Flax the biased one; running statistics are used only in
evaluation), and PyTorch's default initialisers differ from Flax's (the race
times steps; the test copies the weights). Flax's 'SAME' padding of a
stride-2 3x3 convolution pads (0, 1) where PyTorch's padding=1 pads (1, 1):
the same FLOPs, a half-pixel shift of the grid (ResNet only; the small CNN
has no strided convolution).

Not a benchmark itself; used by `python -m benchmarks.torch_mean_teacher`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from sslj.models.resnet import AUTO_SMALL_STEM_MAX_HEIGHT
from sslj.models.small_cnn import MIN_POOL_HEIGHT

# Flax BatchNorm(momentum=0.9, epsilon=1e-5) is PyTorch's momentum=0.1.
_BN = dict(momentum=0.1, eps=1e-5)


class Heads(nn.Module):
  """`num_heads` float32 linear heads on float32 pooled features, as sslj's heads."""

  def __init__(self, features: int, num_classes: int, num_heads: int):
    super().__init__()
    self.heads = nn.ModuleList(nn.Linear(features, num_classes) for _ in range(num_heads))

  def forward(self, features):
    # sslj runs the heads in float32 whatever the compute dtype.
    with torch.autocast(features.device.type, enabled=False):
      outs = tuple(head(features.float()) for head in self.heads)
    return outs[0] if len(outs) == 1 else outs


class SmallCNN(nn.Module):
  """[conv 3x3, BN, ReLU] x 3 (32, 64, 128), 2x2 max-pools while >= 8 high, mean pool."""

  def __init__(self, in_channels: int, height: int, num_classes: int, num_heads: int = 1,
               widths=(32, 64, 128)):
    super().__init__()
    layers, prev = [], in_channels
    for i, width in enumerate(widths):
      layers += [nn.Conv2d(prev, width, 3, padding=1, bias=False),
                 nn.BatchNorm2d(width, **_BN), nn.ReLU(inplace=True)]
      if i < len(widths) - 1 and height >= MIN_POOL_HEIGHT:
        layers.append(nn.MaxPool2d(2))
        height //= 2
      prev = width
    self.body = nn.Sequential(*layers)
    self.heads = Heads(prev, num_classes, num_heads)

  def forward(self, x):
    # Pool in float32, as sslj does.
    return self.heads(self.body(x).float().mean(dim=(2, 3)))


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, prev: int, width: int, stride: int):
    super().__init__()
    self.branch = nn.Sequential(
        nn.Conv2d(prev, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width, **_BN),
        nn.ReLU(inplace=True), nn.Conv2d(width, width, 3, 1, 1, bias=False),
        nn.BatchNorm2d(width, **_BN))
    self.proj = _projection(prev, width, stride)

  def forward(self, x):
    return torch.relu(self.branch(x) + self.proj(x))


class Bottleneck(nn.Module):
  """1x1, 3x3 (strided: v1.5, as sslj and torchvision), 1x1 x4."""
  expansion = 4

  def __init__(self, prev: int, width: int, stride: int):
    super().__init__()
    out = width * 4
    self.branch = nn.Sequential(
        nn.Conv2d(prev, width, 1, bias=False), nn.BatchNorm2d(width, **_BN),
        nn.ReLU(inplace=True), nn.Conv2d(width, width, 3, stride, 1, bias=False),
        nn.BatchNorm2d(width, **_BN), nn.ReLU(inplace=True),
        nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out, **_BN))
    self.proj = _projection(prev, out, stride)

  def forward(self, x):
    return torch.relu(self.branch(x) + self.proj(x))


def _projection(prev: int, out: int, stride: int) -> nn.Module:
  if prev == out and stride == 1:
    return nn.Identity()
  return nn.Sequential(nn.Conv2d(prev, out, 1, stride, bias=False), nn.BatchNorm2d(out, **_BN))


_RESNETS = {18: ((2, 2, 2, 2), BasicBlock), 50: ((3, 4, 6, 3), Bottleneck),
            152: ((3, 8, 36, 3), Bottleneck)}


class ResNet(nn.Module):
  """sslj's ResNet with stem 'auto': ImageNet stem above 64 pixels, else 3x3/1."""

  def __init__(self, depth: int, in_channels: int, height: int, num_classes: int,
               num_heads: int = 1, width: int = 64):
    super().__init__()
    sizes, block = _RESNETS[depth]
    if height > AUTO_SMALL_STEM_MAX_HEIGHT:
      stem = [nn.Conv2d(in_channels, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width, **_BN),
              nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
    else:
      stem = [nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width, **_BN),
              nn.ReLU(inplace=True)]
    layers, prev = stem, width
    for i, count in enumerate(sizes):
      for j in range(count):
        layers.append(block(prev, width * 2 ** i, 2 if i > 0 and j == 0 else 1))
        prev = width * 2 ** i * block.expansion
    self.body = nn.Sequential(*layers)
    self.heads = Heads(prev, num_classes, num_heads)

  def forward(self, x):
    return self.heads(self.body(x).float().mean(dim=(2, 3)))


def build(name: str, shape, num_classes: int, num_heads: int) -> nn.Module:
  """The twin of sslj's model `name` for inputs of `shape` (H, W, C)."""
  h, _, c = shape
  if name == 'small_cnn':
    return SmallCNN(c, h, num_classes, num_heads)
  if name.startswith('resnet') and int(name[6:]) in _RESNETS:
    return ResNet(int(name[6:]), c, h, num_classes, num_heads)
  raise ValueError(f'no PyTorch twin of {name!r}; have small_cnn, '
                   + ', '.join(f'resnet{d}' for d in _RESNETS))


def num_params(module: nn.Module) -> int:
  return sum(p.numel() for p in module.parameters())


def _put(tensor, value):
  with torch.no_grad():
    tensor.copy_(torch.from_numpy(np.array(value, np.float32)))  # a writable copy


def copy_small_cnn(module: SmallCNN, params, batch_stats) -> None:
  """Loads a Flax SmallCNN's parameters and BatchNorm statistics into `module`."""
  convs = [m for m in module.body if isinstance(m, nn.Conv2d)]
  norms = [m for m in module.body if isinstance(m, nn.BatchNorm2d)]
  for i, (conv, norm) in enumerate(zip(convs, norms)):
    _put(conv.weight, np.transpose(params[f'Conv_{i}']['kernel'], (3, 2, 0, 1)))
    _put(norm.weight, params[f'BatchNorm_{i}']['scale'])
    _put(norm.bias, params[f'BatchNorm_{i}']['bias'])
    _put(norm.running_mean, batch_stats[f'BatchNorm_{i}']['mean'])
    _put(norm.running_var, batch_stats[f'BatchNorm_{i}']['var'])
  heads = module.heads.heads
  names = ['head'] if len(heads) == 1 else [f'head_{k}' for k in range(len(heads))]
  for head, name in zip(heads, names):
    _put(head.weight, np.transpose(params[name]['kernel']))
    _put(head.bias, params[name]['bias'])
