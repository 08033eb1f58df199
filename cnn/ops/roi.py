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


def _first_max(a, b):
  """Of two (value, flat index) candidates, the larger value; on a tie the
  smaller index (the first in row-major order, as Caffe's argmax)."""
  (av, ai), (bv, bi) = a, b
  take_b = (bv > av) | ((bv == av) & (bi < ai))
  return jnp.where(take_b, bv, av), jnp.where(take_b, bi, ai)


def _shifted(x, by: int, axis: int, fill):
  """x moved `by` cells towards index 0 along `axis`, the end filled."""
  by = min(by, x.shape[axis])
  kept = jax.lax.slice_in_dim(x, by, x.shape[axis], axis=axis)
  padding = [(0, 0, 0)] * x.ndim
  padding[axis] = (0, by, 0)
  return jax.lax.pad(kept, jnp.array(fill, x.dtype), padding)


def _next_level(entry, half: int, axis: int, neg, big):
  """One doubling of the ranges along `axis`. The barrier keeps XLA from
  fusing each level into the next, which recomputed every earlier level once
  for the values and once for the indices (slower on CPU: results/speed/
  README.md, "Numbers behind the code's comments")."""
  v, i = entry
  return jax.lax.optimization_barrier(_first_max(
      (v, i), (_shifted(v, half, axis, neg), _shifted(i, half, axis, big))))


def _levels(n: int) -> int:
  return max(n, 1).bit_length()  # levels 0 .. floor(log2 n)


def _sparse_table(values, index):
  """Range-maximum tables of a (H, W, C) map: entry [ky, kx, y, x] is the
  first maximum (value, flat index) over rows [y, y + 2**ky) and columns
  [x, x + 2**kx), for every ky <= log2 H, kx <= log2 W (entries whose range
  leaves the map are never read)."""
  height, width = values.shape[:2]
  neg = jnp.array(-jnp.inf, values.dtype)
  big = jnp.array(height * width, index.dtype)
  row = [(values, index)]
  for k in range(1, _levels(width)):
    row.append(_next_level(row[-1], 2 ** (k - 1), 1, neg, big))
  table = [[entry] for entry in row]  # [kx][ky]
  for column in table:
    for k in range(1, _levels(height)):
      column.append(_next_level(column[-1], 2 ** (k - 1), 0, neg, big))
  v = jnp.stack([jnp.stack([c[ky][0] for c in table])
                 for ky in range(_levels(height))])
  i = jnp.stack([jnp.stack([c[ky][1] for c in table])
                 for ky in range(_levels(height))])
  return v, i  # (LH, LW, H, W, C)


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

  # Only the location of each bin's maximum is found here; the values are then
  # gathered from `features`, so autodiff routes each bin's gradient to one
  # cell (Caffe's argmax: the first maximum in row-major order) through a
  # gather, with no -inf or tie arithmetic on the backward pass.
  # The maximum over a bin of n cells is that of two overlapping ranges of
  # 2**floor(log2 n) cells (per axis, so four table entries), read from a
  # sparse table of the map: the work is the table, (log2 H + 1)(log2 W + 1)
  # maps, plus four gathers per bin, however many rois there are.
  flat = jnp.arange(height * width, dtype=jnp.int32).reshape(height, width)
  flat = jnp.broadcast_to(flat[..., None], features.shape)
  table_v, table_i = _sparse_table(jax.lax.stop_gradient(features), flat)
  log2 = lambda n: jnp.array([max(m, 1).bit_length() - 1
                              for m in range(max(height, width) + 1)],
                             jnp.int32)[n]

  def ends(lo, hi):  # the two overlapping power-of-two ranges of each bin
    n = jnp.maximum(hi - lo, 1)
    k = log2(n)
    last = jnp.maximum(hi - 2 ** k, lo)
    return k, lo, last

  ky, ya, yb = (v[:, :, None] for v in ends(ylo, yhi))  # (R, ph, 1)
  kx, xa, xb = (v[:, None, :] for v in ends(xlo, xhi))  # (R, 1, pw)
  clip_y = lambda y: jnp.clip(y, 0, height - 1)
  clip_x = lambda x: jnp.clip(x, 0, width - 1)
  at = lambda y, x: (table_v[ky, kx, clip_y(y), clip_x(x)],
                     table_i[ky, kx, clip_y(y), clip_x(x)])  # (R, ph, pw, C)
  best = _first_max(_first_max(at(ya, xa), at(ya, xb)),
                    _first_max(at(yb, xa), at(yb, xb)))[1]
  out = features.reshape(height * width, channels)[best, jnp.arange(channels)]
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

  Each bin's maximum is read from a sparse table of the map (range maxima
  over 2**ky x 2**kx cells, with the first arg-max): four overlapping
  power-of-two ranges cover any bin exactly, so the cost is the table,
  (log2 H + 1)(log2 W + 1) maps, plus four gathers per bin, independent of
  the rois' sizes (faster than the earlier masked max over
  R * pw * H * W * C: results/speed/README.md, "Numbers behind the code's
  comments"). The value is gathered at the argmax, so the gradient goes to
  a single cell per bin and channel (the first maximum in row-major order,
  like Caffe's backward); empty bins get none.

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
