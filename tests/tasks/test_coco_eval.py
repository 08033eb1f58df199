"""COCO summary mAP: hand cases with known answers, and pycocotools' COCOeval
on coco128's real annotations with jittered, dropped, duplicated and false
detections."""
from __future__ import annotations

import contextlib
import io
import os

import numpy as np
import pytest

from cnn.errors import ConfigError, DataError
from cnn.ops.boxes import pairwise_iou
from cnn.tasks.detection import coco_eval
from tests.conftest import SHARED_TFDS, requires_shared

OBJ = [0.0, 0.0, 10.0, 10.0]


def gt(boxes, classes=None):
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  return {'boxes': boxes,
          'classes': (np.zeros(len(boxes), int) if classes is None
                      else np.asarray(classes, int))}


def det(boxes, scores, classes=None):
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  return {'boxes': boxes, 'scores': np.asarray(scores, np.float64),
          'classes': (np.zeros(len(boxes), int) if classes is None
                      else np.asarray(classes, int))}


def pycocotools_summary(dets, gts, num_classes, sizes=None):
  """COCOeval('bbox') with its default parameters, built in memory.

  Returns:
    (stats[:3] = mAP@[.5:.95], mAP@.5, mAP@.75; per-class AP@[.5:.95] at
    area 'all', maxDets 100, nan for a class without ground truth).
  """
  pytest.importorskip('pycocotools')
  # pylint: disable=g-import-not-at-top
  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval
  images, anns, rows = [], [], []
  for i, (d, g) in enumerate(zip(dets, gts)):
    h, w = sizes[i] if sizes is not None else (1000, 1000)
    images.append({'id': i + 1, 'height': int(h), 'width': int(w)})
    for box, k in zip(g['boxes'], g['classes']):
      # Ids from 1: pycocotools marks "unmatched" with gt id 0.
      anns.append({'id': len(anns) + 1, 'image_id': i + 1,
                   'category_id': int(k) + 1,
                   'bbox': [float(v) for v in box],
                   'area': float(box[2] * box[3]), 'iscrowd': 0})
    for box, s, k in zip(d['boxes'], d['scores'], d['classes']):
      rows.append([i + 1, *box, s, int(k) + 1])
  with contextlib.redirect_stdout(io.StringIO()):
    coco_gt = COCO()
    coco_gt.dataset = {
        'images': images, 'annotations': anns,
        'categories': [{'id': k + 1, 'name': str(k)}
                       for k in range(num_classes)]}
    coco_gt.createIndex()
    # [image_id, x, y, w, h, score, category_id] rows: loadNumpyAnnotations.
    coco_dt = coco_gt.loadRes(np.array(rows, np.float64).reshape(-1, 7))
    ev = COCOeval(coco_gt, coco_dt, 'bbox')
    assert ev.params.maxDets == [1, 10, 100]
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  per_class = []
  for k in range(num_classes):
    s = ev.eval['precision'][:, :, k, 0, 2]  # [T, R] at area 'all', 100.
    per_class.append(float(s[s > -1].mean()) if (s > -1).any() else np.nan)
  return np.array(ev.stats[:3]), np.array(per_class)


def summary(r):
  return np.array([r['map'], r['map50'], r['map75']])


def test_thresholds_are_pycocotools_linspace():
  t = coco_eval.IOU_THRESHOLDS
  assert len(t) == 10 and t[0] == 0.5 and t[5] == 0.75 and t[-1] == 0.95
  # Not the literal 0.9: an IoU of exactly 0.9 matches at the 9th threshold.
  assert t[8] < 0.9


