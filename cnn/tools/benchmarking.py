"""Timing helpers for `experiments/benchmark.py`: synthetic batches, step
timers, memory probes and the input pipeline's own rate.

Nothing here prints: the benchmark command turns the numbers into a table.
Comparisons run their variants interleaved step by step (`time_interleaved`),
so that load from other processes on a shared machine hits every variant
alike and the ratio stays meaningful even when the absolute rates do not.
"""
from __future__ import annotations

import dataclasses
import functools
import resource
import sys
import time
from typing import Callable

import jax
from jax import lax
import numpy as np

from cnn import models
from cnn.data import input_pipeline
from cnn.ops import compiler
from cnn.ops import conv as conv_ops
from cnn.ops import onednn
from cnn.tasks.classification import task as classification
from cnn.tools import summary
from cnn.training import batches as batches_lib
from cnn.training import optim
from cnn.training import state as state_lib
from cnn.training import step as step_lib

DTYPES = classification.DTYPES


def synthetic_batch(batch_size: int, image_shape, num_classes: int,
                    seed: int = 0, mask: bool = False) -> dict:
  """Random uint8 images and int32 labels, shaped like a real host batch."""
  rng = np.random.default_rng(seed)
  batch = {
      'image': rng.integers(0, 256, (batch_size, *image_shape), np.uint8),
      'label': rng.integers(0, num_classes, batch_size).astype(np.int32)}
  if mask:
    batch['mask'] = np.ones(batch_size, np.float32)
  return batch


def synthetic_arrays(n: int, image_shape, num_classes: int,
                     seed: int = 0) -> input_pipeline.ArrayData:
  """An in-memory split of random images (when the real data is absent)."""
  b = synthetic_batch(n, image_shape, num_classes, seed)
  return input_pipeline.ArrayData(b['image'], b['label'])


