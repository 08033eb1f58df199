"""Region proposals: selective search, sliding windows, random boxes, the
padded batch API and its cache, recall; one run on the real CIFAR-10."""
import os

import numpy as np
import pytest

from cnn.data import input_pipeline
from cnn.tasks.detection import proposals
from cnn.data import synthetic_detection as sd
from cnn.errors import ConfigError, DataError
from tests.conftest import ROOT, SHARED_TFDS, requires_cifar10_jpeg, requires_shared


def rectangle_image(h=96, w=128, box=(70, 20, 40, 50)):
  """A high-contrast rectangle (x, y, w, h) on a flat, faintly noisy field."""
  rng = np.random.default_rng(0)
  img = np.full((h, w, 3), 120, np.int64) + rng.integers(-3, 4, (h, w, 3))
  x, y, bw, bh = box
  img[y:y + bh, x:x + bw] = (230, 40, 30)
  return np.clip(img, 0, 255).astype(np.uint8)


def small_canvases(n=3, canvas=64):
  rng = np.random.default_rng(0)
  src = input_pipeline.ArrayData(
      rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8),
      rng.integers(0, 10, 6).astype(np.int32))
  return sd.SyntheticDetection(src, canvas=canvas, min_size=16, max_size=32,
                               num_examples=n).materialize()


def inside(boxes, h, w):
  x, y, bw, bh = boxes.T
  return bool((x >= 0).all() and (y >= 0).all() and (x + bw <= w).all()
              and (y + bh <= h).all())


def test_selective_search_finds_a_rectangle_and_is_deterministic():
  img = rectangle_image()  # Not square: x and y must not be swapped.
  gt = np.array([[[70, 20, 40, 50]]], np.float32)
  for mode in proposals.SS_MODES:
    boxes = proposals.selective_search(img, mode)
    assert boxes.dtype == np.float32 and boxes.shape[1] == 4
    assert len(boxes) > 1 and inside(boxes, 96, 128)
    assert (boxes[:, 2:] >= 4).all()
    assert len(np.unique(boxes, axis=0)) == len(boxes)
    rec = proposals.recall(boxes[None], [len(boxes)], gt, [[True]])
    assert rec['all'] == 1.0
  # OpenCV ranks with a random draw per call; the order must still repeat.
  canvas = small_canvases(1).images[0]
  first = proposals.selective_search(canvas, 'fast')
  np.testing.assert_array_equal(proposals.selective_search(canvas, 'fast'),
                                first)
  np.testing.assert_array_equal(
      proposals.selective_search(canvas, 'fast', max_boxes=5), first[:5])
  big = proposals.selective_search(canvas, 'fast', min_side=16)
  assert (big[:, 2:] >= 16).all() and 0 < len(big) < len(first)
  grey = proposals.selective_search(canvas[..., :1], 'single')
  assert len(grey) and inside(grey, 64, 64)


def test_selective_search_feeds_bgr_and_filters_opencv_output(monkeypatch):
  seen = {}

  class FakeSearch:

    def setBaseImage(self, image):  # pylint: disable=invalid-name
      seen['image'] = image

    def switchToSelectiveSearchFast(self):  # pylint: disable=invalid-name
      seen['mode'] = 'fast'

    def process(self):
      return np.array([[5, 6, 10, 12], [0, 0, 3, 20], [1, 1, 30, 30],
                       [5, 6, 10, 12], [2, 2, 20, 2], [1, 1, 30, 30],
                       [7, 7, 4, 4]], np.int32)

  segmentation = type('Seg', (), {
      'createSelectiveSearchSegmentation': staticmethod(FakeSearch)})
  fake = type('Cv2', (), {'ximgproc': type('X', (), {
      'segmentation': segmentation})})
  monkeypatch.setattr(proposals, '_cv2', lambda: fake)
  img = rectangle_image()
  boxes = proposals.selective_search(img, 'fast')
  # RGB in, BGR to OpenCV; duplicates and thin boxes out, the order kept.
  np.testing.assert_array_equal(seen['image'], img[..., ::-1])
  assert seen['mode'] == 'fast'
  assert boxes.tolist() == [[5, 6, 10, 12], [1, 1, 30, 30], [7, 7, 4, 4]]
  assert proposals.selective_search(img, 'fast', min_side=5).tolist() == [
      [5, 6, 10, 12], [1, 1, 30, 30]]


def test_selective_search_bad_input_is_one_line():
  with pytest.raises(ConfigError, match='mode'):
    proposals.selective_search(rectangle_image(), 'slow')
  with pytest.raises(DataError, match='one at a time'):
    proposals.selective_search(np.zeros((2, 8, 8, 3), np.uint8))


