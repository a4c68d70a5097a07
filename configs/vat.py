r"""VAT, virtual adversarial training (Miyato et al. 2018).

Run:
  python launch.py --config=configs/vat.py --workdir=runs/vat

The default trains the small CNN on `digits` with 5 labels per class (50
labeled images, the other 1,297 training images unlabeled) for 3,000 steps
(FixMatch's digits budget) of 16 labeled + 4 x 16 unlabeled images, the
reference code's 1:4 ratio (32 + 128). Each unlabeled image goes through the
network three times: the clean pass (the target), the power iteration's
perturbed pass (forward and backward with respect to the perturbation) and
the adversarial pass. It is for checking the method end to end on a CPU
against the supervised baseline on the same labels
(configs/supervised.py:labels_per_class=5).

`batch_size` is the labeled images per step; `vat.mu` unlabeled images per
labeled one. epsilon is the L2 norm of each image's perturbation over all
its pixels, in the normalised units the network sees (per-channel mean and
std), so it grows with the image: the digits default 1.0 is about 0.125 of
a standard deviation per pixel of the 8x8 images, as USB's 6.0 is about
0.11 per value of a 32x32x3 CIFAR-10 image. It was picked from a short
sweep on digits (docs/methods/vat.md).

Presets (config string):
  configs/vat.py:dataset=fashion_mnist,labels_per_class=10
    FixMatch's Fashion-MNIST budget: 3,000 steps of 8 labeled + 7 x 8
    unlabeled images; epsilon 3.0 (about 0.11 per pixel of 28x28).
  configs/vat.py:dataset=cifar10,labels_per_class=400
    USB's VAT on WRN-28-2 (`wrn28_2`), 4,000 labels: 2^20 steps of 64
    labeled + 64 unlabeled images, epsilon 6.0, xi 1e-6, one power
    iteration, weight 1 ramped up linearly over the first 40% of the run,
    entropy minimisation weight 0.06, SGD (Nesterov 0.9, lr 0.03, weight
    decay 5e-4 on the kernels) with the cosine cos(7 pi k / 16 K). The paper's own
    CIFAR-10 setting (ConvLarge, Adam) is 32 labeled + 128 unlabeled,
    epsilon 8.0 with flips and translations (vat_tf's README), entropy
    weight 1 for VAT + EntMin and no warm-up:
    --config.batch_size=32 --config.vat.mu=4 --config.vat.epsilon=8.0
    --config.vat.entropy_weight=1.0 --config.vat.warmup_fraction=0.0.

Results: docs/results.md; recipe and departures: docs/methods/vat.md.
"""

from sslj import configlib


def get_config(arg=None):
  args = configlib.parse_arg(arg, configlib.WRN_BENCHMARK_MODELS, labels_per_class='5')
  config = configlib.base_config('vat', args)
  # USB's weight decay, which skips BatchNorm parameters and biases (the authors'
  # Adam has none): level with decay on every parameter on Fashion-MNIST.
  config.optimizer.decay = 'kernels'
  config.num_steps = 3000
  config.batch_size = 16          # labeled images per step
  config.log_every = 100
  config.eval_every = 500
  config.checkpoint_every = 500

  config.vat = dict(
      mu=4,                       # unlabeled images per labeled image
      epsilon=1.0,                # L2 norm of each image's adversarial perturbation
      xi=1e-6,                    # finite-difference step of the power iteration
      num_power_iterations=1,
      unlabeled_weight=1.0,       # weight of KL(p(x) || p(x + r_adv))
      entropy_weight=0.0,         # > 0: "VAT + EntMin", entropy of the clean predictions
      warmup_fraction=0.0,        # linear ramp of the weight over this fraction of the run
  )

  if args.dataset == 'fashion_mnist':
    config.batch_size = 8
    config.vat.mu = 7
    config.vat.epsilon = 3.0
    config.eval_batch_size = 1000
    config.eval_every = 500
    config.checkpoint_every = 1000

  if args.dataset == 'cifar10':
    config.num_steps = 1 << 20
    config.batch_size = 64
    config.vat.mu = 1
    config.vat.epsilon = 6.0
    config.vat.entropy_weight = 0.06
    config.vat.warmup_fraction = 0.4
    config.optimizer.update(**configlib.USB_SGD)
    config.eval_batch_size = 1000
    config.log_every = 1000
    config.eval_every = 10000
    config.checkpoint_every = 10000
  config.lock()
  return config
