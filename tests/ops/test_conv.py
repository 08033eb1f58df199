"""cnn.ops.conv: XLA's convolution with the weight gradient split over batch
chunks, chosen per shape by measurement."""
import json

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

from cnn.errors import ConfigError
from cnn.ops import conv
from tests.conftest import assert_same_training, resnet8_after_steps

NHWC = ('NHWC', 'HWIO', 'NHWC')


@pytest.fixture(autouse=True)
def _xlas_convolution():
  """These tests are about XLA's convolution, which oneDNN's replaces on
  CPU by default (tests/ops/test_onednn.py)."""
  with conv.implementation('xla'):
    yield


def _assert_close(a, b, rel=1e-5):
  """Equal to float32 rounding of a sum: |a - b| <= rel * max |b|."""
  err = float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
  assert err <= rel * float(np.max(np.abs(b))), (err, float(np.max(np.abs(b))))


def _convolutions(x, w, strides, padding) -> int:
  """Convolutions in the lowered gradient of the library's convolution."""
  def loss(a, b):
    return jnp.sum(conv.conv_general_dilated(
        a, b, strides, padding, dimension_numbers=NHWC) ** 2)
  text = jax.jit(jax.grad(loss, (0, 1))).lower(x, w).as_text()
  return text.count('stablehlo.convolution')


def _grads(fn, x, w, strides, padding):
  def loss(a, b):
    y = fn(a, b, strides, padding, dimension_numbers=NHWC)
    return jnp.sum(y * jnp.cos(y))  # a non-trivial output gradient
  return jax.jit(jax.grad(loss, (0, 1)))(x, w)


@pytest.mark.parametrize('kernel,stride,padding', [
    (3, 1, ((1, 1), (1, 1))), (3, 2, ((1, 1), (1, 1))), (1, 2, 'VALID'),
    (5, 1, 'SAME'), (3, 2, ((0, 1), (0, 1)))])
@pytest.mark.parametrize('chunks', [1, 2, 8])
def test_chunked_weight_gradient_equals_xla(kernel, stride, padding, chunks):
  rng = np.random.default_rng(kernel * 10 + stride)
  x = rng.standard_normal((8, 9, 10, 5)).astype(np.float32)
  w = rng.standard_normal((kernel, kernel, 5, 7)).astype(np.float32)
  y_ref = lax.conv_general_dilated(x, w, (stride, stride), padding,
                                   dimension_numbers=NHWC)
  dx_ref, dw_ref = _grads(lax.conv_general_dilated, x, w, (stride, stride),
                          padding)
  with conv.policy(chunks):
    y = conv.conv_general_dilated(x, w, (stride, stride), padding,
                                  dimension_numbers=NHWC)
    dx, dw = _grads(conv.conv_general_dilated, x, w, (stride, stride),
                    padding)
    convs = _convolutions(x, w, (stride, stride), padding)
  np.testing.assert_array_equal(y, y_ref)  # XLA's forward pass, unchanged
  np.testing.assert_array_equal(dx, dx_ref)  # and its input gradient
  _assert_close(dw, dw_ref)
  # The sum really is split: forward, input gradient, one per chunk.
  assert convs == 2 + chunks


def test_xla_policy_is_lax_itself():
  x = jnp.ones((2, 6, 6, 3))
  w = jnp.ones((3, 3, 3, 4))
  with conv.policy('xla'):
    text = str(jax.make_jaxpr(lambda a, b: conv.conv_general_dilated(
        a, b, (1, 1), 'SAME', dimension_numbers=NHWC))(x, w))
  assert 'custom_vjp' not in text and 'conv_general_dilated[' in text
  with conv.policy(2):
    text = str(jax.make_jaxpr(lambda a, b: conv.conv_general_dilated(
        a, b, (1, 1), 'SAME', dimension_numbers=NHWC))(x, w))
  assert 'custom_vjp' in text


