"""R-CNN / Fast R-CNN / Faster R-CNN: RoI sampling, RPN targets, losses,
post-processing, and each detector trained end to end through the train
command's entry point on tfds mock data (plus one run on real CIFAR-10)."""
import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from cnn.tasks.detection import inference
from cnn.tasks.detection import losses
from cnn.tasks.detection import model as model_lib
from cnn.tools import detection_report
from cnn.tasks.detection import targets as targets_lib
from cnn.tasks.detection import task as det_task
from cnn import runs as train_lib
from cnn.training import metric_writers
from cnn.errors import ConfigError, DataError
from cnn.ops import boxes as box_ops
from configs import detection as det_configs
from tests.conftest import (SHARED_TFDS, TIMING_KEYS, requires_cifar10_jpeg,
                            requires_shared)


def tiny_config(kind, **overrides):
  """The detection recipe shrunk to a few steps on 64x64 canvases."""
  c = det_configs.get_config(f'{kind},local')
  c.source, c.data_dir = 'cifar10', None
  c.canvas, c.min_size, c.max_size, c.max_objects = 64, 12, 32, 3
  c.detector.widths = (8, 16)  # stride 4: the R-CNN crop is 16 px
  c.detector.head_widths = (32,)
  c.detector.anchor_sizes = (12, 24)
  c.detector.anchor_ratios = (1.0,)
  c.detector.rpn_width = 16
  c.train_examples, c.test_examples, c.val_examples = 16, 4, 2
  c.roi.rois_per_image = 8
  c.proposals.train_per_image = c.proposals.test_per_image = 40
  c.proposals.processes = 1
  c.rpn.anchors_per_image = 32
  c.rpn.pre_nms_train = c.rpn.pre_nms_test = 100
  c.rpn.post_nms_train = c.rpn.post_nms_test = 20
  c.inference.rcnn_chunk = 16
  c.tensorboard = False
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


# ------------------------------------------------------------ sampling


def test_sample_rois_labels_targets_and_fg_fraction():
  gt = jnp.array([[10., 10., 20., 20.], [40., 40., 10., 10.], [0, 0, 0, 0]])
  gt_classes = jnp.array([3, 7, -1])
  props = jnp.array([
      [10., 10., 20., 20.],   # IoU 1 with gt 0
      [12., 10., 20., 20.],   # IoU ~0.82 with gt 0
      [40., 41., 10., 10.],   # IoU ~0.82 with gt 1
      [60., 0., 4., 4.],      # background (IoU 0)
      [14., 14., 20., 20.],   # IoU 0.47 with gt 0: background
      [0., 0., 0., 0.],       # padding
  ])
  valid = jnp.array([True] * 5 + [False])
  rois, labels, targets, w = targets_lib.sample_rois(
      jax.random.PRNGKey(0), props, valid, gt, gt_classes, num=6,
      fg_fraction=0.5, fg_iou=0.5, bg_iou=0.0, canvas=64)
  rois, labels, targets, w = map(np.asarray, (rois, labels, targets, w))
  # 3 foreground slots (fg_fraction 0.5 of 6) out of 5 foreground candidates
  # (3 proposals + 2 ground-truth boxes); 2 background candidates fill the
  # rest; the 6th slot has nothing left: weight 0.
  assert (labels > 0).sum() == 3 and np.sum(w) == 5
  assert ((labels == 0) & (w > 0)).sum() == 2
  assert set(labels[labels > 0]) <= {4, 8}  # class + 1
  assert np.all(np.isfinite(targets))
  for r, lab, t, wt in zip(rois, labels, targets, w):
    if lab > 0:
      g = np.asarray(gt[0] if lab == 4 else gt[1])
      assert box_ops.iou(r, g) >= 0.5
      np.testing.assert_allclose(
          box_ops.decode_deltas(t, r, model_lib.HEAD_DELTA_WEIGHTS), g, atol=1e-4)
    elif wt > 0:
      assert box_ops.iou(r, np.asarray(gt[0])) < 0.5
  # Different keys draw different foreground subsets, same counts.
  draws = {tuple(np.asarray(targets_lib.sample_rois(
      jax.random.PRNGKey(s), props, valid, gt, gt_classes, num=6,
      fg_fraction=0.5, fg_iou=0.5, bg_iou=0.0, canvas=64)[0][:3]).ravel())
           for s in range(8)}
  assert len(draws) > 1


