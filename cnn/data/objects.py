"""Detection photographs from TFDS: images with any number of labelled boxes.

Reads any TFDS dataset whose examples hold an `image` and a sequence
`objects` with `bbox` (a BBoxFeature) and `label` (a ClassLabel): the
prepared `raccoon` and `coco128` (`../shared/data/README.md`), and TFDS's own
`voc/2007` or `coco/2017` where they are prepared. Each photo is resized so
that its shorter side is `shorter_side` pixels, aspect kept (Fast R-CNN's
single-scale training, Girshick 2015 section 3.1: s = 600, longer side
capped at 1000), and its boxes follow into the resized pixels as (x, y, w,
h), the convention of `cnn.ops.boxes` and `cnn.data.synthetic_detection`.

Resize: PIL's `Image.resize` with the BILINEAR filter on the uint8 pixels.
Pillow widens the triangle filter by the scale factor when it shrinks, so a
downscale averages every source pixel it covers (antialiased, as
`tf.image.resize(..., antialias=True)`), and an upscale is plain bilinear.

Images are decoded here, one at a time, with the dataset's own Image feature
(`tf.image.decode_image`, the pixels `tfds.load` gives), so that a corrupt
file is reported by dataset, split, example index and file name instead of
ending the tf.data iterator with a multi-line TensorFlow error.

A split is read into memory (uint8 pixels at the resized size). By
estimate (pixels x 3 bytes, not measured here): 20-30 MB for raccoon's 200
or coco128's 128 photos at 256 px on the longer side, about 7 GB for VOC
2007 trainval at s = 600 (5,011 photos of about 600 x 800); read
`coco/2017` train in parts with `limit` or a split slice ('train[:10%]').
Padded batches for the detectors come from `ObjectsData.batch`.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image

from cnn.data import input_pipeline
from cnn.errors import ConfigError, DataError
from cnn.ops import boxes as box_ops

# input_pipeline's TFDS access, for its one-line errors on missing data.
_tf = input_pipeline._tf  # pylint: disable=protected-access
_builder = input_pipeline._builder  # pylint: disable=protected-access
_as_dataset = input_pipeline._as_dataset  # pylint: disable=protected-access

# Default granularity of the padded batch size: the stride of a trunk with
# five 2x downsamplings (VGG, ResNet, the detection trunk's deepest setting),
# so every padded image maps onto whole feature cells, and batches of similar
# photos share a shape (and a jit compilation).
SIZE_MULTIPLE = 32

# Per-object flags of boxes that evaluation ignores: VOC's "difficult", COCO's
# crowd regions.
_IGNORE_FLAGS = ('is_difficult', 'is_crowd')

_NEEDED = ("a detection dataset with objects/bbox + objects/label, e.g. "
           "raccoon, coco128, voc/2007 or coco/2017")


class Converted(NamedTuple):
  """One photo after `convert`.

  Attributes:
    image: uint8 (h, w, C) resized image.
    boxes: float32 (k, 4) boxes (x, y, w, h) in resized pixels.
    labels: int32 (k,) class ids.
    scale: float32 (2,) (sx, sy) = resized / original width and height;
      boxes / np.tile(scale, 2) are in the original pixels.
  """
  image: np.ndarray
  boxes: np.ndarray
  labels: np.ndarray
  scale: np.ndarray


def resized_shape(height: int, width: int, shorter_side: int,
                  max_side: int | None = None) -> tuple[int, int]:
  """(h, w) with the shorter side `shorter_side`, the longer <= `max_side`.

  The scale is shorter_side / min(height, width), lowered to
  max_side / max(height, width) where the longer side would exceed
  `max_side`; both sides are rounded to whole pixels (at least 1).
  """
  scale = shorter_side / min(height, width)
  if max_side is not None and max(height, width) * scale > max_side:
    scale = max_side / max(height, width)
  return (max(1, int(round(height * scale))),
          max(1, int(round(width * scale))))


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8 (H, W, C) -> uint8 (height, width, C), PIL BILINEAR (antialiased
  when shrinking); the same array when the size does not change."""
  if image.shape[:2] == (height, width):
    return image
  channels = image.shape[2] if image.ndim == 3 else None
  pil = Image.fromarray(image[..., 0] if channels == 1 else image)
  out = np.asarray(pil.resize((width, height), Image.Resampling.BILINEAR))
  return out[..., None] if channels == 1 else out


