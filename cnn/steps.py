"""Pure train and eval steps, and the train state they transform.

`make_steps` returns jitted functions compiled once per shape; the train state
is donated, so its buffers are updated in place. Under a device mesh the batch
is sharded over the `data` axis and the state replicated; BatchNorm then sees
global batch statistics because jit partitions one global computation.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from cnn import input_pipeline
from cnn import optim


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; checkpointed as one pytree."""
  step: jnp.ndarray
  params: Any
  batch_stats: Any
  opt_state: Any
  plateau: optim.PlateauState
  rng: jnp.ndarray  # Raw uint32[2] key: per-step keys are fold_in(rng, step).


def create_train_state(model, tx, rng, image_shape) -> TrainState:
  """Initialises parameters (He init in the models) and optimizer state."""
  init_rng, state_rng = jax.random.split(rng)
  dummy = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  # XLA's RngBitGenerator ('rbg') compiles the init of a deep net 3-4x
  # faster on CPU than threefry (4 s vs 15 s for cifar_resnet8); the values
  # are still a pure function of the seed on a given backend.
  init_key = jax.random.wrap_key_data(jnp.tile(init_rng, 2), impl='rbg')
  variables = jax.jit(lambda r: model.init(r, dummy, train=False))(init_key)
  params = variables['params']
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables.get('batch_stats', {}),
      opt_state=tx.init(params),
      plateau=optim.PlateauState.create(),
      rng=state_rng)


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)


# XLA:CPU's instruction fusion duplicates the elementwise residual stream
# (BatchNorm -> add -> ReLU, block after block) into the transposes that feed
# every weight-gradient convolution, so each transpose recomputes several
# layers and the cost grows with depth; in the profile of cifar_resnet20 these
# `transpose_copy_fusion`s took more time than all the convolutions. Without
# the pass every tensor is computed once and stored; the arithmetic is the
# same (see `experiments/benchmark.py --compare=fusion` for the measured
# effect). CNN_XLA_CPU_FUSION=1 restores XLA's default.
CPU_COMPILER_OPTIONS = {'xla_disable_hlo_passes': 'fusion'}


def default_compiler_options() -> dict | None:
  """XLA options of the train step on this backend (None: XLA's defaults)."""
  if jax.default_backend() != 'cpu' or os.environ.get('CNN_XLA_CPU_FUSION'):
    return None
  return dict(CPU_COMPILER_OPTIONS)


@dataclasses.dataclass(frozen=True)
class Steps:
  train: Callable  # (state, batch) -> (state, metrics)
  eval: Callable   # (state, batch) -> summed metrics


def make_steps(model, tx, schedule, mean, *, augment: str = 'crop_flip',
               pad: int = 4, dtype=jnp.float32, frozen=None,
               compiler_options: dict | None | str = 'default') -> Steps:
  """Builds the jitted steps for one model/optimizer/preprocessing setup.

  Args:
    model: a Linen module called as `model.apply(vars, x, train=...)`.
    tx: the optax transformation from `optim.make_optimizer` (no LR inside).
    schedule: step -> base learning rate (`optim.make_schedule`).
    mean: training mean in [0, 1] units, per pixel or per channel.
    augment: 'crop_flip' (pad, random crop, flip on device), 'flip' or 'none'.
    pad: padding for the random crop.
    dtype: compute dtype of the input (bfloat16 for mixed precision).
    frozen: None, or (params_mask, stats_mask) of static bools
      (`transfer.freeze_masks`): the leaves marked True leave the step
      bit-identical (transfer learning with frozen layers).
    compiler_options: XLA options for the train step; 'default' takes
      `default_compiler_options()`, None XLA's own defaults.
  """
  if compiler_options == 'default':
    compiler_options = default_compiler_options()
  mean = jnp.asarray(mean)
  if augment not in ('crop_flip', 'flip', 'none'):
    raise ValueError(f"augment='{augment}' is unknown; use crop_flip, flip "
                     'or none')

  def train_step(state: TrainState, batch):
    step_rng = jax.random.fold_in(state.rng, state.step)
    aug_rng, dropout_rng = jax.random.split(step_rng)
    images = input_pipeline.normalize(batch['image'], mean)
    if augment != 'none':
      images = input_pipeline.random_crop_flip(
          aug_rng, images, pad if augment == 'crop_flip' else 0)
    images = images.astype(dtype)
    labels = batch['label']

    def loss_fn(params):
      logits, new_vars = model.apply(
          {'params': params, 'batch_stats': state.batch_stats}, images,
          train=True, mutable=['batch_stats'], rngs={'dropout': dropout_rng})
      loss = cross_entropy(logits, labels).mean()
      return loss, (logits, new_vars)

    (loss, (logits, new_vars)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    lr = schedule(state.step) * state.plateau.scale
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda u: -lr * u, updates)
    params = optax.apply_updates(state.params, updates)
    error = jnp.mean(jnp.argmax(logits, -1) != labels)
    batch_stats = new_vars.get('batch_stats', state.batch_stats)
    if frozen is not None:
      # Static masks: frozen leaves are passed through, not recomputed.
      keep = lambda m, old, new: jax.tree.map(
          lambda f, o, n: o if f else n, m, old, new)
      params = keep(frozen[0], state.params, params)
      batch_stats = keep(frozen[1], state.batch_stats, batch_stats)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats,
        opt_state=opt_state)
    return new_state, {'loss': loss, 'error': error, 'learning_rate': lr}

  def eval_step(state: TrainState, batch):
    images = input_pipeline.normalize(batch['image'], mean).astype(dtype)
    logits = model.apply(
        {'params': state.params, 'batch_stats': state.batch_stats}, images,
        train=False)
    mask = batch['mask']
    wrong = (jnp.argmax(logits, -1) != batch['label']).astype(jnp.float32)
    return {'loss': jnp.sum(cross_entropy(logits, batch['label']) * mask),
            'error': jnp.sum(wrong * mask),
            'count': jnp.sum(mask)}

  # The eval step has no weight gradients, hence no such transposes, and
  # runs faster with XLA's fusion: it keeps the defaults.
  return Steps(train=jax.jit(train_step, donate_argnums=0,
                             compiler_options=compiler_options),
               eval=jax.jit(eval_step))
