"""TFDS -> uint8 arrays in memory, or uint8 batches from tf.data.

Small datasets (CIFAR, MNIST, ...) are read once into memory as uint8
(`ArrayData`); the training loop draws batch `s` from them as a pure
function of (seed, s) (`cnn.training.batches.TrainBatches`). This module
does no augmentation for them: pad-and-crop, flip and mean subtraction run
on the device inside the task's loss, in the jitted step (`cnn.data.augment`;
`pixel_mean` here computes the mean).

Large datasets (ImageNet) stream through tf.data with the standard random
resized crop and flip on the host; their order is not reproducible across a
resume (tf.data shuffling), their math is.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import sys
from typing import Iterator

import numpy as np

from cnn.errors import ConfigError, DataError

# Datasets above this size (bytes of uint8 pixels) or with variable image
# shapes stream through tf.data instead of sitting in memory.
IN_MEMORY_LIMIT_BYTES = 4 << 30


def _tf():
  """Imports TensorFlow for the host pipeline only, hiding any GPU from it."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # Already initialised; visibility is then fixed.
    pass
  return tf


def _builder(name: str, data_dir: str | None):
  """Returns a TFDS builder whose data can be read, or raises DataError."""
  _tf()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  # '' (`--config.data_dir=`) is TFDS's default folder, like None.
  data_dir = os.path.expanduser(data_dir) if data_dir else None
  where = f'data_dir={data_dir}' if data_dir else 'the default TFDS data_dir'
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise DataError(
        f"dataset '{name}' is neither a TFDS dataset nor prepared under "
        f'{where}: check the name or pass --config.data_dir=DIR holding '
        f'DIR/{name}/<version>/') from None
  return builder


def _as_dataset(builder, split: str, data_dir: str | None):
  """`builder.as_dataset`, preparing (downloading) the data when needed."""
  name = builder.info.name
  try:
    return builder.as_dataset(split=split, shuffle_files=False)
  except AssertionError:
    pass  # Not prepared yet: try to download it below.
  except ValueError as e:
    raise DataError(f"dataset '{name}' has no split '{split}' ({e}); "
                    'choose one of its splits in the config') from None
  # TFDS announces "Downloading and preparing dataset ..." on stdout before
  # it knows whether the download can work; held back, the line is shown
  # after a download that worked and dropped with one that did not (its
  # progress bars go to stderr and stay live).
  announced = io.StringIO()
  try:
    with contextlib.redirect_stdout(announced):
      builder.download_and_prepare()
  except Exception as e:  # pylint: disable=broad-except
    # Without network TFDS fails with unrelated errors (e.g. a missing
    # `importlib_resources`): name the real problem and the fixes first.
    cause = f'{type(e).__name__}: {(str(e).splitlines() or [""])[0][:120]}'
    where = (f'data_dir {data_dir}' if data_dir
             else "TFDS's default data_dir")
    raise DataError(
        f"dataset '{name}' is not in {where} (looked for {builder.data_dir}) "
        'and could not be downloaded: put a prepared copy there, or point '
        f'--config.data_dir=DIR (or $TFDS_DATA_DIR) at a folder holding '
        f'{name}/, or run `tfds build {name}` (with --manual_dir=DIR for a '
        'manual-download dataset) on a machine with network and copy the '
        f'folder (the download failed with {cause})') from None
  sys.stdout.write(announced.getvalue())
  return builder.as_dataset(split=split, shuffle_files=False)


@dataclasses.dataclass
class ArrayData:
  """A split held in memory: uint8 images (N, H, W, C), int32 labels (N,),
  and for datasets with one box per image (Tiny ImageNet) float32 boxes
  (N, 4) as TFDS BBox (ymin, xmin, ymax, xmax) in [0, 1]."""
  images: np.ndarray
  labels: np.ndarray
  boxes: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.labels)

  def batch(self, indices) -> dict:
    """The training batch of these example indices (boxes stay on the host:
    classification does not need them)."""
    return {'image': self.images[indices], 'label': self.labels[indices]}

  def take(self, indices, labels=None) -> 'ArrayData':
    """The examples at `indices` (a slice or index array), boxes kept;
    `labels` replaces their labels (relabelled class subsets)."""
    return ArrayData(self.images[indices],
                     self.labels[indices] if labels is None else labels,
                     None if self.boxes is None else self.boxes[indices])


