"""COCO-style detection summary: mAP@0.5, mAP@0.75 and mAP@[.5:.95].

The box numbers of pycocotools' `COCOeval(..., 'bbox').summarize()` for area
'all' and maxDets=100 (its stats[0], stats[1] and stats[2]), built on
`metrics.evaluate` with matching='coco' and interpolation='101point'. What
this reproduces of pycocotools (cocoeval.py, version 2.0):

  * IoU thresholds are `np.linspace(.5, 0.95, 10)` exactly, not decimal
    literals: its 9th value is 0.8999999999999999, so an IoU of exactly 0.9
    still matches there. A TP needs IoU >= threshold, the threshold capped at
    1 - 1e-10 (which only matters at a threshold of 1).
  * The cap on detections: pycocotools keeps the top maxDets by score of each
    image AND CLASS (its `_dts` are keyed by (image, category); computeIoU and
    evaluateImg each cut the score-sorted list there), before matching, with a
    stable sort, so that score ties at the cut keep the earlier detection.
    cap='class' (the default) does this. cap='image' keeps the top maxDets of
    each image over all classes instead: the COCO challenge's rule for a
    results file (and detectron2's detections_per_image), which pycocotools
    itself leaves to the caller.
  * Ranking: detections of a class are ranked across images by decreasing
    score with a stable sort (ties keep image order, then the order within the
    image), precision is read at the 101 recall thresholds of
    `np.linspace(0, 1, 101)` (see `metrics.average_precision`).
  * Classes without ground truth have precision -1 in pycocotools and are
    left out of its means (`np.mean(s[s > -1])`); here their AP is nan and
    they are left out likewise. mAP@[.5:.95] is then the mean over thresholds
    and classes with ground truth of the per-class AP, the same numbers that
    pycocotools averages in another order. Its precision divides by
    tp + fp + np.spacing(1) (1 / 1 gives 1 - 2e-16): agreement is ~1e-16,
    not bitwise.
  * Area range 'all' only: pycocotools' [0, 1e10] px^2 ignores no box of an
    image below 100,000 px on a side.
  * Crowd regions are not modelled (coco128 and the synthetic sets have none):
    pycocotools' crowd box is an ignored box whose IoU divides by the
    detection's area alone and which absorbs any number of detections. A
    'difficult' ground-truth box here is an ignored box that takes one
    detection, as pycocotools' boxes outside the area range are.

Ground-truth and detection ids play no part: pycocotools' image order is its
sorted image ids, here the order of the lists.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cnn.errors import ConfigError
from cnn.tasks.detection import metrics

# pycocotools' Params.setDetParams, to the bit.
IOU_THRESHOLDS = np.linspace(.5, 0.95, int(np.round((0.95 - .5) / .05)) + 1,
                             endpoint=True)
CAPS = ('class', 'image')


def _check_num_classes(num_classes) -> None:
  if isinstance(num_classes, bool) or not isinstance(num_classes,
                                                      (int, np.integer)):
    raise ConfigError(f'num_classes={num_classes!r}; give a positive int')
  if num_classes < 1:
    raise ConfigError(f'num_classes={num_classes}; give a positive int')


def _check_cap(max_detections, cap: str) -> None:
  if cap not in CAPS:
    raise ConfigError(f'cap={cap!r} is unknown; use one of {", ".join(CAPS)}')
  if max_detections is None:
    return
  if (isinstance(max_detections, bool) or
      not isinstance(max_detections, (int, np.integer)) or
      max_detections < 1):
    raise ConfigError(f'max_detections={max_detections!r}; give a positive '
                      f'int or None (no cap)')


def _keep(scores: np.ndarray, classes: np.ndarray, max_detections: int,
          cap: str) -> np.ndarray:
  """Indices (in input order) of one image's detections that survive."""
  keep = np.zeros(len(scores), bool)
  groups = [np.arange(len(scores))] if cap == 'image' else [
      np.flatnonzero(classes == k) for k in np.unique(classes)]
  for idx in groups:
    # Stable: of tied scores at the cut the earlier detection stays, as
    # pycocotools' mergesort keeps it.
    order = idx[np.argsort(-scores[idx], kind='stable')]
    keep[order[:max_detections]] = True
  return np.flatnonzero(keep)


