r"""UDA, unsupervised data augmentation (Xie et al. 2020).

Run:
  python launch.py --config=configs/uda.py --workdir=runs/uda

The default trains the small CNN on `digits` with 5 labels per class (50
labeled images, the other 1,297 training images unlabeled) for 3,000 steps
of 16 labeled + 7 x 16 unlabeled images, FixMatch's digits budget and batch;
the EMA model (`ema`, the one reported) is to be compared with the
supervised baseline on the same 50 labels (configs/supervised.py:labels_per_class=5)
and with configs/fixmatch.py, which differs by its hard, 0.95-confident
targets.

`batch_size` is the labeled images per step; each step also draws `uda.mu`
* batch_size unlabeled images. The targets are the weak view's softmax at
temperature 0.4, kept where the unsharpened confidence reaches 0.8 (the
paper's CIFAR-10 values), lambda = 1; SGD Nesterov 0.9 at lr 0.03 with weight
decay 5e-4 and the code's lr * cos(7 pi t / 16); RandAugment (2 ops, random
magnitudes) + Cutout as the strong view; no training signal annealing
(`uda.tsa='none'`; 'linear', 'log' or 'exp' turn it on).

Presets (config string):
  configs/uda.py:dataset=fashion_mnist,labels_per_class=10
    sized for a CPU: 3,000 steps of 8 labeled + 7 x 8 unlabeled images,
    FixMatch's Fashion-MNIST preset.
  configs/uda.py:dataset=cifar10,labels_per_class=400
    the code's CIFAR-10 run (4,000 labels, image/scripts/run_cifar10_gpu.sh):
    WRN-28-2 (`wrn28_2`), 64 labeled + 5 x 64 unlabeled images for 400,000
    steps, EMA 0.9999, T = 0.4, beta = 0.8. The code's 32-core TPU script
    uses 30 x 32 unlabeled images and TSA: --config.uda.mu=30
    --config.batch_size=32 --config.uda.tsa=linear.

Results: docs/results.md; recipe and departures: docs/methods/uda.md.
"""

from sslj import configlib
from sslj.data import randaugment


def get_config(arg=None):
  args = configlib.parse_arg(arg, configlib.WRN_BENCHMARK_MODELS, labels_per_class='5')
  config = configlib.base_config('uda', args)
  config.num_steps = 3000
  config.batch_size = 16        # labeled images per step
  config.log_every = 100
  config.eval_every = 500
  config.checkpoint_every = 500
  config.optimizer.update(learning_rate=0.03, momentum=0.9, nesterov=True,
                          weight_decay=5e-4, schedule='truncated_cosine')

  config.uda = dict(
      mu=7,                       # unlabeled images per labeled image
      temperature=0.4,            # the target is softmax(weak logits / T)
      threshold=0.8,              # keep images whose weak max probability is >= this
      unlabeled_weight=1.0,       # lambda
      tsa='none',                 # training signal annealing: none, linear, log, exp
      ema_decay=0.999,            # the reported model's average
      # The strong view: RandAugment + Cutout (sslj.data.randaugment.strong_view_fields).
      **randaugment.strong_view_fields(),
  )

  if args.dataset == 'fashion_mnist':
    config.num_steps = 3000
    config.batch_size = 8
    config.eval_batch_size = 1000
    config.eval_every = 500
    config.checkpoint_every = 1000

  if args.dataset == 'cifar10':
    config.batch_size = 64
    config.uda.mu = 5
    config.num_steps = 400000
    config.uda.ema_decay = 0.9999
    config.eval_batch_size = 1000
    config.log_every = 1000
    config.eval_every = 10000
    config.checkpoint_every = 10000
  config.lock()
  return config