def test_rpn_targets_mark_best_anchors_and_ignore_border_crossers():
  anchors = jnp.asarray(box_ops.anchors(4, 4, 16, (16, 32), (1.0,)))
  gt = jnp.array([[16., 16., 16., 16.], [0., 0., 0., 0.]])
  idx, lab, tgt, w = targets_lib.rpn_targets(
      jax.random.PRNGKey(0), anchors, gt, jnp.array([2, -1]), canvas=64,
      num=16, pos_fraction=0.5, pos_iou=0.7, neg_iou=0.3)
  idx, lab, w = map(np.asarray, (idx, lab, w))
  a = np.asarray(anchors)
  # The anchor equal to the box is the one positive (IoU 1).
  pos = idx[(lab > 0) & (w > 0)]
  assert len(pos) >= 1
  np.testing.assert_allclose(a[pos[0]], [16, 16, 16, 16])
  np.testing.assert_allclose(np.asarray(tgt)[(lab > 0) & (w > 0)][0], 0,
                             atol=1e-6)
  # No sampled anchor crosses the border.
  s = a[idx[w > 0]]
  assert np.all((s[:, 0] >= 0) & (s[:, 1] >= 0) & (s[:, 0] + s[:, 2] <= 64)
                & (s[:, 1] + s[:, 3] <= 64))
  ious = np.asarray(box_ops.pairwise_iou(s, np.asarray(gt[:1])))[:, 0]
  neg = (np.asarray(lab)[w > 0] == 0)
  assert np.all(ious[neg] < 0.3)


def test_head_loss_ignores_background_boxes_and_padding():
  logits = jnp.zeros((3, 4))
  deltas = jnp.ones((3, 3, 4))
  labels = jnp.array([0, 2, 1])
  targets = jnp.zeros((3, 4))
  cls, box, _ = losses.head_loss(logits, deltas, labels, targets,
                              jnp.array([1., 1., 0.]))
  np.testing.assert_allclose(cls, np.log(4), rtol=1e-6)
  # Only the second region counts: smooth-L1(1) = 0.5 per coordinate, over
  # 2 weighted regions.
  np.testing.assert_allclose(box, 4 * 0.5 / 2, rtol=1e-6)


def test_postprocess_decodes_class_boxes_and_suppresses_duplicates():
  rois = jnp.array([[10., 10., 20., 20.], [11., 10., 20., 20.],
                    [40., 40., 10., 10.], [0., 0., 5., 5.]])
  valid = jnp.array([True, True, True, False])
  logits = jnp.log(jnp.array([[0.1, 0.9, 0.0 + 1e-9],
                              [0.2, 0.8, 1e-9],
                              [0.3, 1e-9, 0.7],
                              [0.0 + 1e-9, 1.0, 1e-9]]))
  deltas = jnp.zeros((4, 2, 4))
  boxes, scores, classes = inference.postprocess(
      rois, valid, logits, deltas, canvas=64, score_threshold=0.05,
      nms_iou=0.3, per_class=5, max_detections=4)
  boxes, scores, classes = map(np.asarray, (boxes, scores, classes))
  keep = scores > 0
  # The near-duplicate of class 0 is suppressed; the padded roi never shows.
  assert keep.sum() == 2
  np.testing.assert_allclose(scores[keep], [0.9, 0.7], rtol=1e-5)
  np.testing.assert_array_equal(classes[keep], [0, 1])
  np.testing.assert_allclose(boxes[keep], np.asarray(rois)[[0, 2]],
                             atol=1e-4)


