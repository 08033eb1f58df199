r"""Pictures of what a trained classifier learned (Zeiler & Fergus 2014).

  python -m experiments.visualize --workdir=runs/r20 \
    [--checkpoint=best|latest|STEP] [--split=test] [--out=RUN/visualize] \
    [--units=4] [--images=2000] [--occlusion=4]

Writes into --out (default: WORKDIR/visualize):
  filters.png       the first conv layer's filters.
  top9_<stage>.png  per stage, for --units channels (the most active on
                    average), the 9 of the first --images held-out images
                    that excite it most, cropped to its receptive field.
  occlusion.png     for --occlusion held-out images, the true class's
                    probability as a grey square slides over the image.
Classification runs only; see cnn/tools/visualize.py.
"""
import sys

from absl import app
from absl import flags
from absl import logging

from experiments import common

_WORKDIR = flags.DEFINE_string('workdir', None, 'A classification run folder.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', 'latest',
                                  'latest, best or a step number.')
_SPLIT = flags.DEFINE_string('split', 'test', 'Held-out split: test or val.')
_OUT = flags.DEFINE_string('out', None,
                           'Output folder (default: WORKDIR/visualize).')
_UNITS = flags.DEFINE_integer('units', 4, 'Channels shown per stage.')
_IMAGES = flags.DEFINE_integer('images', 2000, 'Held-out images searched for '
                               'the top 9 of each channel.')
_OCCLUSION = flags.DEFINE_integer('occlusion', 4, 'Images with an occlusion '
                                  'map (0: none).')
_DPI = flags.DEFINE_integer('dpi', 100, 'Resolution of the PNGs.')
flags.mark_flags_as_required(['workdir'])


def _visualize():
  from cnn.tools import visualize  # pylint: disable=g-import-not-at-top
  if '--verbosity' not in ' '.join(sys.argv):
    # Orbax warns that a read-only checkpoint folder is read-only.
    logging.set_verbosity(logging.ERROR)
  for path in visualize.write_all(
      _WORKDIR.value, _CHECKPOINT.value, split=_SPLIT.value, out=_OUT.value,
      units=_UNITS.value, images=_IMAGES.value, occlusion=_OCCLUSION.value,
      dpi=_DPI.value):
    print(f'wrote {path}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  common.run(_visualize)


if __name__ == '__main__':
  common.main(main)