def cap_detections(detections: Sequence, num_classes: int,
                   max_detections: int | None = 100,
                   cap: str = 'class') -> list[dict]:
  """The detections that a maxDets cap leaves for evaluation.

  Args:
    detections: one entry per image, a dict (or `metrics.ImageDetections`)
      with 'boxes' (n, 4) (x, y, w, h), 'scores' (n,) and 'classes' (n,).
    num_classes: class ids lie in [0, num_classes).
    max_detections: the most detections kept per image and class
      (cap='class', pycocotools) or per image (cap='image'); None keeps all.
    cap: 'class' or 'image' (see the module docstring).

  Returns:
    One dict per image with float64 'boxes', 'scores' and int64 'classes',
    the kept detections in their input order.

  Raises:
    ConfigError: a bad num_classes, max_detections or cap.
    DataError: detections of the wrong shape or class range.
  """
  _check_num_classes(num_classes)
  _check_cap(max_detections, cap)
  empty_gt = [{'boxes': np.zeros((0, 4)), 'classes': np.zeros(0, int)}
              for _ in detections] if isinstance(detections, Sequence) else []
  # The checks and conversions of metrics.evaluate, shared rather than copied.
  # pylint: disable-next=protected-access
  dets, _ = metrics._parse(detections, empty_gt, num_classes)
  out = []
  for boxes, scores, classes in dets:
    keep = (np.arange(len(scores)) if max_detections is None
            else _keep(scores, classes, max_detections, cap))
    out.append({'boxes': boxes[keep], 'scores': scores[keep],
                'classes': classes[keep]})
  return out


def evaluate_coco(detections: Sequence, ground_truth: Sequence,
                  num_classes: int, max_detections: int | None = 100,
                  iou_thresholds=IOU_THRESHOLDS, cap: str = 'class') -> dict:
  """pycocotools' bbox summary (area 'all') of detections against ground truth.

  Args:
    detections: one entry per image, a dict (or `metrics.ImageDetections`)
      with 'boxes' (n, 4) (x, y, w, h) in pixels, 'scores' (n,) and
      'classes' (n,) ints.
    ground_truth: one entry per image, in the same order, a dict (or
      `metrics.ImageGroundTruth`) with 'boxes' (m, 4), 'classes' (m,) and
      optionally 'difficult' (m,) bool (ignored boxes; see the module
      docstring on crowds).
    num_classes: class ids lie in [0, num_classes).
    max_detections: pycocotools' maxDets (100 in its summary); None for no
      cap.
    iou_thresholds: the IoU thresholds averaged over; pycocotools' ten by
      default.
    cap: 'class' (pycocotools) or 'image' (see the module docstring).

  Returns:
    A dict with
      'map': mAP@[.5:.95], the mean over thresholds and over classes with
        ground truth of the AP (pycocotools' stats[0]); nan without any
        ground truth;
      'map50', 'map75': mAP at IoU 0.5 and 0.75 (stats[1], stats[2]); nan
        where that threshold is not among iou_thresholds (compared exactly,
        as pycocotools does);
      'map_per_threshold': (T,) mAP at each threshold;
      'ap': (T, num_classes) AP per threshold and class, nan for a class
        without (non-difficult) ground truth;
      'ap_per_class': (num_classes,) the per-class mean over thresholds;
      'num_gt': (num_classes,) int, non-difficult ground-truth boxes;
      'num_det': (num_classes,) int, detections left after the cap;
      'iou_thresholds', 'max_detections', 'cap': the settings used.

  Raises:
    ConfigError: a bad setting or a threshold outside [0, 1].
    DataError: inputs of the wrong length, shape or class range.
  """
  thresholds = np.asarray(iou_thresholds, np.float64).reshape(-1)
  if thresholds.size == 0:
    raise ConfigError('iou_thresholds is empty; give at least one threshold')
  kept = cap_detections(detections, num_classes, max_detections, cap)
  results = [metrics.evaluate(kept, ground_truth, num_classes,
                              iou_threshold=float(t),
                              interpolation='101point', matching='coco')
             for t in thresholds]
  ap = np.stack([r['ap'] for r in results])
  valid = ~np.isnan(ap[0])  # Which classes have ground truth: any threshold.
  per_threshold = (ap[:, valid].mean(axis=1) if valid.any()
                   else np.full(len(thresholds), np.nan))

  def at(t):
    i = np.flatnonzero(thresholds == t)
    return float(per_threshold[i[0]]) if i.size else float('nan')

  return {
      'map': float(ap[:, valid].mean()) if valid.any() else float('nan'),
      'map50': at(0.5),
      'map75': at(0.75),
      'map_per_threshold': per_threshold,
      'ap': ap,
      'ap_per_class': ap.mean(axis=0),  # nan where the class has no gt.
      'num_gt': results[0]['num_gt'],
      'num_det': results[0]['num_det'],
      'iou_thresholds': thresholds,
      'max_detections': max_detections,
      'cap': cap,
  }
