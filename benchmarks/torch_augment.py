"""The PyTorch twin's augmentation: the same pixels sslj's `augment_batch` gives.

Used by `benchmarks.torch_mean_teacher`; `shift_flip` is checked pixel for
pixel against `sslj.data.augment` in tests/test_benchmarks.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _fold_symmetric(index, n: int):
  """sslj's 'symmetric' fill: mirror about the border (-1 -> 0, n -> n-1)."""
  m = torch.remainder(index, 2 * n)
  return torch.where(m < n, m, 2 * n - 1 - m)


def shift_flip(x, flip, shift):
  """x [B, H, W, C] float, flip bool [B], integer shift [B, 2] (dy, dx) -> the same
  pixels sslj's `augment_batch` gives for these draws (forward: flip, then shift)."""
  b, h, w, _ = x.shape
  rows = _fold_symmetric(torch.arange(h, device=x.device)[None] - shift[:, :1], h)
  j = torch.arange(w, device=x.device)[None]
  dx = shift[:, 1:]
  cols = _fold_symmetric(torch.where(flip[:, None], w - 1 - j + dx, j - dx), w)
  return x[torch.arange(b, device=x.device)[:, None, None], rows[:, :, None], cols[:, None, :]]


def rotate(x, flip, shift, max_deg: float):
  """Flip, rotation and shift in one bilinear resampling (affine_grid/grid_sample)."""
  b, h, w, _ = x.shape
  angle = (torch.rand(b, device=x.device) * 2 - 1) * math.radians(max_deg)
  c, s = torch.cos(angle), torch.sin(angle)
  fx = torch.where(flip, -1.0, 1.0)
  theta = torch.stack([torch.stack([fx * c, -fx * s], 1), torch.stack([s, c], 1)], 1)
  t = torch.stack([shift[:, 1] / ((w - 1) / 2), shift[:, 0] / ((h - 1) / 2)], 1).float()
  theta = torch.cat([theta, -(theta @ t[:, :, None])], 2)
  nchw = x.permute(0, 3, 1, 2)
  grid = F.affine_grid(theta, list(nchw.shape), align_corners=True)
  out = F.grid_sample(nchw, grid, mode='bilinear', padding_mode='reflection', align_corners=True)
  return out.permute(0, 2, 3, 1)
