r"""SoftMatch (Chen et al. 2023): a truncated-Gaussian weight on each pseudo-label.

Run:
  python launch.py --config=configs/softmatch.py --workdir=runs/softmatch

The default trains the small CNN on `digits` with 5 labels per class (50
labeled images, the other 1,297 training images unlabeled) for FixMatch's
digits budget: 3,000 steps of 16 labeled + 7 x 16 unlabeled images. It is
for comparing SoftMatch with FixMatch (configs/fixmatch.py) and with the
supervised baseline (configs/supervised.py:labels_per_class=5) at equal
budget; the EMA model (`ema`) is the one reported.

`batch_size` is the paper's B (labeled images per step); each step also
draws `softmatch.mu` * B unlabeled images. The paper's recipe (its CIFAR-10
settings and USB's configs) is the default: uniform alignment, the
Gaussian's EMA momentum 0.999 from mu_0 = 1/K and sigma_0^2 = 1, n_sigma 2,
lambda_max = lambda_u = 1, hard pseudo-labels, SGD Nesterov 0.9 at lr 0.03
with weight decay 5e-4 and FixMatch's cosine, EMA 0.999, RandAugment
(3 ops) + Cutout as TorchSSL and USB draw them.

Presets (config string):
  configs/softmatch.py:dataset=fashion_mnist,labels_per_class=10
    sized for a CPU, FixMatch's Fashion-MNIST budget: 3,000 steps of 8
    labeled + 7 x 8 unlabeled images.
  configs/softmatch.py:dataset=cifar10,labels_per_class=4
    the paper's CIFAR-10 setting (40 labels; 25 or 400 for its 250 and
    4,000): WRN-28-2 (`wrn28_2`), B = 64, mu = 7, 2^20 steps.

Results: docs/results.md; recipe and departures: docs/methods/softmatch.md.
"""

from sslj import configlib
from sslj.data import randaugment


def get_config(arg=None):
  args = configlib.parse_arg(arg, configlib.WRN_BENCHMARK_MODELS, labels_per_class='5')
  config = configlib.base_config('softmatch', args)
  # batch_size: the labeled images per step (the paper's B).
  configlib.fixmatch_budget(config, args, large=args.dataset == 'cifar10')

  config.softmatch = dict(
      mu=7,                       # unlabeled images per labeled image
      statistics_momentum=0.999,  # m: EMA of p_hat, mu and sigma^2
      uniform_alignment=True,     # weights from UA(p) (the pseudo-label stays argmax p)
      n_sigma=2.0,                # the Gaussian's variance is divided by n_sigma^2
      unlabeled_weight=1.0,       # lambda_u (lambda_max is 1)
      ema_decay=0.999,            # the reported model's parameter average
      # The strong view: RandAugment + Cutout (sslj.data.randaugment.strong_view_fields),
      # as TorchSSL's and USB's `RandAugment(3, 5)` draw it.
      **randaugment.strong_view_fields(**randaugment.TORCHSSL_USB_VIEW),
  )

  config.lock()
  return config