def peak_host_rss_bytes() -> int:
  """Peak resident set size of this process so far."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak if sys.platform == 'darwin' else peak * 1024  # Linux: KiB.


def device_peak_bytes(device=None) -> int | None:
  """Peak bytes in use on the device, or None where XLA does not track it
  (the CPU backend)."""
  device = device or jax.local_devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  if not stats:
    return None
  return stats.get('peak_bytes_in_use', stats.get('bytes_in_use'))


def time_interleaved(runners: dict, steps: int, warmup: int = 2) -> dict:
  """Times callables round-robin: one step of each per round.

  Args:
    runners: name -> callable running one blocking step.
    steps: timed rounds (the median of these is reported).
    warmup: untimed rounds first (caches, allocator, thread pools).

  Returns:
    name -> list of `steps` wall times in seconds.
  """
  for _ in range(warmup):
    for run in runners.values():
      run()
  times = {name: [] for name in runners}
  for _ in range(steps):
    for name, run in runners.items():
      t = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - t)
  return times


@dataclasses.dataclass
class JaxSetup:
  """A model, its jitted steps and a train state, ready to time.

  Attributes:
    name: model name.
    model: the Linen module.
    train_step, eval_step: the library's real jitted steps
      (`cnn.training.step`, `cnn.tasks.classification`).
    state: the train state (donated by every train step; see `train_runner`).
    image_shape: (H, W, C).
    num_classes: head outputs.
    compile_s: seconds to lower and compile the train step.
    eval_compile_s: seconds to lower and compile the eval step.
  """
  name: str
  model: object
  train_step: Callable
  eval_step: Callable
  state: state_lib.TrainState
  image_shape: tuple
  num_classes: int
  train_fn: Callable = None
  eval_fn: Callable = None
  compile_s: float = 0.0
  eval_compile_s: float = 0.0

  def flops_per_image(self) -> int:
    """Forward FLOPs per image (`cnn.tools.summary` conventions)."""
    return summary.flops_per_example(self.model, self.image_shape)

  def train_runner(self, batch) -> Callable:
    """One blocking train step per call; the state is carried along."""
    batch = jax.device_put(batch)

    def run():
      self.state, metrics = self.train_fn(self.state, batch)
      jax.block_until_ready(metrics)
    return run

  def eval_runner(self, batch) -> Callable:
    batch = jax.device_put(batch)

    def run():
      jax.block_until_ready(self.eval_fn(self.state.variables, batch))
    return run


def jax_setup(config, batch_size: int, eval_batch_size: int,
              dtype: str | None = None, compiler_options='default',
              mean=None) -> JaxSetup:
  """Builds model, optimizer and the library's real steps from a config,
  and compiles both steps for the given batch sizes (timed).

  Args:
    config: a config from `configs/` (model, optimizer, augmentation).
    batch_size: training batch.
    eval_batch_size: evaluation batch.
    dtype: 'float32' or 'bfloat16'; None takes `config.dtype`.
    compiler_options: passed to `cnn.training.step.make_train_step`;
      'default' takes a run's (`cnn.ops.compiler.train_step_options`).
    mean: training mean; zeros of the image shape when None.
  """
  name = config.model
  num_classes = config.num_classes or models.default_num_classes(name)
  image_shape = tuple(models.default_input_shape(name))
  dtype = DTYPES[dtype or config.dtype]
  model = models.get_model(name, num_classes=num_classes, dtype=dtype,
                           **dict(config.model_kwargs))
  tx = optim.make_optimizer(config)
  schedule = optim.make_schedule(config)
  if mean is None:
    mean = np.zeros(image_shape, np.float32)
  loss_fn = classification.make_loss_fn(
      model, mean, augment=config.augment, pad=config.pad, dtype=dtype)
  if compiler_options == 'default':
    compiler_options = compiler.train_step_options()
  train_step = step_lib.make_train_step(loss_fn, tx, schedule,
                                        compiler_options=compiler_options)
  eval_step = classification.make_eval_step(model, mean, dtype)
  state = state_lib.create(
      lambda r: classification.init_variables(model, image_shape, r), tx, 0)
  setup = JaxSetup(name, model, train_step, eval_step, state, image_shape,
                   num_classes)
  train_batch = jax.device_put(
      synthetic_batch(batch_size, image_shape, num_classes))
  eval_batch = jax.device_put(
      synthetic_batch(eval_batch_size, image_shape, num_classes, mask=True))
  t = time.perf_counter()
  setup.train_fn = train_step.lower(state, train_batch).compile()
  setup.compile_s = time.perf_counter() - t
  t = time.perf_counter()
  setup.eval_fn = eval_step.lower(state.variables, eval_batch).compile()
  setup.eval_compile_s = time.perf_counter() - t
  return setup


def pipeline_rate(data: input_pipeline.ArrayData, batch_size: int,
                  num_batches: int, put: Callable = jax.device_put) -> float:
  """Images/s of the training input pipeline alone: `TrainBatches.batch`
  (index a seeded permutation, gather uint8) plus the host->device copy."""
  batches = batches_lib.TrainBatches(data, batch_size, seed=0)
  jax.block_until_ready(put(batches.batch(0)))  # First-touch costs.
  t = time.perf_counter()
  for step in range(1, num_batches + 1):
    jax.block_until_ready(put(batches.batch(step)))
  return num_batches * batch_size / (time.perf_counter() - t)


# --- Per-layer view ----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ConvShape:
  """One convolution of a model: input (N, H, W, C_in) -> C_out."""
  batch: int
  height: int
  width: int
  cin: int
  cout: int
  kernel: int
  stride: int
  count: int = 1  # how many layers of the model have this shape

  def describe(self) -> str:
    return (f'{self.height}x{self.width}x{self.cin}->{self.cout} '
            f'{self.kernel}x{self.kernel}/{self.stride}')


def conv_shapes(model, input_shape, batch_size: int) -> list[ConvShape]:
  """The distinct convolutions of `model` on (batch, *input_shape), in the
  order they run, with how often each occurs (no weights are allocated)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  seen: dict = {}

  def record(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, nn.Conv) and context.method_name == '__call__':
      x = args[0]
      k = module.kernel_size[0]
      s = (module.strides or (1, 1))
      s = s[0] if isinstance(s, (tuple, list)) else s
      key = ConvShape(x.shape[0], x.shape[1], x.shape[2], x.shape[3],
                      module.features, k, s)
      seen[key] = seen.get(key, 0) + 1
    return next_fun(*args, **kwargs)

  x = jax.ShapeDtypeStruct((batch_size,) + tuple(input_shape), np.float32)

  def run(x):
    with nn.intercept_methods(record):
      return model.init(jax.random.PRNGKey(0), x, train=False)
  jax.eval_shape(run, x)
  return [dataclasses.replace(k, count=n) for k, n in seen.items()]


_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _conv(x, k, stride: int, conv=jax.lax.conv_general_dilated):
  pad = k.shape[0] // 2
  return conv(x, k, (stride, stride), ((pad, pad), (pad, pad)),
              dimension_numbers=_NHWC)


