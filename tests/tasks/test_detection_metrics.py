"""Detection AP/mAP: hand-made cases with known answers, a brute-force VOC
reference, and pycocotools on random detections."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

from cnn.tasks.detection import metrics as de
from cnn.errors import ConfigError, DataError
from cnn.ops.boxes import pairwise_iou

INTERPOLATIONS = ('all', '11point', '101point')


def gt(boxes, classes=None, difficult=None):
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  out = {'boxes': boxes,
         'classes': np.zeros(len(boxes), int) if classes is None else classes}
  if difficult is not None:
    out['difficult'] = np.asarray(difficult, bool)
  return out


def det(boxes, scores, classes=None):
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  return {'boxes': boxes, 'scores': np.asarray(scores, np.float64),
          'classes': np.zeros(len(boxes), int) if classes is None else classes}


# Four well separated objects of class 0 in one image.
OBJECTS = [[0, 0, 10, 10], [50, 0, 10, 10], [0, 50, 10, 10], [50, 50, 10, 10]]
FAR = [200, 200, 10, 10]


@pytest.mark.parametrize('matching', ['voc', 'coco'])
@pytest.mark.parametrize('interpolation', INTERPOLATIONS)
def test_a_perfect_detector_has_ap_one(matching, interpolation):
  gts = [gt(OBJECTS[:3], [0, 1, 1]), gt(OBJECTS[3:], [1])]
  dets = [det(OBJECTS[:3], [0.9, 0.8, 0.7], [0, 1, 1]),
          det(OBJECTS[3:], [0.95], [1])]
  r = de.evaluate(dets, gts, 2, interpolation=interpolation, matching=matching)
  np.testing.assert_array_equal(r['ap'], [1.0, 1.0])
  assert r['map'] == 1.0
  np.testing.assert_array_equal(r['num_gt'], [1, 3])
  np.testing.assert_array_equal(r['num_det'], [1, 3])
  np.testing.assert_array_equal(r['num_tp'], [1, 3])
  np.testing.assert_array_equal(r['recall'][1], [1 / 3, 2 / 3, 1.0])


def test_one_false_positive_above_all_true_positives():
  # 4 objects; ranked: FP, then TPs on 3 of them (the 4th is missed):
  # precision 0, 1/2, 2/3, 3/4 at recall 0, 1/4, 2/4, 3/4. The envelope is
  # 3/4 up to recall 3/4 and 0 after.
  #   'all':      3/4 (recall covered) * 3/4 = 9/16.
  #   '11point':  thresholds 0, .1, ..., .7 (8 of 11) see 3/4: 8/11 * 3/4.
  #   '101point': thresholds 0, .01, ..., .75 (76 of 101) see 3/4.
  gts = [gt(OBJECTS)]
  dets = [det([FAR] + OBJECTS[:3], [0.9, 0.8, 0.7, 0.6])]
  expected = {'all': 9 / 16, '11point': 8 / 11 * 3 / 4,
              '101point': 76 / 101 * 3 / 4}
  for matching in ('voc', 'coco'):
    for interpolation, want in expected.items():
      r = de.evaluate(dets, gts, 1, interpolation=interpolation,
                      matching=matching)
      assert r['ap'][0] == pytest.approx(want, abs=1e-12), interpolation
  np.testing.assert_allclose(r['precision'][0], [0, 1 / 2, 2 / 3, 3 / 4])
  np.testing.assert_allclose(r['recall'][0], [0, 1 / 4, 2 / 4, 3 / 4])


def test_the_envelope_lifts_precision_before_a_later_peak():
  # TP, FP, TP, TP on 3 objects: precision 1, 1/2, 2/3, 3/4 at recall
  # 1/3, 1/3, 2/3, 1. Envelope: 1 up to 1/3, then 3/4.
  #   'all': 1/3 * 1 + 2/3 * 3/4 = 5/6.
  #   '11point': t = 0, .1, .2, .3 -> 1; t = .4, ..., 1 (7) -> 3/4.
  gts = [gt(OBJECTS[:3])]
  dets = [det([OBJECTS[0], FAR, OBJECTS[1], OBJECTS[2]], [0.9, 0.8, 0.7, 0.6])]
  assert de.evaluate(dets, gts, 1)['ap'][0] == pytest.approx(5 / 6)
  assert de.evaluate(dets, gts, 1, interpolation='11point')['ap'][0] == (
      pytest.approx((4 + 7 * 3 / 4) / 11))


@pytest.mark.parametrize('matching', ['voc', 'coco'])
def test_a_second_detection_of_the_same_object_is_a_false_positive(matching):
  # The jittered copy ranks first and takes the object; the exact box after it
  # finds the object taken. Precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1:
  # AP ('all') = 1/2 * 1 + 1/2 * 2/3 = 5/6; without the duplicate it is 1.
  a, b = OBJECTS[0], OBJECTS[1]
  jittered = [0.5, 0.5, 10, 10]
  gts = [gt([a, b])]
  dets = [det([jittered, a, b], [0.9, 0.8, 0.7])]
  r = de.evaluate(dets, gts, 1, matching=matching)
  assert r['num_tp'][0] == 2 and r['num_det'][0] == 3
  np.testing.assert_allclose(r['precision'][0], [1, 1 / 2, 2 / 3])
  assert r['ap'][0] == pytest.approx(5 / 6)


@pytest.mark.parametrize('matching', ['voc', 'coco'])
def test_iou_just_under_and_just_over_the_threshold(matching):
  # A box of height h on a 10x10 object, same top-left corner: IoU = h / 10.
  gts = [gt([[0, 0, 10, 10]])]
  for h, want in ((4.99, 0.0), (5.01, 1.0)):
    dets = [det([[0, 0, 10, h]], [1.0])]
    assert de.evaluate(dets, gts, 1, matching=matching)['ap'][0] == want, h
  # A higher threshold turns the 0.501 match into a miss.
  dets = [det([[0, 0, 10, 5.01]], [1.0])]
  assert de.evaluate(dets, gts, 1, iou_threshold=0.6,
                     matching=matching)['ap'][0] == 0.0


def test_iou_exactly_at_the_threshold_misses_for_voc_and_matches_for_coco():
  gts = [gt([[0, 0, 10, 10]])]
  dets = [det([[0, 0, 10, 5]], [1.0])]
  assert pairwise_iou(dets[0]['boxes'], gts[0]['boxes'])[0, 0] == 0.5
  assert de.evaluate(dets, gts, 1, matching='voc')['ap'][0] == 0.0
  assert de.evaluate(dets, gts, 1, matching='coco')['ap'][0] == 1.0


def test_a_class_without_ground_truth_is_nan_and_left_out_of_the_map():
  # Class 0 found (AP 1), class 1 missed (AP 0), class 2 has only a false
  # alarm and no ground truth (nan): mAP = 1/2, not 1/3 (nan as 0) nor nan.
  gts = [gt([OBJECTS[0], OBJECTS[1]], [0, 1])]
  dets = [det([OBJECTS[0], OBJECTS[2]], [0.9, 0.8], [0, 2])]
  r = de.evaluate(dets, gts, 3)
  assert r['ap'][0] == 1.0 and r['ap'][1] == 0.0 and np.isnan(r['ap'][2])
  assert r['map'] == 0.5
  np.testing.assert_array_equal(r['num_gt'], [1, 1, 0])
  np.testing.assert_array_equal(r['num_det'], [1, 0, 1])
  assert r['precision'][1].size == 0
  # No ground truth anywhere: mAP is nan.
  assert np.isnan(de.evaluate([det([FAR], [1.0])], [gt([])], 1)['map'])


@pytest.mark.parametrize('matching', ['voc', 'coco'])
def test_a_difficult_box_is_ignored_both_ways(matching):
  a, hard = OBJECTS[0], OBJECTS[1]
  flagged = [gt([a, hard], difficult=[False, True])]
  # Found: the hit on the difficult box (ranked first) is no FP, as it would
  # be were the box not there at all (precision 0 then 1/2: AP 1/2).
  found = [det([hard, a], [0.9, 0.8])]
  r = de.evaluate(found, flagged, 1, matching=matching)
  assert r['ap'][0] == 1.0 and r['num_tp'][0] == 1
  assert r['num_gt'][0] == 1 and r['num_difficult'][0] == 1
  np.testing.assert_array_equal(r['precision'][0], [1.0])
  assert de.evaluate(found, [gt([a])], 1, matching=matching)['ap'][0] == 0.5
  # Missed: leaving the difficult box out costs no recall, as it would
  # (recall 1/2: AP 1/2) were it an ordinary box.
  missed = [det([a], [0.9])]
  assert de.evaluate(missed, flagged, 1, matching=matching)['ap'][0] == 1.0
  assert de.evaluate(missed, [gt([a, hard])], 1,
                     matching=matching)['ap'][0] == 0.5


def test_voc_ignores_a_detection_whose_best_box_is_difficult():
  # The detection overlaps a difficult box best (IoU 0.74) and a free normal
  # box enough (0.6): VOC looks only at the best box and ignores the
  # detection; COCO prefers the normal box and scores a TP.
  a, b = [0, 0, 10, 10], [4, 0, 10, 10]
  gts = [gt([a, b], difficult=[True, False])]
  dets = [det([[1.5, 0, 10, 10]], [1.0])]
  voc = de.evaluate(dets, gts, 1, matching='voc')
  coco = de.evaluate(dets, gts, 1, matching='coco')
  assert voc['ap'][0] == 0.0 and voc['precision'][0].size == 0
  assert coco['ap'][0] == 1.0 and coco['num_tp'][0] == 1


def test_an_image_without_detections_only_costs_recall():
  gts = [gt([OBJECTS[0]]), gt([OBJECTS[1]]), gt([])]
  dets = [det([OBJECTS[0]], [0.9]), {'boxes': [], 'scores': [], 'classes': []},
          det(np.zeros((0, 4)), [])]
  r = de.evaluate(dets, gts, 1)
  assert r['ap'][0] == 0.5 and r['num_gt'][0] == 2
  np.testing.assert_array_equal(r['recall'][0], [0.5])
  # A false alarm in the image without objects ranks first: precision 0, 1/2.
  dets[2] = det([FAR], [0.95])
  assert de.evaluate(dets, gts, 1)['ap'][0] == 0.25


def test_voc_and_coco_matching_differ_when_the_best_box_is_taken():
  # Objects A and B overlap (IoU 0.43). The exact hit on A ranks first; the
  # second detection overlaps A best (0.74) and B enough (0.6). VOC looks at A
  # only, finds it taken: FP. COCO takes the best free box, B: TP.
  a, b = [0, 0, 10, 10], [4, 0, 10, 10]
  second = [1.5, 0, 10, 10]
  iou = pairwise_iou(np.array([second], float), np.array([a, b], float))[0]
  assert iou[0] > iou[1] > 0.5
  gts = [gt([a, b])]
  dets = [det([a, second], [0.9, 0.8])]
  voc = de.evaluate(dets, gts, 1, matching='voc')
  coco = de.evaluate(dets, gts, 1, matching='coco')
  assert voc['num_tp'][0] == 1 and voc['ap'][0] == 0.5
  assert coco['num_tp'][0] == 2 and coco['ap'][0] == 1.0


def test_dataclass_inputs_give_the_same_result_as_dicts():
  gts = [gt(OBJECTS[:2], [0, 1], [False, True])]
  dets = [det([OBJECTS[0], FAR, OBJECTS[1]], [0.5, 0.7, 0.6], [0, 0, 1])]
  a = de.evaluate(dets, gts, 2)
  b = de.evaluate([de.ImageDetections(**dets[0])],
                  [de.ImageGroundTruth(**gts[0])], 2)
  np.testing.assert_array_equal(a['ap'], b['ap'])
  np.testing.assert_array_equal(a['num_difficult'], [0, 1])
  assert a['ap'][0] == 0.5


@pytest.mark.parametrize('call, error, words', [
    (lambda: de.evaluate([det([FAR], [1.0])], [], 1), DataError,
     'detections has 1 images but ground_truth has 0'),
    (lambda: de.evaluate([{'boxes': [[0, 0, 1]], 'scores': [1.0],
                           'classes': [0]}], [gt([])], 1),
     DataError, "detections[0]['boxes'] has shape (1, 3)"),
    (lambda: de.evaluate([det([], [])],
                         [{'boxes': [0, 0, 1, 1], 'classes': [0]}], 1),
     DataError, "ground_truth[0]['boxes'] has shape (4,)"),
    (lambda: de.evaluate([det([FAR], [1.0], [3])], [gt([])], 3), DataError,
     "detections[0]['classes'] has class id 3 outside [0, 3)"),
    (lambda: de.evaluate([det([], [])], [gt([FAR], [-1])], 3), DataError,
     "ground_truth[0]['classes'] has class id -1 outside [0, 3)"),
    (lambda: de.evaluate([det([FAR], [1.0, 0.5])], [gt([])], 1), DataError,
     "detections[0]['scores'] has shape (2,)"),
    (lambda: de.evaluate([det([FAR], [1.0])], [gt([FAR], difficult=[1, 0])],
                         1), DataError, "ground_truth[0]['difficult']"),
    (lambda: de.evaluate([det([[0, 0, -1, 5]], [1.0])], [gt([])], 1),
     DataError, 'negative width or height'),
    (lambda: de.evaluate([{'boxes': [FAR], 'classes': [0]}], [gt([])], 1),
     DataError, "detections[0] has no 'scores'"),
    (lambda: de.evaluate([det([FAR], [1.0], [0.5])], [gt([])], 1), DataError,
     'non-integer class ids'),
    (lambda: de.evaluate([det([], [])], [gt([])], 1, interpolation='11pt'),
     ConfigError, "interpolation='11pt' is unknown"),
    (lambda: de.evaluate([det([], [])], [gt([])], 1, matching='yolo'),
     ConfigError, "matching='yolo' is unknown"),
    (lambda: de.evaluate([det([], [])], [gt([])], 1, iou_threshold=50),
     ConfigError, 'iou_threshold=50'),
    (lambda: de.evaluate([det([], [])], [gt([])], 0), ConfigError,
     'num_classes=0'),
])
def test_bad_inputs_raise_one_line_errors(call, error, words):
  with pytest.raises(error) as e:
    call()
  assert words in str(e.value)
  assert '\n' not in str(e.value)


def test_format_table():
  gts = [gt([OBJECTS[0], OBJECTS[1], OBJECTS[2]], [0, 1, 1])]
  dets = [det([OBJECTS[0], OBJECTS[1]], [0.9, 0.8], [0, 1])]
  r = de.evaluate(dets, gts, 3)
  table = de.format_table(r, ['cat', 'dog|wolf', 'car'])
  assert table.splitlines() == [
      '| class | AP | #gt |',
      '|:--|--:|--:|',
      '| cat | 1.0000 | 1 |',
      '| dog/wolf | 0.5000 | 2 |',
      '| car | n/a | 0 |',
      '| mAP | 0.7500 | 3 |',
  ]
  assert de.format_table(r).splitlines()[2].startswith('| 0 |')
  with pytest.raises(ConfigError, match='2 names for 3 classes'):
    de.format_table(r, ['cat', 'dog'])


def random_problem(seed, num_images=6, num_classes=4, difficult_rate=0.0,
                   score_decimals=None):
  """Random objects; detections are jittered copies (some of the wrong class,
  some duplicates) plus random false alarms. Class num_classes - 1 never has
  ground truth."""
  rng = np.random.default_rng(seed)
  gts, dets = [], []
  for _ in range(num_images):
    m = int(rng.integers(0, 7))
    boxes = np.concatenate([rng.uniform(0, 100, (m, 2)),
                            rng.uniform(5, 40, (m, 2))], axis=1)
    classes = rng.integers(0, num_classes - 1, m)
    gts.append(gt(boxes, classes, rng.random(m) < difficult_rate))
    d_boxes, d_classes = [], []
    for box, k in zip(boxes, classes):
      for _ in range(int(rng.choice([0, 1, 1, 2]))):
        jitter = rng.normal(0, 0.15, 4) * box[[2, 3, 2, 3]]
        moved = box + jitter
        moved[2:] = np.maximum(moved[2:], 1.0)
        d_boxes.append(moved)
        d_classes.append(k if rng.random() < 0.9
                         else rng.integers(0, num_classes))
    for _ in range(int(rng.integers(0, 5))):
      d_boxes.append(np.concatenate([rng.uniform(0, 100, 2),
                                     rng.uniform(5, 40, 2)]))
      d_classes.append(rng.integers(0, num_classes))
    scores = rng.random(len(d_boxes))
    if score_decimals is not None:
      scores = np.round(scores, score_decimals)
    dets.append(det(np.array(d_boxes).reshape(-1, 4), scores,
                    np.array(d_classes, int)))
  return dets, gts


def voc_reference(dets, gts, k, threshold, interpolation):
  """The devkit's loop over globally ranked detections, written plainly."""
  found = [(s, i, box) for i, d in enumerate(dets)
           for box, s, c in zip(d['boxes'], d['scores'], d['classes'])
           if c == k]
  order = np.argsort([-s for s, _, _ in found], kind='stable')
  taken = [np.zeros(len(g['boxes']), bool) for g in gts]
  npos, tp, fp = 0, [], []
  for g in gts:
    npos += int(np.sum((g['classes'] == k) & ~g['difficult']))
  for n in order:
    _, i, box = found[n]
    idx = np.flatnonzero(gts[i]['classes'] == k)
    ovmax, jmax = -np.inf, -1
    for j in idx:
      ov = pairwise_iou(box[None], gts[i]['boxes'][j][None])[0, 0]
      if ov > ovmax:
        ovmax, jmax = ov, j
    if ovmax > threshold:
      if gts[i]['difficult'][jmax]:
        continue
      hit = not taken[i][jmax]
      taken[i][jmax] = True
      tp.append(hit)
      fp.append(not hit)
    else:
      tp.append(False)
      fp.append(True)
  if npos == 0:
    return np.nan
  tp, fp = np.cumsum(tp), np.cumsum(fp)
  rec = tp / npos
  prec = tp / np.maximum(tp + fp, 1)
  if interpolation == '11point':
    return sum(max(prec[rec >= t / 10], default=0.0) for t in range(11)) / 11
  mrec = [0.0] + list(rec) + [1.0]
  mpre = [0.0] + list(prec) + [0.0]
  for i in range(len(mpre) - 2, -1, -1):
    mpre[i] = max(mpre[i], mpre[i + 1])
  return sum((mrec[i] - mrec[i - 1]) * mpre[i]
             for i in range(1, len(mrec)) if mrec[i] != mrec[i - 1])


