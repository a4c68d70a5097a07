"""Max-pooling whose gradient is not a select-and-scatter.

`flax.linen.max_pool` is a `reduce_window`; JAX differentiates it through
select-and-scatter, which XLA:CPU lowers to a variadic reduce-window that
carries the argmax index, eight iota tensors of the activation's size rebuilt
every step, zero tensors and a scatter. On the small CNN's Fashion-MNIST
Mean Teacher step that was about 43% of the step's time (docs/PERFORMANCE.md).

`max_pool` here computes the same forward value and exactly the gradient that
select-and-scatter gives (the *first* maximum of a window, in row-major window
order, receives the window's gradient; ties included) with elementwise code
only:

- forward: the value is `reduce_window`'s, as in flax; the winner (the window
  position of the first maximum, `int8`) is one variadic reduction over the
  window's strided slices stacked beside the channels;
- backward: the saved winner selects where each output's gradient goes. For
  non-overlapping windows (window == stride) that is one broadcast `where`
  whose result is already in the input's layout; for overlapping windows
  (the 3x3/2 pools of the ResNet stem and AlexNet) each window position's
  share is placed with an interior-padded `lax.pad` and the shares are added.

Why the winner is saved and not recomputed in the backward pass: comparing the
input with the pooled output (`x == y`) in the backward pass is exact for the
op alone, but inside a jitted network XLA may compute the producer of `x`
(convolution, BatchNorm, ReLU) in two fusions with different rounding, and
then no element of a window equals its maximum. Saving the index makes the
gradient's placement independent of how `x` is recomputed. Why a reduction
and not a chain of elementwise `where`s: XLA fuses an elementwise winner into
every shifted read of the backward pass and recomputes it there (measured
1.5-2x slower than `nn.max_pool` on the 3x3/2 pools); a reduction stays a
fusion of its own and is read, not recomputed.

NaN inputs: the forward value is NaN as `reduce_window`'s is (the first NaN in
window order takes the gradient). Padding is -inf and never wins unless the
window holds only -inf.
"""

from __future__ import annotations

import functools
import itertools
from typing import Sequence, Union

import jax
import jax.numpy as jnp
from jax import lax

Padding = Union[str, Sequence[tuple[int, int]]]


def max_pool(x: jax.Array, window_shape: Sequence[int],
             strides: Sequence[int] | None = None,
             padding: Padding = 'VALID') -> jax.Array:
  """Max-pool an NHWC batch; a drop-in for `flax.linen.max_pool`.

  Args:
    x: `[N, H, W, C]` (or `[H, W, C]`, as flax accepts) floating array.
    window_shape: `(kh, kw)`.
    strides: `(sh, sw)`; defaults to `(1, 1)` as in flax.
    padding: 'VALID', 'SAME' or `((top, bottom), (left, right))`.

  Returns:
    The pooled array; its gradient is select-and-scatter's, exactly.
  """
  window = tuple(int(k) for k in window_shape)
  strides = tuple(int(s) for s in (strides or (1,) * len(window)))
  if len(window) != 2 or len(strides) != 2:
    raise ValueError(f'max_pool pools two spatial axes; got window '
                     f'{window_shape} and strides {strides}')
  if x.ndim == 3:
    return max_pool(x[None], window, strides, padding)[0]
  if x.ndim != 4:
    raise ValueError(f'max_pool expects NHWC (or HWC); got shape {x.shape}')
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f'max_pool pools floating arrays; got {x.dtype}')
  if isinstance(padding, str):
    pads = lax.padtype_to_pads(x.shape[1:3], window, strides, padding)
  else:
    pads = padding
  pads = tuple((int(lo), int(hi)) for lo, hi in pads)
  return _max_pool(x, window, strides, pads)


