"""The one train step: a task's loss, its gradient, one SGD update.

`make_train_step(loss_fn, tx, schedule)` returns a jitted, state-donating
`(state, batch) -> (state, metrics)` for any task. The task supplies only
`loss_fn(params, model_state, batch, rng) -> (loss, (metrics, new_model_state))`
(augmentation, the forward pass, targets and losses live there); the step
owns the per-step key, the learning rate (schedule x plateau scale), the
optimizer, frozen leaves and the compiler options. Under a device mesh the
batch is sharded over the `data` axis and the state replicated; BatchNorm
then sees global batch statistics because jit partitions one global
computation.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from cnn.errors import ConfigError
from cnn.ops import conv as conv_ops
from cnn.training.state import TrainState

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
    if conv_ops.current_implementation() == 'onednn':
      return True
    return conv_ops.current_engine() == 'ynnpack' and conv_ops.may_chunk()
  return value == 'on'


def default_compiler_options() -> dict | None:
  """XLA options of the train step on this backend (None: XLA's defaults):
  on CPU the fusion setting above and the convolution engine
  (`cnn.ops.conv.engine_compiler_options`)."""
  if jax.default_backend() != 'cpu':
    return None
  options = dict(conv_ops.engine_compiler_options() or {})
  if not current_fusion():
    options.update(CPU_COMPILER_OPTIONS)
  return options or None


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation,
                    schedule: Callable, *, frozen=None,
                    compiler_options: dict | None | str = 'default'
                    ) -> Callable:
  """Builds the jitted train step of a task.

  Args:
    loss_fn: `(params, model_state, batch, rng) -> (loss, (metrics,
      new_model_state))`; `metrics` is a dict of scalars averaged into the
      train log, `new_model_state` replaces `state.batch_stats`.
    tx: the optax transformation from `optim.make_optimizer` (no LR inside).
    schedule: step -> base learning rate (`optim.make_schedule`).
    frozen: None, or (params_mask, stats_mask) of static bools
      (`transfer.freeze_masks`): the leaves marked True leave the step
      bit-identical (transfer learning with frozen layers).
    compiler_options: XLA options; 'default' takes
      `default_compiler_options()`, None XLA's own defaults.

  Returns:
    `(state, batch) -> (state, metrics)`, metrics = {'loss', the task's
    metrics..., 'learning_rate'}.
  """
  if compiler_options == 'default':
    compiler_options = default_compiler_options()

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    (loss, (metrics, model_state)), grads = jax.value_and_grad(
        lambda p: loss_fn(p, state.batch_stats, batch, rng),
        has_aux=True)(state.params)
    # The rate is applied outside optax, as PyTorch's SGD does (see optim).
    lr = schedule(state.step) * state.plateau.scale
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda u: -lr * u, updates)
    params = optax.apply_updates(state.params, updates)
    if frozen is not None:
      # Static masks: frozen leaves are passed through, not recomputed.
      keep = lambda m, old, new: jax.tree.map(
          lambda f, o, n: o if f else n, m, old, new)
      params = keep(frozen[0], state.params, params)
      model_state = keep(frozen[1], state.batch_stats, model_state)
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats=model_state, opt_state=opt_state)
    return new_state, {'loss': loss, **metrics,
                       'learning_rate': jnp.asarray(lr, jnp.float32)}

  return jax.jit(train_step, donate_argnums=0,
                 compiler_options=compiler_options)