def shifted_weight_grad(x, g, kernel: int):
  """The weight gradient of a stride-1 'same' k x k convolution as k*k
  GEMMs over the shifted input: dK[i, j] = sum_nhw x[n, h+i, w+j]^T g[n, h, w]
  (the issue's proposal, 2.6x faster than XLA by the issue's own figure;
  measured here it was slower than XLA's on three CPUs: results/speed/
  README.md, "Per layer, and what did not help")."""
  pad = kernel // 2
  h, w = x.shape[1:3]
  xp = jax.numpy.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  rows = [[jax.numpy.einsum('nhwc,nhwd->cd', xp[:, i:i + h, j:j + w], g)
           for j in range(kernel)] for i in range(kernel)]
  return jax.numpy.stack([jax.numpy.stack(r) for r in rows])


def conv_layer_times(shape: ConvShape, steps: int = 10, seed: int = 0
                     ) -> dict[str, float]:
  """Median seconds of one convolution's forward pass, input gradient and
  weight gradient as XLA computes them from jit arguments, of the
  shifted-GEMM weight gradient (stride 1 only) and of the library's
  chunked weight gradient (`cnn.ops.conv`; its chunk count is returned as
  'chunks'), timed round-robin, all compiled for the library's convolution
  engine (`cnn.ops.conv.current_engine`)."""
  rng = np.random.default_rng(seed)
  x = jax.device_put(rng.standard_normal(
      (shape.batch, shape.height, shape.width, shape.cin)).astype(np.float32))
  k = jax.device_put((rng.standard_normal(
      (shape.kernel, shape.kernel, shape.cin, shape.cout)) * 0.1
                      ).astype(np.float32))
  y = jax.eval_shape(lambda a, b: _conv(a, b, shape.stride), x, k)
  g = jax.device_put(rng.standard_normal(y.shape).astype(np.float32))
  s = shape.stride
  # Compiled for the convolution engine the library's steps use.
  jit = functools.partial(jax.jit,
                          compiler_options=conv_ops.engine_compiler_options())
  fns = {
      'forward': (jit(lambda a, b: _conv(a, b, s)), (x, k)),
      'input_grad': (jit(lambda a, b, c: jax.vjp(
          lambda u: _conv(u, b, s), a)[1](c)[0]), (x, k, g)),
      'weight_grad': (jit(lambda a, b, c: jax.vjp(
          lambda v: _conv(a, v, s), b)[1](c)[0]), (x, k, g)),
  }
  if s == 1:
    fns['weight_grad_shifted'] = (jit(
        lambda a, c: shifted_weight_grad(a, c, shape.kernel)), (x, g))
  # The library's own XLA convolution under the 'auto' policy
  # (`cnn.ops.conv`, chunk count measured once per shape and machine),
  # traced here.
  with conv_ops.policy('auto'), conv_ops.implementation('xla'):
    fns['weight_grad_chunked'] = (jit(lambda a, b, c: jax.vjp(
        lambda v: _conv(a, v, s, conv_ops.conv_general_dilated), b)[1](c)[0]
                                          ).lower(x, k, g).compile(),
                                  (x, k, g))
    pad = shape.kernel // 2
    m = conv_ops.weight_grad_chunks(x.shape, k.shape, (s, s),
                                    ((pad, pad), (pad, pad)), _NHWC)
  if onednn.status()[0]:
    # oneDNN's three kernels through the FFI, each in a jitted function.
    pads = lax.padtype_to_pads(x.shape[1:3], k.shape[:2], (s, s), 'SAME')
    pads = tuple((int(a), int(b)) for a, b in pads)
    fns['onednn_forward'] = (jax.jit(lambda a, b: onednn.conv(
        a, b, (s, s), pads)), (x, k))
    fns['onednn_input_grad'] = (jax.jit(lambda a, b, c: jax.vjp(
        lambda u: onednn.conv(u, b, (s, s), pads), a)[1](c)[0]), (x, k, g))
    fns['onednn_weight_grad'] = (jax.jit(lambda a, b, c: jax.vjp(
        lambda v: onednn.conv(a, v, (s, s), pads), b)[1](c)[0]), (x, k, g))
  runners = {name: (lambda f=f, a=a: jax.block_until_ready(f(*a)))
             for name, (f, a) in fns.items()}
  times = time_interleaved(runners, steps)
  out = {name: float(np.median(t)) for name, t in times.items()}
  out['chunks'] = m
  return out