def has_boxes(name: str, data_dir: str | None, builder=None) -> bool:
  """Whether the dataset has one `bbox` per image (a BBoxFeature); pass
  its `builder` when one is at hand."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  features = (builder or _builder(name, data_dir)).info.features
  return 'bbox' in features and isinstance(features['bbox'],
                                           tfds.features.BBoxFeature)


def load_arrays(name: str, split: str, data_dir: str | None, *,
                boxes: bool = False) -> ArrayData:
  """Reads a whole TFDS split into memory as uint8 images and int32 labels.

  Args:
    name, split, data_dir: the TFDS dataset and split.
    boxes: also read the `bbox` feature (one box per image).

  Raises:
    DataError: the dataset or split is missing or empty, or `boxes` is asked
      of a dataset without a `bbox` feature.
  """
  builder = _builder(name, data_dir)
  if boxes and not has_boxes(name, data_dir, builder):
    raise DataError(
        f"dataset '{name}' has no 'bbox' feature (one box per image): "
        'localization needs one, e.g. --config.dataset=tiny_imagenet')
  ds = _as_dataset(builder, split, data_dir)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  images, labels, bboxes = [], [], []
  # Batched reads, never batch_size=-1: that aborts under tfds mock_data.
  for ex in tfds.as_numpy(ds.batch(4096)):
    images.append(ex['image'])
    labels.append(ex['label'])
    if boxes:
      bboxes.append(ex['bbox'])
  if not images:
    raise DataError(f"split '{split}' of dataset '{name}' is empty")
  images = np.concatenate(images).astype(np.uint8, copy=False)
  if images.ndim == 3:
    images = images[..., None]
  return ArrayData(images, np.concatenate(labels).astype(np.int32),
                   np.concatenate(bboxes).astype(np.float32) if boxes
                   else None)


def dataset_info(name: str, data_dir: str | None) -> tuple[int, tuple]:
  """Number of classes and image shape (None for variable sizes)."""
  info = _builder(name, data_dir).info
  return info.features['label'].num_classes, tuple(info.features['image'].shape)


def class_names(name: str, data_dir: str | None) -> list[str]:
  """The label names of a TFDS classification dataset, readable.

  Where the labels are ids (Tiny ImageNet's WordNet ids), a tab-separated
  `{name}_classes.tsv` (id, name) in `data_dir` or next to it gives the
  names (`../shared/data/tiny_imagenet_classes.tsv`); ids it lacks stay.
  """
  names = list(_builder(name, data_dir).info.features['label'].names)
  for folder in ([data_dir, os.path.join(data_dir, os.pardir)]
                 if data_dir else []):
    path = os.path.join(os.path.expanduser(folder), f'{name}_classes.tsv')
    if os.path.exists(path):
      with open(path) as f:
        lookup = dict(line.rstrip('\n').split('\t', 1) for line in f
                      if '\t' in line)
      return [lookup.get(n, n) for n in names]
  return names


@dataclasses.dataclass
class Datasets:
  """What training needs from the data.

  Attributes:
    train: the training split in memory, or None when it streams.
    train_stream: an iterable of batches for streaming datasets (ImageNet).
    evals: held-out splits by name ('val', 'test'), in memory or streaming.
    num_classes: label count.
    image_shape: (H, W, C) of the network input.
    mean: per-pixel (H, W, C) or per-channel (C,) mean in [0, 1] units.
  """
  train: ArrayData | None
  evals: dict
  num_classes: int
  image_shape: tuple
  mean: np.ndarray
  train_stream: 'StreamingSplit | None' = None


def get_datasets(config) -> Datasets:
  """Loads the train and held-out splits named by `config`."""
  num_classes, shape = dataset_info(config.dataset, config.data_dir)
  in_memory = str(config.in_memory).strip().lower()
  if in_memory not in ('auto', 'yes', 'no', 'true', 'false'):
    raise ConfigError(f"in_memory={config.in_memory!r}: use 'auto' (in "
                      "memory when the images have one fixed size), 'yes' "
                      "or 'no' (stream through tf.data)")
  in_memory = (None not in shape if in_memory == 'auto'
               else in_memory in ('yes', 'true'))
  classes = tuple(int(c) for c in (config.classes or ()))
  per_class = int(config.train_examples_per_class or 0)
  if not in_memory:
    if classes or per_class:
      raise DataError('classes / train_examples_per_class need an in-memory '
                      f"dataset; '{config.dataset}' streams: leave them unset")
    # Streamed at image_size when set, else at the images' own size where
    # they have one (Tiny ImageNet streamed on request), else 224.
    own = shape[0] if None not in shape else 0
    return _streaming_datasets(config, num_classes,
                               int(config.image_size or 0) or own or 224)
  # The boxes come along where the dataset has them (Tiny ImageNet), for
  # localization and for pictures; classification ignores them.
  boxes = has_boxes(config.dataset, config.data_dir)
  train = load_arrays(config.dataset, config.train_split, config.data_dir,
                      boxes=boxes)
  all_classes = num_classes
  if classes:
    train = select_classes(train, classes, all_classes)
    num_classes = len(classes)
  evals = {}
  n_val = int(config.val_examples)
  if n_val:
    if not 0 < n_val < len(train):
      raise DataError(f'val_examples={n_val} must be between 1 and the '
                      f'{len(train)} training examples')
    # The paper's 45k/5k split: the last n_val training images are held out.
    evals['val'] = train.take(slice(-n_val, None))
    train = train.take(slice(None, -n_val))
  if per_class:
    train = first_per_class(train, per_class)
  if config.test_split:
    evals['test'] = load_arrays(config.dataset, config.test_split,
                                config.data_dir, boxes=boxes)
    if classes:
      evals['test'] = select_classes(evals['test'], classes, all_classes)
  mean = pixel_mean(train.images, config.mean_subtraction)
  return Datasets(train=train, evals=evals, num_classes=num_classes,
                  image_shape=train.images.shape[1:], mean=mean)


def select_classes(data: ArrayData, classes: tuple,
                   num_classes: int) -> ArrayData:
  """The examples of `classes` (original labels), relabelled 0..k-1.

  Label `classes[i]` becomes `i`; the order of the examples is kept.

  Raises:
    DataError: a class is out of range or repeated.
  """
  bad = [c for c in classes if not 0 <= c < num_classes]
  if bad or len(set(classes)) != len(classes):
    raise DataError(f'classes={tuple(classes)} must be distinct labels in '
                    f'0..{num_classes - 1}')
  lookup = np.full(max(num_classes, max(classes) + 1), -1, np.int32)
  lookup[list(classes)] = np.arange(len(classes), dtype=np.int32)
  keep = np.flatnonzero(lookup[data.labels] >= 0)
  if not keep.size:
    raise DataError(f'no example of classes={tuple(classes)} in the split')
  return data.take(keep, labels=lookup[data.labels[keep]])


def first_per_class(data: ArrayData, n: int) -> ArrayData:
  """The first `n` examples of each class, in their original order.

  Deterministic (no sampling): the same subset on every run and resume.
  Classes with fewer examples keep all of theirs.
  """
  keep = np.zeros(len(data), bool)
  for c in np.unique(data.labels):
    keep[np.flatnonzero(data.labels == c)[:n]] = True
  return data.take(keep)


def pixel_mean(images: np.ndarray, mode: str) -> np.ndarray:
  """Mean of the training images in [0, 1] units, per pixel or per channel."""
  if mode == 'none':
    return np.zeros(images.shape[-1:], np.float32)
  # Chunked so that 50k images need no float64 copy of the whole set.
  total = np.zeros(images.shape[1:], np.float64)
  for i in range(0, len(images), 8192):
    total += images[i:i + 8192].sum(axis=0, dtype=np.float64)
  mean = total / len(images) / 255.0
  if mode == 'per_channel':
    mean = mean.mean(axis=(0, 1))
  elif mode != 'per_pixel':
    raise DataError(f"mean_subtraction='{mode}' is unknown; use per_pixel, "
                    'per_channel or none')
  return mean.astype(np.float32)


def eval_batches(data: ArrayData, batch_size: int) -> Iterator[dict]:
  """Whole split in fixed-size batches; the last is padded and masked.

  A fixed shape means one compilation; the mask keeps padded rows out of the
  metrics, so every example counts exactly once.
  """
  n = len(data)
  for start in range(0, n, batch_size):
    images = data.images[start:start + batch_size]
    labels = data.labels[start:start + batch_size]
    k = len(labels)
    mask = np.ones(batch_size, np.float32)
    if k < batch_size:
      pad = batch_size - k
      images = np.concatenate(
          [images, np.zeros((pad,) + images.shape[1:], images.dtype)])
      labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
      mask[k:] = 0.0
    yield {'image': images, 'label': labels, 'mask': mask}


# --- Streaming (large datasets) --------------------------------------------

class StreamingSplit:
  """A tf.data pipeline yielding uint8 batches of a fixed image size."""

  def __init__(self, config, split: str, train: bool, image_size: int):
    self.config = config
    self.split = split
    self.train = train
    self.image_size = image_size

  def __iter__(self):
    tf = _tf()
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    builder = _builder(self.config.dataset, self.config.data_dir)
    ds = _as_dataset(builder, self.split, self.config.data_dir)
    size = self.image_size
    bs = self.config.batch_size if self.train else self.config.eval_batch_size

    def train_map(ex):
      image = ex['image']
      if image.shape[-1] == 1:
        image = tf.image.grayscale_to_rgb(image)
      # Inception-style crop: 8%-100% of the area, aspect 3/4-4/3.
      begin, crop_size, _ = tf.image.sample_distorted_bounding_box(
          tf.shape(image), tf.zeros([0, 0, 4], tf.float32),
          min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3),
          area_range=(0.08, 1.0), max_attempts=10,
          use_image_if_no_bounding_boxes=True)
      image = tf.slice(image, begin, crop_size)
      image = tf.image.resize(image, (size, size))
      image = tf.image.random_flip_left_right(image)
      return {'image': tf.cast(tf.clip_by_value(image, 0, 255), tf.uint8),
              'label': tf.cast(ex['label'], tf.int32)}

    def eval_map(ex):
      image = ex['image']
      shape = tf.cast(tf.shape(image)[:2], tf.float32)
      scale = (size * 256 / 224) / tf.reduce_min(shape)
      image = tf.image.resize(image, tf.cast(shape * scale, tf.int32))
      image = tf.image.resize_with_crop_or_pad(image, size, size)
      return {'image': tf.cast(tf.clip_by_value(image, 0, 255), tf.uint8),
              'label': tf.cast(ex['label'], tf.int32),
              'mask': tf.constant(1.0)}

    if self.train:
      ds = ds.repeat().shuffle(16 * bs, seed=self.config.seed)
      ds = ds.map(train_map, num_parallel_calls=tf.data.AUTOTUNE)
      ds = ds.batch(bs, drop_remainder=True)
    else:
      ds = ds.map(eval_map, num_parallel_calls=tf.data.AUTOTUNE)
      # Pad the tail with masked examples so the whole split counts.
      ds = ds.batch(bs).map(lambda b: _pad_batch(tf, b, bs))
    return iter(tfds.as_numpy(ds.prefetch(tf.data.AUTOTUNE)))


def _pad_batch(tf, batch, bs):
  k = tf.shape(batch['label'])[0]
  pad = bs - k
  return {key: tf.concat([v, tf.zeros(tf.concat([[pad], tf.shape(v)[1:]], 0),
                                      v.dtype)], 0)
          for key, v in batch.items()}


def _streaming_datasets(config, num_classes: int, size: int) -> Datasets:
  evals = {}
  if config.test_split:
    evals['test'] = StreamingSplit(config, config.test_split, False, size)
  # ImageNet statistics are standard; computing them would need a full pass.
  mean = np.array([0.485, 0.456, 0.406], np.float32)
  return Datasets(train=None, evals=evals, num_classes=num_classes,
                  image_shape=(size, size, 3), mean=mean,
                  train_stream=StreamingSplit(config, config.train_split, True,
                                              size))
