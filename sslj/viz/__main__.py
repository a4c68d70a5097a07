r"""python -m sslj.viz --workdir=DIR: draws the run's pictures into DIR/pictures.

  python -m sslj.viz --workdir=runs/mt [--step=N] [--out=FOLDER] [--tsne_points=2000] [--thumbnails]

Same as `python launch.py --mode=viz --workdir=DIR`, with the t-SNE options.
"""

from absl import app, flags

_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory of a run made with launch.py.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step to draw (default: the latest).')
_OUT = flags.DEFINE_string('out', None, 'Folder for the pictures (default: DIR/pictures).')
_TSNE_POINTS = flags.DEFINE_integer('tsne_points', 2000, 'Test images in the t-SNE map.')
_THUMBNAILS = flags.DEFINE_bool('thumbnails', False, 'Draw image thumbnails over the t-SNE map.')


def main(argv):
  del argv
  from sslj import cli  # pylint: disable=g-import-not-at-top
  return cli.run(config=None, workdir=_WORKDIR.value, mode='viz', step=_STEP.value,
                 out=_OUT.value, tsne_points=_TSNE_POINTS.value, thumbnails=_THUMBNAILS.value)


if __name__ == '__main__':
  from sslj import cli  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=cli.parse_flags)