def test_sliding_windows_cover_the_canvas_at_the_stride():
  w32 = proposals.sliding_windows(64, [32], [1.0])
  expect = [(x, y, 32, 32) for y in (0, 16, 32) for x in (0, 16, 32)]
  assert sorted(map(tuple, w32.tolist())) == sorted(expect)
  # 24 px at stride 12: 0, 12, 24, 36 and one flush with the edge, 40.
  w24 = proposals.sliding_windows(64, [24], [1.0])
  assert len(w24) == 25 and set(w24[:, 0].tolist()) == {0, 12, 24, 36, 40}
  # (H, W) = (48, 80): 9 columns x 5 rows of 16 px windows at stride 8.
  wide = proposals.sliding_windows((48, 80), [16], [1.0])
  assert len(wide) == 45 and inside(wide, 48, 80)
  mixed = proposals.sliding_windows((48, 80), [16, 30], [3 / 4, 1, 4 / 3])
  assert inside(mixed, 48, 80)
  assert {(w, h) for w, h in mixed[:, 2:].tolist()} == {
      (14, 18), (16, 16), (18, 14), (26, 35), (30, 30), (35, 26)}
  assert len(proposals.sliding_windows(64, [100], [1.0])) == 0
  with pytest.raises(ConfigError, match='stride_fraction'):
    proposals.sliding_windows(64, [16], [1.0], stride_fraction=0)


def test_random_boxes_are_seeded_and_inside():
  a = proposals.random_boxes(0, 2000, (48, 80), min_side=8)
  assert a.shape == (2000, 4) and a.dtype == np.float32
  assert inside(a, 48, 80) and (a[:, 2:] >= 8).all()
  # They spread over the whole canvas, up to its edges.
  assert (a[:, 0] + a[:, 2]).max() == 80 and (a[:, 1] + a[:, 3]).max() == 48
  assert a[:, 2].max() == 80 and a[:, 3].max() == 48
  np.testing.assert_array_equal(
      proposals.random_boxes(np.random.default_rng(0), 2000, (48, 80)), a)
  assert not np.array_equal(proposals.random_boxes(1, 2000, (48, 80)), a)
  with pytest.raises(ConfigError, match='min_side'):
    proposals.random_boxes(0, 3, 16, min_side=20)


def test_recall_by_hand():
  props = np.array([
      [[50, 50, 5, 5], [0, 0, 10, 10], [20, 20, 10, 12]],
      # IoU 100/210 with the object; the exact box sits past the count.
      [[5, 5, 10, 21], [5, 5, 10, 10], [0, 0, 0, 0]]], np.float32)
  counts = np.array([3, 1])
  gt = np.array([[[0, 0, 10, 10], [20, 20, 10, 10]],
                 [[5, 5, 10, 10], [5, 5, 10, 21]]], np.float32)
  valid = np.array([[True, True], [True, False]])  # The last is padding.
  rec = proposals.recall(props, counts, gt, valid, 0.5, (1, 2, 3, 10, 'all'))
  assert list(rec) == [1, 2, 3, 10, 'all']
  np.testing.assert_allclose(list(rec.values()), [0, 1 / 3, 2 / 3, 2 / 3,
                                                  2 / 3])
  rec = proposals.recall(props, counts, gt, valid, 0.45, (1, 'all'))
  np.testing.assert_allclose(list(rec.values()), [1 / 3, 1])
  with pytest.raises(DataError, match='ground-truth'):
    proposals.recall(props, counts, gt, np.zeros_like(valid))


def test_compute_pads_orders_and_uses_processes():
  data = small_canvases(3)
  boxes, counts = proposals.compute(data.images, 'selective_search_fast', 400)
  assert boxes.shape == (3, 400, 4) and counts.dtype == np.int32
  for img, b, c in zip(data.images, boxes, counts):
    assert 0 < c < 400
    np.testing.assert_array_equal(b[:c], proposals.selective_search(img))
    assert (b[c:] == 0).all()
  some, few = proposals.compute(data.images, 'selective_search_fast', 5)
  assert (few == 5).all()
  np.testing.assert_array_equal(some, boxes[:, :5])
  pooled, pcounts = proposals.compute(data.images, 'selective_search_fast',
                                      400, processes=2)
  np.testing.assert_array_equal(pooled, boxes)
  np.testing.assert_array_equal(pcounts, counts)
  allw, wcounts = proposals.compute(data.images, 'sliding', None,
                                    sizes=[16, 32])
  windows = proposals.sliding_windows(64, [16, 32], [3 / 4, 1, 4 / 3])
  assert allw.shape == (3, len(windows), 4) and (wcounts == len(windows)).all()
  for b in allw:  # Every window, in a different random order per image.
    assert sorted(map(tuple, b.tolist())) == sorted(map(tuple,
                                                        windows.tolist()))
  assert not np.array_equal(allw[0], allw[1])
  np.testing.assert_array_equal(
      proposals.compute(data.images, 'sliding', 7, sizes=[16, 32])[0],
      allw[:, :7])
  rand, rcounts = proposals.compute(data.images, 'random', 50, seed=3)
  assert rand.shape == (3, 50, 4) and (rcounts == 50).all()
  assert inside(rand.reshape(-1, 4), 64, 64)
  np.testing.assert_array_equal(
      proposals.compute(data.images, 'random', 50, seed=3)[0], rand)
  assert not np.array_equal(
      proposals.compute(data.images, 'random', 50, seed=4)[0], rand)
  with pytest.raises(ConfigError, match='unknown'):
    proposals.compute(data.images, 'edge_boxes', 10)
  with pytest.raises(ConfigError, match='num'):
    proposals.compute(data.images, 'random', None)


