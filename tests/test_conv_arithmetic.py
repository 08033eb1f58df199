"""Tests of conv/pool arithmetic, conv-as-matrix, the transposed conv, LRN."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn import conv_arithmetic
from cnn.conv_arithmetic import (conv2d, conv_matrix, conv_output_shape,
                                 conv_output_size, conv_params,
                                 conv_transpose2d, max_pool2d,
                                 pool_output_shape)
from cnn.models.common import local_response_norm

# float32 throughout: sums of a few dozen O(1) products agree to ~1e-6.
TOL = dict(rtol=1e-5, atol=1e-5)


def _rng(seed=0):
  return np.random.default_rng(seed)


# --------------------------------------------------------------------------
# Arithmetic.


def test_lecture_example_32x32x3_ten_5x5_filters():
  assert conv_output_shape((32, 32, 3), 5, 1, 2, k=10) == (32, 32, 10)
  assert conv_params(5, 3, 10) == 760  # 5*5*3*10 weights + 10 biases
  x = _rng().standard_normal((1, 32, 32, 3)).astype(np.float32)
  w = _rng(1).standard_normal((5, 5, 3, 10)).astype(np.float32)
  assert conv2d(x, w, stride=1, padding=2).shape == (1, 32, 32, 10)


def test_conv_params_variants():
  assert conv_params(5, 3, 10, bias=False) == 750
  assert conv_params((3, 5), 2, 4) == 3 * 5 * 2 * 4 + 4
  # AlexNet conv1: 11x11x3, 96 filters.
  assert conv_params(11, 3, 96) == 34944


@pytest.mark.parametrize('f,s,p', [(3, 1, 1), (5, 1, 2), (1, 1, 0)])
@pytest.mark.parametrize('n', [1, 5, 7, 32, 224])
def test_common_settings_keep_size(n, f, s, p):
  if n + 2 * p < f:
    pytest.skip('filter larger than padded input')
  assert conv_output_size(n, f, s, p) == n
  assert conv_output_shape((n, n, 3), f, s, p, k=8) == (n, n, 8)


@pytest.mark.parametrize('n,f,s,out', [
    (32, 2, 2, 16), (224, 2, 2, 112),
    (55, 3, 2, 27), (27, 3, 2, 13), (13, 3, 2, 6),  # AlexNet's pools
])
def test_pool_sizes(n, f, s, out):
  assert conv_output_size(n, f, s, 0) == out
  assert pool_output_shape((n, n, 96), f, s) == (out, out, 96)
  assert pool_output_shape((n, n), f, s) == (out, out)
  x = jnp.zeros((1, n, n, 2))
  assert max_pool2d(x, f, s).shape == (1, out, out, 2)


def test_pool_stride_defaults_to_window():
  assert pool_output_shape((32, 32, 16), 2) == (16, 16, 16)
  assert max_pool2d(jnp.zeros((8, 8)), 2).shape == (4, 4)


def test_alexnet_conv1_227_fits_and_224_does_not():
  assert conv_output_size(227, 11, 4, 0) == 55
  with pytest.raises(ValueError, match='N=224, F=11, S=4, P=0'):
    conv_output_size(224, 11, 4, 0)
  assert conv_output_size(224, 11, 4, 0, strict=False) == 54


def _listed_paddings(msg):
  m = re.search(r'paddings that fit at S=\d+: ([^;]*)', msg)
  return [int(q) for q in re.findall(r'P=(\d+) ->', m.group(1))] if m else []


def test_strict_form_raises_one_line_naming_n_f_s_p():
  with pytest.raises(ValueError) as info:
    conv_output_size(32, 3, 2, 0)
  msg = str(info.value)
  assert '\n' not in msg
  for part in ('N=32', 'F=3', 'S=2', 'P=0', '15.5'):
    assert part in msg
  # N + 2P - F is odd for every P here, so no padding can fit at S=2; the
  # message says so and points at the strides that do.
  assert 'no padding P in 0..3 fits' in msg
  assert 'S=1 -> 30' in msg
  assert conv_output_size(32, 3, 2, 0, strict=False) == 15


def test_strict_message_lists_exactly_the_paddings_that_fit():
  with pytest.raises(ValueError) as info:
    conv_output_size(10, 3, 3, 0)
  msg = str(info.value)
  for part in ('N=10', 'F=3', 'S=3', 'P=0'):
    assert part in msg
  assert _listed_paddings(msg) == [1]
  assert conv_output_size(10, 3, 3, 1) == 4

  with pytest.raises(ValueError) as info:
    conv_output_size(20, 4, 4, 1)
  listed = _listed_paddings(str(info.value))
  assert listed == [q for q in range(5) if (20 + 2 * q - 4) % 4 == 0]
  assert listed == [0, 2, 4]
  for q in listed:
    conv_output_size(20, 4, 4, q)  # each suggestion really fits


def test_filter_larger_than_padded_input_raises_in_both_forms():
  for strict in (True, False):
    with pytest.raises(ValueError, match='F=7 is larger.*N=5, F=7, S=1, P=0'):
      conv_output_size(5, 7, 1, 0, strict=strict)
  assert conv_output_size(5, 7, 1, 1) == 1


def test_conv_output_shape_names_the_failing_axis():
  with pytest.raises(ValueError, match=r'^width: .*N=30, F=3, S=4, P=1'):
    conv_output_shape((32, 30, 3), 3, (1, 4), 1, k=8)
  assert conv_output_shape((32, 30, 3), 3, (1, 4), 1, k=8,
                           strict=False) == (32, 8, 8)


@pytest.mark.parametrize('bad', [dict(n=0, f=1), dict(n=4, f=0),
                                 dict(n=4, f=1, s=0), dict(n=4, f=1, p=-1)])
def test_nonpositive_arguments_raise(bad):
  with pytest.raises(ValueError):
    conv_output_size(**bad)


def test_non_integer_arguments_raise():
  with pytest.raises(TypeError):
    conv_output_size(32.0, 3)
  with pytest.raises(TypeError):
    conv_output_size(32, 3, 1.5)


def test_asymmetric_padding_floor_form():
  # TF-style 'SAME' for a stride-2 3x3 conv on an even input pads (0, 1).
  assert conv_output_size(32, 3, 2, (0, 1), strict=False) == 16
  assert conv_output_size(32, 3, 2, (0, 1)) == 16
  assert conv_output_size(32, 3, 2, (1, 1), strict=False) == 16
  assert conv_output_size(7, 3, 2, (2, 0), strict=False) == 4


@pytest.mark.parametrize('hw,f,s,p', [
    ((32, 32), 3, 2, 1),             # ResNet down-sampling conv: floors 16.5
    ((13, 10), (3, 2), (2, 3), 0),
    ((9, 8), 4, 3, ((1, 2), (0, 3))),
    ((227, 227), 11, 4, 0),
])
def test_floor_form_matches_lax(hw, f, s, p):
  fh, fw = (f, f) if isinstance(f, int) else f
  x = jnp.zeros((1,) + hw + (2,))
  w = jnp.zeros((fh, fw, 2, 3))
  assert conv2d(x, w, s, p).shape[1:] == conv_output_shape(
      hw + (2,), f, s, p, k=3, strict=False)


# --------------------------------------------------------------------------
# Pooling.


def test_max_pool_lecture_example():
  x = np.array([[3, 1, 3, 5], [6, 0, 7, 9], [3, 2, 1, 4], [0, 2, 4, 3]])
  expected = np.array([[6, 9], [3, 4]])
  np.testing.assert_array_equal(max_pool2d(x, 2, 2), expected)
  # Same numbers as one NHWC image with two channels (the second negated):
  # pooling is per channel and keeps the depth.
  x4 = np.stack([x, -x], axis=-1)[None].astype(np.float32)
  out = max_pool2d(x4, 2, 2)
  assert out.shape == (1, 2, 2, 2)
  np.testing.assert_array_equal(out[0, :, :, 0], expected)
  np.testing.assert_array_equal(out[0, :, :, 1], [[0, -3], [0, -1]])


def test_max_pool_padding_never_wins():
  x = -np.ones((1, 3, 3, 1), np.float32)
  out = max_pool2d(x, 3, 2, padding=1)
  assert out.shape == (1, 2, 2, 1)
  np.testing.assert_array_equal(out, -1.0)


# --------------------------------------------------------------------------
# Convolution as a matrix, and its transpose.


def test_conv_matrix_lecture_3x3_on_4x4():
  w = np.arange(1, 10, dtype=np.float32).reshape(3, 3)  # w00=1 ... w22=9
  expected = np.array([
      [1, 2, 3, 0, 4, 5, 6, 0, 7, 8, 9, 0, 0, 0, 0, 0],
      [0, 1, 2, 3, 0, 4, 5, 6, 0, 7, 8, 9, 0, 0, 0, 0],
      [0, 0, 0, 0, 1, 2, 3, 0, 4, 5, 6, 0, 7, 8, 9, 0],
      [0, 0, 0, 0, 0, 1, 2, 3, 0, 4, 5, 6, 0, 7, 8, 9],
  ], dtype=np.float32)
  c = conv_matrix(w, 4)
  assert isinstance(c, np.ndarray)
  assert c.shape == (4, 16)
  np.testing.assert_array_equal(c, expected)


def test_conv_matrix_padding_drops_padded_columns():
  w = np.arange(1, 10, dtype=np.float32).reshape(3, 3)
  c = conv_matrix(w, 2, padding=1)  # 2x2 input, output 2x2
  assert c.shape == (4, 4)
  # Output (0, 0) is centred on input (0, 0): it sees w11, w12, w21, w22.
  np.testing.assert_array_equal(c[0], [5, 6, 8, 9])
  np.testing.assert_array_equal(c[3], [1, 2, 4, 5])


# (input H, W), stride, padding; the last two floor (S does not divide
# N + 2P - F), so the adjoint needs input_size to give back the right shape.
CASES = [
    ((4, 4), 1, 0),
    ((6, 7), 2, 1),
    ((5, 6), 1, 1),
    ((7, 6), (2, 1), ((0, 2), (1, 0))),
    ((6, 6), 2, 1),
    ((8, 9), 3, 0),
]


@pytest.mark.parametrize('hw,s,p', CASES)
def test_conv_matrix_times_vec_equals_conv2d(hw, s, p):
  x = _rng().standard_normal(hw).astype(np.float32)
  w = _rng(1).standard_normal((3, 3)).astype(np.float32)
  y = np.asarray(conv2d(x, w, s, p))
  c = conv_matrix(w, hw, s, p)
  assert c.shape == (y.size, x.size)
  np.testing.assert_allclose(c @ x.reshape(-1), y.reshape(-1), **TOL)


@pytest.mark.parametrize('hw,s,p', CASES)
def test_input_gradient_is_conv_matrix_transpose(hw, s, p):
  x = _rng().standard_normal(hw).astype(np.float32)
  w = _rng(1).standard_normal((3, 3)).astype(np.float32)
  y, vjp = jax.vjp(lambda x: conv2d(x, w, s, p), x)
  delta = _rng(2).standard_normal(y.shape).astype(np.float32)
  expected = conv_matrix(w, hw, s, p).T @ delta.reshape(-1)
  (grad,) = vjp(delta)
  np.testing.assert_allclose(np.asarray(grad).reshape(-1), expected, **TOL)
  back = conv_transpose2d(delta, w, s, p, input_size=hw)
  assert back.shape == hw
  np.testing.assert_allclose(np.asarray(back).reshape(-1), expected, **TOL)


def test_multichannel_conv_matrix_and_transpose():
  hw, s, p = (5, 6), 2, 1
  x = _rng().standard_normal((1,) + hw + (3,)).astype(np.float32)
  w = _rng(1).standard_normal((3, 2, 3, 4)).astype(np.float32)
  y, vjp = jax.vjp(lambda x: conv2d(x, w, s, p), x)
  c = conv_matrix(w, hw, s, p)
  assert c.shape == (y.size, x.size) == (3 * 4 * 4, 5 * 6 * 3)
  np.testing.assert_allclose(c @ x.reshape(-1), np.asarray(y).reshape(-1),
                             **TOL)
  delta = _rng(2).standard_normal(y.shape).astype(np.float32)
  expected = c.T @ delta.reshape(-1)
  (grad,) = vjp(delta)
  np.testing.assert_allclose(np.asarray(grad).reshape(-1), expected, **TOL)
  back = conv_transpose2d(delta, w, s, p, input_size=hw)
  assert back.shape == x.shape
  np.testing.assert_allclose(np.asarray(back).reshape(-1), expected, **TOL)


def test_conv_transpose_default_and_wrong_input_size():
  w = np.ones((3, 3), np.float32)
  y = np.ones((3, 3), np.float32)
  # Default: the smallest input a 3x3, S=2, P=1 conv maps to 3x3.
  assert conv_transpose2d(y, w, 2, 1).shape == (5, 5)
  assert conv_transpose2d(y, w, 2, 1, input_size=6).shape == (6, 6)
  with pytest.raises(ValueError, match='maps input 8 to 4'):
    conv_transpose2d(y, w, 2, 1, input_size=8)


def test_conv2d_rejects_mixed_ranks():
  with pytest.raises(ValueError, match='conv2d takes'):
    conv2d(np.zeros((4, 4)), np.zeros((3, 3, 1, 1)))


def test_conv2d_is_jittable():
  x = _rng().standard_normal((2, 8, 8, 3)).astype(np.float32)
  w = _rng(1).standard_normal((3, 3, 3, 5)).astype(np.float32)
  f = jax.jit(lambda x, w: conv2d(x, w, 2, 1))
  np.testing.assert_allclose(f(x, w), conv2d(x, w, 2, 1), **TOL)


# --------------------------------------------------------------------------
# Local response normalisation.


@pytest.mark.parametrize('size', [3, 5])
def test_lrn_matches_direct_loop(size):
  x = _rng().standard_normal((1, 2, 3, 7)).astype(np.float32)
  k, alpha, beta = 2.0, 0.1, 0.75  # a large alpha so the sum matters
  expected = np.empty_like(x)
  channels = x.shape[-1]
  for c in range(channels):
    lo, hi = max(0, c - size // 2), min(channels - 1, c + size // 2)
    total = np.zeros(x.shape[:-1], np.float32)
    for j in range(lo, hi + 1):
      total += x[..., j] ** 2
    expected[..., c] = x[..., c] / (k + alpha * total) ** beta
  got = local_response_norm(x, size=size, k=k, alpha=alpha, beta=beta)
  np.testing.assert_allclose(got, expected, **TOL)


def test_lrn_paper_defaults_are_near_identity_scaled():
  x = np.ones((1, 1, 1, 9), np.float32)
  got = np.asarray(local_response_norm(x))
  # Interior channels sum 5 ones: 1 / (2 + 5e-4) ** 0.75.
  np.testing.assert_allclose(got[0, 0, 0, 4], (2 + 5e-4) ** -0.75, **TOL)
  np.testing.assert_allclose(got[0, 0, 0, 0], (2 + 3e-4) ** -0.75, **TOL)


def test_public_api():
  for name in ('conv_output_size', 'conv_output_shape', 'pool_output_shape',
               'conv_params', 'conv2d', 'max_pool2d', 'conv_matrix',
               'conv_transpose2d'):
    assert callable(getattr(conv_arithmetic, name))