def convert(image: np.ndarray, bbox: np.ndarray, labels: np.ndarray,
            shorter_side: int, max_side: int | None = None) -> Converted:
  """One photo and its objects at the training scale.

  Args:
    image: uint8 (H, W, C) decoded image.
    bbox: (k, 4) TFDS BBox (ymin, xmin, ymax, xmax), normalised to [0, 1] by
      the image height and width; k may be 0 (a negative example).
    labels: (k,) class ids.
    shorter_side: side the shorter image side is resized to.
    max_side: cap on the longer side (None: no cap).

  Returns:
    The resized image, its boxes (x, y, w, h) in resized pixels (clipped to
    the image), labels and scale.
  """
  image = np.asarray(image, np.uint8)
  h, w = image.shape[:2]
  nh, nw = resized_shape(h, w, shorter_side, max_side)
  bbox = np.asarray(bbox, np.float64).reshape(-1, 4)
  # Normalised corners times the resized extent: exact for any rounding of
  # the resized size, since the resize maps image extent onto image extent.
  corners = bbox[:, [1, 0, 3, 2]] * np.array([nw, nh, nw, nh], np.float64)
  boxes = box_ops.clip(box_ops.from_corners(corners), nh, nw)
  return Converted(resize(image, nh, nw), boxes.astype(np.float32),
                   np.asarray(labels, np.int64).reshape(-1).astype(np.int32),
                   np.array([nw / w, nh / h], np.float32))


def letterbox(image: np.ndarray, side: int):
  """One photo as the detection task sees photographs: resized (aspect
  kept) so its longer side is `side`, at the top-left of a black side x side
  image (`convert` with shorter_side = max_side = side, then `batch` with
  shape (side, side)). Returns (canvas, (h, w) of the resized photo)."""
  image = np.asarray(image, np.uint8)
  nh, nw = resized_shape(image.shape[0], image.shape[1], side, side)
  canvas = np.zeros((side, side) + image.shape[2:], np.uint8)
  canvas[:nh, :nw] = resize(image, nh, nw)
  return canvas, (nh, nw)


def _one_line(error: Exception) -> str:
  """TensorFlow's op error as one short line, without its op decorations."""
  text = getattr(error, 'message', None) or str(error)
  text = re.sub(r'\{\{[^}]*\}\}\s*', '', text.split(' [Op:')[0])
  return ' '.join(text.split())[:200].rstrip('.')


def decode(raw: bytes, feature, *, name: str, split: str, index: int,
           filename: str = '') -> np.ndarray:
  """Decodes one stored image with its TFDS Image feature.

  Args:
    raw: the encoded bytes (as `tfds.decode.SkipDecoding` gives them).
    feature: the dataset's `tfds.features.Image`.
    name, split, index, filename: where the image is, for the error.

  Returns:
    uint8 (H, W, C) pixels, exactly those `tfds.load` would give.

  Raises:
    DataError: the bytes are not a readable image.
  """
  tf = _tf()
  try:
    image = feature.decode_example(tf.constant(raw)).numpy()
  except (tf.errors.OpError, ValueError) as e:
    where = f' ({filename})' if filename else ''
    raise DataError(
        f"dataset '{name}' split '{split}': example {index}{where} is not a "
        f'readable image ({_one_line(e)}); re-prepare the dataset or leave '
        'that example out of the split') from None
  return image


