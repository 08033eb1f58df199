"""OverFeat models, the FC->conv conversion, and box ops."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn.models import fully_conv
from cnn import models
from cnn.ops import boxes
from cnn.tools.summary import count_params


def abstract_variables(model, size):
  x = jnp.zeros((1, size, size, 3))
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x,
                                           train=False))


def abstract_convert(model, variables, shape):
  """convert() under eval_shape: shapes only, nothing allocated."""
  box = {}

  def fn(v):
    box['net'], out = fully_conv.convert(model, v, shape)
    return out
  out = jax.eval_shape(fn, variables)
  return box['net'], out


def test_overfeat_fast_parameters_and_map_sizes():
  model = models.get_model('overfeat_fast')
  assert models.default_input_shape('overfeat_fast') == (231, 231, 3)
  variables = abstract_variables(model, 231)
  assert count_params(variables['params']) == 145_920_872  # Sermanet et al.
  assert set(variables['params']) == {'features', 'fc6', 'fc7', 'head'}
  assert variables['params']['fc6']['kernel'].shape == (6 * 6 * 1024, 3072)
  net, conv_vars = abstract_convert(model, variables, (231, 231, 3))
  assert conv_vars['params']['fc6']['kernel'].shape == (6, 6, 1024, 3072)
  assert fully_conv.output_stride(model, (231, 231, 3)) == 32
  for size, side in ((231, 1), (263, 2), (295, 3)):
    shape = fully_conv.dense_output_shape(net, conv_vars, (size, size, 3))
    assert shape == (side, side, 1000)


def test_overfeat_accurate_parameters():
  model = models.get_model('overfeat_accurate')
  assert models.default_input_shape('overfeat_accurate') == (221, 221, 3)
  variables = abstract_variables(model, 221)
  # Table 3, layer by layer: (F*F*D_in + 1) * K.
  layers = [(7, 3, 96), (7, 96, 256), (3, 256, 512), (3, 512, 512),
            (3, 512, 1024), (3, 1024, 1024), (5, 1024, 4096), (1, 4096, 4096),
            (1, 4096, 1000)]
  expected = sum((f * f * d + 1) * k for f, d, k in layers)
  assert expected == 144_656_488  # the paper: "~144M"
  assert count_params(variables['params']) == expected
  assert set(variables['params']) == {'features', 'fc7', 'fc8', 'head'}
  assert fully_conv.output_stride(model, (221, 221, 3)) == 36
  net, conv_vars = abstract_convert(model, variables, (221, 221, 3))
  assert fully_conv.dense_output_shape(net, conv_vars, (257, 257, 3)) == (
      2, 2, 1000)


# Everything numeric runs under jit: one compilation per net instead of one
# per eager op keeps the file's CPU time small.
def init(model, size, seed=0):
  x = jnp.zeros((1, size, size, 3))
  return jax.jit(lambda r: model.init(r, x, train=False))(
      jax.random.PRNGKey(seed))


def classify(model):
  return jax.jit(lambda v, x: model.apply(v, x, train=False))


def images(shape, seed=1):
  return jax.random.normal(jax.random.PRNGKey(seed), shape)


# Reduced-width OverFeat: the paper's geometry (231 input, stride 32), few
# filters. conv_padding=0 drops the pads of conv3-5, making every window exact.
SMALL_OVERFEAT = dict(widths=(8, 8, 8, 8, 8), fc_widths=(16, 16),
                      num_classes=5)


@pytest.mark.parametrize('name,size,overrides', [
    ('cifar_fcnet', 32, {}),
    ('overfeat_fast', 231, SMALL_OVERFEAT),
    ('alexnet_tiny', 67, {}),
    ('vgg_tiny', 32, {}),
])
def test_converted_net_matches_classifier_at_training_size(name, size,
                                                            overrides):
  model = models.get_model(name, **overrides)
  variables = init(model, size)
  net, conv_vars = fully_conv.convert(model, variables, (size, size, 3))
  x = images((2, size, size, 3))
  want = classify(model)(variables, x)
  got = jax.jit(net.apply)(conv_vars, x)
  assert got.shape == (2, 1, 1, want.shape[-1])
  np.testing.assert_allclose(got[:, 0, 0], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('name,size,overrides,extra', [
    ('cifar_fcnet', 32, {}, (12, 8)),  # stride 4: 4x3 windows
    ('overfeat_fast', 231, dict(SMALL_OVERFEAT, conv_padding=0), (32, 64)),
])
def test_dense_map_equals_classifier_on_every_window(name, size, overrides,
                                                     extra):
  model = models.get_model(name, **overrides)
  shape = (size, size, 3)
  assert fully_conv.windows_are_exact(model, shape)
  stride = fully_conv.output_stride(model, shape)
  variables = init(model, size)
  net, conv_vars = fully_conv.convert(model, variables, shape)
  x = images((1, size + extra[0], size + extra[1], 3))
  dense = jax.jit(net.apply)(conv_vars, x)
  ny, nx = extra[0] // stride + 1, extra[1] // stride + 1
  assert dense.shape[1:3] == (ny, nx)
  apply = classify(model)
  for i in range(ny):
    for j in range(nx):
      window = x[:, i * stride:i * stride + size, j * stride:j * stride + size]
      want = apply(variables, window)
      np.testing.assert_allclose(dense[:, i, j], want, rtol=1e-4, atol=1e-4)
  brute = fully_conv.sliding_windows(model, variables, x, size, stride,
                                     apply=apply)
  np.testing.assert_allclose(dense, brute, rtol=1e-4, atol=1e-4)


def test_padded_trunks_are_not_window_exact():
  # conv3-5 of the paper's net are padded: the dense map is then the paper's
  # approximation away from the training size, and the code says so.
  assert not fully_conv.windows_are_exact(models.get_model('overfeat_fast'),
                                          (231, 231, 3))
  assert not fully_conv.windows_are_exact(models.get_model('vgg_tiny'),
                                          (32, 32, 3))


def test_conversion_errors():
  with pytest.raises(ValueError, match='no fully connected head'):
    fully_conv.trunk_of(models.get_model('cifar_resnet8'))
  model = models.get_model('cifar_fcnet')
  variables = init(model, 32)
  with pytest.raises(ValueError, match='pass the input shape'):
    fully_conv.convert(model, variables, (40, 40, 3))


def test_iou_and_coding():
  a = np.array([0., 0., 10., 10.])
  assert boxes.iou(a, a) == pytest.approx(1.0)
  assert boxes.iou(a, np.array([5., 0., 10., 10.])) == pytest.approx(50 / 150)
  assert boxes.iou(a, np.array([20., 20., 5., 5.])) == 0.0
  m = boxes.pairwise_iou(np.stack([a, a + [5, 0, 0, 0]]), a[None])
  np.testing.assert_allclose(m[:, 0], [1.0, 50 / 150])
  # jax arrays go through the same code inside jit.
  assert float(jax.jit(boxes.iou)(jnp.asarray(a), jnp.asarray(a))) == 1.0
  off = np.array([8., 4.])
  code = boxes.encode(np.array([10., 6., 32., 16.]), off, 32)
  np.testing.assert_allclose(code, [2 / 32, 2 / 32, 1.0, 0.5])
  np.testing.assert_allclose(boxes.decode(code, off, 32), [10, 6, 32, 16])
  np.testing.assert_allclose(boxes.from_corners(boxes.to_corners(a)), a)


def test_nms_and_greedy_merge():
  b = np.array([[0, 0, 10, 10], [1, 0, 10, 10], [30, 30, 10, 10]], float)
  s = np.array([0.9, 0.8, 0.7])
  np.testing.assert_array_equal(boxes.nms(b, s, 0.5), [0, 2])
  np.testing.assert_array_equal(boxes.nms(b, s, 0.5, max_out=1), [0])
  merged, scores = boxes.greedy_merge(b, s, threshold=0.5)
  # The two overlapping boxes become one, weighted by confidence; it now
  # outranks the lone box.
  assert len(merged) == 2
  np.testing.assert_allclose(scores, [1.7, 0.7])
  np.testing.assert_allclose(merged[0], [0.8 / 1.7, 0, 10, 10])
  np.testing.assert_allclose(merged[1], [30, 30, 10, 10])
  # A tighter threshold merges nothing.
  assert len(boxes.greedy_merge(b, s, threshold=0.01)[0]) == 3
