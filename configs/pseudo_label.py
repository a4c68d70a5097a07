r"""Pseudo-Label (Lee 2013).

Run:
  python launch.py --config=configs/pseudo_label.py --workdir=runs/pseudo_label

The default trains the small CNN on `digits` with 5 labels per class for
3,000 steps of 16 labeled + 7 x 16 unlabeled images; it should end above the
supervised baseline trained on the same 50 labels
(configs/supervised.py:labels_per_class=5).

The unlabeled images' targets are the network's own most probable classes
(same forward pass, gradient stopped), weighted by alpha(t): 0 until T1,
rising linearly to alpha_f at T2, alpha_f after. The paper used T1 = 100 and
T2 = 600 epochs and alpha_f = 3 (`pseudo_label.ramp_unit='epochs'`,
`t1=100`, `t2=600`); the CPU default counts steps. `threshold` > 0 keeps only
targets predicted with at least that probability.

Presets (config string):
  configs/pseudo_label.py:dataset=fashion_mnist,labels_per_class=10
    4,000 steps of 16 labeled + 7 x 16 unlabeled images, alpha ramped from
    step 250 to 1,500 (the paper's T1:T2 of 1:6, full weight for the rest),
    to be compared with the supervised baseline on the same labels.
  configs/pseudo_label.py:dataset=cifar10 / dataset=stl10
    train the FixMatch code's networks, WRN-28-2 (`wrn28_2`) and WRN-37-2
    (`wrn37_2`), with the default recipe above; `model=` picks another.

Results: docs/results.md; recipe and departures: docs/methods/pseudo_label.md.
"""

from sslj import configlib


def get_config(arg=None):
  args = configlib.parse_arg(arg, configlib.WRN_BENCHMARK_MODELS, labels_per_class='5')
  config = configlib.base_config('pseudo_label', args)
  config.num_steps = 3000
  config.batch_size = 16        # labeled images per step
  config.log_every = 100
  config.eval_every = 500
  config.checkpoint_every = 500

  config.pseudo_label = dict(
      mu=7,                 # unlabeled images per labeled image
      ramp_unit='steps',    # 'steps' or 'epochs' (one pass over the unlabeled pool)
      t1=500.0,             # alpha is 0 until t1
      t2=2000.0,            # ... rises linearly to final_weight at t2
      final_weight=3.0,     # alpha_f
      threshold=0.0,        # keep targets with max probability >= this (0 = all)
      # BatchNorm: 'separate' = labeled, then unlabeled with its running-
      # statistics update dropped (USB's); 'joint' = one pass of all images.
      bn_passes='separate',
  )

  if args.dataset == 'fashion_mnist':
    config.num_steps = 4000
    config.batch_size = 16
    config.eval_batch_size = 1000
    config.checkpoint_every = 1000
    # Lee's T1:T2 of 1:6, with alpha at full weight while the rate is high
    # (1,000 to 3,000 before; the A/B table in docs/results.md).
    config.pseudo_label.update(t1=250.0, t2=1500.0)
  config.lock()
  return config