@dataclasses.dataclass
class ObjectsData:
  """A detection split in memory, one entry per photo (sizes vary).

  Attributes:
    images: uint8 (h_i, w_i, C) resized photos.
    boxes: float32 (k_i, 4) boxes (x, y, w, h) in resized pixels; k_i = 0
      for a photo without objects.
    labels: int32 (k_i,) class ids.
    difficult: bool (k_i,) boxes evaluation ignores (VOC `is_difficult`,
      COCO `is_crowd`; all False where the dataset has neither).
    sizes: int32 (N, 2) resized (h, w).
    original_sizes: int32 (N, 2) stored (h, w).
    scales: float32 (N, 2) (sx, sy), resized / original; boxes /
      np.tile(scales[i], 2) are in the original pixels (for COCO-style
      evaluation against the source annotations).
    filenames: `image/filename` of each photo ('' where there is none).
    class_names: the label names, `info.features['objects']['label'].names`.
    name, split: where the photos come from.
  """
  images: list
  boxes: list
  labels: list
  difficult: list
  sizes: np.ndarray
  original_sizes: np.ndarray
  scales: np.ndarray
  filenames: list
  class_names: list
  name: str = ''
  split: str = ''

  def __len__(self) -> int:
    return len(self.images)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def num_boxes(self) -> int:
    """Boxes in the whole split."""
    return int(sum(len(b) for b in self.boxes))

  @property
  def max_boxes(self) -> int:
    """Most boxes on one photo: a `max_boxes` for `batch` that drops none."""
    return max((len(b) for b in self.boxes), default=0)

  def take(self, indices) -> ObjectsData:
    """The photos at `indices` (an index array or a slice)."""
    idx = np.arange(len(self))[indices].reshape(-1)
    pick = lambda xs: [xs[i] for i in idx]
    return dataclasses.replace(
        self, images=pick(self.images), boxes=pick(self.boxes),
        labels=pick(self.labels), difficult=pick(self.difficult),
        sizes=self.sizes[idx], original_sizes=self.original_sizes[idx],
        scales=self.scales[idx], filenames=pick(self.filenames))

  def batch(self, indices, *, shape: Sequence[int] | None = None,
            multiple: int = SIZE_MULTIPLE,
            max_boxes: int | None = None) -> dict:
    """The photos at `indices` padded to one array shape.

    Each image sits at the top-left corner of its slot, so its boxes keep
    their coordinates; the rest of the slot is zeros.

    Args:
      indices: photo indices (any sequence of ints).
      shape: (H, W) of every batch (one jit compilation for a whole run:
        e.g. (max_side, max_side) rounded up to `multiple`); None: the
        batch's largest height and width, each rounded up to `multiple`.
      multiple: rounding of the padded size when `shape` is None (1: the
        largest image exactly).
      max_boxes: box slots per image; photos with more keep their first
        `max_boxes` (`self.max_boxes` keeps all). None: the batch's largest
        count (at least one slot, so a batch of negatives has a box axis).

    Returns:
      A dict of numpy arrays (B = len(indices), M box slots):
        images: uint8 (B, H, W, C), zero padding.
        image_sizes: int32 (B, 2) valid (h, w) of each image.
        gt_boxes: float32 (B, M, 4) (x, y, w, h) in pixels; zeros as padding.
        gt_classes: int32 (B, M) class ids; -1 as padding.
        gt_valid: bool (B, M), which slots hold a box (they come first).
        gt_difficult: bool (B, M) ignored boxes (False on padding).
        num_objects: int32 (B,) boxes kept per image.

    Raises:
      DataError: a photo is larger than `shape`.
    """
    idx = [int(i) for i in np.asarray(indices).reshape(-1)]
    sizes = self.sizes[idx].reshape(-1, 2)
    if shape is None:
      m = max(int(multiple), 1)
      hw = [int(math.ceil(s / m) * m) for s in sizes.max(axis=0, initial=1)]
    else:
      hw = [int(s) for s in shape]
      big = [(i, s) for i, s in zip(idx, sizes)
             if s[0] > hw[0] or s[1] > hw[1]]
      if big:
        i, (h, w) = big[0]
        raise DataError(
            f"photo {i} of '{self.name}' {self.split} is {h}x{w}, larger "
            f'than the batch shape {hw[0]}x{hw[1]}: pad to at least '
            '(max_side, max_side) or leave shape=None')
    counts = np.array([len(self.boxes[i]) for i in idx], np.int32)
    if max_boxes is None:
      max_boxes = max(int(counts.max(initial=0)), 1)
    counts = np.minimum(counts, max_boxes)
    b, c = len(idx), (self.images[idx[0]].shape[-1] if idx else 3)
    out = {
        'images': np.zeros((b, hw[0], hw[1], c), np.uint8),
        'image_sizes': sizes.astype(np.int32),
        'gt_boxes': np.zeros((b, max_boxes, 4), np.float32),
        'gt_classes': np.full((b, max_boxes), -1, np.int32),
        'gt_valid': np.arange(max_boxes)[None] < counts[:, None],
        'gt_difficult': np.zeros((b, max_boxes), bool),
        'num_objects': counts,
    }
    for row, (i, k) in enumerate(zip(idx, counts)):
      h, w = sizes[row]
      out['images'][row, :h, :w] = self.images[i]
      out['gt_boxes'][row, :k] = self.boxes[i][:k]
      out['gt_classes'][row, :k] = self.labels[i][:k]
      out['gt_difficult'][row, :k] = self.difficult[i][:k]
    return out


