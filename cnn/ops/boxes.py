"""Boxes: IoU, box coding, anchors, NMS and OverFeat's greedy merge.

A box is (x, y, w, h): top-left corner, width and height, in pixels, on the
last axis. Functions that are used inside jitted code take any array module's
arrays (numpy or jax.numpy); `nms` and the greedy merge are host-side numpy
loops over a few hundred boxes per image, `nms_padded` is their jit-able,
fixed-size counterpart for Faster R-CNN-style detection.
"""
from __future__ import annotations

import math
from typing import Sequence

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


def encode_deltas(boxes, references, weights=(1., 1., 1., 1.)):
  """R-CNN box-regression targets of `boxes` relative to `references`.

  Girshick et al. 2014, appendix C: with centres (cx, cy),
  tx = (cx - cx_r) / w_r, ty = (cy - cy_r) / h_r, tw = log(w / w_r),
  th = log(h / h_r), each then multiplied by its weight (Fast R-CNN's target
  normalisation). Boxes and references broadcast over leading axes; boxes and
  references of zero width or height give infinite targets.

  Args:
    boxes: (..., 4) target boxes.
    references: (..., 4) proposals or anchors.
    weights: (wx, wy, ww, wh) multipliers.

  Returns:
    (..., 4) deltas (tx, ty, tw, th).
  """
  xp = _xp(boxes, references)
  wx, wy, ww, wh = weights
  w, h = boxes[..., 2], boxes[..., 3]
  rw, rh = references[..., 2], references[..., 3]
  # Centre offsets: (x + w/2) - (x_r + w_r/2).
  dcx = boxes[..., 0] - references[..., 0] + (w - rw) / 2
  dcy = boxes[..., 1] - references[..., 1] + (h - rh) / 2
  return xp.stack([wx * dcx / rw, wy * dcy / rh,
                   ww * xp.log(w / rw), wh * xp.log(h / rh)], axis=-1)


def decode_deltas(deltas, references, weights=(1., 1., 1., 1.),
                  max_log_scale=math.log(1000. / 16)):
  """Inverse of `encode_deltas`: apply regression deltas to references.

  Args:
    deltas: (..., 4) (tx, ty, tw, th), as `encode_deltas` returns them.
    references: (..., 4) proposals or anchors; broadcasts with deltas.
    weights: the weights the deltas were encoded with.
    max_log_scale: tw / weight and th / weight are clamped to at most this
      (Detectron's default, log(1000 / 16)), so that an untrained regressor's
      large outputs cannot overflow `exp`.

  Returns:
    (..., 4) boxes.
  """
  xp = _xp(deltas, references)
  wx, wy, ww, wh = weights
  rw, rh = references[..., 2], references[..., 3]
  cx = references[..., 0] + rw / 2 + deltas[..., 0] / wx * rw
  cy = references[..., 1] + rh / 2 + deltas[..., 1] / wy * rh
  w = rw * xp.exp(xp.minimum(deltas[..., 2] / ww, max_log_scale))
  h = rh * xp.exp(xp.minimum(deltas[..., 3] / wh, max_log_scale))
  return xp.stack([cx - w / 2, cy - h / 2, w, h], axis=-1)


def clip(boxes, height, width):
  """Clips boxes to the image: corners to [0, width] x [0, height].

  A box wholly outside the image becomes one of zero width or height on the
  border.
  """
  xp = _xp(boxes)
  c = to_corners(boxes)
  x0, x1 = (xp.clip(c[..., i], 0, width) for i in (0, 2))
  y0, y1 = (xp.clip(c[..., i], 0, height) for i in (1, 3))
  return from_corners(xp.stack([x0, y0, x1, y1], axis=-1))


