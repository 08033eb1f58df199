"""Detection photographs: resize + boxes, padded batches, errors, real data."""
import io

from etils import epath
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from cnn.data import objects
from cnn.errors import DataError
from tests.conftest import SHARED_TFDS, requires_shared

NAMES = ['cat', 'dog']


def _wide(seed=0):
  """A 100x200 image (H x W)."""
  return np.random.default_rng(seed).integers(0, 256, (100, 200, 3), np.uint8)


def _bbox(x, y, w, h, height, width):
  """Pixel (x, y, w, h) -> TFDS BBox (ymin, xmin, ymax, xmax) in [0, 1]."""
  return [y / height, x / width, (y + h) / height, (x + w) / width]


def _jpeg(image):
  out = io.BytesIO()
  Image.fromarray(image).save(out, format='JPEG')
  return out.getvalue()


# --- convert: one photo -----------------------------------------------------

def test_convert_resizes_the_shorter_side_and_scales_the_box_exactly():
  bbox = [_bbox(40, 20, 80, 40, 100, 200), _bbox(0, 0, 200, 100, 100, 200)]
  out = objects.convert(_wide(), bbox, [1, 0], shorter_side=50)
  assert out.image.shape == (50, 100, 3) and out.image.dtype == np.uint8
  assert out.boxes.dtype == np.float32 and out.labels.dtype == np.int32
  np.testing.assert_allclose(out.boxes, [[20, 10, 40, 20], [0, 0, 100, 50]],
                             atol=1e-5)
  assert out.labels.tolist() == [1, 0]
  np.testing.assert_array_equal(out.scale, [0.5, 0.5])
  # The resize averages (antialiased): a 2x shrink of a constant image is
  # that constant, and the mean brightness is kept.
  flat = objects.convert(np.full((100, 200, 3), 77, np.uint8), [], [], 50)
  assert (flat.image == 77).all()
  assert abs(out.image.mean() - _wide().mean()) < 1


def test_convert_caps_the_longer_side_and_upscales():
  image = np.zeros((100, 400, 3), np.uint8)
  bbox = [_bbox(100, 40, 200, 20, 100, 400)]
  out = objects.convert(image, bbox, [0], shorter_side=50, max_side=100)
  assert out.image.shape == (25, 100, 3)  # Not 50x200: the cap wins.
  np.testing.assert_allclose(out.boxes, [[25, 10, 50, 5]], atol=1e-5)
  np.testing.assert_array_equal(out.scale, [0.25, 0.25])
  big = objects.convert(image, bbox, [0], shorter_side=200, max_side=1000)
  assert big.image.shape == (200, 800, 3)
  np.testing.assert_allclose(big.boxes, [[200, 80, 400, 40]], atol=1e-4)
  assert objects.resized_shape(333, 500, 100) == (100, 150)


def test_convert_keeps_a_photo_without_boxes():
  out = objects.convert(_wide(), np.zeros((0, 4), np.float32),
                        np.zeros(0, np.int64), shorter_side=50)
  assert out.boxes.shape == (0, 4) and out.labels.shape == (0,)


def test_letterbox_is_convert_then_a_square_batch_slot():
  # A tall and a wide photo: the longer side becomes the canvas side, the
  # photo sits top-left, the rest is black, as the task's training batches.
  for image in (_wide(), _wide().transpose(1, 0, 2)):
    canvas, (nh, nw) = objects.letterbox(image, 64)
    assert canvas.shape == (64, 64, 3) and canvas.dtype == np.uint8
    assert max(nh, nw) == 64 and (nh, nw) == tuple(
        round(s * 64 / max(image.shape[:2])) for s in image.shape[:2])
    want = objects.convert(image, [], [], shorter_side=64, max_side=64).image
    np.testing.assert_array_equal(canvas[:nh, :nw], want)
    assert not canvas[nh:].any() and not canvas[:, nw:].any()


