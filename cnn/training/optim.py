"""SGD with momentum, weight decay and learning-rate schedules.

The learning rate is applied outside optax, as `-lr * update`, where
`lr = schedule(step) * plateau_scale`. That keeps the optimizer state free of
the schedule, makes the rate a traced value (no recompilation when a plateau
cuts it), and matches PyTorch's SGD exactly: the momentum buffer accumulates
raw gradients (plus weight decay) and the rate scales the buffer.

Reduce-on-plateau is a small state (scale, best, bad evaluations, cooldown)
updated on the host after each evaluation of a held-out split; it lives in the
train state and is checkpointed with it.
"""
from __future__ import annotations

import math
from typing import Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cnn.errors import ConfigError

SCHEDULES = ('step', 'plateau', 'cosine', 'constant')


def decay_mask(params, decay_bn_and_bias: bool = True):
  """True for the leaves weight decay applies to.

  Kernels of conv and dense layers always decay; BatchNorm scales/biases and
  layer biases decay only with `decay_bn_and_bias` (the paper's Torch/Caffe
  recipe decays every parameter).
  """
  def keep(path, _):
    name = str(getattr(path[-1], 'key', path[-1]))
    return decay_bn_and_bias or name == 'kernel'
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(config) -> optax.GradientTransformation:
  """Momentum SGD (optionally Nesterov) with coupled L2 weight decay.

  The returned transformation does not apply the learning rate: see the
  module docstring.
  """
  parts = []
  if config.weight_decay:
    decay_bn_and_bias = config.decay_bn_and_bias
    parts.append(optax.add_decayed_weights(
        config.weight_decay,
        mask=lambda p: decay_mask(p, decay_bn_and_bias)))
  if config.momentum:
    parts.append(optax.trace(decay=config.momentum,
                             nesterov=config.nesterov))
  return optax.chain(*parts) if parts else optax.identity()


def milestone_steps(config) -> tuple[int, ...]:
  """The step schedule's milestones: `lr_milestones` (steps), or
  `lr_milestone_fractions` of `num_train_steps` (they follow the length of
  the run: 0.5 and 0.75 are He et al.'s 32k and 48k of 64k)."""
  fractions = tuple(config.lr_milestone_fractions or ())
  if fractions:
    total = int(config.num_train_steps)
    return tuple(int(round(f * total)) for f in fractions)
  return tuple(int(m) for m in config.lr_milestones)


def make_schedule(config) -> Callable[[jnp.ndarray], jnp.ndarray]:
  """Base learning rate as a function of the step (before plateau scaling).

  `step`: multiply by `lr_factor` at each of `lr_milestones`; `cosine`: from
  `learning_rate` to 0 over `num_train_steps`; `plateau` and `constant`:
  `learning_rate` (plateau cuts come from the plateau state). A warm-up of
  `warmup_steps` runs first: `constant` holds `warmup_lr` (He et al.'s 0.01
  for ResNet-110), `linear` ramps from `warmup_lr` to the schedule.
  """
  base = float(config.learning_rate)
  kind = config.lr_schedule
  if kind not in SCHEDULES:
    raise ConfigError(f"lr_schedule='{kind}' is unknown; use one of "
                      f'{", ".join(SCHEDULES)}')
  if kind == 'step':
    milestones = jnp.asarray(sorted(milestone_steps(config)), jnp.int32)
    factor = float(config.lr_factor)

    def sched(step):
      n = jnp.sum(step >= milestones) if milestones.size else 0
      return base * factor ** n
  elif kind == 'cosine':
    total = max(int(config.num_train_steps), 1)

    def sched(step):
      t = jnp.minimum(step, total) / total
      return base * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
  else:
    def sched(step):
      del step
      return jnp.asarray(base, jnp.float32)

  warmup_steps = int(config.warmup_steps)
  if not warmup_steps:
    return lambda step: jnp.asarray(sched(step), jnp.float32)
  warmup_lr = float(config.warmup_lr)
  warmup = config.warmup
  if warmup not in ('constant', 'linear'):
    raise ConfigError(f"warmup='{warmup}' is unknown; use constant or linear")

  def with_warmup(step):
    after = sched(step)
    if warmup == 'constant':
      during = warmup_lr
    else:
      during = warmup_lr + (after - warmup_lr) * step / warmup_steps
    return jnp.asarray(jnp.where(step < warmup_steps, during, after),
                       jnp.float32)
  return with_warmup


@flax.struct.dataclass
class PlateauState:
  """Reduce-on-plateau state; `scale` multiplies the scheduled rate."""
  scale: jnp.ndarray
  best: jnp.ndarray
  bad_evals: jnp.ndarray
  cooldown: jnp.ndarray

  @classmethod
  def create(cls):
    return cls(scale=jnp.ones((), jnp.float32),
               best=jnp.asarray(np.inf, jnp.float32),
               bad_evals=jnp.zeros((), jnp.int32),
               cooldown=jnp.zeros((), jnp.int32))


