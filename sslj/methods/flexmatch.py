"""FlexMatch: FixMatch with per-class thresholds from curriculum pseudo-labelling.

FixMatch's step (sslj/methods/fixmatch.py: one batch of labeled, weak and
strong views, the weak view's argmax as the strong view's target, an EMA of
the weights as the reported model) with FixMatch's fixed threshold replaced
by one per class that rises as the class is learned
(`sslj.ops.thresholds.curriculum_mask`):

  loss = CE(labeled) + lambda * mean_b [max p_b >= T(argmax p_b)] * CE(strong_b, argmax p_b)
  T(c) = M(beta_c) * tau,  M(x) = x / (2 - x),
  beta_c = sigma_c / max(max_c' sigma_c', N - sum_c' sigma_c')

sigma_c, the learning effect of class c, counts the unlabeled images whose
latest prediction with confidence >= tau was c; N - sum sigma counts the
images never so predicted (the warm-up: while most images are unused, every
beta stays small). The record is an int32 array over the N unlabeled images,
-1 at the start, in the train state (`mask_state`), so it is checkpointed
and a resumed run goes on with it. At the start every beta is 0, so T(c) = 0
and every pseudo-label counts, as in the paper's code. The step logs
`mask_rate`, the mean and smallest class threshold and the fraction of
unused images.

What the paper leaves out, taken from its code (TorchSSL models/flexmatch,
USB semilearn/algorithms/flexmatch):
* The record and beta use the weak views' predictions of the network being
  trained (not of the EMA), the same forward pass as the loss.
* Order: the mask uses beta as of the previous step; then each image of the
  batch whose max probability is >= tau (not >= T(c)) records its argmax,
  and beta is recomputed. Both codes leave beta unchanged while one entry
  (a class, or "unused") holds all N images; so does this one.
* `threshold_warmup=False` divides by max_c sigma_c instead (the codes'
  `thresh_warmup`).
* Hard pseudo-labels (the codes' default `hard_label=True`); no distribution
  alignment (TorchSSL's optional `use_DA`, off by default, USB has none).

Departures from the reference code:
* Unlabeled images are drawn uniformly with replacement (the loop's draw),
  not by epochs of a shuffled pool, so a batch may hold an image twice;
  then the last of its views that passes tau is recorded (the codes'
  indexed assignment leaves the order unspecified).
* As in sslj/methods/fixmatch.py: the EMA starts with `ema.decay_at`'s
  short warm-up, and the reported EMA model averages the BatchNorm running
  statistics too, where TorchSSL's and USB's EMA models normalise with the
  trained network's own statistics; that model is evaluated as
  `ema_live_stats`. Measured on FixMatch only (its docstring); the others
  here were not measured against the reference code.

The strong view is its reference codes' own, TorchSSL's and USB's
`RandAugment(3, 5)`: 3 ops where FixMatch applies 2, geometric ops filling
black (configs/flexmatch.py). Measured on FreeMatch, where FixMatch's view was
not ahead (sslj/methods/freematch.py).

Weight decay reaches the kernels only, as TorchSSL's and USB's does
(`optimizer.decay='kernels'`).

References: Zhang et al. 2021, "FlexMatch: boosting semi-supervised learning
with curriculum pseudo labeling", NeurIPS (Sec. 3.2-3.3); reference code
github.com/TorchSSL/TorchSSL (models/flexmatch/flexmatch.py,
flexmatch_utils.py) and USB (github.com/microsoft/Semi-supervised-learning,
semilearn/algorithms/flexmatch/flexmatch.py, utils.py).
"""

from __future__ import annotations

import functools

from sslj.errors import UserError
from sslj.methods import base, fixmatch
from sslj.ops import thresholds

NAME = 'flexmatch'


def mask_fn(config):
  """The curriculum mask of `config.flexmatch`."""
  section = config[NAME]
  return thresholds.curriculum_mask(section.threshold, warmup=bool(section.threshold_warmup))


def build(config, data, steps: base.Steps) -> base.Method:
  section = config[NAME]
  if not 0 <= section.threshold <= 1:
    raise UserError(f'{NAME}.threshold={section.threshold} is a probability; use 0 to 1.')
  return fixmatch.build_with_mask(config, data, steps, name=NAME, mask_fn=mask_fn(config))


METHOD = base.register(base.Definition(
    name=NAME, summary='FixMatch with per-class thresholds from curriculum pseudo-labelling',
    steps_per_epoch=functools.partial(fixmatch.steps_per_epoch, name=NAME), build=build,
    reported=fixmatch.reported, pictures=functools.partial(fixmatch.pictures, name=NAME)))