def test_decode_names_the_dataset_and_example_of_a_corrupt_image():
  feature = tfds.features.Image(shape=(None, None, 3))
  good = _jpeg(_wide())
  assert objects.decode(good, feature, name='d', split='s', index=0).shape == (
      100, 200, 3)
  for raw in (good[:len(good) // 2], b'not an image'):
    with pytest.raises(DataError) as e:
      objects.decode(raw, feature, name='raccoon', split='train', index=7,
                     filename='raccoon-7.jpg')
    msg = str(e.value)
    assert '\n' not in msg and 'Op:' not in msg, msg
    assert "'raccoon' split 'train': example 7 (raccoon-7.jpg)" in msg, msg


# --- a small TFDS dataset on disk --------------------------------------------

class _Adhoc(tfds.dataset_builders.AdhocBuilder, skip_registration=True):
  # TFDS 4.9.10 looks for a builder's file through `importlib_resources`,
  # which is not installed (see cnn/data/tiny_imagenet_builder.py).
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)


def _example(image, filename, boxes=(), labels=(), difficult=()):
  h, w = (100, 200) if isinstance(image, bytes) else image.shape[:2]
  return {'image': image, 'image/filename': filename, 'objects': {
      'bbox': np.array([_bbox(*b, h, w) for b in boxes],
                       np.float32).reshape(-1, 4),
      'label': np.array(labels, np.int64),
      'is_difficult': np.array(difficult, bool)}}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """`toy_objects` (train: 3 photos, corrupt: a good one, then a bad one)."""
  tmp = tmp_path_factory.mktemp('tfds')
  tall = np.random.default_rng(1).integers(0, 256, (80, 60, 3), np.uint8)
  splits = {
      'train': [
          _example(_wide(), 'wide.png', [(40, 20, 80, 40), (0, 0, 10, 10)],
                   [1, 0], [False, True]),
          _example(np.zeros((60, 80, 3), np.uint8), 'empty.png'),
          _example(tall, 'tall.png', [(6, 8, 30, 40)] * 3, [0, 1, 1],
                   [False] * 3)],
      'corrupt': [_example(_wide(), 'fine.png'),
                  _example(b'\xff\xd8 truncated', 'broken.jpg')],
  }
  f = tfds.features
  features = f.FeaturesDict({
      'image': f.Image(shape=(None, None, 3)),
      'image/filename': f.Text(),
      'objects': f.Sequence({'bbox': f.BBoxFeature(),
                             'label': f.ClassLabel(names=NAMES),
                             'is_difficult': np.bool_}),
  })
  _Adhoc(name='toy_objects', version='1.0.0', features=features,
         split_datasets={k: list(enumerate(v)) for k, v in splits.items()},
         data_dir=str(tmp), disable_shuffling=True).download_and_prepare()
  return str(tmp)


def test_load_objects_reads_resizes_and_describes_each_photo(data_dir):
  d = objects.load_objects('toy_objects', 'train', data_dir, shorter_side=50)
  assert len(d) == 3 and d.class_names == NAMES and d.num_classes == 2
  assert d.filenames == ['wide.png', 'empty.png', 'tall.png']
  assert d.sizes.tolist() == [[50, 100], [50, 67], [67, 50]]
  assert d.original_sizes.tolist() == [[100, 200], [60, 80], [80, 60]]
  assert d.images[0].shape == (50, 100, 3)
  np.testing.assert_allclose(d.boxes[0], [[20, 10, 40, 20], [0, 0, 5, 5]],
                             atol=1e-5)
  assert d.labels[0].tolist() == [1, 0]
  assert d.difficult[0].tolist() == [False, True]
  assert d.boxes[1].shape == (0, 4) and d.labels[1].shape == (0,)
  assert d.num_boxes == 5 and d.max_boxes == 3
  # Back to the stored pixels through the scale.
  np.testing.assert_allclose(d.boxes[2][0] / np.tile(d.scales[2], 2),
                             [6, 8, 30, 40], atol=1e-4)
  capped = objects.load_objects('toy_objects', 'train', data_dir,
                                shorter_side=50, max_side=80, limit=2)
  assert len(capped) == 2 and capped.sizes.tolist() == [[40, 80], [50, 67]]


def test_batch_pads_images_and_boxes_and_masks_the_padding(data_dir):
  d = objects.load_objects('toy_objects', 'train', data_dir, shorter_side=50)
  b = d.batch([0, 1, 2])
  assert b['images'].shape == (3, 96, 128, 3)  # 67 x 100 up to 32s.
  assert b['image_sizes'].tolist() == d.sizes.tolist()
  for row in range(3):
    h, w = d.sizes[row]
    np.testing.assert_array_equal(b['images'][row, :h, :w], d.images[row])
    assert not b['images'][row, h:].any() and not b['images'][row, :, w:].any()
  assert b['gt_boxes'].shape == (3, 3, 4) and b['num_objects'].tolist() == [
      2, 0, 3]
  assert b['gt_valid'].tolist() == [[True, True, False], [False] * 3,
                                    [True] * 3]
  assert b['gt_classes'].tolist() == [[1, 0, -1], [-1] * 3, [0, 1, 1]]
  assert b['gt_difficult'].tolist() == [[False, True, False], [False] * 3,
                                        [False] * 3]
  assert not b['gt_boxes'][~b['gt_valid']].any()
  np.testing.assert_array_equal(b['gt_boxes'][0, :2], d.boxes[0])
  exact = d.batch([2, 0], multiple=1, max_boxes=2)
  assert exact['images'].shape == (2, 67, 100, 3)
  assert exact['num_objects'].tolist() == [2, 2]
  fixed = d.batch([0], shape=(128, 128), max_boxes=4)
  assert fixed['images'].shape == (1, 128, 128, 3)
  assert fixed['gt_valid'].tolist() == [[True, True, False, False]]
  with pytest.raises(DataError, match='larger than the batch shape 32x32'):
    d.batch([0], shape=(32, 32))


def test_a_photo_without_boxes_batches_all_masked(data_dir):
  d = objects.load_objects('toy_objects', 'train', data_dir, shorter_side=50)
  b = d.batch([1])
  assert b['gt_boxes'].shape == (1, 1, 4) and b['num_objects'].tolist() == [0]
  assert not b['gt_valid'].any() and (b['gt_classes'] == -1).all()


def test_a_corrupt_image_is_one_line_naming_the_example(data_dir):
  with pytest.raises(DataError) as e:
    objects.load_objects('toy_objects', 'corrupt', data_dir, shorter_side=50)
  msg = str(e.value)
  assert '\n' not in msg, msg
  assert ("dataset 'toy_objects' split 'corrupt': example 1 (broken.jpg) is "
          'not a readable image') in msg, msg


def test_missing_dataset_and_split_reuse_the_pipeline_messages(data_dir):
  with pytest.raises(DataError, match="'no_such_set' is neither a TFDS"):
    objects.load_objects('no_such_set', 'train', data_dir, shorter_side=50)
  with pytest.raises(DataError, match="has no split 'test'"):
    objects.load_objects('toy_objects', 'test', data_dir, shorter_side=50)


def test_a_dataset_without_objects_is_one_line():
  with tfds.testing.mock_data(num_examples=2):
    with pytest.raises(DataError) as e:
      objects.load_objects('mnist', 'train', None, shorter_side=32)
  msg = str(e.value)
  assert '\n' not in msg
  assert "dataset 'mnist' has no 'objects' feature" in msg, msg
  assert 'objects/bbox + objects/label' in msg, msg
  f = tfds.features
  no_label = f.FeaturesDict({'image': f.Image(shape=(None, None, 3)),
                             'objects': f.Sequence({'bbox': f.BBoxFeature()})})
  with pytest.raises(DataError, match="'x' has no 'objects/label' feature"):
    objects.check_features('x', no_label)


# --- the prepared photographs ----------------------------------------------

@requires_shared('raccoon')
def test_raccoon_train_photos_each_hold_boxes_inside_them():
  d = objects.load_objects('raccoon', 'train', str(SHARED_TFDS),
                           shorter_side=128, max_side=256)
  assert len(d) == 160 and d.class_names == ['raccoon']
  assert d.sizes.max() <= 256
  for boxes, labels, (h, w) in zip(d.boxes, d.labels, d.sizes):
    assert len(boxes) >= 1 and (labels == 0).all()
    x, y, bw, bh = boxes.T
    assert (x >= 0).all() and (y >= 0).all() and (bw > 0).all() and (
        bh > 0).all()
    assert (x + bw <= w + 1e-3).all() and (y + bh <= h + 1e-3).all()


@requires_shared('coco128')
def test_coco128_has_128_photos_898_boxes_and_80_classes():
  d = objects.load_objects('coco128', 'validation', str(SHARED_TFDS),
                           shorter_side=64, max_side=128)
  assert len(d) == 128 and d.num_boxes == 898
  assert d.num_classes == 80 and d.class_names[0] == 'person'
  assert objects.class_names('coco128', str(SHARED_TFDS)) == d.class_names
  assert all(n.endswith('.jpg') for n in d.filenames)
  b = d.batch(range(8))
  assert b['gt_valid'].sum() == sum(len(x) for x in d.boxes[:8])
