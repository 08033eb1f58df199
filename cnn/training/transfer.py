"""Transfer learning: start from another run's weights, freeze some of them.

Three pieces, wired into training by `init_from`, `freeze` and `new_head`:

* `load_pretrained` copies `params` and `batch_stats` from a checkpoint of
  another run into a freshly initialised state. Names and shapes are checked
  leaf by leaf and every mismatch is reported, one line each; nothing is
  loaded unless everything fits. The only exception is the classifier: every
  model ends in an `nn.Dense` named `head`, and that head keeps its fresh
  initialisation when its shape differs (another number of classes) or when
  `new_head=True` (new classes, same count).
* `freeze_masks` turns a spec such as `trunk`, `stem,stage1` or
  `re:^stage1/.*/conv` into boolean pytrees over `params` and `batch_stats`.
* `freeze_optimizer` gives frozen parameters a zero update and no optimizer
  state (`optax.multi_transform` with `set_to_zero`), and `FrozenBatchNorm`
  runs the BatchNorm layers whose scale and bias are frozen on their running
  averages during training: their statistics stay fixed, and the frozen
  layers compute in training exactly what they compute in evaluation (the
  usual practice for a frozen trunk, e.g. Keras' `trainable=False`).

Parameter paths are written `stage1/block0/conv1/kernel`; the named groups are
the top-level submodules of the model (`stem`, `stage1`.., `head`, ...) plus
`trunk`, everything but the head.
"""
from __future__ import annotations

import os
import re
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax

from cnn.training import checkpointing
from cnn.errors import CheckpointError, ConfigError

HEAD = 'head'
_WHICH_RE = re.compile(r'^(.*):(latest|best|\d+)$')


# --- Paths and masks ---------------------------------------------------------

def _key(k) -> str:
  return str(getattr(k, 'key', getattr(k, 'name', k)))


