"""Detection ops: box deltas, clipping, anchors, padded NMS, RoI pooling and
the R-CNN warp, against hand cases and brute-force numpy references."""
from __future__ import annotations

import decimal
import fractions
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn.ops import boxes as box_ops
from cnn.ops import roi


# ----------------------------------------------------------------- deltas


def test_encode_deltas_follows_the_rcnn_formula_on_a_hand_case():
  reference = np.array([10., 20., 40., 20.])  # Centre (30, 30).
  box = np.array([20., 10., 80., 40.])  # Centre (60, 30), twice the size.
  np.testing.assert_allclose(box_ops.encode_deltas(box, reference),
                             [0.75, 0., math.log(2), math.log(2)])
  np.testing.assert_allclose(
      box_ops.encode_deltas(jnp.asarray(box), jnp.asarray(reference),
                            weights=(10., 10., 5., 5.)),
      [7.5, 0., 5 * math.log(2), 5 * math.log(2)], rtol=1e-6)


def test_decode_deltas_inverts_encode_deltas_and_broadcasts():
  rng = np.random.default_rng(0)
  refs = np.concatenate([rng.uniform(0, 100, (5, 2)),
                         rng.uniform(4, 60, (5, 2))], axis=1)
  targets = np.concatenate([rng.uniform(0, 100, (3, 5, 2)),
                            rng.uniform(4, 60, (3, 5, 2))], axis=-1)
  weights = (10., 10., 5., 5.)
  # numpy in, numpy out; jax under jit agrees.
  deltas = box_ops.encode_deltas(targets, refs, weights)
  assert isinstance(deltas, np.ndarray) and deltas.shape == (3, 5, 4)
  np.testing.assert_allclose(box_ops.decode_deltas(deltas, refs, weights),
                             targets, rtol=1e-9, atol=1e-9)
  decoded = jax.jit(functools.partial(box_ops.decode_deltas, weights=weights))(
      jnp.asarray(deltas, jnp.float32), jnp.asarray(refs, jnp.float32))
  np.testing.assert_allclose(decoded, targets, rtol=1e-4, atol=1e-3)
  # Zero deltas are the references themselves.
  np.testing.assert_allclose(box_ops.decode_deltas(np.zeros((5, 4)), refs),
                             refs)


def test_decode_deltas_clamps_the_log_scale():
  ref = jnp.array([0., 0., 16., 8.])
  out = box_ops.decode_deltas(jnp.array([0., 0., 100., 1e4]), ref)
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out[2:], [1000., 500.], rtol=1e-5)
  out = box_ops.decode_deltas(np.array([0., 0., 100., 1.]), np.asarray(ref),
                              max_log_scale=0.5)
  np.testing.assert_allclose(out[2:], [16 * math.exp(0.5), 8 * math.exp(0.5)])


def test_clip_keeps_boxes_inside_the_image():
  boxes = np.array([[-5., 10., 20., 100.],   # Left and bottom outside.
                    [5., 6., 7., 8.],        # Inside.
                    [50., 5., 10., 10.]])    # Wholly right of the image.
  expected = [[0., 10., 15., 40.], [5., 6., 7., 8.], [40., 5., 0., 10.]]
  np.testing.assert_allclose(box_ops.clip(boxes, 50, 40), expected)
  np.testing.assert_allclose(
      jax.jit(box_ops.clip)(jnp.asarray(boxes), 50., 40.), expected)


# ---------------------------------------------------------------- anchors


