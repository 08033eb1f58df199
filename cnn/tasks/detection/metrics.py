"""Object-detection evaluation: per-class average precision and mAP.

Pure numpy. Boxes are (x, y, w, h) in pixels, as in `cnn.ops.boxes`, and the
IoU is the continuous one of `cnn.ops.boxes.pairwise_iou` (no "+1 pixel" of
the Pascal VOC devkit).

Two matching rules decide which detections are true positives:
  * 'voc', the Pascal VOC devkit (VOCevaldet.m): a detection looks only at the
    ground-truth box of its class with the largest IoU in its image. Above the
    threshold it is a TP if that box is still free (the box is then taken), a
    FP if it was taken (a duplicate), and ignored if that box is 'difficult'.
  * 'coco', pycocotools (COCOeval.evaluateImg): a detection takes the free box
    with the largest IoU among those with IoU >= threshold, so a duplicate of
    one object can still be a TP for a neighbouring object. Free non-difficult
    boxes are preferred to difficult ones (COCO's "ignore" boxes); a detection
    matched to a difficult box is ignored.

Detections of a class are ranked across all images by decreasing score with a
stable sort (ties keep image order, then the order within the image, as in
both reference implementations), giving a precision/recall curve, which one
of three interpolations turns into AP:
  * 'all' (VOC 2010 and later): the area under the monotone-decreasing
    precision envelope, summed at every recall change.
  * '11point' (VOC 2007): the mean over recall thresholds 0, 0.1, ..., 1 of the
    largest precision at recall >= threshold.
  * '101point' (COCO): the precision envelope read at np.linspace(0, 1, 101)
    with np.searchsorted(recall, thresholds, side='left'), 0 past the last
    recall reached. With matching='coco' this reproduces pycocotools' AP at
    one IoU threshold, one area range and no cap on detections per image.

Difficult boxes never count as positives: they neither raise recall when
found nor lower it when missed.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cnn.errors import ConfigError, DataError
from cnn.ops.boxes import pairwise_iou

INTERPOLATIONS = ('all', '11point', '101point')
MATCHINGS = ('voc', 'coco')


@dataclasses.dataclass
class ImageDetections:
  """Detections of one image (a dict with the same keys works as well).

  Attributes:
    boxes: (n, 4) (x, y, w, h) in pixels.
    scores: (n,) confidences; higher ranks first.
    classes: (n,) integer class ids in [0, num_classes).
  """
  boxes: Any
  scores: Any
  classes: Any


@dataclasses.dataclass
class ImageGroundTruth:
  """Ground truth of one image (a dict with the same keys works as well).

  Attributes:
    boxes: (m, 4) (x, y, w, h) in pixels.
    classes: (m,) integer class ids in [0, num_classes).
    difficult: optional (m,) bool; difficult boxes are neither required nor
      penalised (VOC's 'difficult', COCO's 'ignore').
  """
  boxes: Any
  classes: Any
  difficult: Any = None


def _field(item, name: str, where: str, required: bool = True):
  """Reads `name` from a dict or an object with attributes."""
  if isinstance(item, Mapping):
    if name in item:
      return item[name]
  elif hasattr(item, name):
    return getattr(item, name)
  if required:
    raise DataError(f"{where} has no '{name}'; give each image a dict (or "
                    f"ImageDetections/ImageGroundTruth) with '{name}'")
  return None


def _boxes(value, where: str) -> np.ndarray:
  arr = np.asarray(value, dtype=np.float64)
  if arr.size == 0:
    # An empty list arrives as shape (0,); it means "no boxes".
    return arr.reshape(0, 4)
  if arr.ndim != 2 or arr.shape[1] != 4:
    raise DataError(f'{where} has shape {arr.shape}; give (n, 4) boxes as '
                    f'(x, y, w, h) in pixels')
  if not np.all(np.isfinite(arr)):
    raise DataError(f'{where} has NaN or Inf coordinates; give finite '
                    f'(x, y, w, h) boxes')
  if np.any(arr[:, 2:] < 0):
    raise DataError(f'{where} has a negative width or height; give (x, y, '
                    f'w, h) boxes, not corners (cnn.ops.boxes.from_corners)')
  return arr


def _vector(value, n: int, where: str, what: str) -> np.ndarray:
  arr = np.asarray(value)
  if arr.size == 0 and n == 0:
    return arr.reshape(0)
  if arr.shape != (n,):
    raise DataError(f'{where} has shape {arr.shape}; give one {what} per box, '
                    f'shape ({n},)')
  return arr


def _classes(value, n: int, num_classes: int, where: str) -> np.ndarray:
  arr = _vector(value, n, where, 'class id')
  if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or
                               np.issubdtype(arr.dtype, np.floating)):
    raise DataError(f'{where} has dtype {arr.dtype}; give integer class ids')
  if np.issubdtype(arr.dtype, np.floating):
    if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
      raise DataError(f'{where} has non-integer class ids; give integer ids '
                      f'in [0, {num_classes})')
  arr = arr.astype(np.int64)
  bad = (arr < 0) | (arr >= num_classes)
  if np.any(bad):
    raise DataError(f'{where} has class id {arr[bad][0]} outside '
                    f'[0, {num_classes}); fix the ids or raise num_classes')
  return arr


def _parse(detections, ground_truth, num_classes: int):
  """Checks and converts the inputs to lists of float64/int64/bool arrays."""
  for name, value in (('detections', detections),
                      ('ground_truth', ground_truth)):
    if isinstance(value, (Mapping, str)) or not isinstance(value, Sequence):
      raise DataError(f'{name} is a {type(value).__name__}; give a list with '
                      f'one entry per image')
  if len(detections) != len(ground_truth):
    raise DataError(f'detections has {len(detections)} images but '
                    f'ground_truth has {len(ground_truth)}; give one entry per '
                    f'image in both, in the same order')
  dets, gts = [], []
  for i, (det, gt) in enumerate(zip(detections, ground_truth)):
    w = f'detections[{i}]'
    boxes = _boxes(_field(det, 'boxes', w), f"{w}['boxes']")
    n = len(boxes)
    scores = _vector(_field(det, 'scores', w), n, f"{w}['scores']", 'score')
    scores = scores.astype(np.float64)
    if not np.all(np.isfinite(scores)):
      raise DataError(f"{w}['scores'] has NaN or Inf; give finite scores")
    classes = _classes(_field(det, 'classes', w), n, num_classes,
                       f"{w}['classes']")
    dets.append((boxes, scores, classes))

    w = f'ground_truth[{i}]'
    boxes = _boxes(_field(gt, 'boxes', w), f"{w}['boxes']")
    m = len(boxes)
    classes = _classes(_field(gt, 'classes', w), m, num_classes,
                       f"{w}['classes']")
    difficult = _field(gt, 'difficult', w, required=False)
    if difficult is None:
      difficult = np.zeros(m, bool)
    else:
      difficult = _vector(difficult, m, f"{w}['difficult']", 'flag')
      if not (difficult.dtype == bool or np.all(np.isin(difficult, (0, 1)))):
        raise DataError(f"{w}['difficult'] has values other than 0/1; give "
                        f'booleans')
      difficult = difficult.astype(bool)
    gts.append((boxes, classes, difficult))
  return dets, gts


def _match_voc(iou: np.ndarray, difficult: np.ndarray, threshold: float):
  """VOCevaldet.m on one image and class; detections already in rank order.

  Returns:
    (tp, ignored) bool arrays over the detections; the rest are FPs.
  """
  n = iou.shape[0]
  tp, ignored = np.zeros(n, bool), np.zeros(n, bool)
  if iou.shape[1] == 0:
    return tp, ignored
  taken = np.zeros(iou.shape[1], bool)
  best = np.argmax(iou, axis=1)  # First box on ties, as `ov > ovmax` does.
  for d in range(n):
    j = best[d]
    # Strictly above ("IoU exceeds 0.5"), as the py-faster-rcnn/Detectron
    # port of the devkit has it (VOCevaldet.m itself tests >=; only exact
    # ties differ).
    if iou[d, j] > threshold:
      if difficult[j]:
        ignored[d] = True
      elif not taken[j]:
        tp[d] = taken[j] = True
  return tp, ignored


def _match_coco(iou: np.ndarray, difficult: np.ndarray, threshold: float):
  """COCOeval.evaluateImg on one image and class, one IoU threshold.

  Returns:
    (tp, ignored) bool arrays over the detections; the rest are FPs.
  """
  n = iou.shape[0]
  tp, ignored = np.zeros(n, bool), np.zeros(n, bool)
  if iou.shape[1] == 0:
    return tp, ignored
  # pycocotools caps the threshold so that IoU 1 can still match at t = 1.
  threshold = min(threshold, 1 - 1e-10)
  taken = np.zeros(iou.shape[1], bool)
  for d in range(n):
    free = ~taken & (iou[d] >= threshold)
    # Non-ignored boxes come first in pycocotools' loop, which stops at the
    # ignored ones once it holds a match.
    for group in (free & ~difficult, free & difficult):
      if group.any():
        cand = np.flatnonzero(group)
        # The loop's `<` lets a later equal IoU replace the best: last wins.
        j = cand[len(cand) - 1 - np.argmax(iou[d, cand][::-1])]
        taken[j] = True
        tp[d], ignored[d] = not difficult[j], difficult[j]
        break
  return tp, ignored


def average_precision(precision: np.ndarray, recall: np.ndarray,
                      interpolation: str = 'all') -> float:
  """AP from a precision/recall curve in rank order.

  Args:
    precision: (k,) precision after each of the k ranked detections.
    recall: (k,) recall after each, non-decreasing.
    interpolation: 'all', '11point' or '101point' (see the module docstring).

  Returns:
    The AP in [0, 1]; 0 for an empty curve.
  """
  precision = np.asarray(precision, np.float64)
  recall = np.asarray(recall, np.float64)
  if interpolation == 'all':
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
    return float(np.sum((mrec[i] - mrec[i - 1]) * mpre[i]))
  if interpolation == '11point':
    # k / 10 rather than k * 0.1: 3 * 0.1 > 0.3, which would drop a recall of
    # exactly 3/10 from the 0.3 threshold.
    total = 0.0
    for t in np.arange(11) / 10:
      reached = precision[recall >= t]
      total += reached.max() if reached.size else 0.0
    return total / 11
  if interpolation == '101point':
    thresholds = np.linspace(0.0, 1.0, 101)  # Exactly pycocotools' recThrs.
    q = np.zeros(len(thresholds))
    if recall.size:
      envelope = np.maximum.accumulate(precision[::-1])[::-1]
      idx = np.searchsorted(recall, thresholds, side='left')
      inside = idx < len(recall)
      q[inside] = envelope[idx[inside]]
    return float(np.mean(q))
  raise ConfigError(f'interpolation={interpolation!r} is unknown; use one of '
                    f'{", ".join(INTERPOLATIONS)}')


def evaluate(detections: Sequence, ground_truth: Sequence, num_classes: int,
             iou_threshold: float = 0.5, interpolation: str = 'all',
             matching: str = 'voc') -> dict:
  """Per-class AP and mAP of detections against ground truth.

  Args:
    detections: one entry per image, a dict (or `ImageDetections`) with
      'boxes' (n, 4) (x, y, w, h), 'scores' (n,) and 'classes' (n,) ints.
    ground_truth: one entry per image, in the same order, a dict (or
      `ImageGroundTruth`) with 'boxes' (m, 4), 'classes' (m,) and optionally
      'difficult' (m,) bool.
    num_classes: class ids lie in [0, num_classes).
    iou_threshold: the overlap a TP needs: IoU > threshold for 'voc',
      IoU >= threshold for 'coco'.
    interpolation: 'all' (VOC 2010+), '11point' (VOC 2007) or '101point'
      (COCO).
    matching: 'voc' or 'coco' (see the module docstring).

  Returns:
    A dict with
      'ap': (num_classes,) float AP per class, nan for a class without
        non-difficult ground truth (whatever its detections);
      'map': the mean of the non-nan APs (nan if all are nan);
      'num_gt': (num_classes,) int, non-difficult ground-truth boxes (the
        positives recall is counted against);
      'num_difficult': (num_classes,) int, difficult ground-truth boxes;
      'num_det': (num_classes,) int, detections given for the class;
      'num_tp': (num_classes,) int, true positives among them;
      'precision', 'recall': lists of num_classes float arrays, the curve
        after each ranked detection that is not ignored (matched to a
        difficult box), empty for a class without detections and all-nan
        recall for a class without ground truth;
      'iou_threshold', 'interpolation', 'matching': the settings used.

  Raises:
    ConfigError: an unknown setting or a threshold outside [0, 1].
    DataError: inputs of the wrong length, shape or class range.
  """
  if isinstance(num_classes, bool) or not isinstance(num_classes,
                                                      (int, np.integer)):
    raise ConfigError(f'num_classes={num_classes!r}; give a positive int')
  if num_classes < 1:
    raise ConfigError(f'num_classes={num_classes}; give a positive int')
  if not 0.0 <= iou_threshold <= 1.0:
    raise ConfigError(f'iou_threshold={iou_threshold}; give a value in [0, 1]')
  if interpolation not in INTERPOLATIONS:
    raise ConfigError(f'interpolation={interpolation!r} is unknown; use one of '
                      f'{", ".join(INTERPOLATIONS)}')
  if matching not in MATCHINGS:
    raise ConfigError(f'matching={matching!r} is unknown; use one of '
                      f'{", ".join(MATCHINGS)}')
  match = _match_voc if matching == 'voc' else _match_coco
  dets, gts = _parse(detections, ground_truth, num_classes)

  num_gt = np.zeros(num_classes, np.int64)
  num_difficult = np.zeros(num_classes, np.int64)
  for _, classes, difficult in gts:
    num_gt += np.bincount(classes[~difficult], minlength=num_classes)
    num_difficult += np.bincount(classes[difficult], minlength=num_classes)

  # Matching state never crosses images, and a stable global sort keeps each
  # image's detections in their stable per-image order, so matching image by
  # image and ranking afterwards is the same as matching in global rank order.
  scores = [[] for _ in range(num_classes)]
  tps = [[] for _ in range(num_classes)]
  ignored = [[] for _ in range(num_classes)]
  for (d_boxes, d_scores, d_classes), (g_boxes, g_classes, g_difficult) in zip(
      dets, gts):
    for k in np.unique(d_classes):
      di = np.flatnonzero(d_classes == k)
      di = di[np.argsort(-d_scores[di], kind='stable')]
      gi = g_classes == k
      iou = pairwise_iou(d_boxes[di], g_boxes[gi])
      tp, ig = match(iou, g_difficult[gi], iou_threshold)
      scores[k].append(d_scores[di])
      tps[k].append(tp)
      ignored[k].append(ig)

  ap = np.full(num_classes, np.nan)
  num_det = np.zeros(num_classes, np.int64)
  num_tp = np.zeros(num_classes, np.int64)
  precisions, recalls = [], []
  for k in range(num_classes):
    s = np.concatenate(scores[k]) if scores[k] else np.zeros(0)
    tp = np.concatenate(tps[k]) if tps[k] else np.zeros(0, bool)
    ig = np.concatenate(ignored[k]) if ignored[k] else np.zeros(0, bool)
    order = np.argsort(-s, kind='stable')
    # Ignored detections neither add a TP nor a FP; dropping their rows only
    # removes repeated curve points, which no interpolation depends on.
    tp = tp[order][~ig[order]]
    tp_cum = np.cumsum(tp, dtype=np.float64)
    fp_cum = np.cumsum(~tp, dtype=np.float64)
    precision = tp_cum / np.maximum(tp_cum + fp_cum, 1)
    with np.errstate(invalid='ignore', divide='ignore'):
      recall = tp_cum / num_gt[k] if num_gt[k] else np.full(len(tp), np.nan)
    num_det[k], num_tp[k] = len(s), int(tp.sum())
    precisions.append(precision)
    recalls.append(recall)
    if num_gt[k]:
      ap[k] = average_precision(precision, recall, interpolation)

  valid = ~np.isnan(ap)
  return {
      'ap': ap,
      # nanmean warns on an all-nan input; mAP is simply undefined there.
      'map': float(ap[valid].mean()) if valid.any() else float('nan'),
      'num_gt': num_gt,
      'num_difficult': num_difficult,
      'num_det': num_det,
      'num_tp': num_tp,
      'precision': precisions,
      'recall': recalls,
      'iou_threshold': float(iou_threshold),
      'interpolation': interpolation,
      'matching': matching,
  }


def format_table(result: Mapping, class_names: Sequence[str] | None = None,
                 digits: int = 4) -> str:
  """A markdown table of per-class AP and the mAP from `evaluate`'s result.

  Args:
    result: the dict `evaluate` returns.
    class_names: one name per class; None numbers the classes.
    digits: decimals of AP.

  Returns:
    Rows 'class | AP | #gt', one per class and a last 'mAP' row (its #gt is
    the total); a class without ground truth shows 'n/a' for AP.
  """
  ap, num_gt = np.asarray(result['ap']), np.asarray(result['num_gt'])
  if class_names is None:
    class_names = [str(k) for k in range(len(ap))]
  if len(class_names) != len(ap):
    raise ConfigError(f'class_names has {len(class_names)} names for '
                      f'{len(ap)} classes; give one name per class')

  def fmt(v):
    return 'n/a' if np.isnan(v) else f'{v:.{digits}f}'

  # A '|' in a name would split the markdown cell.
  lines = ['| class | AP | #gt |', '|:--|--:|--:|']
  for name, a, n in zip(class_names, ap, num_gt):
    lines.append(f"| {str(name).replace('|', '/')} | {fmt(a)} | {int(n)} |")
  lines.append(f"| mAP | {fmt(result['map'])} | {int(num_gt.sum())} |")
  return '\n'.join(lines)
