"""Synthetic multi-object canvases: seeded rendering, layout constraints,
pixels where the boxes say, padding and loading."""
import numpy as np
import pytest
import tensorflow_datasets as tfds

from cnn.data import input_pipeline
from cnn.data import synthetic_detection as sd
from cnn.errors import DataError
from cnn.ops import boxes as box_ops
from cnn.data.synthetic_localization import resize


def source(n=12, seed=0, side=32):
  rng = np.random.default_rng(seed)
  return input_pipeline.ArrayData(
      rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8),
      rng.integers(0, 10, n).astype(np.int32))


def _fields(d):
  return (d.images, d.boxes, d.classes, d.num_objects, d.sources)


def test_rendering_is_a_pure_function_of_seed_and_index():
  src = source()
  data = sd.SyntheticDetection(src, canvas=96, seed=3, num_examples=8)
  full = data.materialize()
  for got, want in zip(_fields(data.render([3, 1])), _fields(full)):
    np.testing.assert_array_equal(got, want[[3, 1]])
  # Another instance, and one with fewer examples, draw the same canvases.
  again = sd.SyntheticDetection(src, canvas=96, seed=3, num_examples=8)
  fewer = sd.SyntheticDetection(src, canvas=96, seed=3, num_examples=4)
  for a, b, c in zip(_fields(again.materialize()), _fields(full),
                     _fields(fewer.materialize())):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(c, b[:4])
  assert len(data) == 8 and len(full) == 8 and len(fewer.materialize(2)) == 2
  other = sd.SyntheticDetection(src, canvas=96, seed=4,
                                num_examples=8).materialize()
  assert not np.array_equal(other.boxes, full.boxes)
  assert len(sd.SyntheticDetection(src)) == len(src)  # one per source image


def test_layout_counts_sizes_overlap_and_padding():
  src = source()
  data = sd.SyntheticDetection(src, canvas=100, seed=1, min_objects=1,
                               max_objects=4, min_size=20, max_size=40,
                               max_iou=0.1, num_examples=60).materialize()
  assert data.images.shape == (60, 100, 100, 3)
  assert data.images.dtype == np.uint8 and data.boxes.dtype == np.float32
  assert data.boxes.shape == (60, 4, 4) and data.classes.shape == (60, 4)
  assert data.classes.dtype == np.int32
  # Every count in 1..4 occurs (60 draws), and nothing outside the range.
  assert sorted(set(data.num_objects.tolist())) == [1, 2, 3, 4]
  overlaps = []
  for boxes, classes, sources, k in zip(data.boxes, data.classes,
                                        data.sources, data.num_objects):
    real, pad = boxes[:k], boxes[k:]
    x, y, w, h = real.T
    assert (x >= 0).all() and (y >= 0).all()
    assert (x + w <= 100).all() and (y + h <= 100).all()
    mean_side = np.sqrt(w * h)
    assert (mean_side >= 19.5).all() and (mean_side <= 40.5).all()
    assert (w / h >= 3 / 4 - 0.05).all() and (w / h <= 4 / 3 + 0.05).all()
    np.testing.assert_array_equal(classes[:k], src.labels[sources[:k]])
    assert (classes[k:] == -1).all() and (sources[k:] == -1).all()
    assert (pad == 0).all()
    iou = box_ops.pairwise_iou(real, real)[np.triu_indices(k, 1)]
    assert (iou <= 0.1 + 1e-6).all()
    overlaps.extend(iou.tolist())
  # Touching/overlapping placements do occur: the bound is what holds them.
  assert max(overlaps) > 0
  np.testing.assert_array_equal(data.valid, data.classes >= 0)
  # Objects come from all over the source, not one image per canvas.
  assert len(set(data.sources[data.valid].tolist())) == len(src)


def test_an_object_that_cannot_be_placed_is_dropped():
  # Two boxes of side >= 35 never fit side by side on 64 pixels, so with no
  # overlap allowed every canvas keeps only its first object.
  data = sd.SyntheticDetection(source(), canvas=64, min_objects=4,
                               max_objects=4, min_size=40, max_size=40,
                               max_iou=0.0, num_examples=10).materialize()
  assert (data.num_objects == 1).all()
  assert (data.classes[:, 1:] == -1).all()


@pytest.mark.parametrize('background', ['noise', 'gray'])
def test_pasted_pixels_are_the_resized_source_where_not_occluded(background):
  src = source(side=20)  # Not 32: the resize must come from the source.
  data = sd.SyntheticDetection(src, canvas=96, seed=2, max_iou=0.3,
                               background=background,
                               num_examples=12).materialize()
  occluded_some = False
  for img, boxes, sources, k in zip(data.images, data.boxes, data.sources,
                                    data.num_objects):
    covered = np.zeros((96, 96), bool)
    # Later objects are pasted over earlier ones: walk from the last.
    for j in reversed(range(k)):
      x, y, w, h = boxes[j].astype(int)
      visible = ~covered[y:y + h, x:x + w]
      occluded_some |= not visible.all()
      pasted = resize(src.images[sources[j]], h, w)
      np.testing.assert_allclose(img[y:y + h, x:x + w][visible],
                                 pasted[visible], atol=0.51)
      covered[y:y + h, x:x + w] = True
    outside = img[~covered]
    if background == 'gray':
      assert (outside == 128).all()
    else:
      # Textured, not a flat colour an edge detector would solve.
      assert outside.std() > 10
  assert occluded_some  # The check above did meet overlapping objects.


def test_bad_options_are_one_line_errors():
  src = source()
  for kwargs, match in (({'background': 'stripes'}, 'background'),
                        ({'min_size': 50, 'max_size': 40}, 'min_size'),
                        ({'max_size': 200}, 'canvas=128'),
                        ({'min_objects': 0}, 'min_objects'),
                        ({'min_objects': 3, 'max_objects': 2}, 'max_objects'),
                        ({'max_iou': 1.5}, 'max_iou'),
                        ({'num_examples': 0}, 'num_examples')):
    with pytest.raises(DataError, match=match) as e:
      sd.SyntheticDetection(src, **kwargs)
    assert '\n' not in str(e.value)
  with pytest.raises(DataError, match='empty'):
    sd.SyntheticDetection(input_pipeline.ArrayData(
        np.zeros((0, 8, 8, 3), np.uint8), np.zeros(0, np.int32)))


def test_load_mixes_the_split_into_the_seed():
  with tfds.testing.mock_data(num_examples=12):
    a = sd.load('cifar10', 'train', None, canvas=64, seed=1, num_examples=5,
                max_size=40)
    b = sd.load('cifar10', 'train', None, canvas=64, seed=1, max_size=40)
    test = sd.load('cifar10', 'test', None, canvas=64, seed=1, num_examples=5,
                   max_size=40)
  assert len(a) == 5 and len(b) == 12 and a.max_size == 40
  np.testing.assert_array_equal(a.materialize().boxes, b.render(range(5)).boxes)
  assert not np.array_equal(a.materialize().boxes, test.materialize().boxes)