def test_policy_errors_are_one_line():
  with pytest.raises(ConfigError, match="'auto'.*'xla'.*chunk count"):
    with conv.policy('fastest'):
      pass
  x = jnp.ones((8, 6, 6, 3))
  w = jnp.ones((3, 3, 3, 4))
  with conv.policy('3'), pytest.raises(ConfigError,
                                       match='does not divide the batch of 8'):
    jax.grad(lambda b: conv.conv_general_dilated(
        x, b, (1, 1), 'SAME', dimension_numbers=NHWC).sum())(w)
  with conv.policy('xla'):
    assert conv.current_policy() == 'xla'


def test_choose_takes_the_fewest_chunks_within_tolerance():
  assert conv.choose({1: 10.0, 2: 5.0, 4: 4.9, 8: 4.0}) == 8
  assert conv.choose({1: 10.0, 2: 4.1, 4: 4.0, 8: 3.95}) == 2
  assert conv.choose({1: 1.0, 2: 1.04}) == 1


def test_auto_measures_once_per_shape_and_machine(tmp_path, monkeypatch):
  plan = tmp_path / 'plan.json'
  monkeypatch.setenv(conv.ENV_PLAN, str(plan))
  monkeypatch.setattr(conv, 'MIN_TUNE_MACS', 0)
  monkeypatch.setattr(conv, 'CANDIDATES', (1, 2))
  monkeypatch.setattr(conv, 'TUNE_RUNS', 2)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, 8, 8, 3)).astype(np.float32)
  w = rng.standard_normal((3, 3, 3, 5)).astype(np.float32)
  with conv.policy('auto'):
    dx, dw = _grads(conv.conv_general_dilated, x, w, (1, 1), 'SAME')
  saved = json.loads(plan.read_text())
  [(machine, shapes)] = saved.items()
  assert machine == conv.machine_key() and 'jax ' + jax.__version__ in machine
  [(key, entry)] = shapes.items()
  assert '(4, 8, 8, 3) (3, 3, 3, 5)' in key
  assert set(entry['ms']) == {'1', '2'}  # the candidates that divide 4
  # The choice was made on the unrounded times; the plan keeps them rounded
  # to 0.01 ms, so allow that much when checking it against them.
  ms = {int(m): t for m, t in entry['ms'].items()}
  assert entry['chunks'] in ms
  assert ms[entry['chunks']] <= min(ms.values()) * (1 + conv.TOLERANCE) + 0.01
  _, dw_ref = _grads(lax.conv_general_dilated, x, w, (1, 1), 'SAME')
  _assert_close(dw, dw_ref)

  # The second trace of the same shape reads the plan: no measurement.
  def fail(*a, **k):
    raise AssertionError('measured again')
  monkeypatch.setattr(conv, 'measure_chunks', fail)
  entry['chunks'] = 4
  plan.write_text(json.dumps(saved))
  with conv.policy('auto'):
    convs = _convolutions(x, w, (1, 1), 'SAME')
  # Four chunks: four weight-gradient convolutions besides forward and dx.
  assert convs == 1 + 1 + 4
  # A plan from another machine is not used.
  saved = {'another CPU | flags 0 | jax 0 | cpu x1': shapes}
  plan.write_text(json.dumps(saved))
  monkeypatch.setattr(conv, 'measure_chunks',
                      lambda *a, **k: {1: 1.0, 2: 2.0, 4: 3.0})
  with conv.policy('auto'):
    convs = _convolutions(x, w, (1, 1), 'SAME')
  assert convs == 3
  assert conv.machine_key() in json.loads(plan.read_text())


def test_small_shapes_are_not_measured(tmp_path, monkeypatch):
  monkeypatch.setenv(conv.ENV_PLAN, str(tmp_path / 'plan.json'))
  x = jnp.ones((2, 6, 6, 3))
  w = jnp.ones((3, 3, 3, 4))
  with conv.policy('auto'):
    jax.grad(lambda b: conv.conv_general_dilated(
        x, b, (1, 1), 'SAME', dimension_numbers=NHWC).sum())(w)
  assert not (tmp_path / 'plan.json').exists()