@pytest.mark.parametrize('seed', range(4))
def test_voc_matches_a_brute_force_devkit_loop(seed):
  # Scores rounded to 1 decimal make many ties, which both must break by image
  # order, then order within the image.
  dets, gts = random_problem(seed, difficult_rate=0.2, score_decimals=1)
  for interpolation in ('all', '11point'):
    r = de.evaluate(dets, gts, 4, interpolation=interpolation)
    want = [voc_reference(dets, gts, k, 0.5, interpolation) for k in range(4)]
    np.testing.assert_allclose(r['ap'], want, rtol=0, atol=1e-12)
    assert np.isnan(r['ap'][3]) and 0 < np.nanmin(r['ap'])
    assert np.nanmax(r['ap']) < 1


def coco_ap(dets, gts, num_classes):
  """pycocotools' AP per class at IoU 0.5, one area range, no det cap."""
  # pylint: disable=g-import-not-at-top
  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval
  images, anns, results = [], [], []
  for i, (d, g) in enumerate(zip(dets, gts)):
    images.append({'id': i + 1, 'width': 200, 'height': 200})
    for box, k, hard in zip(g['boxes'], g['classes'], g['difficult']):
      # pycocotools overwrites 'ignore' with 'iscrowd', but ignores a box
      # whose area is outside the area range: that is how a difficult box
      # becomes one of its ignored boxes.
      area = 2e10 if hard else float(box[2] * box[3])
      anns.append({'id': len(anns) + 1, 'image_id': i + 1,
                   'category_id': int(k) + 1, 'bbox': [float(v) for v in box],
                   'area': area, 'iscrowd': 0})
    for box, s, k in zip(d['boxes'], d['scores'], d['classes']):
      results.append({'image_id': i + 1, 'category_id': int(k) + 1,
                      'bbox': [float(v) for v in box], 'score': float(s)})
  with contextlib.redirect_stdout(io.StringIO()):
    coco_gt = COCO()
    coco_gt.dataset = {
        'images': images, 'annotations': anns,
        'categories': [{'id': k + 1, 'name': str(k)}
                       for k in range(num_classes)]}
    coco_gt.createIndex()
    coco_dt = coco_gt.loadRes(results)
    ev = COCOeval(coco_gt, coco_dt, 'bbox')
    ev.params.iouThrs = np.array([0.5])
    ev.params.areaRng = [[0, 1e10]]
    ev.params.areaRngLbl = ['all']
    ev.params.maxDets = [10_000]
    ev.evaluate()
    ev.accumulate()
  out = []
  for k in range(num_classes):
    q = ev.eval['precision'][0, :, k, 0, -1]
    # -1 marks a class without (non-ignored) ground truth.
    out.append(np.nan if np.all(q == -1) else float(q.mean()))
  return np.array(out)