def anchors(feature_height: int, feature_width: int, stride: float,
            sizes: Sequence[float], ratios: Sequence[float],
            dtype=np.float32) -> np.ndarray:
  """Faster R-CNN's region-proposal anchors for a feature map.

  Every feature cell (i, j) gets A = len(ratios) * len(sizes) anchors centred
  at ((j + 0.5) * stride, (i + 0.5) * stride); for size s and aspect ratio
  r = h / w an anchor has area s * s: w = s / sqrt(r), h = s * sqrt(r).

  Ordering: position-major (row i, then column j), then the anchor index
  a = ratio_index * len(sizes) + size_index, i.e. ratios vary slowest and
  sizes fastest, as in py-faster-rcnn and torchvision. Row n of the result is
  thus anchor a of cell (i, j) with n = (i * feature_width + j) * A + a, which
  is the order of a conv output (B, H, W, A * 4) reshaped to (B, H * W * A, 4).

  Args:
    feature_height: H, rows of the feature map.
    feature_width: W, columns of the feature map.
    stride: image pixels per feature cell.
    sizes: anchor sides (square root of the area) in pixels.
    ratios: aspect ratios h / w.
    dtype: of the result.

  Returns:
    (H * W * A, 4) numpy array of (x, y, w, h) boxes; a compile-time constant
    under jit since all arguments are static.
  """
  sizes = np.asarray(sizes, np.float64)
  root = np.sqrt(np.asarray(ratios, np.float64))
  ws = (sizes[None, :] / root[:, None]).reshape(-1)  # (A,), ratio-major.
  hs = (sizes[None, :] * root[:, None]).reshape(-1)
  cy = (np.arange(feature_height) + 0.5) * stride
  cx = (np.arange(feature_width) + 0.5) * stride
  cy, cx = (a[..., None] for a in np.meshgrid(cy, cx, indexing='ij'))
  shape = (feature_height, feature_width, ws.size)
  out = np.stack([cx - ws / 2, cy - hs / 2, np.broadcast_to(ws, shape),
                  np.broadcast_to(hs, shape)], axis=-1)
  return out.reshape(-1, 4).astype(dtype)


def nms_padded(boxes, scores, iou_threshold, max_out: int, valid=None):
  """Greedy non-maximum suppression with a static output size (jit-able).

  Gives the same boxes as `nms`: in decreasing score order (ties in index
  order), a box is kept unless its IoU with an already kept box exceeds
  `iou_threshold`. The pairwise IoU matrix of the score-sorted boxes is
  computed once (O(N^2) memory); a `lax.fori_loop` of min(max_out, N) steps
  then takes the best remaining box and drops the ones it suppresses, so the
  sequential part scales with the boxes kept rather than with N. Works under
  `jax.vmap` for a batch of images.

  Args:
    boxes: (N, 4).
    scores: (N,).
    iou_threshold: suppression threshold (may be traced).
    max_out: static number of output slots.
    valid: optional (N,) bool; False boxes are neither kept nor suppress
      others (padding, boxes below a score threshold, ...).

  Returns:
    (indices, keep): int32 (max_out,) indices into `boxes` of the kept boxes,
    highest score first, and bool (max_out,) marking the slots that hold a
    kept box; unused slots have index 0 and keep False.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  boxes, scores = jnp.asarray(boxes), jnp.asarray(scores)
  if not jnp.issubdtype(scores.dtype, jnp.floating):
    scores = scores.astype(jnp.float32)
  n = boxes.shape[0]
  if n == 0 or max_out == 0:
    return jnp.zeros(max_out, jnp.int32), jnp.zeros(max_out, bool)
  # Stable sort on -score: the order `nms` uses, ties in index order.
  order = jnp.argsort(-scores, stable=True).astype(jnp.int32)
  sorted_boxes = boxes[order]
  suppresses = pairwise_iou(sorted_boxes, sorted_boxes) > iou_threshold
  available = (jnp.ones(n, bool) if valid is None
               else jnp.asarray(valid, bool)[order])
  positions = jnp.arange(n)

  def step(k, carry):
    available, indices, keep = carry
    i = jnp.argmax(available)  # The best box not yet kept or suppressed.
    found = available[i]
    indices = indices.at[k].set(jnp.where(found, order[i], 0))
    keep = keep.at[k].set(found)
    # Clear i itself explicitly: a zero-area box has IoU 0 with itself.
    available = available & ~suppresses[i] & (positions != i)
    return available, indices, keep

  init = (available, jnp.zeros(max_out, jnp.int32), jnp.zeros(max_out, bool))
  _, indices, keep = jax.lax.fori_loop(0, min(max_out, n), step, init)
  return indices, keep


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