def plateau_update(state: PlateauState, metric: float, config) -> PlateauState:
  """One held-out evaluation's effect on the plateau state (lower is better).

  The metric improves when it beats `best` by more than `threshold` (relative
  to best with `threshold_mode='rel'`, absolute with 'abs'). After `patience`
  evaluations without improvement the rate is multiplied by `lr_factor`
  (never below `min_lr`), then `cooldown` evaluations pass before counting
  again. PyTorch's ReduceLROnPlateau semantics.
  """
  p = config.plateau
  best = float(state.best)
  if p.threshold_mode == 'rel':
    improved = metric < best * (1.0 - p.threshold)
  elif p.threshold_mode == 'abs':
    improved = metric < best - p.threshold
  else:
    raise ConfigError(f"plateau.threshold_mode='{p.threshold_mode}' is "
                      'unknown; use rel or abs')
  scale = float(state.scale)
  bad = 0 if improved else int(state.bad_evals) + 1
  cooldown = int(state.cooldown)
  if cooldown > 0:
    cooldown -= 1
    bad = 0
  if bad > p.patience:
    base = float(config.learning_rate)
    min_scale = p.min_lr / base if base else 0.0
    new_scale = max(scale * config.lr_factor, min_scale)
    if new_scale < scale:
      scale = new_scale
      cooldown = p.cooldown
    bad = 0
  return PlateauState(scale=jnp.asarray(scale, jnp.float32),
                      best=jnp.asarray(min(best, metric), jnp.float32),
                      bad_evals=jnp.asarray(bad, jnp.int32),
                      cooldown=jnp.asarray(cooldown, jnp.int32))


def _is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def validate(config) -> None:
  """Raises ConfigError for inconsistent optimizer settings."""
  if config.lr_schedule not in SCHEDULES:
    raise ConfigError(f"lr_schedule='{config.lr_schedule}' is unknown; use "
                      f'one of {", ".join(SCHEDULES)}')
  if not (config.learning_rate > 0 and math.isfinite(config.learning_rate)):
    raise ConfigError(f'learning_rate={config.learning_rate} must be a '
                      'positive number')
  if not 0 <= config.momentum < 1:
    raise ConfigError(f'momentum={config.momentum} must be in [0, 1)')
  if config.weight_decay < 0:
    raise ConfigError(f'weight_decay={config.weight_decay} must be >= 0')
  if not 0 <= config.ema_decay < 1:
    raise ConfigError(f'ema_decay={config.ema_decay} must be in [0, 1) '
                      '(0: no moving average; e.g. 0.999)')
  fractions = tuple(config.lr_milestone_fractions or ())
  milestones = tuple(config.lr_milestones or ())
  if not all(_is_number(m) and float(m).is_integer() and m >= 0
             for m in milestones):
    raise ConfigError(f'lr_milestones={milestones} must be steps (integers '
                      '>= 0), e.g. --config.lr_milestones="(32000,48000)"')
  if not all(_is_number(f) for f in fractions):
    raise ConfigError(f'lr_milestone_fractions={fractions} must be numbers '
                      'in (0, 1), e.g. --config.lr_milestone_fractions='
                      '"(0.5,0.75)"')
  if fractions and milestones:
    raise ConfigError('set lr_milestones (steps) or lr_milestone_fractions '
                      '(of num_train_steps), not both: --config.lr_milestones'
                      '=() keeps the fractions')
  if any(not 0 < f < 1 for f in fractions):
    raise ConfigError(f'lr_milestone_fractions={fractions} must lie in '
                      '(0, 1)')
  if config.lr_schedule == 'plateau' and config.plateau.patience < 0:
    raise ConfigError('plateau.patience must be >= 0')
  _validate_warmup(config)


def _validate_warmup(config) -> None:
  """A warm-up must end inside the run, and before the first milestone
  (else the rate the schedule warms up to is never used)."""
  total = int(config.num_train_steps)
  warmup = int(config.warmup_steps or 0)
  if warmup < 0:
    raise ConfigError(f'warmup_steps={warmup} must be >= 0 (0: none)')
  if not warmup or total <= 0:  # 0 steps: evaluate only
    return
  if warmup >= total:
    raise ConfigError(
        f'warmup_steps={warmup} does not fit num_train_steps={total}: the '
        'whole run would be warm-up; set --config.warmup_steps below '
        f'{total} (e.g. {max(total // 10, 1)}), or 0 for none')
  first = min(milestone_steps(config), default=None)
  if config.lr_schedule == 'step' and first is not None and warmup > first:
    raise ConfigError(
        f'warmup_steps={warmup} outlasts the first lr milestone (step '
        f'{first} of num_train_steps={total}): learning_rate='
        f'{config.learning_rate} would never be used; set '
        f'--config.warmup_steps to {first} or less, or lengthen the run')


def schedule_notes(config) -> list[str]:
  """What the start of a run says about its schedule: step milestones
  given in steps that lie beyond the run, so they never lower the rate."""
  total = int(config.num_train_steps)
  if (config.lr_schedule != 'step' or total <= 0
      or tuple(config.lr_milestone_fractions or ())):
    return []
  late = [m for m in milestone_steps(config) if m >= total]
  if not late:
    return []
  return [f'lr_milestones {", ".join(map(str, late))} lie at or beyond '
          f'num_train_steps={total} and never lower the rate (milestones '
          'in steps; lr_milestone_fractions follow the length of the run)']
