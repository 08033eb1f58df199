"""The library's convolution: oneDNN's on CPU where it is built, else XLA's
with the weight gradient chosen per shape by measurement.

* The implementation is a config field (`config.conv`, recorded in
  config.json; the training loop traces a run's steps within
  `implementation(config.conv)`): `auto` (the default) takes oneDNN's kernels
  (`cnn.ops.onednn`: forward, input and weight gradient as XLA FFI custom
  calls) on a one-device CPU run where the library is built, XLA's
  convolution everywhere else; `onednn` insists on it (one-line error where
  it cannot run); `xla` keeps XLA's. `describe()` is the line a run prints.
  What follows is about XLA's convolution.

XLA:CPU computes a convolution's weight gradient as one convolution whose
"kernel" is the whole output gradient, which on CPUs can be several times
slower than PyTorch's; the same sum split over the batch, XLA's own weight
gradient of each chunk of N/m images added up, can be several times faster
(the large contraction seems to fall out of the kernel's cache blocking;
measurements: results/speed/README.md, "The weight gradient over batch
chunks"). The best m differs per shape and per CPU, so it is measured, not
assumed:

* `conv_general_dilated` is a drop-in for `lax.conv_general_dilated` (the
  models pass it to `nn.Conv`). Its forward pass and input gradient are
  XLA's; its weight gradient is XLA's, summed over `m` batch chunks.
* `m` comes from the policy (`config.conv_weight_grad`, entered with
  `policy(...)`): `auto` (the default) on CPU looks the shape up in the plan
  file (`~/.cache/cnn/conv_plan.json`, or `$CNN_CONV_PLAN`), measuring the
  candidates once per shape and machine when it is not there, and on GPU and
  TPU (where cuDNN/XLA's kernels are not the problem) is `xla`: XLA's own
  weight gradient everywhere; an integer fixes m.
* XLA:CPU's convolution kernels are chosen too (`config.xla_cpu_conv`,
  entered with `engine(...)`): `eigen` compiles the train and eval steps with convolutions
  on XLA's Eigen kernels instead of YNNPACK (`ynnpack`, XLA's default);
  `auto`, the default, takes Eigen on CPUs without AVX-512, where it was
  measured faster (see ENGINES). `engine_compiler_options()` are the XLA
  options that select it; the chunk counts are measured under them.
* Shapes too small for the choice to matter (under `MIN_TUNE_MACS`
  multiply-adds in the weight gradient) keep m = 1 without measuring, and
  so does a step over more than one device (the measurement is for one).

The plan is keyed by the CPU (model name and flags), the jax version and the
backend, so a plan measured on one machine is never used on another. The
chunked sum adds in another order: parameters after a step differ from XLA's
by float32 rounding (checked to 1e-5 in the tests).

The chunk count changes a run's numbers, so a training run owns its own:
`run_plan(chunks, on_new)` (the loop holds it around the run, with the
counts recorded in the run folder) answers the shapes it knows from its
record and hands every new choice to `on_new`, which records it before the
step runs. The machine plan only seeds a run's first choice (saving a
measurement); a resumed run reuses its record whatever another process has
measured and written to the machine plan since.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import time

import jax
from jax import lax
import numpy as np

from cnn import hardware
from cnn.errors import ConfigError
from cnn.ops import onednn

ENV_PLAN = 'CNN_CONV_PLAN'
DEFAULT_PLAN = os.path.join('~', '.cache', 'cnn', 'conv_plan.json')
CANDIDATES = (1, 2, 4, 8, 16, 32, 64)
MIN_TUNE_MACS = 1 << 24
TUNE_RUNS = 5
TOLERANCE = 0.05

IMPLEMENTATIONS = ('auto', 'onednn', 'xla')

_policy_override: list = []
_impl_override: list = []
_engine_override: list = []

# XLA:CPU's convolution kernels. jaxlib 0.10 hands every convolution to
# YNNPACK (its default `xla_cpu_experimental_ynn_fusion_type` is individual
# dots and individual convolutions); 'eigen' keeps YNNPACK for dots only, so
# convolutions take XLA's Eigen kernels. Eigen's measured faster on an AVX2
# CPU without AVX-512 (train step, eval and compile) and slower in the train
# step on an AVX-512 Xeon (results/speed/README.md, "YNNPACK or Eigen
# convolutions" and "An AVX-512 Xeon"). So `auto` (the default) takes Eigen
# on CPUs without AVX-512 and leaves XLA's YNNPACK elsewhere.
ENGINES = {
    'ynnpack': None,
    'eigen': {'xla_cpu_experimental_ynn_fusion_type':
              'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'},
}


def _parse_implementation(value) -> str:
  text = str(value).strip().lower()
  if text not in IMPLEMENTATIONS:
    raise ConfigError(
        f"conv={value!r} is not a convolution implementation: use 'auto' "
        "(oneDNN on CPU where built, else XLA), 'onednn' or 'xla'")
  return text


@contextlib.contextmanager
def implementation(value):
  """Within the block, convolutions traced use this implementation ('auto',
  'onednn' or 'xla'); a ConfigError (one line) on entry where it cannot
  run."""
  _impl_override.append(_parse_implementation(value))
  try:
    current_implementation()
    yield
  finally:
    _impl_override.pop()


def requested_implementation() -> str:
  return _impl_override[-1] if _impl_override else 'auto'


def current_implementation() -> str:
  """'onednn' or 'xla': what convolutions traced now use.

  Raises:
    ConfigError: 'onednn' was asked for where it cannot run.
  """
  asked = requested_implementation()
  if asked == 'xla':
    return 'xla'
  ok, why = onednn.status()
  if ok and jax.device_count() > 1:
    ok, why = False, (f'XLA (oneDNN runs on one device; this step spans '
                      f'{jax.device_count()})')
  if asked == 'onednn' and not ok:
    raise ConfigError(f"conv='onednn' cannot run here: {why}; set "
                      "--config.conv=auto or xla")
  return 'onednn' if ok else 'xla'


def describe() -> str:
  """One line: the convolution in use and why (a run prints it once)."""
  if current_implementation() == 'onednn':
    return onednn.status()[1]
  asked = requested_implementation()
  if asked == 'xla':
    return f"XLA ({current_engine()} kernels; conv='xla')"
  return onednn.status()[1] if not onednn.status()[0] else (
      f'XLA ({current_engine()} kernels; oneDNN runs on one device)')


def _parse_policy(value) -> str | int:
  if isinstance(value, int) and not isinstance(value, bool):
    if value < 1:
      raise ConfigError(f'conv weight-gradient chunks must be >= 1, got '
                       f'{value}')
    return value
  text = str(value).strip().lower()
  if text in ('auto', 'xla'):
    return text
  if text.isdigit() and int(text) >= 1:
    return int(text)
  raise ConfigError(
      f"conv_weight_grad={value!r} is not a weight-gradient policy: use "
      "'auto' (measure per shape), 'xla' (XLA's own) or a chunk count >= 1, "
      'e.g. --config.conv_weight_grad=auto')


def current_policy() -> str | int:
  """'auto' (on CPU: measure per shape), 'xla' or a fixed chunk count:
  the policy entered last (`policy(...)`; a run enters
  `config.conv_weight_grad`), 'auto' outside any; 'auto' is 'xla' off CPU
  (see the module docstring)."""
  value = _policy_override[-1] if _policy_override else 'auto'
  if value == 'auto' and jax.default_backend() != 'cpu':
    return 'xla'
  return value


def _parse_engine(value) -> str:
  text = str(value).strip().lower()
  if text == 'auto':
    return 'ynnpack' if _cpu_has_avx512() else 'eigen'
  if text not in ENGINES:
    raise ConfigError(
        f'xla_cpu_conv={value!r} is not an XLA:CPU convolution engine: use '
        f"'auto', {' or '.join(repr(e) for e in ENGINES)}, e.g. "
        '--config.xla_cpu_conv=auto')
  return text


def current_engine() -> str:
  """'ynnpack' (XLA's default) or 'eigen': XLA:CPU's convolution kernels
  (the engine entered last, `engine(...)`; a run enters
  `config.xla_cpu_conv`; 'auto' outside any, resolved as above)."""
  if _engine_override:
    return _engine_override[-1]
  return _parse_engine('auto')


@contextlib.contextmanager
def engine(value):
  """Within the block, steps built and chunk counts measured use this
  convolution engine ('auto', 'ynnpack' or 'eigen')."""
  _engine_override.append(_parse_engine(value))
  try:
    yield
  finally:
    _engine_override.pop()


def engine_compiler_options() -> dict | None:
  """XLA options selecting the convolution engine (None: XLA's default;
  always None off CPU)."""
  options = ENGINES[current_engine()]
  if options is None or jax.default_backend() != 'cpu':
    return None
  return dict(options)


@contextlib.contextmanager
def policy(value):
  """Within the block, steps traced use this policy ('auto', 'xla', m)."""
  _policy_override.append(_parse_policy(value))
  try:
    yield
  finally:
    _policy_override.pop()


@contextlib.contextmanager
def settings(conv='auto', weight_grad='auto', xla_cpu_conv='auto'):
  """Within the block, convolutions are built and traced as a run's config
  says: `conv` (implementation), `conv_weight_grad` (policy) and
  `xla_cpu_conv` (engine); a ConfigError (one line) on entry for a value
  that is not one, or cannot run here."""
  with implementation(conv), policy(weight_grad), engine(xla_cpu_conv):
    yield


# --- The plan: chunk counts measured per shape and machine -------------------

# (chunks, on_new) of the runs whose steps are traced now (see run_plan).
_run_plans: list = []


@contextlib.contextmanager
def run_plan(chunks: dict, on_new=None):
  """Within the block, chunk counts come from one run's record.

  Args:
    chunks: shape key -> chunk count, the run's recorded choices (updated
      in place with the new ones).
    on_new: called with `chunks` after a shape was added (the run records
      it), or None.

  Yields:
    `chunks`.
  """
  _run_plans.append((chunks, on_new))
  try:
    yield chunks
  finally:
    _run_plans.pop()


def plan_path() -> str:
  return os.path.abspath(os.path.expanduser(
      os.environ.get(ENV_PLAN) or DEFAULT_PLAN))


def machine_key() -> str:
  """CPU model and flags, jax version, backend and convolution engine: what
  a plan is valid on."""
  key = _hardware_key()
  if engine_compiler_options() is not None:
    key += f' | conv {current_engine()}'
  return key


_cpuinfo = hardware.cpuinfo  # A name of this module's: tests replace it.


def _cpu_has_avx512() -> bool:
  """AVX-512 in the CPU's flags; True where the flags are unknown (keeps
  XLA's default there)."""
  flags = _cpuinfo().get('flags')
  return flags is None or 'avx512f' in flags.split()


