"""t-SNE maps of images: raw pixels beside a trained representation.

Each point set is reduced to 50 dimensions by PCA when it has more (the usual
preprocessing for t-SNE: it removes noise and makes the neighbour search
cheap), then embedded in 2-D by scikit-learn's Barnes-Hut `TSNE`. A map's
class separation is summarised by its 5-NN agreement: the percentage of
points whose 5 nearest neighbours in the 2-D map vote for their own class
(leave-one-out), so "the features separate the classes better than pixels"
is a number, not only an impression.

References:
  van der Maaten & Hinton, "Visualizing data using t-SNE", JMLR 2008.
"""

from __future__ import annotations

from matplotlib import colormaps
from matplotlib.offsetbox import AnnotationBbox, OffsetImage
import numpy as np
import threadpoolctl

from sslj.viz import curves

PCA_DIMS = 50
PANEL_PX = 640       # each map is about this many pixels square
LEGEND_PX = 150      # room on the right for the class legend
THUMBNAIL_PX = 22    # side of a thumbnail drawn over the map
MAX_THUMBNAILS = 160


def subsample(n: int, limit: int, seed: int) -> np.ndarray:
  """Sorted indices of min(n, limit) items drawn without replacement."""
  if n <= limit:
    return np.arange(n)
  return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def embed(x: np.ndarray, seed: int) -> np.ndarray:
  """2-D t-SNE of the rows of x [n, d] (PCA to 50 dimensions first when d > 50)."""
  from sklearn.decomposition import PCA  # pylint: disable=g-import-not-at-top
  from sklearn.manifold import TSNE  # pylint: disable=g-import-not-at-top
  x = np.asarray(x, np.float32).reshape(len(x), -1)
  if len(x) < 5:
    raise ValueError(f't-SNE needs at least 5 points, got {len(x)}')
  if x.shape[1] > PCA_DIMS and len(x) > PCA_DIMS:
    x = PCA(PCA_DIMS, random_state=seed).fit_transform(x)
  perplexity = min(30.0, (len(x) - 1) / 3)
  # One thread: Barnes-Hut t-SNE of a few thousand points takes seconds, and
  # its OpenMP threads spin; on a busy shared machine they made it 5-20x slower.
  with threadpoolctl.threadpool_limits(1):
    return TSNE(2, perplexity=perplexity, init='pca', learning_rate='auto',
                random_state=seed).fit_transform(x)


def knn_agreement(points: np.ndarray, labels: np.ndarray, k: int = 5) -> float:
  """Percent of points whose k nearest other points' majority class is their own."""
  from sklearn.neighbors import NearestNeighbors  # pylint: disable=g-import-not-at-top
  labels = np.asarray(labels, np.int64)
  k = min(k, len(points) - 1)
  _, index = NearestNeighbors(n_neighbors=k + 1).fit(points).kneighbors(points)
  votes = labels[index[:, 1:]]  # column 0 is the point itself
  counts = np.zeros((len(points), labels.max() + 1), np.int64)
  np.add.at(counts, (np.repeat(np.arange(len(points)), k), votes.ravel()), 1)
  return 100.0 * float(np.mean(counts.argmax(axis=1) == labels))


def class_colors(num_classes: int) -> np.ndarray:
  """RGBA colours [num_classes, 4]: tab10 / tab20, else evenly spaced turbo."""
  if num_classes <= 10:
    return colormaps['tab10'](np.arange(num_classes))
  if num_classes <= 20:
    return colormaps['tab20'](np.arange(num_classes))
  return colormaps['turbo'](np.linspace(0, 1, num_classes))


def _spread_out(points: np.ndarray, min_dist: float, limit: int, seed: int) -> list[int]:
  """Greedy pick of points at least `min_dist` apart, in a random order."""
  chosen = []
  for i in np.random.default_rng(seed).permutation(len(points)):
    if not chosen or np.min(np.hypot(*(points[chosen] - points[i]).T)) >= min_dist:
      chosen.append(int(i))
      if len(chosen) == limit:
        break
  return chosen


def _thumbnails(ax, points, images, labels, colors, seed):
  span = np.ptp(points, axis=0).max()
  h = images.shape[1]
  grey = images.shape[-1] == 1
  for i in _spread_out(points, 0.045 * span, MAX_THUMBNAILS, seed):
    image = images[i][..., 0] if grey else images[i]
    box = OffsetImage(image, zoom=THUMBNAIL_PX / h, cmap='gray' if grey else None)
    ax.add_artist(AnnotationBbox(box, points[i], frameon=True, pad=0.05,
                                 bboxprops=dict(edgecolor=colors[labels[i]], lw=1.2)))


def draw_maps(panels: list[tuple[str, np.ndarray]], labels: np.ndarray, class_names, path: str,
              *, title: str, images: np.ndarray | None = None,
              seed: int = 0) -> tuple[int, int]:
  """Draws one scatter map per (panel title, points [n, 2]), coloured by class.

  `images` (uint8 [n, h, w, C]) draws thumbnails of well-separated points.
  Size: (len(panels) * PANEL_PX + LEGEND_PX) x (PANEL_PX + 60) pixels.
  """
  labels = np.asarray(labels, np.int64)
  colors = class_colors(len(class_names))
  size = (len(panels) * PANEL_PX + LEGEND_PX, PANEL_PX + 60)
  fig = curves.new_figure(size)
  width = size[0]
  for p, (panel_title, points) in enumerate(panels):
    left = (p * PANEL_PX + 20) / width
    ax = fig.add_axes((left, 0.04, (PANEL_PX - 40) / width, 0.84))
    for c, name in enumerate(class_names):
      mask = labels == c
      ax.scatter(points[mask, 0], points[mask, 1], s=6, color=colors[c], label=str(name),
                 linewidths=0)
    if images is not None:
      _thumbnails(ax, points, images, labels, colors, seed)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(panel_title, fontsize=10)
  handles, names = ax.get_legend_handles_labels()
  fig.legend(handles, names, loc='center left', fontsize=9, markerscale=3, frameon=False,
             bbox_to_anchor=((len(panels) * PANEL_PX) / width, 0.5))
  fig.suptitle(title, fontsize=11)
  return curves.save_figure(fig, path)
