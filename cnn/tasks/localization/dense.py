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
                  batch_size: int = 250):
  """Multi-scale dense evaluation: the final class and box per image.

  The class is the argmax over classes of the per-scale mean probability
  summed over scales; the box comes from merging the `top_k` most confident
  boxes of that class over all scales and positions, weighted by that
  confidence (greedy merge: the merged box with the largest total
  confidence; NMS: the most confident box).

  Returns:
    (classes (B,), boxes (B, 4) in pixels of `images`).
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
    cls = np.argmax(votes, axis=-1)
    for i in range(k):
      conf = probs[i, :, cls[i]]
      top = np.argsort(-conf, kind='stable')[:top_k]
      if merge == 'greedy':
        merged, _ = box_ops.greedy_merge(bxs[i, top], conf[top],
                                         merge_threshold)
        out_boxes.append(merged[0])
      else:
        out_boxes.append(bxs[i, top[0]])
    classes.append(cls)
  return np.concatenate(classes), np.asarray(out_boxes, np.float32)


def box_metrics(pred: np.ndarray, true: np.ndarray, prefix: str = '',
                pred_classes=None, true_classes=None) -> dict:
  """Mean IoU, the fraction with IoU >= 0.5 and, given classes, the ILSVRC
  localization error: a prediction is right when its class is right AND
  its box has IoU >= 0.5 with the true box."""
  ious = np.asarray(box_ops.iou(np.asarray(pred, np.float64),
                                np.asarray(true, np.float64)))
  out = {f'{prefix}mean_iou': float(ious.mean()),
         f'{prefix}iou50': float((ious >= 0.5).mean())}
  if pred_classes is not None:
    right = (np.asarray(pred_classes) == np.asarray(true_classes)) & (
        ious >= 0.5)
    out[f'{prefix}loc_error'] = float(1.0 - right.mean())
  return out
