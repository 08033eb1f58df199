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

import os
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
# layers and the cost grows with depth; with XLA's own weight gradient these
# `transpose_copy_fusion`s took more time than all the convolutions of
# cifar_resnet20, and the step without the pass was 1.15-1.97x faster on
# AVX-512 CPUs. With the chunked weight gradient of `cnn.ops.conv` the
# balance turned: on YNNPACK's convolutions (XLA's default) the fused step was
# faster in 5 of 6 side-by-side measurements (cifar_resnet20 1.12-1.20x,
# cifar_resnet56 0.97-1.08x, an AVX2 EPYC and an AVX-512 Xeon), while on
# Eigen's (`CNN_XLA_CPU_CONV=eigen`, the default without AVX-512) it cost
# resnet56 20 % on one EPYC (results/speed/). With oneDNN's convolutions
# (FFI custom calls, no transposes for XLA to fuse into) the pass made
# cifar_resnet20's step 1.18x faster on an AVX2 EPYC (results/speed/). So
# `auto`, the default, keeps the pass exactly where it measured faster:
# oneDNN's convolutions, or the chunked weight gradient (one device, policy
# not 'xla') on YNNPACK's. CNN_XLA_CPU_FUSION=1
# keeps XLA's fusion, 0 turns it off; the arithmetic is the same either way.
CPU_COMPILER_OPTIONS = {'xla_disable_hlo_passes': 'fusion'}
ENV_FUSION = 'CNN_XLA_CPU_FUSION'


def current_fusion() -> bool:
  """Whether the CPU train step keeps XLA's fusion pass (`ENV_FUSION`: 1,
  0, or auto, the default: on with oneDNN's convolutions or with the
  chunked weight gradient on YNNPACK's, off otherwise).

  Raises:
    ConfigError: the variable holds something else than 0, 1 or auto.
  """
  value = os.environ.get(ENV_FUSION, '').strip().lower() or 'auto'
  if value not in ('0', '1', 'auto'):
    raise ConfigError(
        f"{ENV_FUSION}={value!r} is not a fusion setting: use 1 (XLA's "
        'fusion pass), 0 (none) or auto (the default: the pass with the '
        "chunked weight gradient on YNNPACK's convolutions)")
  if value == 'auto':
    if conv_ops.current_implementation() == 'onednn':
      return True
    return conv_ops.current_engine() == 'ynnpack' and conv_ops.may_chunk()
  return value == '1'


def default_compiler_options() -> dict | None:
  """XLA options of the train step on this backend (None: XLA's defaults):
  on CPU the fusion setting above and the convolution engine
  (`cnn.ops.conv.engine_compiler_options`, `CNN_XLA_CPU_CONV`)."""
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
