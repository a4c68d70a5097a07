"""Pictures of a run: filters, centroids, augmentations, samples, t-SNE, curves.

  python -m sslj.viz --workdir=DIR [--step=N] [--out=FOLDER] [--tsne_points=2000] [--thumbnails]
  python launch.py --mode=viz --workdir=DIR [--step=N] [--out=FOLDER]

reads a finished or running run's directory (its `config.json`, the
checkpoint of `--step` or the latest, `metrics.jsonl`, `centroids.npz`) and
writes into `DIR/pictures/` (or `--out`) one PNG per picture that applies to
the run's method, and `index.html` showing them with captions that say what
each is and which checkpoint or file it comes from:

  curves.png            loss and top-1 against steps (a method that declares
                        `compare_models`, e.g. a student and its weight
                        average, gets both top-1 curves on the same axes)
  tsne.png              t-SNE of a test subsample from raw pixels and from the
                        learned representation, coloured by class
  confusion.png         the reported model on the whole test split
  filters.png           the reported network's first-layer convolution filters
  centroids.png         k-means patch centroids saved in DIR/centroids.npz,
  centroids_whitened.png  un-whitened, and as k-means found them
  augmentations.png     one training image and draws of the run's augmentation
  <method>_<name>.png   the method's own pictures (`Definition.pictures`)

A picture that does not apply (no checkpoint yet, no centroids, a method
without a reported network) is skipped with its reason in the log and on the
page; it never stops the others. Drawing uses matplotlib's Agg canvas and
Pillow: no display is needed.

A method's own pictures. A method's registration
(`sslj.methods.base.Definition`) may declare

  pictures(state, config, data, seed) -> dict[str, np.ndarray | tuple[np.ndarray, str]]

viz calls it with the restored training state (None before the first
checkpoint), the run's config, its `sslj.data.splits.SemiSupervisedData` and
the page's seed, and writes each returned uint8 image ([H, W] grey,
[H, W, 1|3|4]) as `<method>_<name>.png`, upscaled (nearest neighbour) to at
least 400 pixels wide. A value may be `(image, caption)` to caption it; a bad
value is skipped with its reason, the rest are kept; a hook that cannot draw
yet raises `base.NotApplicable` with the reason. GAN samples, FixMatch's weak
and strong views and Exemplar-CNN's surrogate classes are drawn there, with
`sslj.ops.image_grid.tile`.

Modules: `drawing` (the order of pictures and the command), `context` (the run
loaded once), `pictures` (image grids), `tsne`, `curves` (curves and the
confusion matrix), `page` (index.html).
"""



def draw(workdir, **kwargs):
  """`sslj.viz.drawing.draw`, imported on first call (it imports JAX)."""
  from sslj.viz import drawing as _draw  # pylint: disable=g-import-not-at-top
  return _draw.draw(workdir, **kwargs)


def run_command(workdir, **kwargs):
  """`sslj.viz.drawing.run_command`, imported on first call (it imports JAX)."""
  from sslj.viz import drawing as _draw  # pylint: disable=g-import-not-at-top
  return _draw.run_command(workdir, **kwargs)
