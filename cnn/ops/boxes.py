"""Boxes: IoU, coding relative to a window, NMS and OverFeat's greedy merge.

A box is (x, y, w, h): top-left corner, width and height, in pixels, on the
last axis. Functions that are used inside jitted code take any array module's
arrays (numpy or jax.numpy); NMS and the greedy merge are host-side numpy
loops over a few hundred boxes per image.
"""
from __future__ import annotations

import numpy as np


def _xp(*arrays):
  """numpy for numpy inputs, jax.numpy otherwise (keeps jit tracing)."""
  if all(isinstance(a, (np.ndarray, float, int, np.generic)) for a in arrays):
    return np
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jnp


def to_corners(boxes):
  """(x, y, w, h) -> (x0, y0, x1, y1)."""
  xp = _xp(boxes)
  x, y, w, h = (boxes[..., i] for i in range(4))
  return xp.stack([x, y, x + w, y + h], axis=-1)


def from_corners(corners):
  """(x0, y0, x1, y1) -> (x, y, w, h)."""
  xp = _xp(corners)
  x0, y0, x1, y1 = (corners[..., i] for i in range(4))
  return xp.stack([x0, y0, x1 - x0, y1 - y0], axis=-1)


def area(boxes):
  xp = _xp(boxes)
  return xp.maximum(boxes[..., 2], 0) * xp.maximum(boxes[..., 3], 0)


def intersection(a, b):
  """Area shared by boxes a and b (broadcasting over leading axes)."""
  xp = _xp(a, b)
  ca, cb = to_corners(a), to_corners(b)
  w = xp.minimum(ca[..., 2], cb[..., 2]) - xp.maximum(ca[..., 0], cb[..., 0])
  h = xp.minimum(ca[..., 3], cb[..., 3]) - xp.maximum(ca[..., 1], cb[..., 1])
  return xp.maximum(w, 0) * xp.maximum(h, 0)


def iou(a, b):
  """Intersection over union of a and b, broadcasting; 0 for empty unions."""
  xp = _xp(a, b)
  inter = intersection(a, b)
  union = area(a) + area(b) - inter
  return xp.where(union > 0, inter / xp.where(union > 0, union, 1), 0.0)


def pairwise_iou(a, b):
  """(N, 4), (M, 4) -> (N, M) IoU matrix."""
  return iou(a[:, None, :], b[None, :, :])


def encode(boxes, offset, window):
  """Pixel boxes -> codes relative to a window: (box - (ox, oy, 0, 0)) / T.

  Args:
    boxes: (..., 4) boxes in the image.
    offset: (..., 2) top-left (x, y) of the window.
    window: the window side T (the network's training input).

  Returns:
    (..., 4) codes; a box filling the window is (0, 0, 1, 1).
  """
  xp = _xp(boxes, offset)
  shift = xp.concatenate([offset, xp.zeros_like(offset)], axis=-1)
  return (boxes - shift) / window


def decode(codes, offset, window):
  """Inverse of `encode`: codes relative to a window -> pixel boxes."""
  xp = _xp(codes, offset)
  shift = xp.concatenate([offset, xp.zeros_like(offset)], axis=-1)
  return codes * window + shift


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float = 0.5,
        max_out: int | None = None) -> np.ndarray:
  """Greedy non-maximum suppression.

  Args:
    boxes: (N, 4).
    scores: (N,).
    iou_threshold: a box is dropped when its IoU with a kept, higher-scoring
      box exceeds this.
    max_out: keep at most this many.

  Returns:
    Indices of the kept boxes, highest score first.
  """
  boxes, scores = np.asarray(boxes, np.float64), np.asarray(scores)
  order = np.argsort(-scores, kind='stable')
  keep = []
  while order.size and (max_out is None or len(keep) < max_out):
    i = order[0]
    keep.append(i)
    rest = order[1:]
    overlap = iou(boxes[i][None], boxes[rest])
    order = rest[overlap <= iou_threshold]
  return np.asarray(keep, np.int64)


def match_score(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """OverFeat's merge criterion between box sets, lower = more alike.

  The paper sums the distance between the centres and the intersection area,
  which mixes units; here both terms are made scale-free: the centre distance
  over the mean side of the two boxes, plus 1 - IoU. Pairwise (N, M).
  """
  a, b = a[:, None, :], b[None, :, :]
  ca = a[..., :2] + a[..., 2:] / 2
  cb = b[..., :2] + b[..., 2:] / 2
  dist = np.linalg.norm(ca - cb, axis=-1)
  side = (a[..., 2] + a[..., 3] + b[..., 2] + b[..., 3]) / 4
  return dist / np.maximum(side, 1e-9) + 1.0 - iou(a, b)


def greedy_merge(boxes: np.ndarray, scores: np.ndarray,
                 threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
  """OverFeat's greedy box merging (Sermanet et al. 2014, section 4.3).

  Repeatedly takes the two boxes with the smallest `match_score`; while it is
  below `threshold` they are replaced by their score-weighted mean box, whose
  score is the sum of theirs (the paper averages coordinates; weighting by
  confidence lets the confident windows dominate). Boxes that support each
  other thus pile up score, which is how OverFeat picks the final box.

  Args:
    boxes: (N, 4).
    scores: (N,) non-negative confidences.
    threshold: merge while the best pair's match score is below this.

  Returns:
    (merged boxes (K, 4), their scores (K,)), highest score first.
  """
  boxes = np.array(boxes, np.float64).reshape(-1, 4)
  scores = np.array(scores, np.float64).reshape(-1)
  while len(boxes) > 1:
    m = match_score(boxes, boxes)
    np.fill_diagonal(m, np.inf)
    i, j = np.unravel_index(np.argmin(m), m.shape)
    if m[i, j] >= threshold:
      break
    wi, wj = scores[i], scores[j]
    total = wi + wj
    merged = ((boxes[i] * wi + boxes[j] * wj) / total if total > 0
              else (boxes[i] + boxes[j]) / 2)
    keep = np.ones(len(boxes), bool)
    keep[[i, j]] = False
    boxes = np.concatenate([boxes[keep], merged[None]])
    scores = np.concatenate([scores[keep], [total]])
  order = np.argsort(-scores, kind='stable')
  return boxes[order], scores[order]