def flat_paths(tree) -> dict[str, Any]:
  """{'stage1/block0/conv1/kernel': leaf, ...} of a nested dict."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(_key(k) for k in path): leaf for path, leaf in flat}


def _map_paths(fn, tree):
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: fn('/'.join(_key(k) for k in path), leaf), tree)


def freeze_masks(spec: str, params, batch_stats=None) -> tuple[Any, Any]:
  """Boolean pytrees (True = frozen) over `params` and `batch_stats`.

  Args:
    spec: comma-separated groups: `trunk` (all but `head`), a top-level
      submodule name (`stem`, `stage1`, ..., `head`), or `re:REGEX` searched
      in each parameter path (`re:^stage[12]/`). '' freezes nothing.
    params: the model's parameters (arrays or shape structs).
    batch_stats: the model's BatchNorm statistics, or None.

  Returns:
    (params_mask, stats_mask). A BatchNorm layer's statistics are frozen when
    all of its parameters are (scale and bias); statistics of a layer without
    parameters follow the spec applied to their own path.

  Raises:
    ConfigError: unknown group, a regex that matches nothing or does not
      compile, or a spec that leaves nothing to train.
  """
  batch_stats = batch_stats if batch_stats is not None else {}
  groups = sorted(params)
  example = max(flat_paths(params), key=lambda p: p.count('/'))
  matchers = []
  for item in (s.strip() for s in spec.split(',')):
    if not item:
      continue
    if item.startswith('re:'):
      try:
        pattern = re.compile(item[3:])
      except re.error as e:
        raise ConfigError(f"freeze regex '{item[3:]}' does not compile ({e})"
                          ) from None
      if not any(pattern.search(p) for p in flat_paths(params)):
        raise ConfigError(
            f"freeze='{item}' matches no parameter path; paths look like "
            f"'{example}'")
      matchers.append(lambda p, pat=pattern: bool(pat.search(p)))
    elif item == 'trunk':
      matchers.append(lambda p: p.split('/')[0] != HEAD)
    elif item in groups:
      matchers.append(lambda p, g=item: p.split('/')[0] == g)
    else:
      raise ConfigError(
          f"freeze group '{item}' is unknown for this model; use trunk, "
          f"{', '.join(groups)} or re:REGEX over paths like "
          f"'{example}'")

  def frozen(path):
    return any(m(path) for m in matchers)

  params_mask = _map_paths(lambda p, _: frozen(p), params)
  flat_mask = flat_paths(params_mask)
  if flat_mask and all(flat_mask.values()):
    raise ConfigError(f"freeze='{spec}' freezes every parameter, so nothing "
                      'would train; leave out a group (e.g. freeze=trunk)')

  def stats_frozen(path, _):
    module = path.rsplit('/', 1)[0]
    own = [v for p, v in flat_mask.items() if p.rsplit('/', 1)[0] == module]
    return all(own) if own else frozen(path)

  return params_mask, _map_paths(stats_frozen, batch_stats)


def frozen_modules(stats_mask) -> frozenset:
  """Paths ('stage1/block0/bn1') of the layers whose statistics are frozen."""
  return frozenset(p.rsplit('/', 1)[0]
                   for p, f in flat_paths(stats_mask).items() if f)


def freeze_optimizer(tx: optax.GradientTransformation, params_mask
                     ) -> optax.GradientTransformation:
  """`tx` for trainable parameters; zero updates and no state for frozen ones."""
  labels = jax.tree.map(lambda f: 'frozen' if f else 'train', params_mask)
  return optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()},
                               labels)


class FrozenBatchNorm:
  """Wraps a model so that frozen BatchNorm layers use running averages.

  `apply` intercepts the `BatchNorm` calls whose module path is in
  `modules` and runs them in inference mode on the same variables; all other
  layers behave as usual. With no frozen BatchNorm layer it is the model.
  """

  def __init__(self, model: nn.Module, modules: frozenset):
    self.model = model
    self.modules = modules

  def __getattr__(self, name):
    return getattr(self.model, name)

  def _interceptor(self, next_fun, args, kwargs, context):
    module = context.module
    if (not isinstance(module, nn.BatchNorm) or context.method_name !=
        '__call__' or module.use_running_average or
        '/'.join(module.path) not in self.modules):
      return next_fun(*args, **kwargs)
    variables = {k: module.variables[k] for k in ('params', 'batch_stats')
                 if k in module.variables}
    # A standalone copy in inference mode on the very same variables; its
    # own call passes the check above (use_running_average=True).
    return module.clone(parent=None, use_running_average=True).apply(
        variables, *args, **kwargs)

  def apply(self, variables, *args, **kwargs):
    if not self.modules:
      return self.model.apply(variables, *args, **kwargs)
    with nn.intercept_methods(self._interceptor):
      return self.model.apply(variables, *args, **kwargs)


# --- Loading ----------------------------------------------------------------

def parse_init_from(spec: str) -> tuple[str, str]:
  """'runs/pre:best' -> (checkpoints folder, 'best'); default 'latest'.

  The path may be a run folder (holding `checkpoints/`), a checkpoints
  folder, or one step folder (`runs/pre/checkpoints/2000`).
  """
  match = _WHICH_RE.match(spec)
  path, which = (match.group(1), match.group(2)) if match else (spec, 'latest')
  path = os.path.expanduser(path)
  if not os.path.isdir(path):
    raise CheckpointError(f"init_from='{spec}': {path} is not a folder; give "
                          'a run folder, e.g. runs/pre, runs/pre:best or '
                          'runs/pre:2000')
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    return os.path.join(path, 'checkpoints'), which
  base = os.path.basename(os.path.normpath(path))
  if base.isdigit() and not match:
    return os.path.dirname(os.path.normpath(path)), base
  return path, which


def _restore_raw(checkpointer, step: int) -> dict:
  """The saved state at `step` as nested dicts, whatever its structure."""
  state = checkpointer.restore_tree(step)
  return {k: state.get(k) or {} for k in ('params', 'batch_stats')}


def mismatches(saved: dict, expected: dict, collection: str,
               skip=lambda p: False) -> list[str]:
  """One line per leaf missing, unexpected or of another shape."""
  lines = []
  for p in sorted(set(expected) | set(saved)):
    if skip(p):
      continue
    if p not in saved:
      lines.append(f'{collection}/{p}: missing in the checkpoint, model has '
                   f'shape {list(np.shape(expected[p]))}')
    elif p not in expected:
      lines.append(f'{collection}/{p}: in the checkpoint '
                   f'{list(np.shape(saved[p]))}, not in the model')
    elif tuple(np.shape(saved[p])) != tuple(np.shape(expected[p])):
      lines.append(f'{collection}/{p}: checkpoint shape '
                   f'{list(np.shape(saved[p]))}, model shape '
                   f'{list(np.shape(expected[p]))}')
  return lines


def load_pretrained(spec: str, model_name: str, params, batch_stats,
                    new_head: bool = False, other_model_fix=None):
  """Weights of another run's checkpoint, checked against the model.

  Args:
    spec: `init_from`: run folder or checkpoints folder, optionally with
      `:latest`, `:best` or `:STEP`.
    model_name: the config's model; the checkpoint must be of the same one.
    params, batch_stats: the fresh initialisation (its head is kept when
      replaced).
    new_head: re-initialise `head` even when its shape matches.
    other_model_fix: `fix(saved_model) -> str`, what to do when the
      checkpoint is of another model (`saved_model`, its meta's name);
      by default: set --config.model to it, or pretrain `model_name`.

  Returns:
    (params, batch_stats, message): the loaded trees (numpy leaves, same
    structure as the inputs) and a one-line summary of what was loaded.

  Raises:
    CheckpointError: no such checkpoint, another architecture, or any name or
      shape mismatch outside the head (all listed, one per line).
  """
  from cnn.errors import UserError  # pylint: disable=g-import-not-at-top
  directory, which = parse_init_from(spec)
  checkpointer = checkpointing.Checkpointer(directory, read_only=True,
                                            init_from=spec)
  try:
    try:
      step = checkpointer.resolve(which)
    except UserError as e:
      raise CheckpointError(f"init_from='{spec}': {e}") from None
    meta = checkpointer.read_meta(step)
    if meta.get('model') != model_name:
      fix = (other_model_fix(meta.get('model')) if other_model_fix else
             f"set --config.model={meta.get('model')} or pretrain a "
             f'{model_name}')
      raise CheckpointError(
          f"init_from='{spec}' holds a checkpoint of model "
          f"'{meta.get('model')}', but the config trains '{model_name}': "
          f'weights only transfer within one architecture; {fix}')
    saved = _restore_raw(checkpointer, step)
  finally:
    checkpointer.close()

  want_p, want_s = flat_paths(params), flat_paths(batch_stats)
  got_p, got_s = flat_paths(saved['params']), flat_paths(saved['batch_stats'])
  is_head = lambda p: p.split('/')[0] == HEAD
  head_fits = not mismatches({p: v for p, v in got_p.items() if is_head(p)},
                             {p: v for p, v in want_p.items() if is_head(p)},
                             'params')
  replace_head = new_head or not head_fits
  if not any(is_head(p) for p in want_p):
    replace_head = False
  lines = (mismatches(got_p, want_p, 'params',
                      skip=is_head if replace_head else lambda p: False) +
           mismatches(got_s, want_s, 'batch_stats'))
  if lines:
    raise CheckpointError(
        f"init_from='{spec}' (step {step} of {directory}) does not fit model "
        f"'{model_name}' with this config: {len(lines)} mismatches, nothing "
        'loaded; use the model_kwargs of the pretraining run\n  ' +
        '\n  '.join(lines))

  def pick(fresh_tree, got):
    return _map_paths(
        lambda p, fresh: fresh if replace_head and is_head(p)
        else np.asarray(got[p], dtype=np.asarray(fresh).dtype), fresh_tree)

  loaded = sum(1 for p in want_p if not (replace_head and is_head(p)))
  if replace_head:
    shapes = {p: list(np.shape(v)) for p, v in want_p.items() if is_head(p)}
    why = 'new_head=True' if head_fits else 'its shape differs'
    head_note = f'; head re-initialised ({why}): {shapes}'
  else:
    head_note = '; head loaded too'
  message = (f'init_from: loaded {loaded} parameter arrays and '
             f'{len(want_s)} BatchNorm statistics from step {step} of '
             f'{directory}{head_note}')
  return pick(params, got_p), pick(batch_stats, got_s), message
