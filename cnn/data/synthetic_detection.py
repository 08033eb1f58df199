"""Synthetic detection data: several source images pasted on one canvas.

The multi-object sibling of `cnn.data.synthetic_localization`: example i is a
canvas (128 x 128 by default) with the same smooth multi-octave coloured
noise background, on which k source images (k uniform in [min_objects,
max_objects], each drawn at random from the source split) are pasted at a
random size and position. A placement that overlaps an earlier box of the
same canvas by more than `max_iou` is drawn again (a bounded number of
times; an object that finds no place is dropped), so objects may touch or
slightly overlap but never hide each other. Each object's class is its
source label and its box (x, y, w, h) is where the image went, in canvas
pixels; later objects are pasted over earlier ones.

Everything about example i is a pure function of (seed, i): its layout and
background noise come from `np.random.default_rng([seed, i])`, so any subset
renders identically, in any order, and a resumed run sees the same canvases.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from cnn.data import input_pipeline
from cnn.errors import DataError
from cnn.ops import boxes as box_ops
# The background noise and the resize are the localization set's, so the two
# sets differ only in the number of objects.
from cnn.data.synthetic_localization import _OCTAVES  # pylint: disable=protected-access
from cnn.data.synthetic_localization import _resize_matrix  # pylint: disable=protected-access
from cnn.data.synthetic_localization import BACKGROUNDS
from cnn.data.synthetic_localization import VOC
from cnn.data.synthetic_localization import load_source
from cnn.data.synthetic_localization import resize
from cnn.data.synthetic_localization import voc_examples

# Candidate placements drawn per object. All are drawn whether or not an
# early one fits, so the random stream of an example does not depend on
# which placements were accepted. With <= 4 objects of at most half the
# canvas side, 32 tries practically never run out.
_TRIES = 32


@dataclasses.dataclass
class DetectionData:
  """Rendered examples, objects padded to M = max_objects per canvas.

  Attributes:
    images: uint8 (N, S, S, C) canvases.
    boxes: float32 (N, M, 4) boxes (x, y, w, h) in pixels; zeros as padding.
    classes: int32 (N, M) source labels; -1 as padding.
    num_objects: int32 (N,) number of real objects (they come first).
    sources: int32 (N, M) index of each object's source image; -1 as
      padding (None for VOC).
    difficult: bool (N, M) VOC's "difficult" flags (None: none are).
  """
  images: np.ndarray
  boxes: np.ndarray
  classes: np.ndarray
  num_objects: np.ndarray
  sources: np.ndarray | None = None
  difficult: np.ndarray | None = None

  def take(self, indices) -> DetectionData:
    """The examples at `indices` (a slice or index array)."""
    return DetectionData(**{
        f.name: None if getattr(self, f.name) is None
        else getattr(self, f.name)[indices]
        for f in dataclasses.fields(self)})

  def __len__(self) -> int:
    return len(self.images)

  @property
  def valid(self) -> np.ndarray:
    """bool (N, M): which object slots are real."""
    return self.classes >= 0


class SyntheticDetection:
  """Source images pasted at seeded random places and sizes, several a canvas.

  Args:
    source: the classification split (uint8 images, labels) objects are
      drawn from.
    canvas: canvas side S.
    seed: the seed; `load` mixes the dataset and split names in.
    min_objects, max_objects: range of the number of objects per canvas.
    min_size, max_size: range of an object's mean side in pixels; the
      aspect ratio varies within 3:4 .. 4:3.
    max_iou: largest IoU an object's box may have with an earlier box.
    background: 'noise' (random coloured multi-scale noise) or 'gray'.
    num_examples: number of canvases (default: one per source image).
  """

  def __init__(self, source: input_pipeline.ArrayData, canvas: int = 128,
               seed: int = 0, min_objects: int = 1, max_objects: int = 4,
               min_size: int = 24, max_size: int = 64, max_iou: float = 0.1,
               background: str = 'noise', num_examples: int | None = None):
    if background not in BACKGROUNDS:
      raise DataError(f"background='{background}' is unknown; use one of "
                      f'{", ".join(BACKGROUNDS)}')
    if not 4 <= min_size <= max_size <= canvas:
      raise DataError(f'object sizes {min_size}..{max_size} must satisfy '
                      f'4 <= min_size <= max_size <= canvas={canvas}')
    if not 1 <= min_objects <= max_objects:
      raise DataError(f'object counts {min_objects}..{max_objects} must '
                      'satisfy 1 <= min_objects <= max_objects')
    if not 0 <= max_iou <= 1:
      raise DataError(f'max_iou={max_iou} must be in [0, 1]')
    if not len(source):
      raise DataError('the source split is empty; choose a split with images')
    if num_examples is not None and num_examples < 1:
      raise DataError(f'num_examples={num_examples} must be at least 1 (or '
                      'None for one canvas per source image)')
    self.source = source
    self.canvas = int(canvas)
    self.seed = int(seed)
    self.min_objects, self.max_objects = int(min_objects), int(max_objects)
    self.min_size, self.max_size = int(min_size), int(max_size)
    self.max_iou = float(max_iou)
    self.background = background
    self.num_examples = len(source) if num_examples is None else num_examples

  def __len__(self) -> int:
    return self.num_examples

  def layout(self, i: int):
    """Example i's source indices (k,), boxes (k, 4) and background noise.

    A pure function of (seed, i); k <= max_objects.
    """
    if not 0 <= i < len(self):
      raise IndexError(f'example {i} is outside 0..{len(self) - 1}')
    rng = np.random.default_rng([self.seed, int(i)])
    s, c = self.canvas, self.source.images.shape[-1]
    noise = [rng.integers(0, 256, (g, g, c), dtype=np.uint8)
             for g, _ in _OCTAVES]
    k = int(rng.integers(self.min_objects, self.max_objects + 1))
    sources, boxes = [], []
    for _ in range(k):
      src = int(rng.integers(len(self.source)))
      side = rng.uniform(self.min_size, self.max_size, _TRIES)
      ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3), _TRIES))
      w = np.clip(np.round(side * np.sqrt(ratio)), 4, s)
      h = np.clip(np.round(side / np.sqrt(ratio)), 4, s)
      x = np.floor(rng.uniform(0, 1, _TRIES) * (s - w + 1))
      y = np.floor(rng.uniform(0, 1, _TRIES) * (s - h + 1))
      cand = np.stack([x, y, w, h], axis=1)
      if boxes:
        fits = (box_ops.pairwise_iou(cand, np.stack(boxes)).max(axis=1)
                <= self.max_iou)
      else:
        fits = np.ones(_TRIES, bool)
      if fits.any():
        sources.append(src)
        boxes.append(cand[int(np.argmax(fits))])
    return (np.asarray(sources, np.int32),
            np.asarray(boxes, np.float32).reshape(-1, 4), noise)

  def _background(self, noise) -> np.ndarray:
    """float32 (S, S, C) background from one example's noise octaves."""
    s, c = self.canvas, self.source.images.shape[-1]
    if self.background == 'gray':
      return np.full((s, s, c), 127.5, np.float32)
    out = np.zeros((s, s, c), np.float32)
    for grid, (g, amp) in zip(noise, _OCTAVES):
      m = _resize_matrix(s, g)
      up = np.tensordot(m, grid.astype(np.float32), axes=(1, 0))
      out += amp * (np.einsum('jw,iwc->ijc', m, up, optimize=True) - 127.5)
    return 127.5 + out / sum(a for _, a in _OCTAVES)

  def render(self, indices) -> DetectionData:
    """The canvases and padded objects of the given example indices."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    n, m, s = len(indices), self.max_objects, self.canvas
    c = self.source.images.shape[-1]
    images = np.empty((n, s, s, c), np.uint8)
    boxes = np.zeros((n, m, 4), np.float32)
    classes = np.full((n, m), -1, np.int32)
    sources = np.full((n, m), -1, np.int32)
    counts = np.zeros(n, np.int32)
    for row, i in enumerate(indices):
      src, box, noise = self.layout(int(i))
      canvas = self._background(noise)
      for j, (x, y, w, h) in zip(src, box.astype(int)):
        canvas[y:y + h, x:x + w] = resize(self.source.images[j], h, w)
      images[row] = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
      k = len(src)
      counts[row] = k
      boxes[row, :k] = box
      classes[row, :k] = self.source.labels[src]
      sources[row, :k] = src
    return DetectionData(images, boxes, classes, counts, sources)

  def materialize(self, limit: int | None = None) -> DetectionData:
    """The first `limit` examples (all by default) rendered at once."""
    n = len(self) if limit is None else min(int(limit), len(self))
    return self.render(np.arange(n))


def load(name: str, split: str, data_dir: str | None, *, canvas: int = 128,
         seed: int = 0, limit: int | None = None,
         num_examples: int | None = None, **kwargs) -> SyntheticDetection:
  """A synthetic detection set over any split of a TFDS image dataset.

  Args:
    name: TFDS classification dataset ('cifar10', 'cifar10_jpeg', ...).
    split: any TFDS split string ('train', 'test', 'train[:5000]').
    data_dir: TFDS data_dir.
    canvas: canvas side.
    seed: the seed; different datasets and splits get different canvases.
    limit: draw objects from the first `limit` source images only. Objects
      are drawn from the whole source, so unlike the localization set a
      different `limit` gives different canvases.
    num_examples: number of canvases (default: one per source image).
    **kwargs: `SyntheticDetection` options (min_objects, max_objects,
      min_size, max_size, max_iou, background).

  Returns:
    The dataset; `render`/`materialize` draw the canvases.
  """
  source, mixed = load_source(name, split, data_dir, limit, seed)
  return SyntheticDetection(source, canvas=canvas, seed=mixed,
                            num_examples=num_examples, **kwargs)


def load_voc(split: str, data_dir: str | None, canvas: int = 128,
             limit: int | None = None, max_objects: int = 42
             ) -> DetectionData:
  """Pascal VOC 2007 detection (TFDS `voc/2007`), 20 classes.

  Each image is resized to canvas x canvas (aspect not kept; the boxes
  follow), its objects padded to `max_objects` (VOC 2007 has at most 42 per
  image; extra ones are dropped) with their "difficult" flags.

  Raises:
    DataError: `voc/2007` is not prepared under `data_dir`.
  """
  images, boxes, classes, counts, difficult = [], [], [], [], []
  for ex in voc_examples(split, data_dir):
    objects = ex['objects']
    # (The three lengths agree in VOC; tfds mock data draws them apart.)
    n = min(len(objects['label']), len(objects['bbox']),
            len(objects['is_difficult']), max_objects)
    ymin, xmin, ymax, xmax = (objects['bbox'][:n, k] for k in range(4))
    b = np.zeros((max_objects, 4), np.float32)
    b[:n] = np.stack([xmin, ymin, xmax - xmin, ymax - ymin], 1) * canvas
    c = np.full(max_objects, -1, np.int32)
    c[:n] = objects['label'][:n]
    d = np.zeros(max_objects, bool)
    d[:n] = objects['is_difficult'][:n]
    images.append(np.clip(np.round(resize(ex['image'], canvas, canvas)), 0,
                          255).astype(np.uint8))
    boxes.append(b)
    classes.append(c)
    counts.append(n)
    difficult.append(d)
    if limit and len(images) >= limit:
      break
  if not images:
    raise DataError(f"split '{split}' of {VOC} is empty")
  return DetectionData(np.stack(images), np.stack(boxes), np.stack(classes),
                       np.asarray(counts, np.int32), None, np.stack(difficult))
