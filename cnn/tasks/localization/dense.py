"""Single-window and multi-scale dense (OverFeat) prediction, box metrics.

Multi-scale dense evaluation runs the net on the image resized by each of
`scales`, maps every position's class probabilities and box back to image
coordinates, picks the class with the highest mean probability summed over
scales, and merges that class's boxes (OverFeat's greedy merge, or NMS).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cnn.errors import ConfigError
from cnn.ops import boxes as box_ops
from cnn.tasks.localization.model import preprocess

MERGES = ('greedy', 'nms')


def predict(model, params, images, batch_size: int = 250):
  """Single-window prediction at the training size: (logits, boxes px)."""
  canvas = images.shape[1]
  batch_size = min(batch_size, len(images))  # no padding beyond the data
  apply = jax.jit(lambda p, x: model.apply({'params': p}, preprocess(x),
                                           train=False))
  logits, boxes = [], []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    k = len(chunk)
    if k < batch_size:  # one shape, one compilation
      chunk = np.concatenate([chunk, np.zeros((batch_size - k,)
                                              + chunk.shape[1:], chunk.dtype)])
    lo, co = apply(params, chunk)
    logits.append(np.asarray(lo[:k, 0, 0]))
    boxes.append(np.asarray(co[:k, 0, 0]) * canvas)
  return np.concatenate(logits), np.concatenate(boxes)


def dense_maps(model, params, images, scale: float, window: int, stride: int):
  """One scale of dense evaluation, mapped back to image coordinates.

  Args:
    model, params: the localizer.
    images: (B, H, W, C) uint8.
    scale: the images are resized by this factor first.
    window: the training input side T.
    stride: the dense map's stride in (resized) pixels.

  Returns:
    (probs (B, N, K), boxes (B, N, 4) in original image pixels), N = H' W'
    positions; the window at map (i, j) starts at (j*stride, i*stride) of the
    resized image.
  """
  b, h, w, c = images.shape
  sh, sw = int(round(h * scale)), int(round(w * scale))
  if min(sh, sw) < window:
    raise ConfigError(f'scale {scale} makes the {h}x{w} image {sh}x{sw}, '
                      f'smaller than the {window}x{window} window; use scales '
                      f'>= {window / min(h, w):.3g}')
  x = preprocess(images)
  if (sh, sw) != (h, w):
    x = jax.image.resize(x, (b, sh, sw, c), 'bilinear')
  logits, codes = model.apply({'params': params}, x, train=False)
  probs = jax.nn.softmax(logits, axis=-1)
  gy, gx = jnp.meshgrid(jnp.arange(probs.shape[1]),
                        jnp.arange(probs.shape[2]), indexing='ij')
  offsets = jnp.stack([gx, gy], axis=-1).astype(jnp.float32) * stride
  boxes = box_ops.decode(codes, offsets[None], window) / scale
  n = probs.shape[1] * probs.shape[2]
  return probs.reshape(b, n, -1), boxes.reshape(b, n, 4)


def dense_predict(model, params, images, *, window: int, stride: int,
                  scales: Sequence[float] = (1.0,), merge: str = 'greedy',
                  merge_threshold: float = 0.5, top_k: int = 30,
                  batch_size: int = 250, guesses: int = 1):
  """Multi-scale dense evaluation: the final class and box per image.

  The class is the argmax over classes of the per-scale mean probability
  summed over scales; the box comes from merging the `top_k` most confident
  boxes of that class over all scales and positions, weighted by that
  confidence (greedy merge: the merged box with the largest total
  confidence; NMS: the most confident box). With `guesses` = k > 1 the k
  classes of highest summed probability each get their own merged box
  (ILSVRC's top-5).

  Returns:
    (classes (B,), boxes (B, 4) in pixels of `images`); with guesses > 1,
    (classes (B, k), boxes (B, k, 4)), best guess first.
  """
  if merge not in MERGES:
    raise ConfigError(f"merge='{merge}' is unknown; use one of "
                      f'{", ".join(MERGES)}')
  batch_size = min(batch_size, len(images))
  fns = {s: jax.jit(lambda p, x, s=s: dense_maps(model, p, x, s, window,
                                                 stride)) for s in scales}
  classes, out_boxes = [], []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    k = len(chunk)
    if k < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - k,)
                                              + chunk.shape[1:], chunk.dtype)])
    per_scale = [jax.device_get(fns[s](params, chunk)) for s in scales]
    votes = sum(p.mean(axis=1) for p, _ in per_scale)[:k]
    probs = np.concatenate([p for p, _ in per_scale], axis=1)[:k]
    bxs = np.concatenate([b for _, b in per_scale], axis=1)[:k]
    cls = np.argsort(-votes, axis=-1, kind='stable')[:, :guesses]
    for i in range(k):
      for c in cls[i]:
        conf = probs[i, :, c]
        top = np.argsort(-conf, kind='stable')[:top_k]
        if merge == 'greedy':
          merged, _ = box_ops.greedy_merge(bxs[i, top], conf[top],
                                           merge_threshold)
          out_boxes.append(merged[0])
        else:
          out_boxes.append(bxs[i, top[0]])
    classes.append(cls)
  classes = np.concatenate(classes)
  out_boxes = np.asarray(out_boxes, np.float32).reshape(len(classes),
                                                        guesses, 4)
  if guesses == 1:
    return classes[:, 0], out_boxes[:, 0]
  return classes, out_boxes


def localization_error(pred_classes, pred_boxes, true_classes,
                       true_boxes) -> float:
  """ILSVRC localization error with k guesses per image.

  A guess is right when its class is the true class AND its box has IoU >=
  0.5 with the true box; an image counts as right when any of its k
  guesses is (k = 1: top-1, k = 5: top-5).

  Args:
    pred_classes: (N,) or (N, k) predicted classes, best first.
    pred_boxes: (N, 4), one class-agnostic box for every guess, or (N, k, 4)
      a box per guess; (x, y, w, h).
    true_classes: (N,).
    true_boxes: (N, 4).
  """
  pred_classes = np.asarray(pred_classes)
  if pred_classes.ndim == 1:
    pred_classes = pred_classes[:, None]
  n, k = pred_classes.shape
  pred_boxes = np.asarray(pred_boxes, np.float64)
  if pred_boxes.ndim == 2:
    pred_boxes = np.broadcast_to(pred_boxes[:, None], (n, k, 4))
  true_boxes = np.asarray(true_boxes, np.float64)
  ious = np.asarray(box_ops.iou(
      pred_boxes.reshape(-1, 4), np.repeat(true_boxes, k, axis=0)))
  right = (pred_classes == np.asarray(true_classes)[:, None]) & (
      ious.reshape(n, k) >= 0.5)
  return float(1.0 - right.any(axis=1).mean())


def box_metrics(pred: np.ndarray, true: np.ndarray, prefix: str = '',
                pred_classes=None, true_classes=None) -> dict:
  """Metrics of predicted boxes (x, y, w, h) against the true ones.

  `mean_iou` and `iou50` (the fraction with IoU >= 0.5) of the first guess;
  `oracle_loc_error` = 1 - iou50 (the box alone, as if the class were
  right); given classes, the ILSVRC localization error `loc_error` (top-1)
  and, with 5 guesses ((N, 5) classes, (N, 4) or (N, 5, 4) boxes),
  `loc_error_top5`: see `localization_error`.
  """
  first = np.asarray(pred, np.float64)
  if first.ndim == 3:
    first = first[:, 0]
  ious = np.asarray(box_ops.iou(first, np.asarray(true, np.float64)))
  out = {f'{prefix}mean_iou': float(ious.mean()),
         f'{prefix}iou50': float((ious >= 0.5).mean()),
         f'{prefix}oracle_loc_error': float((ious < 0.5).mean())}
  if pred_classes is not None:
    cls = np.asarray(pred_classes)
    top1 = cls if cls.ndim == 1 else cls[:, 0]
    out[f'{prefix}loc_error'] = localization_error(top1, first, true_classes,
                                                   true)
    if cls.ndim == 2 and cls.shape[1] >= 5:
      out[f'{prefix}loc_error_top5'] = localization_error(
          cls[:, :5], pred if np.ndim(pred) == 2 else np.asarray(pred)[:, :5],
          true_classes, true)
  return out
