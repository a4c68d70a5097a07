"""Using what was trained: evaluate, probe, predict with and export any run.

  python launch.py --mode=eval    --workdir=DIR [--step=N] [--split=test|train|labeled] [--dataset=NAME]
  python launch.py --mode=probe   --workdir=DIR [same flags as eval]
  python launch.py --mode=predict --workdir=DIR --images=FOLDER_OR_LIST [--step=N] [--out=CSV]
  python launch.py --mode=export  --workdir=DIR [--step=N] [--out=FOLDER]

and in Python `model = sslj.load(FOLDER)`, then `model(images_uint8)`.

Modules: `restore` (a run back in memory), `reported` (the network a method
reports, per-method hooks), `evaluate` (eval and probe -> <mode>_<split>_step<N>.json),
`predict` (image files -> predictions.csv), `export` (export and load),
`commands` (what launch.py runs). Only `commands` and `restore` read
datasets; `export.load` needs neither TensorFlow Datasets nor the run.
"""
