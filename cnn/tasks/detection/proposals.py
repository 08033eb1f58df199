"""Region proposals on the host: selective search, sliding windows, random.

R-CNN and Fast R-CNN classify a few hundred to a few thousand class-agnostic
boxes per image; this module makes those boxes with numpy and OpenCV and
measures how many ground-truth objects they cover (recall at IoU 0.5 among
the first k proposals). Boxes are (x, y, w, h) in pixels, float32, as in
`cnn.ops.boxes`.

OpenCV's selective search ranks its regions the way the paper does: by
hierarchy level times a random number, drawn from the C library's `rand()`.
`selective_search` reseeds that generator before every image, and OpenCV
runs single-threaded here, so the proposals (order included) are a pure
function of the image, in any process.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import multiprocessing
import os
import zipfile
from typing import Sequence

import numpy as np

from cnn.errors import ConfigError, DataError
from cnn.ops import boxes as box_ops

SS_MODES = ('fast', 'quality', 'single')
_SS_SWITCH = {'fast': 'switchToSelectiveSearchFast',
              'quality': 'switchToSelectiveSearchQuality',
              'single': 'switchToSingleStrategy'}
METHODS = ('selective_search_fast', 'selective_search_quality', 'sliding',
           'random')
# The seed given to libc's srand() before every selective search.
_SS_RAND_SEED = 1
_cv2_module = None
_libc = None


def _cv2():
  """cv2, set single-threaded once (deterministic, no oversubscription
  under multiprocessing)."""
  global _cv2_module, _libc
  if _cv2_module is None:
    try:
      import cv2  # pylint: disable=g-import-not-at-top
      cv2.ximgproc.segmentation  # pylint: disable=pointless-statement
    except (ImportError, AttributeError):
      raise ConfigError(
          'selective search needs OpenCV with the contrib modules: pip '
          'install opencv-contrib-python-headless') from None
    cv2.setNumThreads(1)
    try:
      _libc = ctypes.CDLL(None)
      _libc.srand.argtypes = [ctypes.c_uint]
    except (OSError, AttributeError):  # No C library to reseed (Windows).
      _libc = None
    _cv2_module = cv2
  return _cv2_module


def _check_size(canvas) -> tuple[int, int]:
  """An int side or an (H, W) pair -> (H, W)."""
  hw = (canvas, canvas) if np.isscalar(canvas) else tuple(canvas)
  if len(hw) != 2 or min(hw) < 1:
    raise ConfigError(f'canvas={canvas} must be a side or an (H, W) pair of '
                      'positive sizes')
  return int(hw[0]), int(hw[1])


def selective_search(image: np.ndarray, mode: str = 'fast',
                     max_boxes: int | None = None,
                     min_side: int = 4) -> np.ndarray:
  """OpenCV's selective search (Uijlings et al. 2013) on one RGB image.

  Args:
    image: uint8 (H, W, 3) RGB (a grey (H, W) or (H, W, 1) image is
      repeated to three channels).
    mode: 'fast' (2 colour spaces x 2 strategies x 2 k), 'quality' (5
      colour spaces, more k) or 'single' (one strategy).
    max_boxes: keep the first this many.
    min_side: drop boxes narrower or shorter than this.

  Returns:
    float32 (n, 4) boxes (x, y, w, h), in OpenCV's ranking order, without
    duplicates.
  """
  if mode not in SS_MODES:
    raise ConfigError(f"selective search mode='{mode}' is unknown; use one "
                      f'of {", ".join(SS_MODES)}')
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise DataError(f'selective search takes one (H, W, 3) image, not shape '
                    f'{image.shape}; pass images one at a time')
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  cv2 = _cv2()
  ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
  # Its colour-space strategies convert from BGR, as everything in OpenCV.
  ss.setBaseImage(np.ascontiguousarray(image[..., ::-1], dtype=np.uint8))
  getattr(ss, _SS_SWITCH[mode])()
  if _libc is not None:
    _libc.srand(_SS_RAND_SEED)
  rects = np.asarray(ss.process(), np.int64).reshape(-1, 4)
  rects = rects[(rects[:, 2] >= min_side) & (rects[:, 3] >= min_side)]
  # The strategies find many of the same regions; keep each box once, at its
  # best rank (OpenCV 4.x already does; this keeps the contract if not).
  _, first = np.unique(rects, axis=0, return_index=True)
  rects = rects[np.sort(first)]
  if max_boxes is not None:
    rects = rects[:max_boxes]
  return rects.astype(np.float32)


def sliding_windows(canvas, sizes: Sequence[float],
                    ratios: Sequence[float] = (1.0,),
                    stride_fraction: float = 0.5) -> np.ndarray:
  """Every window of each size and aspect ratio, on a regular grid.

  Args:
    canvas: image side, or (H, W).
    sizes: window mean sides (sqrt of the area) in pixels.
    ratios: aspect ratios w / h.
    stride_fraction: the step between windows as a fraction of the window's
      width (horizontally) and height (vertically).

  Returns:
    float32 (n, 4) windows inside the canvas, size by size, ratio by ratio,
    row by row. Each grid also has a last row/column flush with the far edge
    so that it covers the whole canvas; windows larger than the canvas are
    left out.
  """
  height, width = _check_size(canvas)
  if not 0 < stride_fraction <= 1:
    raise ConfigError(f'stride_fraction={stride_fraction} must be in (0, 1]')
  out = []
  for size in sizes:
    for ratio in ratios:
      w = int(round(size * np.sqrt(ratio)))
      h = int(round(size / np.sqrt(ratio)))
      if not (1 <= w <= width and 1 <= h <= height):
        continue
      grid = []
      for side, extent in ((w, width), (h, height)):
        step = max(1, int(round(stride_fraction * side)))
        pos = np.arange(0, extent - side + 1, step)
        if pos[-1] != extent - side:
          pos = np.append(pos, extent - side)
        grid.append(pos)
      y, x = np.meshgrid(grid[1], grid[0], indexing='ij')
      out.append(np.stack([x.ravel(), y.ravel(), np.full(x.size, w),
                           np.full(x.size, h)], axis=1))
  if not out:
    return np.zeros((0, 4), np.float32)
  return np.concatenate(out).astype(np.float32)


def random_boxes(rng_or_seed, n: int, canvas, min_side: int = 8
                 ) -> np.ndarray:
  """n random boxes inside the canvas: integer width and height uniform in
  [min_side, side of the canvas], then a uniform position.

  Args:
    rng_or_seed: a numpy Generator or anything `np.random.default_rng` takes.
    n: number of boxes.
    canvas: image side, or (H, W).
    min_side: smallest width and height.

  Returns:
    float32 (n, 4) boxes.
  """
  height, width = _check_size(canvas)
  if min_side > min(height, width):
    raise ConfigError(f'min_side={min_side} is larger than the canvas '
                      f'{height}x{width}; lower it')
  rng = np.random.default_rng(rng_or_seed)
  w = rng.integers(min_side, width + 1, n)
  h = rng.integers(min_side, height + 1, n)
  x = np.floor(rng.uniform(0, 1, n) * (width - w + 1))
  y = np.floor(rng.uniform(0, 1, n) * (height - h + 1))
  return np.stack([x, y, w, h], axis=1).astype(np.float32)


def default_sizes(canvas: int, n: int = 4) -> tuple[float, ...]:
  """Window sides for the synthetic detection set's default objects: a
  geometric series from 3/16 to 1/2 of the canvas (24..64 on 128)."""
  return tuple(float(s) for s in np.geomspace(canvas * 3 / 16, canvas / 2, n))


def _ss_one(args):
  image, mode = args
  return selective_search(image, mode)


def _compute(images: np.ndarray, method: str, num: int | None, *,
             seed: int, processes: int, sizes, ratios,
             stride_fraction: float, min_side: int) -> list[np.ndarray]:
  """Unpadded proposals of every image (the work `compute` caches)."""
  n, height, width = images.shape[:3]
  if method == 'random':
    return [random_boxes(np.random.default_rng([seed, i]), num,
                         (height, width), min_side) for i in range(n)]
  if method == 'sliding':
    windows = sliding_windows(
        (height, width), sizes or default_sizes(min(height, width)), ratios,
        stride_fraction)
    # Windows have no score: a random order per image makes the first k a
    # random k-subset instead of the top-left corner of the smallest size.
    return [windows[np.random.default_rng([seed, i]).permutation(
        len(windows))] for i in range(n)]
  mode = method[len('selective_search_'):]
  items = [(img, mode) for img in images]
  if processes <= 1 or n < 2:
    return [_ss_one(it) for it in items]
  # Spawned, not forked: the parent may hold JAX/TF threads, which a fork
  # would copy mid-state. Chunks amortise the pickling.
  chunk = max(1, -(-n // (4 * processes)))
  with multiprocessing.get_context('spawn').Pool(processes) as pool:
    return pool.map(_ss_one, items, chunksize=chunk)


def _key(images: np.ndarray, method: str, num, **options) -> str:
  digest = hashlib.sha256(np.ascontiguousarray(images).tobytes())
  digest.update(repr((images.shape, str(images.dtype))).encode())
  return json.dumps({'method': method, 'num': num, 'images': len(images),
                     'hash': digest.hexdigest(), **options}, sort_keys=True)


def _load_cache(path: str, key: str):
  try:
    with np.load(path, allow_pickle=False) as f:
      if str(f['key']) == key:
        return f['boxes'], f['counts']
  except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
    pass  # Missing or unreadable (a truncated .npz is a damaged zip).
  return None


def _save_cache(path: str, key: str, boxes: np.ndarray, counts: np.ndarray):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}'
  # A file object, not a path: np.savez would append '.npz' to the tmp name.
  with open(tmp, 'wb') as f:
    np.savez(f, key=np.asarray(key), boxes=boxes, counts=counts)
  os.replace(tmp, path)


def compute(images: np.ndarray, method: str, num: int | None, *,
            seed: int = 0, processes: int = 1, cache: str | None = None,
            sizes: Sequence[float] | None = None,
            ratios: Sequence[float] = (3 / 4, 1.0, 4 / 3),
            stride_fraction: float = 0.5, min_side: int = 8
            ) -> tuple[np.ndarray, np.ndarray]:
  """Proposals of a batch of images, padded to `num` per image.

  Args:
    images: uint8 (N, H, W, 3).
    method: 'selective_search_fast', 'selective_search_quality', 'sliding'
      (`sliding_windows` of `sizes` x `ratios`, in a seeded random order per
      image) or 'random' (`random_boxes` of side >= `min_side`, seeded per
      image).
    num: proposals kept per image (the first `num`); None keeps them all,
      padding to the longest list (for 'random' it is required).
    seed: the seed of the sliding-window order and of random boxes.
    processes: worker processes for selective search (1: in this process).
      They are spawned, so a script calling this with processes > 1 needs
      the usual `if __name__ == '__main__':` guard.
    cache: an .npz path. When it holds the result of the same call (method,
      num, options and a hash of the image bytes) it is loaded instead;
      otherwise the proposals are computed and written there atomically.
    sizes: sliding-window sides (default: `default_sizes` of the image).
    ratios: sliding-window aspect ratios w / h.
    stride_fraction: sliding-window step as a fraction of its side.
    min_side: smallest side of a random box.

  Returns:
    boxes: float32 (N, num, 4), zeros after each image's count.
    counts: int32 (N,) number of real proposals per image.
  """
  if method not in METHODS:
    raise ConfigError(f"proposal method '{method}' is unknown; use one of "
                      f'{", ".join(METHODS)}')
  images = np.asarray(images)
  if images.ndim != 4:
    raise DataError(f'proposals take a batch of images (N, H, W, C), not '
                    f'shape {images.shape}')
  if num is None and method == 'random':
    raise ConfigError("method='random' needs num, the boxes per image")
  if num is not None and num < 1:
    raise ConfigError(f'num={num} must be at least 1')
  options = dict(seed=int(seed),
                 sizes=None if sizes is None else [float(s) for s in sizes],
                 ratios=[float(r) for r in ratios],
                 stride_fraction=float(stride_fraction),
                 min_side=int(min_side))
  key = None
  if cache:
    key = _key(images, method, num, **options)
    hit = _load_cache(cache, key)
    if hit is not None:
      return hit
  lists = _compute(images, method, num, processes=processes, **options)
  n = len(images)
  width_out = num if num is not None else max([len(b) for b in lists] + [1])
  boxes = np.zeros((n, width_out, 4), np.float32)
  counts = np.zeros(n, np.int32)
  for i, b in enumerate(lists):
    b = b[:width_out]
    boxes[i, :len(b)] = b
    counts[i] = len(b)
  if cache:
    _save_cache(cache, key, boxes, counts)
  return boxes, counts


def recall(proposals: np.ndarray, counts: np.ndarray, gt_boxes: np.ndarray,
           gt_valid: np.ndarray, iou: float = 0.5,
           top: Sequence[int | str] = (10, 50, 100, 300, 'all')
           ) -> dict:
  """Fraction of ground-truth boxes that the first k proposals cover.

  A ground-truth box is covered when at least one of its image's first k
  proposals has IoU >= `iou` with it.

  Args:
    proposals: (N, P, 4) padded proposals.
    counts: (N,) real proposals per image.
    gt_boxes: (N, M, 4) padded ground-truth boxes.
    gt_valid: bool (N, M), which ground-truth slots are real.
    iou: the IoU threshold.
    top: the k's; 'all' (or None) means every proposal.

  Returns:
    {k: recall} in the order of `top`.
  """
  proposals = np.asarray(proposals, np.float64)
  gt_boxes = np.asarray(gt_boxes, np.float64)
  gt_valid = np.asarray(gt_valid, bool)
  counts = np.asarray(counts)
  total = int(gt_valid.sum())
  if not total:
    raise DataError('recall needs at least one ground-truth box; pass '
                    'images with objects')
  n, p = proposals.shape[:2]
  if p == 0:
    return {k: 0.0 for k in top}
  # (N, P, M) IoU; padded proposals count as no overlap.
  overlap = box_ops.iou(proposals[:, :, None, :], gt_boxes[:, None, :, :])
  overlap = np.where(np.arange(p)[None, :, None] < counts[:, None, None],
                     overlap, 0.0)
  # best[:, k - 1] is the best IoU among the first k proposals.
  best = np.maximum.accumulate(overlap, axis=1)
  out = {}
  for k in top:
    last = p if k in (None, 'all') else min(int(k), p)
    if last < 1:
      raise ConfigError(f'top k={k} must be at least 1')
    covered = (best[:, last - 1] >= iou) & gt_valid
    out[k] = float(covered.sum()) / total
  return out