@functools.lru_cache(maxsize=None)
def _hardware_key() -> str:
  fields = _cpuinfo()
  model = fields.get('model name') or platform.processor() or platform.machine()
  flags = fields.get('flags', '')
  digest = hashlib.sha1(flags.encode()).hexdigest()[:12]
  return (f'{model} | flags {digest} | jax {jax.__version__} | '
          f'{jax.default_backend()} x{jax.local_device_count()}')


def _load_plan() -> dict:
  try:
    with open(plan_path(), encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _save_choice(key: str, entry: dict) -> None:
  path = plan_path()
  plan = _load_plan()
  plan.setdefault(machine_key(), {})[key] = entry
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f'{path}.{os.getpid()}.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(plan, f, indent=1, sort_keys=True)
  os.replace(tmp, path)  # Atomic: a concurrent reader sees old or new.


def _shape_key(lhs, rhs, strides, padding, dn, dtype) -> str:
  return (f'{tuple(lhs)} {tuple(rhs)} s{tuple(strides)} p{tuple(padding)} '
          f'{dn.lhs_spec}{dn.rhs_spec}{dn.out_spec} {np.dtype(dtype).name}')


def weight_grad_macs(lhs_shape, rhs_shape, dn, out_shape) -> int:
  """Multiply-adds of the weight gradient: out elements x kernel window x
  input features."""
  window = int(np.prod([rhs_shape[d] for d in dn.rhs_spec[2:]]))
  return int(np.prod(out_shape)) * window * lhs_shape[dn.lhs_spec[1]]


def measure_chunks(lhs_shape, rhs_shape, strides, padding, dn, dtype,
                   candidates=None, runs: int | None = None
                   ) -> dict[int, float]:
  """Median seconds of the weight gradient with each chunk count that
  divides the batch (of `candidates`, default CANDIDATES), timed
  round-robin on random data (`runs`, default TUNE_RUNS, after a warm-up)."""
  n = lhs_shape[dn.lhs_spec[0]]
  ms = [m for m in (candidates or CANDIDATES) if n % m == 0]
  runs = runs or TUNE_RUNS
  rng = np.random.default_rng(0)
  x = jax.device_put(rng.standard_normal(lhs_shape).astype(dtype))
  w = jax.device_put(rng.standard_normal(rhs_shape).astype(dtype))
  fwd = functools.partial(_conv, strides=strides, padding=padding, dn=dn)
  out = jax.eval_shape(fwd, x, w)
  g = jax.device_put(rng.standard_normal(out.shape).astype(dtype))
  options = engine_compiler_options()  # The kernels the step will use.
  fns = {m: jax.jit(functools.partial(_chunked_weight_grad, m=m, fwd=fwd,
                                      dn=dn)).lower(x, w, g).compile(options)
         for m in ms}
  times = {m: [] for m in ms}
  for r in range(runs + 1):
    for m, f in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(f(x, w, g))
      if r:  # The first round warms up.
        times[m].append(time.perf_counter() - t)
  return {m: float(np.median(t)) for m, t in times.items()}


def choose(times: dict[int, float], within: float = TOLERANCE) -> int:
  """The fewest chunks whose time is within `within` of the fastest: each
  chunk is one more convolution to compile, and a difference inside the
  timing noise is not worth it."""
  best = min(times.values())
  return min(m for m, t in times.items() if t <= best * (1 + within))


def may_chunk() -> bool:
  """Whether the policy may split weight gradients into chunks here: not
  under 'xla', and not in a step over more than one device (the chunk
  counts are measured on one; a chunk of the global batch would span
  devices, so such a step keeps XLA's)."""
  return (current_policy() != 'xla' and jax.device_count() == 1
          and current_implementation() == 'xla')


def chunks_for(lhs_shape, rhs_shape, strides, padding, dn, dtype,
               out_shape) -> int:
  """The chunk count the current policy gives this convolution."""
  pol = current_policy()
  n = lhs_shape[dn.lhs_spec[0]]
  if pol == 'xla':
    return 1
  if isinstance(pol, int):
    if n % pol:
      raise ConfigError(f'conv_weight_grad={pol} does not divide the batch '
                        f'of {n}: use a divisor of the batch, or auto')
    return pol
  if weight_grad_macs(lhs_shape, rhs_shape, dn, out_shape) < MIN_TUNE_MACS:
    return 1
  if not may_chunk():
    return 1
  key = _shape_key(lhs_shape, rhs_shape, strides, padding, dn, dtype)
  recorded, on_new = _run_plans[-1] if _run_plans else (None, None)
  if recorded is not None and key in recorded:
    return int(recorded[key])  # The run's own choice, whatever the machine's.
  entry = _load_plan().get(machine_key(), {}).get(key)
  if entry is None:
    # Measured outside the trace that asked (concrete arrays, real runs).
    with jax.ensure_compile_time_eval():
      times = measure_chunks(lhs_shape, rhs_shape, strides, padding, dn,
                             dtype)
    best = choose(times)
    entry = {'chunks': best, 'ms': {str(m): round(t * 1e3, 2)
                                    for m, t in times.items()}}
    _save_choice(key, entry)
    from absl import logging  # pylint: disable=g-import-not-at-top
    logging.info('conv weight gradient %s: %d batch chunks (ms by chunks: '
                 '%s; plan %s)', key, best, entry['ms'], plan_path())
  if recorded is not None:
    recorded[key] = int(entry['chunks'])
    if on_new is not None:
      on_new(recorded)
  return int(entry['chunks'])


# --- The convolution ---------------------------------------------------------

def _conv(x, w, *, strides, padding, dn):
  return lax.conv_general_dilated(x, w, strides, padding,
                                  dimension_numbers=dn)


def _chunked_weight_grad(x, w, g, *, m: int, fwd, dn):
  """XLA's weight gradient of `fwd` summed over m chunks of the batch."""
  def dw(xi, gi):
    return jax.vjp(lambda v: fwd(xi, v), w)[1](gi)[0]
  if m == 1:
    return dw(x, g)
  xs = jax.numpy.split(x, m, axis=dn.lhs_spec[0])
  gs = jax.numpy.split(g, m, axis=dn.out_spec[0])
  total = dw(xs[0], gs[0])
  for xi, gi in zip(xs[1:], gs[1:]):
    total = total + dw(xi, gi)
  return total


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_measured(x, w, strides, padding, dn):
  return _conv(x, w, strides=strides, padding=padding, dn=dn)


def _conv_measured_fwd(x, w, strides, padding, dn):
  return _conv(x, w, strides=strides, padding=padding, dn=dn), (x, w)


def _conv_measured_bwd(strides, padding, dn, res, g):
  x, w = res
  fwd = functools.partial(_conv, strides=strides, padding=padding, dn=dn)
  dx = jax.vjp(lambda u: fwd(u, w), x)[1](g)[0]
  m = chunks_for(x.shape, w.shape, strides, padding, dn, x.dtype, g.shape)
  return dx, _chunked_weight_grad(x, w, g, m=m, fwd=fwd, dn=dn)


_conv_measured.defvjp(_conv_measured_fwd, _conv_measured_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None,
                         feature_group_count: int = 1,
                         batch_group_count: int = 1, precision=None,
                         preferred_element_type=None):
  """`lax.conv_general_dilated` with the measured weight gradient.

  Plain convolutions (no dilation, groups, precision or element-type
  override) take `_conv_measured`; anything else, and every convolution
  under the 'xla' policy, is XLA's own `lax.conv_general_dilated`.
  """
  def ones(d):
    return d is None or all(int(v) == 1 for v in np.atleast_1d(d))
  simple = (ones(lhs_dilation) and ones(rhs_dilation)
            and feature_group_count == 1 and batch_group_count == 1
            and precision is None and preferred_element_type is None)
  if simple and current_implementation() == 'onednn':
    strides, pads, dn = _normalize(lhs.shape, rhs.shape, window_strides,
                                   padding, dimension_numbers)
    if onednn.supports(lhs, rhs, dn, strides, pads):
      return onednn.conv(lhs, rhs, strides, pads)
  plain = simple and current_policy() != 'xla'
  if not plain:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
        dimension_numbers, feature_group_count, batch_group_count, precision,
        preferred_element_type)
  return _conv_measured(lhs, rhs, *_normalize(
      lhs.shape, rhs.shape, window_strides, padding, dimension_numbers))


def _normalize(lhs_shape, rhs_shape, window_strides, padding,
               dimension_numbers):
  """(strides, explicit padding pairs, ConvDimensionNumbers): the hashable
  static arguments of `_conv_measured`."""
  dn = lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(
        [lhs_shape[d] for d in dn.lhs_spec[2:]],
        [rhs_shape[d] for d in dn.rhs_spec[2:]], window_strides, padding)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  return tuple(int(s) for s in window_strides), padding, dn


def weight_grad_chunks(lhs_shape, rhs_shape, window_strides, padding,
                       dimension_numbers=None, dtype=np.float32) -> int:
  """The chunk count `conv_general_dilated` uses for this convolution's
  weight gradient under the current policy (measuring it if the plan has
  none yet)."""
  strides, padding, dn = _normalize(lhs_shape, rhs_shape, window_strides,
                                    padding, dimension_numbers)
  out = jax.eval_shape(
      functools.partial(_conv, strides=strides, padding=padding, dn=dn),
      jax.ShapeDtypeStruct(lhs_shape, dtype),
      jax.ShapeDtypeStruct(rhs_shape, dtype))
  return chunks_for(lhs_shape, rhs_shape, strides, padding, dn, dtype,
                    out.shape)
