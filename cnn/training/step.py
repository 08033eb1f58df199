"""The one train step: a task's loss, its gradient, one SGD update.

`make_train_step(loss_fn, tx, schedule)` returns a jitted, state-donating
`(state, batch) -> (state, metrics)` for any task. The task supplies only
`loss_fn(params, model_state, batch, rng) -> (loss, (metrics, new_model_state))`
(augmentation, the forward pass, targets and losses live there); the step
owns the per-step key, the learning rate (schedule x plateau scale), the
optimizer, frozen leaves and the compiler options it is given. Under a device mesh the
batch is sharded over the `data` axis and the state replicated; BatchNorm
then sees global batch statistics because jit partitions one global
computation.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from cnn.training.state import TrainState

def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation,
                    schedule: Callable, *, frozen=None,
                    compiler_options: dict | None = None,
                    ema_decay: float = 0.0) -> Callable:
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
    compiler_options: XLA options (None: XLA's defaults); a run passes its
      numerics' (`cnn.ops.compiler.train_step_options`).
    ema_decay: d > 0: after the update, `state.ema` <- d * ema + (1 - d) *
      the new variables (params and batch_stats); 0: `state.ema` is None.

  Returns:
    `(state, batch) -> (state, metrics)`, metrics = {'loss', the task's
    metrics..., 'learning_rate'}.
  """
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
    if ema_decay:
      d = ema_decay
      average = lambda e, v: (d * e + (1.0 - d) * v if jnp.issubdtype(
          v.dtype, jnp.inexact) else v)  # counters are copied
      new_state = new_state.replace(ema=jax.tree.map(
          average, state.ema, {'params': params, 'batch_stats': model_state}))
    return new_state, {'loss': loss, **metrics,
                       'learning_rate': jnp.asarray(lr, jnp.float32)}

  return jax.jit(train_step, donate_argnums=0,
                 compiler_options=compiler_options)
