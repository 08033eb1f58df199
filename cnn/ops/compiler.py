"""XLA's compiler options of a run's train step on CPU: the convolution
engine (`cnn.ops.conv.engine_compiler_options`) and XLA's fusion pass
(`config.xla_cpu_fusion`, entered with `fusion(...)`).

The step itself takes options as an argument (`cnn.training.step`); a run
computes them here, within its numerics (`cnn.runs.numerics`).
"""
from __future__ import annotations

import contextlib

import jax

from cnn.errors import ConfigError
from cnn.ops import conv

# XLA:CPU's instruction fusion duplicates the elementwise residual stream
# (BatchNorm -> add -> ReLU, block after block) into the transposes that feed
# every weight-gradient convolution, so each transpose recomputes several
# layers and the cost grows with depth. Whether the pass pays depends on the
# convolution (measurements: results/speed/README.md): it is kept with
# oneDNN's convolutions (FFI custom calls, no transposes to fuse into) and
# with the chunked weight gradient on YNNPACK's, and dropped otherwise. That
# is `auto`, the default of `config.xla_cpu_fusion`; `on` keeps XLA's pass,
# `off` drops it; the arithmetic is the same either way.
CPU_COMPILER_OPTIONS = {'xla_disable_hlo_passes': 'fusion'}
FUSION_SETTINGS = ('auto', 'on', 'off')

_fusion_override: list = []


def _parse_fusion(value) -> str:
  text = str(value).strip().lower()
  if text not in FUSION_SETTINGS:
    raise ConfigError(
        f"xla_cpu_fusion={value!r} is not a fusion setting: use 'on' (XLA's "
        "fusion pass), 'off' (none) or 'auto' (the default: the pass where "
        'it measured faster), e.g. --config.xla_cpu_fusion=auto')
  return text


@contextlib.contextmanager
def fusion(value):
  """Within the block, train steps are built with this fusion setting
  ('auto', 'on' or 'off'; a run enters `config.xla_cpu_fusion`); a
  ConfigError (one line) on entry for another value."""
  _fusion_override.append(_parse_fusion(value))
  try:
    yield
  finally:
    _fusion_override.pop()


def current_fusion() -> bool:
  """Whether the CPU train step keeps XLA's fusion pass: the setting
  entered last (`fusion(...)`), 'auto' outside any: on with oneDNN's
  convolutions or with the chunked weight gradient on YNNPACK's, off
  otherwise."""
  value = _fusion_override[-1] if _fusion_override else 'auto'
  if value == 'auto':
    if conv.current_implementation() == 'onednn':
      return True
    return conv.current_engine() == 'ynnpack' and conv.may_chunk()
  return value == 'on'


def train_step_options() -> dict | None:
  """XLA options of the train step on this backend (None: XLA's defaults):
  on CPU the fusion setting above and the convolution engine
  (`cnn.ops.conv.engine_compiler_options`)."""
  if jax.default_backend() != 'cpu':
    return None
  options = dict(conv.engine_compiler_options() or {})
  if not current_fusion():
    options.update(CPU_COMPILER_OPTIONS)
  return options or None