def test_anchors_count_centres_areas_ratios_and_conv_order():
  h, w, stride = 3, 4, 16.
  sizes, ratios = (32., 64.), (0.5, 1., 2.)
  a = len(sizes) * len(ratios)
  got = box_ops.anchors(h, w, stride, sizes, ratios)
  assert got.shape == (h * w * a, 4) and got.dtype == np.float32

  # Built per cell and anchor as documented (ratio-major, sizes fastest), laid
  # out like a conv output (1, H, W, A * 4) and reshaped the way an RPN head's
  # deltas are.
  conv = np.zeros((1, h, w, a * 4))
  for i in range(h):
    for j in range(w):
      for ri, r in enumerate(ratios):
        for si, s in enumerate(sizes):
          k = ri * len(sizes) + si
          bw, bh = s / math.sqrt(r), s * math.sqrt(r)
          conv[0, i, j, 4 * k:4 * k + 4] = [
              (j + .5) * stride - bw / 2, (i + .5) * stride - bh / 2, bw, bh]
  np.testing.assert_allclose(got, conv.reshape(1, h * w * a, 4)[0], rtol=1e-6)

  centres = got[:, :2] + got[:, 2:] / 2
  cells = np.arange(h * w).repeat(a)
  np.testing.assert_allclose(centres[:, 0], (cells % w + .5) * stride)
  np.testing.assert_allclose(centres[:, 1], (cells // w + .5) * stride)
  np.testing.assert_allclose(got[:, 2] * got[:, 3],
                             np.tile(np.square(sizes), h * w * len(ratios)),
                             rtol=1e-5)
  np.testing.assert_allclose(got[:, 3] / got[:, 2],
                             np.tile(np.repeat(ratios, len(sizes)), h * w),
                             rtol=1e-5)


# -------------------------------------------------------------------- NMS


def random_boxes(rng, n):
  """Crowded boxes, so that NMS suppresses a good share of them."""
  return np.concatenate([rng.uniform(0, 40, (n, 2)),
                         rng.uniform(4, 30, (n, 2))], axis=1).astype(np.float32)


def expected_nms(boxes, scores, threshold, max_out, valid):
  """The numpy `nms` on the valid boxes, as padded (indices, keep)."""
  idx = np.flatnonzero(valid)
  kept = idx[box_ops.nms(boxes[idx], scores[idx], threshold, max_out)]
  indices = np.zeros(max_out, np.int32)
  indices[:len(kept)] = kept
  return indices, np.arange(max_out) < len(kept)


@functools.partial(jax.jit, static_argnames='max_out')
def jit_nms(boxes, scores, threshold, valid, max_out):
  return box_ops.nms_padded(boxes, scores, threshold, max_out, valid)


@pytest.mark.parametrize('threshold', [0.3, 0.5, 0.7])
def test_nms_padded_matches_numpy_nms_under_jit(threshold):
  rng = np.random.default_rng(int(threshold * 10))
  n, max_out = 40, 30
  boxes = random_boxes(rng, n)
  scores = rng.uniform(size=n).astype(np.float32)
  suppressed_some = False
  for valid in (np.ones(n, bool), rng.uniform(size=n) < 0.7):
    want_idx, want_keep = expected_nms(boxes, scores, threshold, max_out,
                                       valid)
    suppressed_some |= want_keep.sum() < valid.sum()
    idx, keep = jit_nms(boxes, scores, threshold, valid, max_out)
    assert idx.dtype == jnp.int32 and keep.dtype == jnp.bool_
    np.testing.assert_array_equal(keep, want_keep)
    np.testing.assert_array_equal(idx, want_idx)
  assert suppressed_some


def test_nms_padded_truncates_pads_and_breaks_ties_like_nms():
  rng = np.random.default_rng(1)
  n = 12
  boxes = random_boxes(rng, n)
  scores = rng.integers(0, 3, n).astype(np.float32)  # Many ties.
  valid = np.ones(n, bool)
  for max_out in (3, 20):  # Fewer slots than survivors; more than boxes.
    want_idx, want_keep = expected_nms(boxes, scores, 0.4, max_out, valid)
    idx, keep = jax.jit(box_ops.nms_padded, static_argnums=(2, 3))(
        boxes, scores, 0.4, max_out)  # valid=None: all boxes.
    np.testing.assert_array_equal(keep, want_keep)
    np.testing.assert_array_equal(idx, want_idx)
  assert keep.sum() < n and not keep[-1]
  # Nothing valid: all padding.
  idx, keep = jit_nms(boxes, scores, 0.4, np.zeros(n, bool), max_out=4)
  assert not keep.any() and not idx.any()


def test_nms_padded_hand_case_threshold_is_strict_and_empty_boxes_kept_once():
  boxes = np.array([[0., 0., 30., 10.],
                    [10., 0., 30., 10.],   # IoU exactly 0.5 with box 0.
                    [12., 0., 30., 10.],   # IoU 0.8 with box 1: suppressed.
                    [50., 50., 0., 0.]],   # Zero area: IoU 0 with itself.
                   np.float32)
  scores = np.array([.9, .8, .7, .6], np.float32)
  idx, keep = jit_nms(boxes, scores, 0.5, np.ones(4, bool), max_out=4)
  np.testing.assert_array_equal(idx, [0, 1, 3, 0])
  np.testing.assert_array_equal(keep, [True, True, True, False])
  np.testing.assert_array_equal(box_ops.nms(boxes, scores, 0.5), [0, 1, 3])


def test_nms_padded_under_vmap_matches_numpy_per_image():
  rng = np.random.default_rng(2)
  b, n, max_out = 3, 30, 25
  boxes = np.stack([random_boxes(rng, n) for _ in range(b)])
  scores = rng.uniform(size=(b, n)).astype(np.float32)
  valid = rng.uniform(size=(b, n)) < 0.8
  batched = jax.jit(jax.vmap(
      lambda bx, s, v: box_ops.nms_padded(bx, s, 0.5, max_out, v)))
  idx, keep = batched(boxes, scores, valid)
  assert idx.shape == keep.shape == (b, max_out)
  for k in range(b):
    want_idx, want_keep = expected_nms(boxes[k], scores[k], 0.5, max_out,
                                       valid[k])
    np.testing.assert_array_equal(keep[k], want_keep)
    np.testing.assert_array_equal(idx[k], want_idx)


# ------------------------------------------------------------ RoI pooling


def c_round(v) -> int:
  """C's round() (halves away from zero) of a float32 value."""
  return int(decimal.Decimal(float(v)).quantize(
      decimal.Decimal(1), rounding=decimal.ROUND_HALF_UP))


def roi_pool_reference(features, rois, output_size, scale):
  """Caffe's RoI pooling loop, with exclusive right/bottom edges x + w.

  Returns the pooled values and, per bin and channel, the (row, col) of the
  first maximum in row-major order ((-1, -1) for an empty bin).
  """
  height, width, channels = features.shape
  ph, pw = output_size
  out = np.zeros((len(rois), ph, pw, channels), features.dtype)
  arg = np.full(out.shape + (2,), -1)
  scale = np.float32(scale)
  for r, (x, y, w, h) in enumerate(np.asarray(rois, np.float32)):
    x0, y0 = c_round(x * scale), c_round(y * scale)
    x1, y1 = c_round((x + w) * scale), c_round((y + h) * scale)
    rw, rh = max(x1 - x0, 1), max(y1 - y0, 1)
    for i in range(ph):
      hs = min(max(y0 + math.floor(fractions.Fraction(i * rh, ph)), 0), height)
      he = min(max(y0 + math.ceil(fractions.Fraction((i + 1) * rh, ph)), 0),
               height)
      for j in range(pw):
        ws = min(max(x0 + math.floor(fractions.Fraction(j * rw, pw)), 0),
                 width)
        we = min(max(x0 + math.ceil(fractions.Fraction((j + 1) * rw, pw)), 0),
                 width)
        for c in range(channels):
          best = -np.inf
          for yy in range(hs, he):
            for xx in range(ws, we):
              if features[yy, xx, c] > best:
                best = features[yy, xx, c]
                arg[r, i, j, c] = (yy, xx)
          out[r, i, j, c] = best if best > -np.inf else 0
  return out, arg


def routed_gradient(shape, arg, g):
  """g routed to each bin's argmax cell, summed where bins share a cell."""
  grad = np.zeros(shape)
  for (r, i, j, c), (yy, xx) in zip(np.ndindex(arg.shape[:-1]),
                                    arg.reshape(-1, 2)):
    if yy >= 0:
      grad[yy, xx, c] += g[r, i, j, c]
  return grad


STRIDE = 4  # spatial_scale = 1 / 4: image pixels are 4x the 9 x 7 map.


def sample_rois():
  rng = np.random.default_rng(3)
  # Inside the 28 x 36 pixel image the map covers.
  random = np.concatenate([rng.uniform(0, [12, 16], (6, 2)),
                           rng.uniform(1, [16, 20], (6, 2))], axis=1)
  hand = [[-10., -6., 20., 14.],   # Partly above and left of the map.
          [20., 30., 40., 40.],    # Partly right of and below the map.
          [10., 10., 1., 0.5],     # Tiny: one cell.
          [10., 6., 0., 0.],       # Empty box: still one cell.
          [18., 22., 6., 10.],     # x0, y0 on halves: 4.5 -> 5, 5.5 -> 6.
          [24., 4., 12., 3.],      # Starts on the last column: empty bins.
          [60., 60., 8., 8.]]      # Wholly outside: all bins empty.
  return np.concatenate([random, hand]).astype(np.float32)


def pool_inputs(seed=4, channels=3):
  rng = np.random.default_rng(seed)
  features = rng.normal(size=(9, 7, channels)).astype(np.float32)
  return features, sample_rois()


@pytest.mark.parametrize('output_size', [(2, 3), (3, 3)])
def test_roi_max_pool_matches_caffe_loop_values_and_gradient(output_size):
  features, rois = pool_inputs()
  pool = jax.jit(roi.roi_max_pool, static_argnames='output_size')
  out = pool(features, rois, output_size=output_size,
             spatial_scale=1. / STRIDE)
  want, arg = roi_pool_reference(features, rois, output_size, 1. / STRIDE)
  assert out.shape == (len(rois),) + output_size + (3,)
  np.testing.assert_array_equal(out, want)
  # The hand cases exercise what they claim to: negative maxima pass through,
  # partial rois have empty bins, the outside roi is all zeros.
  assert (want < 0).any()
  empty = arg[..., 0] < 0
  assert empty[-2].any() and not empty[-2].all() and empty[-1].all()
  assert not empty[:6].any()
  np.testing.assert_array_equal(np.asarray(out)[empty], 0)

  g = np.random.default_rng(5).normal(size=out.shape).astype(np.float32)
  grad = jax.jit(jax.grad(lambda f: jnp.sum(roi.roi_max_pool(
      f, rois, output_size, 1. / STRIDE) * g)))(features)
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(grad, routed_gradient(features.shape, arg, g),
                             rtol=1e-5, atol=1e-6)


def test_roi_max_pool_corner_rounding_is_half_away_from_zero():
  # x * scale = 2.5 -> cell 3 (banker's rounding would give 2).
  features = np.arange(6, dtype=np.float32).reshape(1, 6, 1)
  out = jax.jit(roi.roi_max_pool, static_argnums=(2, 3))(
      features, np.array([[10., 0., 2., 4.]]), (1, 1), 0.25)
  assert float(out[0, 0, 0, 0]) == 3.


def check_pool_and_gradient_against_loop(features, rois, size, rng):
  """roi_max_pool (scale 1/4) and its gradient for a random output gradient
  equal the Caffe-style loop's; returns the gradient."""
  g = rng.normal(size=(len(rois), *size, features.shape[-1])).astype(
      np.float32)

  @jax.jit
  def pool_and_grad(f):
    out, vjp = jax.vjp(lambda f: roi.roi_max_pool(f, rois, size, 0.25), f)
    return out, vjp(g)[0]

  out, grad = pool_and_grad(features)
  want, arg = roi_pool_reference(features, rois, size, 0.25)
  np.testing.assert_array_equal(out, want)
  np.testing.assert_allclose(grad, routed_gradient(features.shape, arg, g),
                             rtol=1e-5, atol=1e-6)
  return grad


def test_roi_max_pool_ties_route_gradient_to_first_maximum():
  rng = np.random.default_rng(6)
  # ReLU-like features: many equal zeros.
  features = np.maximum(rng.integers(-2, 2, (9, 7, 2)), 0).astype(np.float32)
  rois = sample_rois()
  grad = check_pool_and_gradient_against_loop(features, rois, (3, 2), rng)
  assert np.all(np.isfinite(grad))


def test_roi_max_pool_large_bins_with_ties_match_caffe_loop():
  # Bins of 1 to 17 cells on a 19 x 37 map (not powers of two), so each bin's
  # maximum comes from two overlapping power-of-two ranges per axis; few
  # distinct values, so the overlap holds ties whose gradient must still go
  # to the first maximum in row-major order.
  rng = np.random.default_rng(8)
  features = rng.integers(0, 4, (19, 37, 2)).astype(np.float32)
  corners = rng.uniform(-8, 140, (40, 2))
  sizes = rng.uniform(1, 150, (40, 2))
  rois = np.concatenate([corners, sizes], axis=1).astype(np.float32)
  check_pool_and_gradient_against_loop(features, rois, (2, 3), rng)


def test_roi_max_pool_batched_is_per_image():
  rng = np.random.default_rng(7)
  features = rng.normal(size=(2, 9, 7, 4)).astype(np.float32)
  rois = np.stack([sample_rois(), sample_rois()[::-1]])
  out = jax.jit(roi.roi_max_pool, static_argnums=(2, 3))(
      features, rois, (2, 2), 0.25)
  assert out.shape == (2, len(rois[0]), 2, 2, 4)
  for b in range(2):
    np.testing.assert_array_equal(
        out[b], roi_pool_reference(features[b], rois[b], (2, 2), 0.25)[0])


# ---------------------------------------------------------- crop and resize


def crop_reference(image, boxes, size):
  """Bilinear samples at the output pixel centres laid over each box."""
  height, width, _ = image.shape
  out_h, out_w = size
  out = np.zeros((len(boxes), out_h, out_w, image.shape[-1]))
  for r, (bx, by, bw, bh) in enumerate(np.asarray(boxes, np.float64)):
    for i in range(out_h):
      y = min(max(by + (i + .5) * bh / out_h - .5, 0), height - 1)
      for j in range(out_w):
        x = min(max(bx + (j + .5) * bw / out_w - .5, 0), width - 1)
        y0, x0 = int(math.floor(y)), int(math.floor(x))
        y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
        fy, fx = y - y0, x - x0
        out[r, i, j] = ((1 - fy) * ((1 - fx) * image[y0, x0]
                                    + fx * image[y0, x1])
                        + fy * ((1 - fx) * image[y1, x0] + fx * image[y1, x1]))
  return out


def test_crop_and_resize_matches_bilinear_reference_and_is_differentiable():
  rng = np.random.default_rng(8)
  images = rng.normal(size=(2, 10, 8, 3)).astype(np.float32)
  boxes = np.concatenate([rng.uniform(-3, 8, (2, 5, 2)),
                          rng.uniform(0.5, 9, (2, 5, 2))],
                         axis=-1).astype(np.float32)
  crop = jax.jit(roi.crop_and_resize, static_argnames='size')
  out = crop(images, boxes, size=(4, 5))
  assert out.shape == (2, 5, 4, 5, 3)
  for b in range(2):
    np.testing.assert_allclose(out[b], crop_reference(images[b], boxes[b],
                                                      (4, 5)),
                               rtol=1e-4, atol=1e-5)
  # Unbatched form agrees; gradients reach the image and are finite.
  np.testing.assert_allclose(crop(images[0], boxes[0], size=(4, 5)), out[0],
                             rtol=1e-6, atol=1e-6)
  grad = jax.jit(jax.grad(
      lambda im: roi.crop_and_resize(im, boxes[0], (4, 5)).sum()))(images[0])
  assert np.all(np.isfinite(grad)) and np.abs(grad).sum() > 0
  # The weights of each sample sum to one, so the total gradient is the
  # number of samples per channel.
  np.testing.assert_allclose(grad.sum(axis=(0, 1)), [5 * 4 * 5] * 3,
                             rtol=1e-5)


def test_crop_and_resize_of_the_whole_image_is_the_image():
  image = np.random.default_rng(9).normal(size=(6, 9, 2)).astype(np.float32)
  crop = jax.jit(roi.crop_and_resize, static_argnames='size')
  out = crop(image, np.array([[0., 0., 9., 6.]]), size=(6, 9))
  np.testing.assert_array_equal(out[0], image)
  # uint8 images are warped in float32.
  u8 = np.arange(54, dtype=np.uint8).reshape(6, 9, 1)
  out = crop(u8, np.array([[0., 0., 9., 6.]]), size=(6, 9))
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(out[0], u8)
