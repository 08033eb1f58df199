"""Region-of-interest ops: Fast R-CNN's RoI max pooling and R-CNN's warp.

Boxes are (x, y, w, h) in image pixels, as in `cnn.ops.boxes`. Both ops take
one image, `features` / `images` (H, W, C) with boxes (R, 4), or a batch,
(B, H, W, C) with (B, R, 4), and are jit-able with a static output size.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _round_half_away(v):
  """C's round(), which Caffe uses: halves go away from zero."""
  return jnp.sign(v) * jnp.floor(jnp.abs(v) + 0.5)


def _bin_edges(start, end, bins: int, limit: int):
  """Cell ranges [lo, hi) of `bins` bins over rois [start, end), clipped.

  The roi spans max(end - start, 1) cells; bin k covers
  [floor(k * n / bins), ceil((k + 1) * n / bins)) offset by start. Caffe
  computes these edges in float; integer arithmetic gives the exact rational
  edges (they agree except where float rounding crosses an integer).
  """
  n = jnp.maximum(end - start, 1)[:, None]
  k = jnp.arange(bins, dtype=start.dtype)[None, :]
  lo = start[:, None] + (k * n) // bins
  hi = start[:, None] + ((k + 1) * n + bins - 1) // bins
  return jnp.clip(lo, 0, limit), jnp.clip(hi, 0, limit)


def _roi_max_pool(features, rois, output_size, spatial_scale):
  """`roi_max_pool` for one image: (H, W, C), (R, 4) -> (R, ph, pw, C)."""
  features = jnp.asarray(features)
  height, width, channels = features.shape
  ph, pw = output_size
  rois = jnp.asarray(rois, jnp.float32)
  # Corners on the feature map; the right/bottom edge x + w is exclusive.
  x0, y0 = (_round_half_away(rois[:, i] * spatial_scale) for i in (0, 1))
  x1 = _round_half_away((rois[:, 0] + rois[:, 2]) * spatial_scale)
  y1 = _round_half_away((rois[:, 1] + rois[:, 3]) * spatial_scale)
  x0, y0, x1, y1 = (v.astype(jnp.int32) for v in (x0, y0, x1, y1))
  xlo, xhi = _bin_edges(x0, x1, pw, width)  # (R, pw)
  ylo, yhi = _bin_edges(y0, y1, ph, height)  # (R, ph)
  cols, rows = jnp.arange(width), jnp.arange(height)
  in_x = (cols >= xlo[..., None]) & (cols < xhi[..., None])  # (R, pw, W)
  in_y = (rows >= ylo[..., None]) & (rows < yhi[..., None])  # (R, ph, H)

  # Only the location of each bin's maximum is found here; the values are then
  # gathered from `features`, so autodiff routes each bin's gradient to one
  # cell (Caffe's argmax: the first maximum in row-major order) through a
  # gather, with no -inf or tie arithmetic on the backward pass.
  masked = jax.lax.stop_gradient(features)
  neg = jnp.array(-jnp.inf, masked.dtype)
  # Max over each bin's column range, for every row: (R, pw, H, C). XLA fuses
  # the select into the reductions, so (R, pw, H, W, C) is never stored (on
  # CPU, R=64, 7x7 bins, a 38x50x256 map: 38 MB of temporaries, not 870 MB).
  along_x = jnp.where(in_x[:, :, None, :, None], masked[None, None], neg)
  row_max = along_x.max(axis=3)
  row_argmax = along_x.argmax(axis=3)
  # Then over the bin's row range: the first row holding the maximum.
  along_y = jnp.where(in_y[:, :, None, :, None], row_max[:, None], neg)
  best_row = along_y.argmax(axis=3)  # (R, ph, pw, C)
  row_argmax = jnp.broadcast_to(row_argmax[:, None],
                                (len(rois), ph) + row_argmax.shape[1:])
  best_col = jnp.take_along_axis(row_argmax, best_row[..., None, :],
                                 axis=3)[..., 0, :]
  out = features[best_row, best_col, jnp.arange(channels)]
  empty = ((xhi <= xlo)[:, None, :] | (yhi <= ylo)[:, :, None])[..., None]
  return jnp.where(empty, jnp.zeros((), out.dtype), out)