def test_train_steps_with_chunks_keep_the_math():
  """A few train steps of a CIFAR ResNet: the library's chunked weight
  gradients give XLA's parameters and loss to float32 rounding."""
  results = []
  for pol in ('xla', 4):
    with conv.policy(pol):
      results.append(resnet8_after_steps())
  assert_same_training(*results)


def test_bad_policy_is_refused_before_the_run():
  from cnn import runs  # pylint: disable=g-import-not-at-top
  from cnn import tasks  # pylint: disable=g-import-not-at-top
  from tests.conftest import small_config  # pylint: disable=g-import-not-at-top
  c = small_config(conv_weight_grad='fastest')
  with pytest.raises(ConfigError, match='^conv_weight_grad=.fastest. is '
                     'not a weight-gradient policy'):
    runs.validate_config(c, tasks.get(c))


def test_eigen_engine_takes_convolutions_from_ynnpack_and_keeps_the_math():
  """xla_cpu_conv='eigen': the convolutions of the compiled step leave
  YNNPACK (XLA:CPU's default), the results stay XLA's to rounding, and the
  chunk plan is kept apart from the default engine's."""
  # YNNPACK takes 32 channels or more (the 16 of a CIFAR ResNet's first
  # stage are Eigen's already).
  x = jnp.ones((2, 8, 8, 32))
  w = jnp.ones((3, 3, 32, 32))

  def compiled(engine):
    with conv.engine(engine):
      options = conv.engine_compiler_options()
      return jax.jit(lambda a, b: lax.conv_general_dilated(
          a, b, (1, 1), 'SAME', dimension_numbers=NHWC)).lower(
              x, w).compile(options).as_text()
  assert 'ynn_fusion' in compiled('ynnpack')
  assert 'ynn_fusion' not in compiled('eigen')
  with conv.engine('eigen'):
    assert conv.machine_key().endswith(' | conv eigen')
  assert 'conv eigen' not in conv.machine_key()
  results = []
  for engine in ('ynnpack', 'eigen'):
    with conv.engine(engine), conv.policy('xla'):
      results.append(resnet8_after_steps())
  assert_same_training(*results)


def test_bad_engine_is_one_line():
  from cnn import runs  # pylint: disable=g-import-not-at-top
  from cnn import tasks  # pylint: disable=g-import-not-at-top
  from tests.conftest import small_config  # pylint: disable=g-import-not-at-top
  c = small_config(xla_cpu_conv='onednn')
  with pytest.raises(ConfigError, match="^xla_cpu_conv='onednn' is not "
                     "an XLA:CPU convolution engine: use 'auto', "
                     "'ynnpack' or 'eigen', e.g. --config.xla_cpu_conv=auto$"):
    runs.validate_config(c, tasks.get(c))


def test_auto_engine_is_eigen_only_without_avx512(monkeypatch):
  from configs import cifar10  # pylint: disable=g-import-not-at-top
  for flags, engine in (('fma avx avx2', 'eigen'),
                        ('avx2 avx512f avx512bw', 'ynnpack'),
                        (None, 'ynnpack')):  # no /proc/cpuinfo
    monkeypatch.setattr(conv, '_cpuinfo',
                        lambda f=flags: {} if f is None else {'flags': f})
    with conv.engine('auto'):
      assert conv.current_engine() == engine, flags
  # auto is the configs' default, and the engine outside any run's.
  assert cifar10.get_config('cifar_resnet20').xla_cpu_conv == 'auto'
  monkeypatch.setattr(conv, '_engine_override', [])
  monkeypatch.setattr(conv, '_cpuinfo', lambda: {'flags': 'avx2'})
  assert conv.current_engine() == 'eigen'
