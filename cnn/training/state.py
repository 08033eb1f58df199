"""The train state every task trains, checkpointed as one pytree."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

from cnn.training import optim


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training.

  Attributes:
    step: steps taken.
    params: the model's parameters.
    batch_stats: the model's other variables (BatchNorm statistics); {} for
      a model without any.
    opt_state: the optimizer's state (momentum buffers).
    plateau: reduce-on-plateau state (`optim.PlateauState`).
    rng: raw uint32[2] key; the key of step s is fold_in(rng, s).
  """
  step: jnp.ndarray
  params: Any
  batch_stats: Any
  opt_state: Any
  plateau: optim.PlateauState
  rng: jnp.ndarray

  @property
  def variables(self) -> dict:
    """The model's variables, as `model.apply` takes them."""
    return {'params': self.params, 'batch_stats': self.batch_stats}


@flax.struct.dataclass
class EmaTrainState(TrainState):
  """A TrainState that also carries `ema`: the exponential moving average
  of the model's variables ({'params', 'batch_stats'}, `config.ema_decay`),
  evaluated as a model of its own; it starts at the initial variables. A
  class of its own, so the checkpoints of runs without an average keep the
  structure they always had."""
  ema: Any


def average(state) -> dict | None:
  """The state's moving average of the variables, or None."""
  return getattr(state, 'ema', None)


def create(init_variables, tx, seed: int, ema: bool = False) -> TrainState:
  """A fresh state: `init_variables(key)` -> {'params', ...} (He init in the
  models), the optimizer state, and the per-step key.

  The seed is split once: the first half initialises the model, the second
  is the run's step key, so a task's init never shifts the training noise.
  """
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(seed))
  variables = init_variables(init_rng)
  params = variables['params']
  batch_stats = variables.get('batch_stats', {})
  fields = dict(step=jnp.zeros((), jnp.int32),
                params=params,
                batch_stats=batch_stats,
                opt_state=tx.init(params),
                plateau=optim.PlateauState.create(),
                rng=state_rng)
  if ema:
    return EmaTrainState(**fields, ema=start_ema(params, batch_stats))
  return TrainState(**fields)


def start_ema(params, batch_stats) -> dict:
  """The moving average's start: a copy of the variables."""
  copy = lambda tree: jax.tree.map(jnp.array, tree)
  return {'params': copy(params), 'batch_stats': copy(batch_stats)}