def test_postprocess_on_each_class_s_best_boxes_equals_all_boxes():
  # Many overlapping proposals, 6 classes, scores with many exact ties
  # (30 distinct logit rows): NMS on each class's `candidates` best boxes
  # gives the same detections as NMS on all 300 when every class's boxes
  # above the threshold fit, and falls back to all 300 when they do not.
  rng = np.random.default_rng(0)
  n, k = 300, 6
  xy = rng.uniform(0, 48, (n, 2))
  rois = jnp.asarray(np.concatenate([xy, rng.uniform(4, 16, (n, 2))], 1),
                     jnp.float32)
  valid = jnp.asarray(rng.random(n) < 0.9)
  logits = jnp.asarray(rng.normal(0, 2, (30, k + 1))[
      rng.integers(0, 30, n)], jnp.float32)
  deltas = jnp.asarray(rng.normal(0, 0.1, (n, k, 4)), jnp.float32)
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))[:, 1:]
  for threshold, candidates in ((0.5, 64), (0.05, 16)):
    most = int((probs[np.asarray(valid)] > threshold).sum(axis=0).max())
    assert (most <= candidates) == (threshold == 0.5), most
    got, want = (inference.postprocess(
        rois, valid, logits, deltas, canvas=64, score_threshold=threshold,
        nms_iou=0.3, per_class=60, max_detections=6 * 60, candidates=c)
        for c in (candidates, 0))
    assert (np.asarray(want[1]) > 0).sum() >= 20
    for g, w in zip(got, want):
      np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_config_errors_are_one_line():
  with pytest.raises(ValueError, match='unknown preset'):
    det_configs.get_config('yolo')
  c = tiny_config('fast_rcnn')
  c.proposals.method = 'edge_boxes'
  with pytest.raises(ConfigError, match='proposals.method'):
    det_task.DetectionTask(c).validate()
  c = tiny_config('fast_rcnn')
  c.roi.bg_iou = 0.6
  with pytest.raises(ConfigError, match='bg_iou'):
    det_task.DetectionTask(c).validate()
  c = tiny_config('faster_rcnn', canvas=66)
  with pytest.raises(ConfigError, match='multiple of the trunk stride'):
    model_lib.make_model(c, 10)


# -------------------------------------------------------- end to end


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """Each detector trained for 6 steps through the one training loop."""
  root = tmp_path_factory.mktemp('det')
  runs = {}
  with tfds.testing.mock_data(num_examples=16):
    for kind in model_lib.KINDS:
      work = str(root / kind)
      res = train_lib.train_and_evaluate(tiny_config(kind), work)
      runs[kind] = (work, res['test'])
  return runs


def test_each_detector_trains_evaluates_and_writes_its_run(trained):
  for kind, (work, res) in trained.items():
    assert 0.0 <= res['map'] <= 1.0, kind
    assert res['seconds_per_image'] > 0 and res['network_seconds'] > 0
    assert res['nms_seconds'] > 0  # the detection NMS, timed apart
    assert res['seconds_per_image'] == pytest.approx(
        res['proposal_seconds'] + res['network_seconds'] + res['nms_seconds'])
    # Only R-CNN and Fast R-CNN spend time on selective search.
    assert (res['proposal_seconds'] > 0) == (kind != 'faster_rcnn'), kind
    assert 0 < res['proposals_per_image'] <= 40
    records = metric_writers.read_metrics(work)
    train = [r for r in records if r['split'] == 'train']
    assert [r['step'] for r in train] == [2, 4, 6]
    assert all(np.isfinite(r['loss']) for r in train)
    assert [r['step'] for r in records if r['split'] == 'val'] == [4, 6]
    assert [r['step'] for r in records if r['split'] == 'test'] == [4, 6]
    assert records[-1]['split'] == 'test'
    assert os.path.isdir(os.path.join(work, 'checkpoints', '6'))
    with open(os.path.join(work, 'config.json')) as f:
      assert json.load(f)['kind'] == kind
    if kind != 'faster_rcnn':  # the training proposals are cached
      assert os.listdir(os.path.join(work, 'proposals'))


def test_resumed_detector_run_equals_an_uninterrupted_one(trained, tmp_path):
  # A copy of the 6-step run that "died" after its step-4 checkpoint.
  straight_work, straight = trained['fast_rcnn']
  work = str(tmp_path / 'resumed')
  shutil.copytree(straight_work, work)
  shutil.rmtree(os.path.join(work, 'checkpoints', '6'))
  with tfds.testing.mock_data(num_examples=16):
    res = train_lib.train_and_evaluate(tiny_config('fast_rcnn'), work)['test']
  train = lambda w: [{k: v for k, v in r.items() if k not in TIMING_KEYS}
                     for r in metric_writers.read_metrics(w)
                     if r['split'] == 'train']
  assert [r['step'] for r in train(work)] == [2, 4, 6]
  assert train(work) == train(straight_work)
  assert res['map'] == straight['map']


