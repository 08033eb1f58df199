"""Data with boxes: CIFAR images pasted onto larger canvases, and VOC 2007.

The synthetic set turns any TFDS classification split into a localization
problem: every source image is resized to a random width and height and
pasted at a random position on a canvas (64 x 64 by default) whose background
is random multi-scale coloured noise, so that the box is not a simple edge
to find and the background carries no class. The label is the source label,
the box (x, y, w, h) is where the image went, in canvas pixels.

Everything is a pure function of (seed, split, index): the per-example
parameters (size, position, background noise) are drawn up front from one
seeded generator, and `render(indices)` draws any batch on demand, so a
50,000-image training set costs a few MB of memory and a resumed run sees
exactly the same canvases.
"""
from __future__ import annotations

import dataclasses
import functools
import zlib

import numpy as np

from cnn.data import input_pipeline
from cnn.errors import DataError

BACKGROUNDS = ('noise', 'gray')
# Noise octaves: coarse colour blobs plus finer texture, as grid sides.
_OCTAVES = ((4, 1.0), (16, 0.35))


@dataclasses.dataclass
class LocalizationData:
  """Rendered examples: uint8 images (N, S, S, C), labels (N,), boxes (N, 4)
  as (x, y, w, h) in pixels."""
  images: np.ndarray
  labels: np.ndarray
  boxes: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)


# Parameters are drawn in blocks of this many examples, each block from its
# own generator, so example i does not depend on how many examples there are.
_BLOCK = 1024


def _draw_block(seed, block: int, min_size: int, max_size: int, canvas: int,
                channels: int):
  """Boxes (x, y, w, h) and background noise of one block of examples."""
  rng = np.random.default_rng([int(seed), block])
  n = _BLOCK
  side = rng.uniform(min_size, max_size, n)
  ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3), n))
  w = np.clip(np.round(side * np.sqrt(ratio)), 4, canvas).astype(int)
  h = np.clip(np.round(side / np.sqrt(ratio)), 4, canvas).astype(int)
  x = np.floor(rng.uniform(0, 1, n) * (canvas - w + 1)).astype(int)
  y = np.floor(rng.uniform(0, 1, n) * (canvas - h + 1)).astype(int)
  boxes = np.stack([x, y, w, h], axis=1).astype(np.float32)
  noise = [rng.integers(0, 256, (n, g, g, channels), dtype=np.uint8)
           for g, _ in _OCTAVES]
  return boxes, noise


