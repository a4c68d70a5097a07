r"""FixMatch (Sohn et al. 2020).

Run:
  python launch.py --config=configs/fixmatch.py --workdir=runs/fixmatch

The default trains the small CNN on `digits` with 5 labels per class (50
labeled images, the other 1,297 training images unlabeled) for 3,000 steps
of 16 labeled + 7 x 16 unlabeled images; the EMA model (`ema`, the one
reported) should end above the supervised baseline trained on the same 50
labels (configs/supervised.py:labels_per_class=5).

`batch_size` is the paper's B, the labeled images per step; each step also
draws `fixmatch.mu` * B unlabeled images. The paper's recipe is the default:
threshold 0.95, lambda 1, SGD Nesterov 0.9 at lr 0.03 with weight decay 5e-4
and the cosine cos(7 pi k / 16 K), EMA 0.999, RandAugment (2 ops at magnitudes
uniform over each op's range, as the paper's Table 12 reads) + Cutout of a
side uniform up to half the image as the strong augmentation, flips (not for
digits) and small translations (the `augment` section) as the weak one. The
paper's code draws the strong view otherwise (each op with probability 0.5 at
a level 1..10, a fixed half-side square): `--config.fixmatch.randaugment_op_probability=0.5
--config.fixmatch.randaugment_levels=10 --config.fixmatch.cutout_mode=fixed`.

Presets (config string):
  configs/fixmatch.py:dataset=fashion_mnist,labels_per_class=10
    sized for a CPU: 3,000 steps of 8 labeled + 7 x 8 unlabeled images
    (about 3 passes over the unlabeled pool), to be compared with the
    supervised baseline on the same labels. The paper's regime is far
    longer (2^20 steps of 64 + 448 images).
  configs/fixmatch.py:dataset=cifar10,labels_per_class=25
    the paper's WRN-28-2 (`wrn28_2`, 1,469,642 parameters), B = 64, mu = 7
    and 2^20 steps.
  configs/fixmatch.py:dataset=stl10 (with --config.data.fold=0..9)
    the same recipe on the 1,000 labels of an official fold, with the
    paper's WRN-37-2 (`wrn37_2`, 5,933,770 parameters; see
    sslj/models/wide_resnet.py for what that name means in its code).
  Either takes another network with `model=` (e.g. model=resnet18).

Results: docs/results.md; recipe and departures: docs/methods/fixmatch.md.
"""

from sslj import configlib
from sslj.data import randaugment


def get_config(arg=None):
  args = configlib.parse_arg(arg, configlib.WRN_BENCHMARK_MODELS, labels_per_class='5')
  config = configlib.base_config('fixmatch', args)
  # batch_size: the labeled images per step (the paper's B).
  configlib.fixmatch_budget(config, args, large=args.dataset in ('cifar10', 'stl10')
                            or args.dataset.startswith('image_folder'))

  config.fixmatch = dict(
      mu=7,                       # unlabeled images per labeled image
      threshold=0.95,             # keep pseudo-labels with max probability >= this
      unlabeled_weight=1.0,       # lambda_u
      ema_decay=0.999,            # the reported model's parameter average
      # The strong view: RandAugment + Cutout (sslj.data.randaugment.strong_view_fields),
      # drawn as the paper reads: both ops at uniform magnitudes, then Cutout
      # of a side uniform up to half the image. The reference code's draw
      # (p = 0.5 per op, levels 1..10, a fixed half-side square) was behind on
      # three seeds (sslj/methods/fixmatch.py).
      **randaugment.strong_view_fields(),
  )

  config.lock()
  return config