def check_features(name: str, features) -> None:
  """Raises DataError unless `features` hold an image and labelled boxes."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  kinds = (('image', tfds.features.Image), ('objects', tfds.features.Sequence))
  for key, kind in kinds:
    if key not in features or not isinstance(features[key], kind):
      raise DataError(
          f"dataset '{name}' has no '{key}' feature (it has: "
          f"{', '.join(sorted(features.keys()))}): reading objects needs "
          f'{_NEEDED}')
  objects = features['objects'].feature
  kinds = (('bbox', tfds.features.BBoxFeature),
           ('label', tfds.features.ClassLabel))
  for key, kind in kinds:
    if (not isinstance(objects, tfds.features.FeaturesDict)
        or key not in objects or not isinstance(objects[key], kind)):
      raise DataError(
          f"dataset '{name}' has no 'objects/{key}' feature: reading objects "
          f'needs {_NEEDED}')


def class_names(name: str, data_dir: str | None) -> list[str]:
  """The object class names of a TFDS detection dataset."""
  features = _builder(name, data_dir).info.features
  check_features(name, features)
  return list(features['objects']['label'].names)


def _raw_dataset(builder, split: str, data_dir: str | None):
  """The split with its images left encoded, or input_pipeline's DataError
  for a missing split or unprepared dataset."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  # Read once into memory: TFDS's auto-cache would only hold a second copy
  # (and warns when `limit` stops the read early).
  read = lambda: builder.as_dataset(
      split=split, shuffle_files=False,
      decoders={'image': tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(try_autocache=False))
  try:
    return read()
  except (AssertionError, ValueError):
    # Raises the pipeline's one-line error, or prepares the data.
    _as_dataset(builder, split, data_dir)
    return read()


def load_objects(name: str, split: str, data_dir: str | None, *,
                 shorter_side: int, max_side: int | None = None,
                 limit: int | None = None) -> ObjectsData:
  """Reads a TFDS detection split into memory at one scale.

  Args:
    name: TFDS dataset with objects/bbox + objects/label ('raccoon',
      'coco128', 'voc/2007', 'coco/2017', ...).
    split: any TFDS split string ('train', 'validation', 'test[:10]').
    data_dir: TFDS data_dir.
    shorter_side: the shorter side of every resized photo.
    max_side: cap on the longer side (None: none); a photo it caps has a
      shorter side below `shorter_side`.
    limit: read only the first `limit` photos.

  Returns:
    The photos in the split's stored order.

  Raises:
    ConfigError: a size or limit below 1.
    DataError: no such dataset or split, a dataset without objects, an
      empty split, an unreadable image or inconsistent objects.
  """
  for key, value in (('shorter_side', shorter_side), ('max_side', max_side),
                     ('limit', limit)):
    if value is not None and int(value) < 1:
      raise ConfigError(f'{key}={value} must be at least 1')
  builder = _builder(name, data_dir)
  features = builder.info.features
  check_features(name, features)
  ds = _raw_dataset(builder, split, data_dir)
  if limit is not None:
    ds = ds.take(int(limit))
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  flags = [f for f in _IGNORE_FLAGS if f in features['objects'].feature]
  rows = []
  for i, ex in enumerate(tfds.as_numpy(ds)):
    filename = ex.get('image/filename', b'')
    if isinstance(filename, bytes):
      filename = filename.decode('utf-8', 'replace')
    image = decode(ex['image'], features['image'], name=name, split=split,
                   index=i, filename=filename)
    objects = ex['objects']
    if len(objects['bbox']) != len(objects['label']):
      raise DataError(
          f"dataset '{name}' split '{split}': example {i} ({filename}) has "
          f"{len(objects['bbox'])} boxes but {len(objects['label'])} labels; "
          're-prepare the dataset')
    out = convert(image, objects['bbox'], objects['label'], shorter_side,
                  max_side)
    ignore = np.zeros(len(out.labels), bool)
    for flag in flags:
      ignore |= np.asarray(objects[flag], bool).reshape(-1)[:len(ignore)]
    rows.append((out, ignore, image.shape[:2], filename))
  if not rows:
    raise DataError(f"split '{split}' of dataset '{name}' is empty")
  return ObjectsData(
      images=[r[0].image for r in rows], boxes=[r[0].boxes for r in rows],
      labels=[r[0].labels for r in rows], difficult=[r[1] for r in rows],
      sizes=np.array([r[0].image.shape[:2] for r in rows], np.int32),
      original_sizes=np.array([r[2] for r in rows], np.int32),
      scales=np.stack([r[0].scale for r in rows]),
      filenames=[r[3] for r in rows],
      class_names=list(features['objects']['label'].names),
      name=name, split=split)
