"""Optimisers and learning-rate schedules built from a config.

Schedules are derived here from the run's length, never written into configs,
so they stay right when `num_steps` is overridden on the command line.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from sslj.errors import UserError


def learning_rate(cfg, num_steps: int) -> optax.Schedule:
  """`cfg.schedule`, a name in `SCHEDULES`, after `cfg.warmup_steps` of linear warm-up.

  Cosine annealing to zero over the run (Loshchilov & Hutter 2017, SGDR without
  restarts) is what both reports used; 'truncated_cosine' stops at 7/16 of
  the half period (FixMatch's).
  References: Loshchilov & Hutter 2017, "SGDR: stochastic gradient descent with warm restarts".
  """
  warmup = min(cfg.warmup_steps, max(num_steps - 1, 0))
  if cfg.schedule not in SCHEDULES:
    raise UserError(f"optimizer.schedule='{cfg.schedule}' is unknown; use one of "
                    f"{', '.join(SCHEDULES)}.")
  return SCHEDULES[cfg.schedule](cfg.learning_rate, num_steps, warmup)


def cosine(peak: float, num_steps: int, warmup_steps: int = 0) -> optax.Schedule:
  """Cosine annealing from `peak` to zero over the run, after a linear warm-up from zero."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup_steps else peak, peak_value=peak, warmup_steps=warmup_steps,
      decay_steps=max(num_steps, warmup_steps + 1), end_value=0.0)


def constant(peak: float, num_steps: int, warmup_steps: int = 0) -> optax.Schedule:
  """`peak` throughout, after a linear warm-up from zero."""
  del num_steps
  if not warmup_steps:
    return optax.constant_schedule(peak)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup_steps), optax.constant_schedule(peak)],
      [warmup_steps])


def truncated_cosine(peak: float, num_steps: int, warmup_steps: int = 0) -> optax.Schedule:
  """lr(k) = peak * cos(7 pi k / (16 K)) over K steps (after any linear warm-up).

  It ends at cos(7 pi / 16) ~ 0.2 of the peak rather than at zero.
  References: Sohn et al. 2020, "FixMatch: simplifying semi-supervised learning
  with consistency and confidence" (Sec. 4 / Appendix B.1).
  """
  total = max(num_steps - warmup_steps, 1)

  def schedule(step):
    # optax.join_schedules passes the steps counted from the warm-up's end.
    k = jnp.clip(jnp.asarray(step, jnp.float32), 0, total)
    return peak * jnp.cos(7 * jnp.pi * k / (16 * total))

  if not warmup_steps:
    return schedule
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup_steps), schedule], [warmup_steps])


# `optimizer.schedule` name -> (peak, num_steps, warmup_steps) -> optax schedule.
SCHEDULES = {'cosine': cosine, 'constant': constant, 'truncated_cosine': truncated_cosine}


# Schedule names runs were recorded under that now have another name (the
# FixMatch configs' name for truncated_cosine until both were one): such a run
# reads as the new name (`run_files.as_current`), so it still resumes and
# rebuilds, and a command line that uses the old name is told the new one.
RENAMED_SCHEDULES = {'fixmatch_cosine': 'truncated_cosine'}


# The names `optimizer.name` accepts.
OPTIMIZERS = ('sgd', 'adam')

# The names `optimizer.decay` accepts: which parameters the weight decay reaches.
DECAYED = ('all', 'kernels')


def kernel_mask(params):
  """True for the convolution and dense kernels (the leaves whose last key is `kernel`).

  BatchNorm scales and offsets, biases, and the scales of `nn.WeightNorm`
  (stored as `<layer>/kernel/scale`) are False.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params)


def decay_mask(cfg):
  """The mask the weight decay is given: None (every parameter) or `kernel_mask`.

  'kernels' is what FixMatch's code does (an L2 loss on the variables named
  `kernel`) and USB's in effect (no decay for 1-D parameters and biases).
  """
  # A config recorded before `decay` existed (an older run's config.json)
  # decayed every parameter.
  decay = cfg.get('decay', 'all')
  if decay not in DECAYED:
    raise UserError(f"optimizer.decay='{decay}' is unknown; use 'all' (every parameter) or "
                    "'kernels' (convolution and dense kernels only).")
  return kernel_mask if decay == 'kernels' else None


def make_optimizer(cfg, num_steps: int) -> optax.GradientTransformation:
  """SGD (optionally Nesterov) with L2 weight decay, or Adam(W).

  SGD's weight decay is added to the gradient before momentum, as PyTorch's
  `SGD(weight_decay=...)` does, which is how the reports trained. The decay
  reaches every parameter, or with `cfg.decay='kernels'` only the kernels
  (`decay_mask`); 'all' passes no mask, so it builds the transform it always built.
  """
  mask = decay_mask(cfg)
  schedule = learning_rate(cfg, num_steps)
  if cfg.name == 'sgd':
    return optax.chain(
        optax.add_decayed_weights(cfg.weight_decay, mask=mask) if cfg.weight_decay
        else optax.identity(),
        optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov))
  if cfg.name == 'adam':
    if cfg.weight_decay:
      return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                         mask=mask)
    return optax.adam(schedule, b1=cfg.b1, b2=cfg.b2)
  raise UserError(f"optimizer.name='{cfg.name}' is unknown; use 'sgd' or 'adam'.")


def make_optimizer_with_plain_sgd(cfg, num_steps: int, param_names,
                                  plain) -> optax.GradientTransformation:
  """`make_optimizer(cfg)`, but the top-level parameters named in `plain` take
  SGD without momentum (the same learning rate, schedule and weight decay).

  `param_names` are every top-level parameter name. `cfg.name` must be 'sgd'.
  """
  plain_cfg = cfg.copy_and_resolve_references()
  plain_cfg.momentum, plain_cfg.nesterov = 0.0, False
  # Labels as a tree, not a function: optax.tree_map_params calls `init` with
  # stand-in values instead of the parameters, which a function could not read.
  return optax.multi_transform(
      {'momentum': make_optimizer(cfg, num_steps), 'plain': make_optimizer(plain_cfg, num_steps)},
      {name: 'plain' if name in plain else 'momentum' for name in param_names})