def test_a_perfect_detector_scores_one_at_every_threshold():
  gts = [gt([OBJ, [20, 20, 5, 8]], [0, 2]), gt([[3, 4, 30, 40]], [2])]
  dets = [det(g['boxes'], np.linspace(0.9, 0.5, len(g['boxes'])),
              g['classes']) for g in gts]
  r = coco_eval.evaluate_coco(dets, gts, 3)
  np.testing.assert_array_equal(summary(r), [1.0, 1.0, 1.0])
  assert np.all(r['ap'][:, [0, 2]] == 1.0) and np.all(np.isnan(r['ap'][:, 1]))
  np.testing.assert_array_equal(r['ap_per_class'][[0, 2]], [1.0, 1.0])
  np.testing.assert_array_equal(r['num_gt'], [1, 0, 2])
  stats, per_class = pycocotools_summary(dets, gts, 3)
  # Its precision is tp / (tp + fp + np.spacing(1)): 1 - 2e-16 for 1 / 1.
  np.testing.assert_allclose(stats, [1.0, 1.0, 1.0], rtol=0, atol=1e-15)
  np.testing.assert_allclose(per_class[[0, 2]], [1.0, 1.0], rtol=0,
                             atol=1e-15)


@pytest.mark.parametrize('height, iou, want', [
    # A box of height h on a 10x10 object, same top-left corner: IoU h / 10.
    (5.8, 0.58, 0.2),   # Counts at 0.5 and 0.55 only.
    (6.0, 0.6, 0.3),    # Exactly 0.6 counts at 0.6 too (IoU >= threshold).
    (6.4, 0.64, 0.3),
    (9.0, 0.9, 0.9),
    (9.6, 0.96, 1.0),
    (4.9, 0.49, 0.0),
])
def test_one_box_counts_at_the_thresholds_its_iou_reaches(height, iou, want):
  gts = [gt([OBJ])]
  dets = [det([[0, 0, 10, height]], [1.0])]
  assert pairwise_iou(dets[0]['boxes'], gts[0]['boxes'])[0, 0] == iou
  r = coco_eval.evaluate_coco(dets, gts, 1)
  assert r['map'] == pytest.approx(want, abs=1e-15)
  reached = coco_eval.IOU_THRESHOLDS <= iou
  np.testing.assert_array_equal(r['ap'][:, 0], reached.astype(float))
  assert r['map50'] == float(iou >= 0.5) and r['map75'] == float(iou >= 0.75)
  stats, _ = pycocotools_summary(dets, gts, 1)
  np.testing.assert_allclose(summary(r), stats, rtol=0, atol=1e-15)


def test_an_iou_just_under_0_9_matches_at_linspace_not_at_decimal_0_9():
  # On a unit box, height h gives IoU h: 0.8999999999999999 reaches the 9th
  # linspace threshold (that very number) but not a literal 0.9.
  h = float(coco_eval.IOU_THRESHOLDS[8])
  gts, dets = [gt([[0, 0, 1, 1]])], [det([[0, 0, 1, h]], [1.0])]
  assert pairwise_iou(dets[0]['boxes'], gts[0]['boxes'])[0, 0] == h < 0.9
  r = coco_eval.evaluate_coco(dets, gts, 1)
  assert r['map'] == pytest.approx(0.9, abs=1e-15)
  stats, _ = pycocotools_summary(dets, gts, 1)
  assert stats[0] == pytest.approx(0.9, abs=1e-15)
  decimal = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]
  r = coco_eval.evaluate_coco(dets, gts, 1, iou_thresholds=decimal)
  assert r['map'] == pytest.approx(0.8, abs=1e-15)
  only = coco_eval.evaluate_coco(dets, gts, 1, iou_thresholds=[0.6])
  assert only['map'] == 1.0 and np.isnan(only['map50'])


def test_the_cap_drops_the_101st_detection_of_an_image_and_class():
  # 100 false alarms outscore the one hit: the cap of 100 drops the hit.
  far = [[100.0 + 20 * i, 100.0, 10.0, 10.0] for i in range(100)]
  dets = [det(far + [OBJ], np.r_[np.linspace(0.9, 0.5, 100), 0.1])]
  gts = [gt([OBJ])]
  r = coco_eval.evaluate_coco(dets, gts, 1)
  assert r['map'] == 0.0 and r['num_det'][0] == 100
  stats, _ = pycocotools_summary(dets, gts, 1)
  np.testing.assert_allclose(stats, [0.0, 0.0, 0.0], rtol=0, atol=1e-15)
  # Without the cap (or with 101) the hit ranks 101st: precision 1/101.
  for m in (None, 101):
    r = coco_eval.evaluate_coco(dets, gts, 1, max_detections=m)
    assert r['map'] == pytest.approx(1 / 101, abs=1e-15)
  # A tie at the cut keeps the earlier detection, as pycocotools' mergesort.
  for first, want in ((True, 1.0), (False, 0.0)):
    boxes = [OBJ] + far if first else far + [OBJ]
    tied = [det(boxes, np.full(101, 0.5))]
    r = coco_eval.evaluate_coco(tied, gts, 1)
    stats, _ = pycocotools_summary(tied, gts, 1)
    assert r['map50'] == want == pytest.approx(stats[1], abs=1e-15)


