r"""Dense (fully-convolutional) vs brute-force sliding-window classification.

  python -m experiments.overfeat_benchmark --model=overfeat_fast \
    --sizes=231,295,359

For each input size, the brute-force baseline crops every training-size
window `stride` pixels apart and classifies each with the original net; the
dense pass runs the FC->conv converted net once. Prints windows, both times
(median of --repeats after a warm-up compile), the speed-up and the largest
score difference. With --exact (default) an OverFeat net is built with its
padded convs unpadded (conv_padding=0) so that the two give the same scores;
--noexact uses the paper's padding, where the dense pass lets each window see
its neighbours and the scores differ away from the training size.
"""
import time

from absl import app
from absl import flags

from experiments import common

_MODEL = flags.DEFINE_string('model', 'overfeat_fast', 'Registry model with '
                             'an FC head.')
_SIZES = flags.DEFINE_list('sizes', ['231', '295', '359'], 'Input sides.')
_EXACT = flags.DEFINE_bool('exact', True, 'OverFeat nets without conv '
                           'padding, so dense == brute force exactly.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed runs per method.')
_BATCH = flags.DEFINE_integer('window_batch', 16, 'Windows per brute-force '
                              'call.')
_CLASSES = flags.DEFINE_integer('num_classes', 1000, 'Classes.')


def _time(fn, repeats):
  fn()  # compile
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return sorted(times)[len(times) // 2]


def benchmark():
  sizes = common.whole_numbers(_SIZES)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cnn.models import fully_conv  # pylint: disable=g-import-not-at-top
  from cnn import models  # pylint: disable=g-import-not-at-top
  from cnn.errors import ConfigError  # pylint: disable=g-import-not-at-top

  name = _MODEL.value
  kwargs = {'num_classes': _CLASSES.value}
  try:
    model = models.get_model(name, **kwargs)
    if _EXACT.value and hasattr(model, 'conv_padding'):
      model = models.get_model(name, conv_padding=0, **kwargs)
    shape = models.default_input_shape(name)
    fully_conv.trunk_of(model)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  t = shape[0]
  if min(sizes) < t:
    raise ConfigError(f'--sizes must be >= the training size {t}')
  variables = jax.jit(lambda r: model.init(
      r, jnp.zeros((1,) + shape), train=False))(jax.random.PRNGKey(0))
  net, conv_vars = fully_conv.convert(model, variables, shape)
  stride = fully_conv.output_stride(model, shape)
  exact = fully_conv.windows_are_exact(model, shape)
  dense_fn = jax.jit(lambda v, x: net.apply(v, x))
  window_fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
  print(f'model {name} (training input {t}x{t}, stride {stride}, '
        f'{"unpadded: windows exact" if exact else "padded convs"}), '
        f'device {jax.devices()[0].platform}')
  print('| input | windows | brute force s | dense s | speed-up | '
        'max abs diff |')
  print('|---|---|---|---|---|---|')
  for size in sizes:
    x = jax.random.normal(jax.random.PRNGKey(size), (1, size, size, 3))
    dense = dense_fn(conv_vars, x)
    brute = fully_conv.sliding_windows(model, variables, x, t, stride,
                                       batch=_BATCH.value, apply=window_fn)
    diff = float(jnp.max(jnp.abs(dense - brute)))
    n = dense.shape[1] * dense.shape[2]
    td = _time(lambda: dense_fn(conv_vars, x).block_until_ready(),
               _REPEATS.value)
    tb = _time(lambda: np.asarray(fully_conv.sliding_windows(
        model, variables, x, t, stride, batch=_BATCH.value,
        apply=window_fn)), _REPEATS.value)
    print(f'| {size} | {dense.shape[1]}x{dense.shape[2]} = {n} | {tb:.3f} | '
          f'{td:.3f} | {tb / td:.1f}x | {diff:.2e} |', flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  common.run(benchmark, cache_default='off')


if __name__ == '__main__':
  common.main(main)