@functools.lru_cache(maxsize=512)
def _resize_matrix(n_out: int, n_in: int) -> np.ndarray:
  """(n_out, n_in) bilinear interpolation matrix (half-pixel centres)."""
  src = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
  src = np.clip(src, 0, n_in - 1)
  lo = np.floor(src).astype(int)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = src - lo
  m = np.zeros((n_out, n_in), np.float32)
  m[np.arange(n_out), lo] += 1 - frac
  m[np.arange(n_out), hi] += frac
  return m


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear resize of one (H, W, C) image to float32 (height, width, C)."""
  a = _resize_matrix(height, image.shape[0])
  b = _resize_matrix(width, image.shape[1])
  # Two matrix products, not one three-operand einsum (which numpy would
  # evaluate as a single O(h*w*H*W*C) loop).
  rows = np.tensordot(a, image.astype(np.float32), axes=(1, 0))
  return np.einsum('jw,iwc->ijc', b, rows, optimize=True)


class SyntheticLocalization:
  """Source images pasted at a seeded random place and size on canvases.

  Args:
    source: the classification split (uint8 images, labels).
    canvas: canvas side S (any size at least the largest pasted side).
    seed: the seed; the split name is mixed in by `load`.
    min_size, max_size: range of the pasted image's mean side in pixels
      (default 3/8 and 7/8 of the canvas); the aspect ratio varies within
      3:4 .. 4:3.
    background: 'noise' (random coloured multi-scale noise) or 'gray'.
  """

  def __init__(self, source: input_pipeline.ArrayData, canvas: int = 64,
               seed: int = 0, min_size: int | None = None,
               max_size: int | None = None, background: str = 'noise'):
    if background not in BACKGROUNDS:
      raise DataError(f"background='{background}' is unknown; use one of "
                      f'{", ".join(BACKGROUNDS)}')
    min_size = int(min_size or round(canvas * 3 / 8))
    max_size = int(max_size or round(canvas * 7 / 8))
    if not 4 <= min_size <= max_size <= canvas:
      raise DataError(f'pasted sizes {min_size}..{max_size} must satisfy '
                      f'4 <= min_size <= max_size <= canvas={canvas}')
    self.source = source
    self.canvas = canvas
    self.background = background
    n = len(source)
    c = source.images.shape[-1]
    blocks = [_draw_block(seed, b, min_size, max_size, canvas, c)
              for b in range(-(-n // _BLOCK))]
    self.boxes = np.concatenate([b[0] for b in blocks])[:n]
    self._noise = [np.concatenate([b[1][k] for b in blocks])[:n]
                   for k in range(len(_OCTAVES))]

  def __len__(self) -> int:
    return len(self.source)

  @property
  def labels(self) -> np.ndarray:
    return self.source.labels

  def _backgrounds(self, indices: np.ndarray) -> np.ndarray:
    """float32 (B, S, S, C) backgrounds, resized for the batch at once."""
    s, c = self.canvas, self.source.images.shape[-1]
    if self.background == 'gray':
      return np.full((len(indices), s, s, c), 127.5, np.float32)
    out = np.zeros((len(indices), s, s, c), np.float32)
    total = sum(a for _, a in _OCTAVES)
    for noise, (g, amp) in zip(self._noise, _OCTAVES):
      m = _resize_matrix(s, g)
      up = np.einsum('ih,bhwc->biwc', m, noise[indices].astype(np.float32),
                     optimize=True)
      out += amp * (np.einsum('jw,biwc->bijc', m, up, optimize=True) - 127.5)
    return 127.5 + out / total

  def render(self, indices) -> LocalizationData:
    """The canvases, labels and boxes of the given example indices."""
    indices = np.asarray(indices, np.int64)
    canvases = self._backgrounds(indices)
    for k, i in enumerate(indices):
      x, y, w, h = self.boxes[i].astype(int)
      canvases[k, y:y + h, x:x + w] = resize(self.source.images[i], h, w)
    images = np.clip(np.round(canvases), 0, 255).astype(np.uint8)
    return LocalizationData(images, self.source.labels[indices],
                            self.boxes[indices])

  def materialize(self, limit: int | None = None) -> LocalizationData:
    """The first `limit` examples (all by default) rendered at once."""
    n = len(self) if limit is None else min(limit, len(self))
    return self.render(np.arange(n))


def load(name: str, split: str, data_dir: str | None, *, canvas: int = 64,
         seed: int = 0, limit: int | None = None, **kwargs
         ) -> SyntheticLocalization:
  """A synthetic localization set over any split of a TFDS image dataset.

  Args:
    name: TFDS classification dataset ('cifar10', 'cifar10_jpeg', ...).
    split: any TFDS split string ('train', 'test', 'train[:5000]').
    data_dir: TFDS data_dir.
    canvas: canvas side.
    seed: the seed; different splits get different placements.
    limit: use only the first `limit` source images.
    **kwargs: `SyntheticLocalization` options (min_size, max_size,
      background).

  Returns:
    The dataset; `render`/`materialize` draw the canvases.
  """
  # The placements depend on (seed, name, split) only, so the first k
  # examples are the same canvases whatever `limit` is.
  source, mixed = load_source(name, split, data_dir, limit, seed)
  return SyntheticLocalization(source, canvas=canvas, seed=mixed, **kwargs)


def load_source(name: str, split: str, data_dir: str | None,
                limit: int | None, seed: int
                ) -> tuple[input_pipeline.ArrayData, int]:
  """The first `limit` images of a TFDS split and the seed mixed with
  (name, split), so that each split gets its own canvases."""
  read = f'{split}[:{int(limit)}]' if limit and '[' not in split else split
  source = input_pipeline.load_arrays(name, read, data_dir)
  if limit:
    source = input_pipeline.ArrayData(source.images[:limit],
                                      source.labels[:limit])
  mixed = np.random.SeedSequence(
      [int(seed), zlib.crc32(f'{name}/{split}'.encode())])
  return source, int(mixed.generate_state(1)[0])


VOC = 'voc/2007'


def voc_examples(split: str, data_dir: str | None):
  """The examples (numpy dicts) of a split of TFDS `voc/2007`.

  Raises:
    DataError: `voc/2007` is not prepared under `data_dir` (there is no
      network here to download it).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  input_pipeline._tf()  # pylint: disable=protected-access
  try:
    # as_dataset, not is_prepared(): it is what fails when the data is
    # missing, and what tfds.testing.mock_data replaces.
    ds = tfds.builder(VOC, data_dir=data_dir).as_dataset(
        split=split, shuffle_files=False)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(
        f"TFDS '{VOC}' split '{split}' is not readable under "
        f"{data_dir or 'the default TFDS data_dir'} ({type(e).__name__}): "
        f'run `tfds build {VOC}` on a machine with network and pass '
        '--config.data_dir=DIR holding DIR/voc/2007/, or use the synthetic '
        'dataset (dataset=synthetic)') from None
  return tfds.as_numpy(ds)


def load_voc(split: str, data_dir: str | None, size: int = 64,
             limit: int | None = None) -> LocalizationData:
  """Pascal VOC 2007 single-object localization: images with one object.

  Each image is resized to size x size (the box follows) and labelled with
  its one object's class (20 classes).

  Raises:
    DataError: `voc/2007` is not prepared under `data_dir` (there is no
      network here to download it).
  """
  images, labels, boxes = [], [], []
  for ex in voc_examples(split, data_dir):
    objects = ex['objects']
    if len(objects['label']) != 1:
      continue
    ymin, xmin, ymax, xmax = objects['bbox'][0]
    img = ex['image']
    images.append(np.clip(np.round(resize(img, size, size)), 0, 255)
                  .astype(np.uint8))
    labels.append(int(objects['label'][0]))
    boxes.append([xmin * size, ymin * size, (xmax - xmin) * size,
                  (ymax - ymin) * size])
    if limit and len(labels) >= limit:
      break
  if not labels:
    raise DataError(f"split '{split}' of {VOC} has no single-object image")
  return LocalizationData(np.stack(images), np.asarray(labels, np.int32),
                          np.asarray(boxes, np.float32))