def test_pycocotools_caps_each_class_and_cap_image_caps_the_image():
  # 100 class-1 detections outscore the class-0 hit in the same image.
  far = [[100.0 + 20 * i, 100.0, 10.0, 10.0] for i in range(100)]
  dets = [det(far + [OBJ], np.r_[np.full(100, 0.9), 0.1], [1] * 100 + [0])]
  gts = [gt([OBJ, far[0]], [0, 1])]
  per_class = coco_eval.evaluate_coco(dets, gts, 2)
  per_image = coco_eval.evaluate_coco(dets, gts, 2, cap='image')
  assert per_class['ap'][0, 0] == 1.0 and per_image['ap'][0, 0] == 0.0
  np.testing.assert_array_equal(per_image['num_det'], [0, 100])
  stats, ap = pycocotools_summary(dets, gts, 2)
  np.testing.assert_allclose(summary(per_class), stats, rtol=0, atol=1e-15)
  assert ap[0] == pytest.approx(1.0, abs=1e-15)
  kept = coco_eval.cap_detections(dets, 2, 1, cap='image')
  np.testing.assert_array_equal(kept[0]['boxes'], [far[0]])


@pytest.mark.parametrize('call, words', [
    (lambda: coco_eval.evaluate_coco([], [], 1, max_detections=0),
     'max_detections=0'),
    (lambda: coco_eval.evaluate_coco([], [], 1, cap='box'), "cap='box'"),
    (lambda: coco_eval.evaluate_coco([], [], 0), 'num_classes=0'),
    (lambda: coco_eval.evaluate_coco([], [], 1, iou_thresholds=[]),
     'iou_thresholds is empty'),
    (lambda: coco_eval.evaluate_coco([det([], [])], [gt([])], 1,
                                     iou_thresholds=[1.5]), 'iou_threshold'),
])
def test_bad_settings_raise_config_errors(call, words):
  with pytest.raises(ConfigError, match=words.replace('[', r'\[')):
    call()


def test_bad_inputs_raise_data_errors():
  with pytest.raises(DataError, match='class id 3 outside'):
    coco_eval.evaluate_coco([det([OBJ], [1.0], [3])], [gt([])], 3)
  with pytest.raises(DataError, match='detections has 1 images'):
    coco_eval.evaluate_coco([det([OBJ], [1.0])], [], 1)
  r = coco_eval.evaluate_coco([det([OBJ], [1.0])], [gt([])], 1)
  assert np.isnan(r['map']) and np.isnan(r['map50'])


# --- coco128: real annotations --------------------------------------------

NUM_CLASSES = 80