def test_evaluate_checkpoint_of_a_detection_run(trained):
  work, final = trained['faster_rcnn']
  with tfds.testing.mock_data(num_examples=16):
    last = train_lib.evaluate_checkpoint(work, 'test', 'latest')
    early = train_lib.evaluate_checkpoint(work, 'test', '4')
    val = train_lib.evaluate_checkpoint(work, 'val', 'best')
    with pytest.raises(ConfigError, match='training images sit in memory'):
      train_lib.evaluate_checkpoint(work, 'train')
  # (mock data ignores split slices; the real-data test counts the canvases)
  assert val['examples'] > 0 and val['step'] in (4, 6)
  assert last['step'] == 6 and early['step'] == 4
  assert last['map'] == final['map']  # the same weights, the same canvases
  assert 0.0 <= early['map'] <= 1.0


def test_training_seconds_leave_out_the_evaluations(tmp_path):
  rows = [('train', 2, 10.0), ('train', 4, 20.0), ('val', 4, 25.0),
          ('test', 4, 27.0), ('train', 6, 37.0), ('val', 6, 40.0),
          ('test', 6, 45.0)]
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    for split, step, wall in rows:
      f.write(json.dumps({'split': split, 'step': step,
                          'wall_seconds': wall}) + '\n')
  # 37 s at step 6, less the 7 s of evaluation at step 4.
  assert detection_report.training_seconds(str(tmp_path)) == (6, 30.0)
  with open(tmp_path / 'metrics.jsonl', 'w') as f:  # a run without a clock
    f.write(json.dumps({'split': 'train', 'step': 2}) + '\n')
  assert detection_report.training_seconds(str(tmp_path)) == (2, None)


