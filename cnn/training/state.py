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


def create(init_variables, tx, seed: int) -> TrainState:
  """A fresh state: `init_variables(key)` -> {'params', ...} (He init in the
  models), the optimizer state, and the per-step key.

  The seed is split once: the first half initialises the model, the second
  is the run's step key, so a task's init never shifts the training noise.
  """
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(seed))
  variables = init_variables(init_rng)
  params = variables['params']
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables.get('batch_stats', {}),
      opt_state=tx.init(params),
      plateau=optim.PlateauState.create(),
      rng=state_rng)
