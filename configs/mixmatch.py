r"""MixMatch (Berthelot et al. 2019).

Run:
  python launch.py --config=configs/mixmatch.py --workdir=runs/mixmatch

The default trains the small CNN on `digits` with 5 labels per class (50
labeled images, the other 1,297 training images unlabeled) for 3,000 steps
(FixMatch's digits budget) of 64 labeled + 64 unlabeled images, the same
128 images a step as configs/fixmatch.py draws; each unlabeled image gets
K = 2 weak views. The EMA model (`ema`, the one reported) is to be compared
with the supervised baseline on the same 50 labels
(configs/supervised.py:labels_per_class=5).

`batch_size` is the paper's B: B labeled and B unlabeled images a step, as
in the code. The recipe is the code's CIFAR-10 one for every preset: K = 2,
T = 0.5, MixUp alpha = 0.75, lambda_U = 75 ramped up linearly, Adam at a
constant lr 0.002 with decoupled weight decay 0.02 * lr on the kernels
(sslj/methods/mixmatch.py), EMA 0.999, flips (not for digits) and small
translations as the weak augmentation. The ramp-up spans 500 of the 3,000
steps on the CPU presets, a choice not tuned here (the code's 16,384 steps
are 1/64 of its run).

Presets (config string):
  configs/mixmatch.py:dataset=fashion_mnist,labels_per_class=10
    sized for a CPU: 3,000 steps of 32 labeled + 32 unlabeled images, the
    64 images a step of FixMatch's Fashion-MNIST preset.
  configs/mixmatch.py:dataset=cifar10,labels_per_class=25
    the code's CIFAR-10 setting: WRN-28-2 (`wrn28_2`), B = 64, 2^20 steps
    (train_kimg = 2^16), the ramp over 16,384 steps (warmup_kimg = 1024),
    lambda_U = 75 and alpha = 0.75 (its README and runs/*.sh). For 4,000
    labels use labels_per_class=400.

Results: docs/results.md; recipe and departures: docs/methods/mixmatch.md.
"""

from sslj import configlib


def get_config(arg=None):
  args = configlib.parse_arg(arg, configlib.WRN_BENCHMARK_MODELS, labels_per_class='5')
  config = configlib.base_config('mixmatch', args)
  config.num_steps = 3000
  config.batch_size = 64        # labeled images per step (B), and as many unlabeled
  config.log_every = 100
  config.eval_every = 500
  config.checkpoint_every = 500
  config.optimizer.update(name='adam', learning_rate=0.002, weight_decay=0.02,
                          schedule='constant')

  config.mixmatch = dict(
      num_augmentations=2,        # K weak views per unlabeled image
      temperature=0.5,            # sharpening T
      alpha=0.75,                 # MixUp's Beta(alpha, alpha)
      unlabeled_weight=75.0,      # lambda_U (the code's w_match)
      rampup_steps=500,           # linear ramp of lambda_U
      ema_decay=0.999,            # the reported model's parameter average
      interleave=True,            # one pass per interleaved batch of B, as the code
  )

  if args.dataset == 'fashion_mnist':
    config.num_steps = 3000
    config.batch_size = 32
    config.eval_batch_size = 1000
    config.eval_every = 500
    config.checkpoint_every = 1000

  if args.dataset == 'cifar10':
    config.batch_size = 64
    config.num_steps = 1 << 20
    config.mixmatch.rampup_steps = 16384
    config.eval_batch_size = 1000
    config.log_every = 1000
    config.eval_every = 10000
    config.checkpoint_every = 10000
  config.lock()
  return config