def _geometry(in_hw, window, strides, pads):
  """Padded size and output size per spatial axis."""
  padded = tuple(n + lo + hi for n, (lo, hi) in zip(in_hw, pads))
  out = tuple((p - k) // s + 1 for p, k, s in zip(padded, window, strides))
  if min(out) < 1:
    raise ValueError(f'max_pool window {window} is larger than the padded '
                     f'input {padded}')
  return padded, out


def _window_positions(window):
  return list(itertools.product(range(window[0]), range(window[1])))


def _first_max(a, b):
  """Reducer of (value, position) pairs: the larger value, on ties the earlier
  position; a NaN beats any number. Associative and commutative, so any
  reduction order gives the first maximum in window order."""
  (va, pa), (vb, pb) = a, b
  a_nan, b_nan = jnp.isnan(va), jnp.isnan(vb)
  take_b = ((vb > va) & ~a_nan) | (b_nan & ~a_nan) | (
      ((vb == va) | (a_nan & b_nan)) & (pb < pa))
  return jnp.where(take_b, vb, va), jnp.where(take_b, pb, pa)


def _pool_with_winner(x, window, strides, pads):
  """The pooled value and the window position (int8) it was taken from."""
  _, out = _geometry(x.shape[1:3], window, strides, pads)
  n, c = x.shape[0], x.shape[3]
  neg_inf = jnp.array(-jnp.inf, x.dtype)
  xp = lax.pad(x, neg_inf, ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
  views = [lax.slice(xp, (0, i, j, 0),
                     (n, i + strides[0] * (out[0] - 1) + 1,
                      j + strides[1] * (out[1] - 1) + 1, c),
                     (1, strides[0], strides[1], 1))
           for i, j in _window_positions(window)]
  # One reduction over the window axis (beside the channels, so it runs along
  # contiguous channel vectors). Being a reduction, XLA keeps it a fusion of
  # its own: its result is read by the backward pass, not recomputed in it.
  stacked = jnp.stack(views, axis=3)
  positions = lax.broadcasted_iota(jnp.int8, stacked.shape, 3)
  # The identity's position is after every real one, so it loses all ties.
  _, winner = lax.reduce((stacked, positions), (neg_inf, jnp.int8(127)),
                         _first_max, (3,))
  # The value is flax's `reduce_window`, not the reduction's own maximum: in a
  # jitted network XLA fuses the convolution's BatchNorm + ReLU into whichever
  # op reads it, and a different reader can round that producer differently
  # by an ulp (a Mean Teacher step's gradients differed by 1e-8 until this was
  # `reduce_window`; now three steps give flax's state bit for bit).
  value = lax.reduce_window(x, neg_inf, lax.max, (1, *window, 1),
                            (1, *strides, 1), ((0, 0), *pads, (0, 0)))
  return value, winner


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, pads):
  return _pool_with_winner(x, window, strides, pads)[0]


def _max_pool_fwd(x, window, strides, pads):
  y, winner = _pool_with_winner(x, window, strides, pads)
  return y, (winner, x.shape)


def _max_pool_bwd(window, strides, pads, residuals, g):
  winner, in_shape = residuals
  n, h, w, c = in_shape
  padded, out = _geometry((h, w), window, strides, pads)
  (kh, kw), (sh, sw) = window, strides
  # Padded row s*a + r (phase r < s) is row r + s*d of the window of output
  # row a - d, for every d with r + s*d < kh; likewise for columns. Each
  # phase's gradient is a sum of output-sized shares shifted by d, and the
  # phases interleave into the input's layout by one reshape.
  rows, cols = -(-padded[0] // sh), -(-padded[1] // sw)
  zero = jnp.zeros((), g.dtype)

  def shifted_share(i, j):
    share = jnp.where(winner == jnp.int8(i * kw + j), g, zero)
    di, dj = i // sh, j // sw
    return lax.pad(share, zero, ((0, 0, 0), (di, rows - out[0] - di, 0),
                                 (dj, cols - out[1] - dj, 0), (0, 0, 0)))

  phases = []
  for r in range(sh):
    row = []
    for q in range(sw):
      # Select-and-scatter adds an input's gradients in the outputs'
      # row-major order: the largest shift first.
      total = jnp.zeros((n, rows, cols, c), g.dtype)
      for i in reversed(range(r, kh, sh)):
        for j in reversed(range(q, kw, sw)):
          total = total + shifted_share(i, j)
      row.append(total)
    phases.append(jnp.stack(row, axis=3))
  dx = jnp.stack(phases, axis=2).reshape(n, rows * sh, cols * sw, c)
  dx = lax.slice(dx, (0, pads[0][0], pads[1][0], 0),
                 (n, pads[0][0] + h, pads[1][0] + w, c))
  return (dx,)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