def test_coco_ties_and_the_threshold_cap_follow_pycocotools():
  pytest.importorskip('pycocotools')
  # The first detection overlaps A and B equally (IoU 9/11): pycocotools'
  # loop keeps the later box, B, which leaves A for the second detection
  # (IoU 7/13 with A only). VOC's devkit keeps the first box, A, so its second
  # detection finds A taken.
  a, b = [0, 0, 10, 10], [2, 0, 10, 10]
  gts = [gt([a, b], difficult=[False, False])]
  dets = [det([[1, 0, 10, 10], [-3, 0, 10, 10]], [0.9, 0.8])]
  coco = de.evaluate(dets, gts, 1, matching='coco', interpolation='101point')
  assert coco['num_tp'][0] == 2
  assert coco['ap'][0] == pytest.approx(coco_ap(dets, gts, 1)[0], abs=1e-12)
  assert de.evaluate(dets, gts, 1, matching='voc')['num_tp'][0] == 1
  # At threshold 1 pycocotools accepts IoU >= 1 - 1e-10.
  near = [det([[1e-11, 0, 10, 10]], [1.0])]
  assert 1 - 1e-10 < pairwise_iou(near[0]['boxes'], gts[0]['boxes'])[0, 0] < 1
  assert de.evaluate(near, [gt([a])], 1, iou_threshold=1.0,
                     matching='coco')['ap'][0] == 1.0


@pytest.mark.parametrize('seed', range(5))
def test_coco_matching_reproduces_pycocotools(seed):
  pytest.importorskip('pycocotools')
  dets, gts = random_problem(seed, num_images=8, num_classes=4,
                             difficult_rate=0.15 if seed % 2 else 0.0)
  want = coco_ap(dets, gts, 4)
  r = de.evaluate(dets, gts, 4, matching='coco', interpolation='101point')
  np.testing.assert_allclose(r['ap'], want, rtol=0, atol=1e-9)
  # Informative data: no class trivially 0 or 1; the last has no objects.
  assert np.isnan(want[3]) and 0 < np.nanmin(want) and np.nanmax(want) < 1
  assert r['map'] == pytest.approx(np.nanmean(want), abs=1e-9)