def test_comparison_table_and_picture(trained, tmp_path):
  works = [trained[k][0] for k in model_lib.KINDS]
  table = detection_report.comparison_table(works)
  lines = table.splitlines()
  assert len(lines) == 5 and lines[2].startswith('| R-CNN |')
  assert '| 1.0x |' in lines[2]  # R-CNN against itself
  assert '250x' in lines[4]  # the lecture's Faster R-CNN speed-up
  assert '| NMS |' in lines[0] and ' ms | in network |' not in table
  assert all(' min / 6 steps |' in line for line in lines[2:])
  with pytest.raises(ConfigError, match='no config.json'):
    detection_report.comparison_table([str(tmp_path / 'nothing')])
  png = str(tmp_path / 'det.png')
  with tfds.testing.mock_data(num_examples=16):
    times = detection_report.time_side_by_side(works, num_images=2)
    # Selective search for R-CNN and Fast R-CNN only; every net takes time.
    assert [t[0] > 0 for t in times] == [True, True, False]
    assert all(t[1] > 0 and t[2] > 0 for t in times)
    detection_report.draw_detections(works, png, num_images=2, min_score=0.0)
    # The NMS both ways on one run's outputs: a row per value, same
    # detections (the exactness itself is tested on postprocess above).
    nms = detection_report.compare_nms(works[1], [0, 1], num_images=2)
  rows = nms.splitlines()[2:]
  assert [r.split(' | ')[0] for r in rows] == ['| 0', '| 1']
  assert rows[0].endswith('| 1.00x | yes |') and rows[1].endswith('| yes |')
  with open(png, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


@requires_cifar10_jpeg
def test_fast_rcnn_on_real_cifar10_canvases(tmp_path):
  c = tiny_config('fast_rcnn', source='cifar10_jpeg',
                  data_dir=str(SHARED_TFDS))
  final = train_lib.train_and_evaluate(c, str(tmp_path / 'real'))
  res = final['test']
  assert 0.0 <= res['map'] <= 1.0
  # val: one canvas per source image after the 16 training ones.
  assert final['val']['examples'] == 2 and res['examples'] == 4
  # Selective search finds the pasted photos (recall ~1 on these canvases).
  assert res['proposal_recall'] > 0.5


def test_voc_images_objects_and_difficult_flags_and_missing_voc(tmp_path):
  from cnn.data import synthetic_detection as synth  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=3,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    d = synth.load_voc('train', None, canvas=64, max_objects=6)
  assert d.images.shape == (3, 64, 64, 3) and d.images.dtype == np.uint8
  assert d.boxes.shape == (3, 6, 4) and d.difficult.shape == (3, 6)
  for classes, n in zip(d.classes, d.num_objects):
    assert 1 <= n <= 6
    assert np.all((classes[:n] >= 0) & (classes[:n] < 20))
    assert np.all(classes[n:] == -1)
  part = d.take(slice(0, 2))
  assert len(part) == 2 and part.sources is None
  np.testing.assert_array_equal(part.difficult, d.difficult[:2])
  c = tiny_config('faster_rcnn', dataset='voc', data_dir=str(tmp_path))
  with pytest.raises(DataError, match=r"voc/2007.*not readable.*tfds build"):
    train_lib.train_and_evaluate(c, str(tmp_path / 'run'))


def test_detector_starts_from_a_pretrained_det_trunk_classifier(tmp_path):
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top
  from cnn.training import checkpointing  # pylint: disable=g-import-not-at-top
  from cnn.training import transfer  # pylint: disable=g-import-not-at-top
  from cnn.errors import CheckpointError  # pylint: disable=g-import-not-at-top
  from tests.conftest import small_config  # pylint: disable=g-import-not-at-top

  def pretrain(name, model='det_trunk', **kwargs):
    c = small_config(model, steps=2, tensorboard=False)
    c.model_kwargs = config_dict.ConfigDict(kwargs)
    with tfds.testing.mock_data(num_examples=16):
      train_lib.train_and_evaluate(c, str(tmp_path / name))
    return str(tmp_path / name)

  # Three stages: stride 8, so a 32x32 image leaves the detector's 4x4 RoI
  # grid and the FC layers fit.
  good = pretrain('good', widths=(8, 16, 16), fc_widths=(32,))
  c = tiny_config('fast_rcnn', init_from=good)
  c.detector.widths = (8, 16, 16)
  task = det_task.DetectionTask(c)
  model, spec = model_lib.make_model(c, 10)
  task.spec = spec
  fresh = task.init_variables(model, None, jax.random.PRNGKey(0))
  params, stats, message = det_task.load_pretrained(
      good, fresh['params'], fresh['batch_stats'])
  # 6 conv kernels + 6 BN (scale, bias) + fc1 (kernel, bias) = 20 arrays.
  assert 'loaded 20 parameter arrays and 12 BatchNorm statistics' in message
  ckpt = checkpointing.Checkpointer(os.path.join(good, 'checkpoints'),
                                    read_only=True)
  saved = transfer._restore_raw(ckpt, 2)  # pylint: disable=protected-access
  ckpt.close()
  np.testing.assert_array_equal(
      params['trunk']['conv2_1']['kernel'],
      saved['params']['trunk']['conv2_1']['kernel'])
  np.testing.assert_array_equal(params['head']['fc']['fc1']['kernel'],
                                saved['params']['fc']['fc1']['kernel'])
  np.testing.assert_array_equal(stats['trunk']['bn1_1']['var'],
                                saved['batch_stats']['trunk']['bn1_1']['var'])
  # The class and box layers keep their fresh initialisation.
  np.testing.assert_array_equal(params['head']['cls']['kernel'],
                                fresh['params']['head']['cls']['kernel'])
  with pytest.raises(CheckpointError, match=r'(?s)11 mismatches, nothing loaded.*'
                     r'trunk/conv2_1/kernel: checkpoint shape \[3, 3, 8, 32\]'):
    det_task.load_pretrained(
        pretrain('wide', widths=(8, 32, 16), fc_widths=(32,)),
        fresh['params'], fresh['batch_stats'])
  with pytest.raises(CheckpointError, match="'cifar_resnet8' checkpoint"):
    det_task.load_pretrained(pretrain('resnet', 'cifar_resnet8'),
                             fresh['params'], fresh['batch_stats'])


@requires_shared('coco128')
def test_coco128_preset_trains_and_tests_on_disjoint_photos():
  c = det_configs.get_config('fast_rcnn,coco128')
  c.data_dir = str(SHARED_TFDS)
  from cnn.data import objects  # pylint: disable=g-import-not-at-top
  train = objects.load_objects(c.dataset, c.train_split, c.data_dir,
                               shorter_side=64, max_side=64,
                               limit=c.train_examples)
  test = objects.load_objects(c.dataset, c.test_split, c.data_dir,
                              shorter_side=64, max_side=64)
  assert (len(train.images), len(test.images)) == (96, 32)
  assert not set(train.filenames) & set(test.filenames)
  assert c.val_examples == 0 and det_task.num_classes(c) == 80


@requires_shared('raccoon')
def test_faster_rcnn_on_real_raccoon_photographs(tmp_path, monkeypatch):
  c = det_configs.get_config('faster_rcnn,raccoon,local')
  c.data_dir = str(SHARED_TFDS)
  # The letterboxes: longer side 256, boxes scaled with the photo and
  # inside it, black beyond it.
  data = det_task.photos(c, 'train', 4)
  assert data.images.shape[1:] == (256, 256, 3)
  assert data.num_objects.min() >= 1 and set(
      data.classes[data.valid].tolist()) == {0}
  x, y, w, h = (data.boxes[data.valid][:, k] for k in range(4))
  assert x.min() >= 0 and y.min() >= 0 and (x + w).max() <= 256.01
  assert (y + h).max() <= 256.01 and w.min() > 0 and h.min() > 0
  for img in data.images:  # one side filled, the rest padded black
    rows = np.flatnonzero(img.max(axis=(1, 2)) > 0)
    cols = np.flatnonzero(img.max(axis=(0, 2)) > 0)
    assert max(rows[-1], cols[-1]) >= 250
  final = train_lib.train_and_evaluate(c, str(tmp_path / 'run'))
  for split in ('val', 'test'):
    assert 0.0 <= final[split]['map'] <= 1.0
    assert final[split]['seconds_per_image'] > 0
  meta = json.loads((tmp_path / 'run' / 'config.json').read_text())
  assert meta['dataset'] == 'raccoon' and meta['canvas'] == 256
  # The picture of a photo run names the dataset's classes.
  png = tmp_path / 'raccoon.png'
  detection_report.draw_detections([str(tmp_path / 'run')], str(png),
                                   num_images=2, min_score=0.0)
  assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  # Its RPN as a proposal method on photos of their own size (not
  # letterboxed): boxes inside each photo, as many as NMS kept.
  from cnn.data import objects  # pylint: disable=g-import-not-at-top
  from experiments import proposals as proposals_cli  # pylint: disable=g-import-not-at-top
  run, state, _ = train_lib.restore_run(str(tmp_path / 'run'))
  rpn = inference.RPNProposer(run.model, state.variables, run.config,
                              run.task.spec, post_nms=300)
  photos = objects.load_objects('raccoon', 'test', str(SHARED_TFDS),
                                shorter_side=200, limit=2)
  for img in photos.images:
    boxes, seconds = rpn(img)
    h, w = img.shape[:2]
    assert max(h, w) > 256 and 0 < len(boxes) <= 300 and seconds > 0
    assert boxes[:, 0].min() >= 0 and boxes[:, 1].min() >= 0
    assert (boxes[:, 0] + boxes[:, 2]).max() <= w + 1e-3
    assert (boxes[:, 1] + boxes[:, 3]).max() <= h + 1e-3
  monkeypatch.setattr(proposals_cli, '_METHODS', ('sliding',))
  rows = proposals_cli.measure_photos(photos, 1, 0, ('rpn', rpn))
  assert [r[0] for r in rows] == ['sliding', 'rpn'] and rows[1][1] > 0
  assert 0 <= rows[1][3][0.7]['all'] <= rows[1][3][0.5]['all'] <= 1
  with pytest.raises(ValueError, match='needs a faster_rcnn run'):
    inference.RPNProposer(run.model, state.variables, run.config,
                          dataclasses.replace(run.task.spec, kind='rcnn'))
  with pytest.raises(DataError, match="'mnist' has no 'objects'"):
    bad = det_configs.get_config('faster_rcnn,raccoon,local')
    bad.dataset, bad.data_dir = 'mnist', str(SHARED_TFDS)
    det_task.DetectionTask(bad).validate()
