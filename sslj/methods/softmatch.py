"""SoftMatch: FixMatch with a truncated-Gaussian weight on every pseudo-label.

FixMatch's step (sslj/methods/fixmatch.py) with the 0/1 threshold mask
replaced by a soft weight (`sslj.ops.thresholds.truncated_gaussian_mask`):

  q_b      = UA(p_b) = SumNorm(p_b * (1/K) / p_hat)      (uniform alignment)
  mu_t     = m mu_{t-1} + (1 - m) mean_b max q_b
  sigma2_t = m sigma2_{t-1} + (1 - m) var_b max q_b      (unbiased)
  w_b      = exp(-(min(max q_b - mu_t, 0))^2 / (2 sigma2_t / n_sigma^2))
  loss     = CE(labeled) + lambda mean_b w_b CE(strong_b, argmax p_b)

p_b are the weak views' probabilities, p_hat their EMA (momentum m =
`statistics_momentum`), so the weight is 1 for a prediction at least as
confident as the running mean and falls off as a Gaussian below it. The
pseudo-label is the argmax of the *unaligned* p_b: alignment only decides
the weight. p_hat, mu and sigma2 are in the train state (`mask_state`),
checkpointed with it. The step logs `mask_rate` (the mean weight), mu and
sigma.

What the paper leaves out, taken from USB (semilearn/algorithms/softmatch,
hooks/dist_align.py):
* Order: p_hat takes in the batch first (the first batch sets it), then the
  batch is aligned, then mu and sigma2 take in the aligned max
  probabilities, then the weights use the updated mu and sigma2.
* The statistics are those of the aligned probabilities; the target is the
  uniform 1/K (`dist_uniform=True`), with USB's 1e-6 added to the target
  and to p_hat. Start: mu_0 = 1/K, sigma2_0 = 1.
* The Gaussian is clipped at the mean (weight 1 at or above it) and its
  variance divided by n_sigma^2 = 4 (USB's `n_sigma=2`; TorchSSL divides by
  4 too), so its width is sigma_t / 2; the paper's equation has sigma_t^2
  alone, which is `n_sigma=1`. lambda_max = 1.
* Statistics from the weak views of the network being trained (not of the
  EMA), the same forward pass as the loss; hard pseudo-labels; one
  (global) mu and sigma2, not USB's optional `per_class`.

TorchSSL's models/softmatch differs from USB: it aligns to the EMA of the
*labeled* predictions, without the 1e-6, and takes mu and sigma2 from the
unaligned probabilities. USB's form is followed (USB's is the released
SoftMatch code).

The strong view is its reference codes' own, TorchSSL's and USB's
`RandAugment(3, 5)`: 3 ops where FixMatch applies 2, geometric ops filling
black (configs/softmatch.py). Measured on FreeMatch, where FixMatch's view was
not ahead (sslj/methods/freematch.py).

Weight decay, the EMA's warm-up and its averaged BatchNorm statistics are
FixMatch's, with their departures and measurements in its docstring.

References: Chen et al. 2023, "SoftMatch: addressing the quantity-quality
trade-off in semi-supervised learning", ICLR (Sec. 3.2-3.3); reference code
USB (github.com/microsoft/Semi-supervised-learning,
semilearn/algorithms/softmatch/softmatch.py, utils.py,
semilearn/algorithms/hooks/dist_align.py) and github.com/TorchSSL/TorchSSL
(models/softmatch).
"""

from __future__ import annotations

import functools

from sslj.errors import UserError
from sslj.methods import base, fixmatch
from sslj.ops import thresholds

NAME = 'softmatch'


def build(config, data, steps: base.Steps) -> base.Method:
  section = config[NAME]
  if section.n_sigma <= 0:
    raise UserError(f'{NAME}.n_sigma={section.n_sigma} divides the Gaussian\'s variance; '
                    'use a number above 0 (2 as the reference code).')
  if fixmatch.batch_split(config, NAME)[1] < 2:
    raise UserError(f'{NAME} estimates the variance of each unlabeled batch, which needs '
                    f'at least 2 images; raise batch_size or {NAME}.mu.')
  mask_fn = thresholds.truncated_gaussian_mask(
      section.statistics_momentum, n_sigma=float(section.n_sigma),
      align=bool(section.uniform_alignment))
  return fixmatch.build_with_mask(config, data, steps, name=NAME, mask_fn=mask_fn)


METHOD = base.register(base.Definition(
    name=NAME, summary='FixMatch with a truncated-Gaussian weight on each pseudo-label',
    steps_per_epoch=functools.partial(fixmatch.steps_per_epoch, name=NAME), build=build,
    reported=fixmatch.reported, pictures=functools.partial(fixmatch.pictures, name=NAME)))