def test_cache_hit_skips_the_work_and_a_new_key_recomputes(tmp_path,
                                                           monkeypatch):
  data = small_canvases(2)
  path = str(tmp_path / 'cache' / 'ss.npz')
  boxes, counts = proposals.compute(data.images, 'selective_search_fast', 100,
                                    cache=path)
  assert os.listdir(tmp_path / 'cache') == ['ss.npz']  # No tmp file left.

  class Recomputed(Exception):
    pass

  def refuse(*args, **kwargs):
    raise Recomputed
  monkeypatch.setattr(proposals, '_compute', refuse)
  hit = proposals.compute(data.images, 'selective_search_fast', 100,
                          cache=path)
  np.testing.assert_array_equal(hit[0], boxes)
  np.testing.assert_array_equal(hit[1], counts)
  changed = data.images.copy()
  changed[1, 0, 0, 0] ^= 1
  for images, method, num in ((data.images, 'selective_search_fast', 50),
                              (data.images, 'selective_search_quality', 100),
                              (data.images[:1], 'selective_search_fast', 100),
                              (changed, 'selective_search_fast', 100)):
    with pytest.raises(Recomputed):
      proposals.compute(images, method, num, cache=path)
  monkeypatch.undo()
  # A different key or an unreadable file is recomputed and replaced.
  small = proposals.compute(data.images, 'selective_search_fast', 50,
                            cache=path)
  np.testing.assert_array_equal(small[0], boxes[:, :50])
  with open(path, 'wb') as f:
    f.write(b'not an npz')
  again = proposals.compute(data.images, 'selective_search_fast', 100,
                            cache=path)
  np.testing.assert_array_equal(again[0], boxes)


@requires_cifar10_jpeg
def test_integration_real_cifar10_jpeg_canvases_and_selective_search():
  data = sd.load('cifar10_jpeg', 'test', str(SHARED_TFDS), limit=300,
                 num_examples=8).materialize()
  assert data.images.shape == (8, 128, 128, 3)
  assert data.boxes.shape == (8, 4, 4)
  assert ((data.num_objects >= 1) & (data.num_objects <= 4)).all()
  real = data.classes[data.valid]
  assert ((real >= 0) & (real <= 9)).all()
  boxes, counts = proposals.compute(data.images, 'selective_search_fast', None)
  assert (counts > 10).all()
  rec = proposals.recall(boxes, counts, data.boxes, data.valid)
  assert rec['all'] > 0.5 and rec['all'] >= rec[10]


@requires_shared('coco128')
def test_proposal_recall_on_real_photographs():
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.proposals', '--dataset=coco128',
       f'--data_dir={SHARED_TFDS}', '--num_images=2', '--shorter_side=128',
       '--processes=1'], cwd=str(ROOT), capture_output=True, text=True,
      check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  rows = [l.split('|')[1:-1] for l in out.stdout.splitlines()
          if l.startswith('| ') and not l.startswith('| method')]
  assert [r[0].strip() for r in rows] == [
      'selective_search_fast', 'selective_search_quality', 'sliding',
      'random']
  for r in rows:
    recalls = [float(x) for x in r[3:]]
    assert len(recalls) == 8 and all(0 <= x <= 1 for x in recalls)
    at5, at7 = recalls[:4], recalls[4:]
    assert at5 == sorted(at5) and at7 == sorted(at7)  # more boxes, more recall
    assert all(a >= b for a, b in zip(at5, at7))  # 0.7 is stricter
  assert '2 photos of coco128/validation, shorter side 128' in out.stdout


def test_proposals_rpn_flag_without_a_run_fails_with_one_line(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.proposals', '--dataset=coco128',
       f'--rpn={tmp_path}/nothing'], cwd=str(ROOT), capture_output=True,
      text=True, check=False)
  assert out.returncode != 0
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, out.stderr[-2000:]
  assert f'--rpn={tmp_path}/nothing holds no training run' in lines[0]
  assert 'faster_rcnn' in lines[0]
