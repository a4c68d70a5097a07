r"""FreeMatch (Wang et al. 2023): self-adaptive thresholds and a fairness loss.

Run:
  python launch.py --config=configs/freematch.py --workdir=runs/freematch

The default trains the small CNN on `digits` with 5 labels per class (50
labeled images, the other 1,297 training images unlabeled) for FixMatch's
digits budget: 3,000 steps of 16 labeled + 7 x 16 unlabeled images. It is
for comparing FreeMatch with FixMatch (configs/fixmatch.py) and with the
supervised baseline (configs/supervised.py:labels_per_class=5) at equal
budget; the EMA model (`ema`) is the one reported.

`batch_size` is the paper's B (labeled images per step); each step also
draws `freematch.mu` * B unlabeled images. The paper's recipe is the
default: the thresholds' EMA momentum 0.999 from tau_0 = 1/K, w_u = 1, the
fairness loss at w_f = 0.01 (TorchSSL's CIFAR-10 configs; USB's use 0.001),
hard pseudo-labels, SGD Nesterov 0.9 at lr 0.03 with weight decay 5e-4 and
FixMatch's cosine, EMA 0.999, RandAugment (3 ops) + Cutout as TorchSSL and
USB draw them.

Presets (config string):
  configs/freematch.py:dataset=fashion_mnist,labels_per_class=10
    sized for a CPU, FixMatch's Fashion-MNIST budget: 3,000 steps of 8
    labeled + 7 x 8 unlabeled images.
  configs/freematch.py:dataset=cifar10,labels_per_class=4
    the paper's CIFAR-10 setting (40 labels; 25 or 400 for its 250 and
    4,000; 1 for its 10): WRN-28-2 (`wrn28_2`), B = 64, mu = 7, 2^20 steps.

Results: docs/results.md; recipe and departures: docs/methods/freematch.md.
"""

from sslj import configlib
from sslj.data import randaugment


def get_config(arg=None):
  args = configlib.parse_arg(arg, configlib.WRN_BENCHMARK_MODELS, labels_per_class='5')
  config = configlib.base_config('freematch', args)
  # batch_size: the labeled images per step (the paper's B).
  configlib.fixmatch_budget(config, args, large=args.dataset == 'cifar10')

  config.freematch = dict(
      mu=7,                       # unlabeled images per labeled image
      statistics_momentum=0.999,  # lambda: EMA of tau, p~ and h~
      unlabeled_weight=1.0,       # w_u
      fairness_weight=0.01,       # w_f
      ema_decay=0.999,            # the reported model's parameter average
      # The strong view: RandAugment + Cutout (sslj.data.randaugment.strong_view_fields),
      # as TorchSSL's and USB's `RandAugment(3, 5)` draw it.
      **randaugment.strong_view_fields(**randaugment.TORCHSSL_USB_VIEW),
  )

  config.lock()
  return config