def roi_max_pool(features, rois, output_size: tuple[int, int],
                 spatial_scale: float):
  """Fast R-CNN RoI max pooling (Girshick 2015), Caffe's rules.

  Each roi is mapped to the feature map with corners
  x0 = round(x * scale), x1 = round((x + w) * scale) (likewise y; round
  halves away from zero, as C's round). Caffe's boxes are (x1, y1, x2, y2)
  with an inclusive x2, hence its width x2 - x1 + 1; here x + w is the
  exclusive right edge, so the roi covers cells [x0, x1), but at least one
  cell: roi_w = max(x1 - x0, 1). Bin j of pw spans cells
  [x0 + floor(j * roi_w / pw), x0 + ceil((j + 1) * roi_w / pw)), clipped to
  [0, W] (likewise rows); a bin with no cell on the map outputs 0. Bins may
  overlap, as in Caffe.

  The max is separable: over each bin's columns for every row, then over its
  rows, so intermediates are about R * pw * H * C (plus a fused, never stored
  R * pw * H * W * C select). The value is gathered at the argmax, so the
  gradient goes to a single cell per bin and channel (the first maximum in
  row-major order, like Caffe's backward); empty bins get none.

  Args:
    features: (H, W, C) or (B, H, W, C) feature map.
    rois: (R, 4) or (B, R, 4) boxes (x, y, w, h) in image pixels.
    output_size: static (ph, pw).
    spatial_scale: feature cells per image pixel (1 / stride).

  Returns:
    (R, ph, pw, C), or (B, R, ph, pw, C) for batched inputs.
  """
  output_size = tuple(output_size)
  features = jnp.asarray(features)
  pool = lambda f, r: _roi_max_pool(f, r, output_size, spatial_scale)
  if features.ndim == 4:
    return jax.vmap(pool)(features, rois)
  return pool(features, rois)


def _crop_and_resize(images, boxes, size):
  """`crop_and_resize` for one image: (H, W, C), (R, 4) -> (R, h, w, C)."""
  images = jnp.asarray(images)
  height, width = images.shape[:2]
  out_h, out_w = size
  boxes = jnp.asarray(boxes, jnp.float32)

  def taps(start, extent, n, limit):
    # Centres of the n output pixels inside [start, start + extent), in
    # pixel-centre coordinates (pixel k is centred at k), clamped to the image.
    pos = start[:, None] + (jnp.arange(n) + 0.5) * (extent[:, None] / n) - 0.5
    pos = jnp.clip(pos, 0, limit - 1)
    lo = jnp.floor(pos)
    frac = pos - lo
    lo = lo.astype(jnp.int32)
    return lo, jnp.minimum(lo + 1, limit - 1), frac

  x0, x1, fx = taps(boxes[:, 0], boxes[:, 2], out_w, width)  # (R, w)
  y0, y1, fy = taps(boxes[:, 1], boxes[:, 3], out_h, height)  # (R, h)
  dtype = (images.dtype if jnp.issubdtype(images.dtype, jnp.floating)
           else jnp.float32)
  images = images.astype(dtype)
  fx = fx.astype(dtype)[:, None, :, None]
  fy = fy.astype(dtype)[:, :, None, None]
  at = lambda ys, xs: images[ys[:, :, None], xs[:, None, :]]  # (R, h, w, C)
  top = at(y0, x0) * (1 - fx) + at(y0, x1) * fx
  bottom = at(y1, x0) * (1 - fx) + at(y1, x1) * fx
  return top * (1 - fy) + bottom * fy


def crop_and_resize(images, boxes, size: tuple[int, int]):
  """R-CNN's warp: each box resampled to a fixed size, bilinearly.

  Like `tf.image.crop_and_resize` but with (x, y, w, h) pixel boxes: output
  pixel (i, j) samples the image at x = bx + (j + 0.5) * bw / out_w - 0.5,
  y = by + (i + 0.5) * bh / out_h - 0.5 in pixel-centre coordinates (pixel k
  is centred at k), i.e. at the centres of the output pixels laid over the
  box. Samples outside the image are clamped to its border. The box of the
  whole image at the image's size returns the image. Differentiable w.r.t.
  the images (and the boxes, through the interpolation weights).

  Args:
    images: (H, W, C) or (B, H, W, C); integer images are warped in float32.
    boxes: (R, 4) or (B, R, 4).
    size: static (out_h, out_w).

  Returns:
    (R, out_h, out_w, C), or (B, R, out_h, out_w, C) for batched inputs.
  """
  size = tuple(size)
  images = jnp.asarray(images)
  warp = lambda i, b: _crop_and_resize(i, b, size)
  if images.ndim == 4:
    return jax.vmap(warp)(images, boxes)
  return warp(images, boxes)