@pytest.fixture(scope='module')
def coco128():
  """(ground truth per image, (height, width) per image), by file name."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  tfds = pytest.importorskip('tensorflow_datasets')
  ds = tfds.load('coco128', split='validation', data_dir=str(SHARED_TFDS),
                 shuffle_files=False)
  examples = sorted(tfds.as_numpy(ds), key=lambda e: e['image/filename'])
  gts, sizes = [], []
  for ex in examples:
    h, w = ex['image'].shape[:2]
    # TFDS BBox (ymin, xmin, ymax, xmax) normalised -> pixel (x, y, w, h).
    ymin, xmin, ymax, xmax = ex['objects']['bbox'].astype(np.float64).T
    boxes = np.stack([xmin * w, ymin * h, (xmax - xmin) * w,
                      (ymax - ymin) * h], axis=1).reshape(-1, 4)
    gts.append(gt(boxes, ex['objects']['label'].astype(int)))
    sizes.append((h, w))
  assert len(gts) == 128 and sum(len(g['boxes']) for g in gts) == 898
  return gts, sizes


def jittered_detections(gts, sizes, seed, score_decimals=None):
  """Each object found 0-3 times, shifted and rescaled by 2-30 % of its
  size, 5 % with a wrong class; random false alarms of random classes; in
  every 8th image 110-160 extra detections, most of one class (over
  pycocotools' cap of 100 per image and class)."""
  rng = np.random.default_rng(seed)
  dets = []
  for n, (g, (h, w)) in enumerate(zip(gts, sizes)):
    boxes, classes = [], []
    for box, k in zip(g['boxes'], g['classes']):
      for _ in range(int(rng.choice([0, 1, 1, 1, 2, 3]))):
        s = rng.uniform(0.02, 0.3)
        x, y = box[:2] + rng.uniform(-s, s, 2) * box[2:]
        bw, bh = box[2:] * np.exp(rng.uniform(-s, s, 2))
        boxes.append([x, y, bw, bh])
        classes.append(k if rng.random() < 0.95
                       else rng.integers(NUM_CLASSES))
    extra = int(rng.integers(0, 12))
    busy = n % 8 == seed % 8
    if busy:
      extra += int(rng.integers(110, 160))
    for _ in range(extra):
      bw, bh = rng.uniform(0.03, 0.6) * w, rng.uniform(0.03, 0.6) * h
      boxes.append([rng.uniform(0, w - bw), rng.uniform(0, h - bh), bw, bh])
      classes.append(rng.integers(NUM_CLASSES))
    classes = np.array(classes, int)
    if busy and len(g['classes']):
      # Most of the extras take one class of the image: over 100 of it.
      many = rng.random(len(classes)) < 0.9
      classes[many] = g['classes'][0]
    scores = rng.random(len(boxes))
    if score_decimals is not None:
      scores = np.round(scores, score_decimals)
    order = rng.permutation(len(boxes))
    dets.append(det(np.array(boxes).reshape(-1, 4)[order], scores[order],
                    classes[order]))
  return dets


@requires_shared('coco128')
@pytest.mark.parametrize('seed, score_decimals', [(0, None), (1, None),
                                                  (2, 2)])
def test_coco128_summary_equals_pycocotools(coco128, seed, score_decimals):
  gts, sizes = coco128
  dets = jittered_detections(gts, sizes, seed, score_decimals)
  r = coco_eval.evaluate_coco(dets, gts, NUM_CLASSES, max_detections=100)
  stats, per_class = pycocotools_summary(dets, gts, NUM_CLASSES, sizes)
  np.testing.assert_allclose(summary(r), stats, rtol=0, atol=1e-9)
  np.testing.assert_allclose(r['ap_per_class'], per_class, rtol=0, atol=1e-9)
  # Informative data: middling APs, the cap bites, classes without gt exist.
  # (Random-score false alarms keep the APs low: mAP@.5 ~0.3, mAP ~0.15.)
  assert 0.05 < r['map75'] < r['map'] < r['map50'] < 0.6
  assert np.isnan(r['ap_per_class']).sum() == 80 - 73
  assert sum(len(d['scores']) for d in dets) > r['num_det'].sum()
  if seed == 0:
    uncapped = coco_eval.evaluate_coco(dets, gts, NUM_CLASSES, None)
    assert abs(uncapped['map'] - r['map']) > 1e-6
    # cap='image' equals pycocotools given the already capped detections.
    kept = coco_eval.cap_detections(dets, NUM_CLASSES, 100, cap='image')
    assert max(len(d['scores']) for d in kept) == 100
    r = coco_eval.evaluate_coco(dets, gts, NUM_CLASSES, cap='image')
    stats, _ = pycocotools_summary(kept, gts, NUM_CLASSES, sizes)
    np.testing.assert_allclose(summary(r), stats, rtol=0, atol=1e-9)
