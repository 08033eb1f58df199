r"""Compares trained detectors: mAP@0.5, test time per image, speed-up.

  python -m experiments.detection_table --workdirs=runs/det_rcnn,\
runs/det_fast_rcnn,runs/det_faster_rcnn [--picture=runs/detections.png]

Prints a markdown table of each run's final test record (written by
`python -m experiments.train --config=configs/detection.py:KIND`: mAP@0.5 on
the test canvases, proposal recall) with the time per image measured again
side by side in this process (`--timing_images`), beside the lecture's table
(VOC 2007: 50 s / 2 s / 0.2 s per image, 1x / 25x / 250x).
With --picture, draws detections of each run on the first test canvases;
with --compare_nms_candidates=0,256, times the detection NMS of the first
run both ways side by side (`inference.postprocess`).
"""
from absl import app
from absl import flags

from cnn.errors import ConfigError
from experiments import common

_WORKDIRS = flags.DEFINE_list('workdirs', None, 'Detection run folders.')
_PICTURE = flags.DEFINE_string('picture', None, 'Write a PNG of detections.')
_TIMING = flags.DEFINE_integer(
    'timing_images', 100, 'Measure the times again, the detectors taking '
    'turns on this many test canvases (0: the times recorded at the end of '
    'each training run).')
_IMAGES = flags.DEFINE_integer('images', 4, 'Test canvases in the picture.')
_MIN_SCORE = flags.DEFINE_float('min_score', 0.3, 'Draw detections scoring '
                                'at least this.')
_NMS = flags.DEFINE_list(
    'compare_nms_candidates', None, 'Also time the detection NMS of the '
    'first run with each of these inference.nms_candidates (e.g. 0,256), '
    'side by side on the same network outputs of --timing_images test '
    'canvases, and check that their detections are equal.')
flags.mark_flags_as_required(['workdirs'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from cnn.tools import detection_report  # pylint: disable=g-import-not-at-top

  def run():
    try:  # checked before any run is loaded
      candidates = [int(c) for c in _NMS.value or []]
    except ValueError:
      raise ConfigError('--compare_nms_candidates takes whole numbers (e.g. '
                        f'0,256), not {",".join(_NMS.value)}') from None
    print(detection_report.comparison_table(_WORKDIRS.value,
                                                _TIMING.value))
    if candidates:
      print(detection_report.compare_nms(_WORKDIRS.value[0], candidates,
                                         _TIMING.value or 100))
    if _PICTURE.value:
      detection_report.draw_detections(_WORKDIRS.value, _PICTURE.value,
                                       _IMAGES.value, _MIN_SCORE.value)
      print(f'picture: {_PICTURE.value}')
  common.run(run)


if __name__ == '__main__':
  common.main(main)
