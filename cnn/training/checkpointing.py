"""Orbax checkpoints: save, restore-or-init, resume, best-by-metric.

Each checkpoint is a step folder under `workdir/checkpoints` holding the train
state and a small JSON `meta` item (model, dataset, classes, parameter
shapes), which is read first so that a checkpoint of another model fails with
one clear line instead of an orbax tree-mismatch traceback. The last
`keep` checkpoints and the best one by the held-out metric are preserved.
Saves are asynchronous; orbax writes to a temporary folder and renames it, so
a run killed mid-save leaves the previous checkpoints intact.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os

import jax
import numpy as np
from etils import epath
import orbax.checkpoint as ocp

from cnn.errors import CheckpointError


# Orbax's notes on what this module does on purpose: a save without a metric
# (a checkpoint between evaluations; the latest-N policy keeps it) and a
# read-only manager (evaluating a finished run). Dropped so that a run's
# console shows its progress lines only.
_EXPECTED = ('Requested `tracked_metric`; did not provide metrics',
             'CheckpointManagerOptions.read_only=True',
             'Given directory is read only')


class _QuietOrbax(logging.Filter):
  """Drops orbax's expected notes, and its save threads' tracebacks of a
  full disk (four for one checkpoint, before the save raises): the loop
  says that in one line naming the folder and the step a rerun resumes
  from."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = str(record.getMessage())
    return not (message.startswith(_EXPECTED) or _NO_SPACE in message
                or is_disk_full(record.exc_info[1] if record.exc_info
                                else None))


_NO_SPACE = 'No space left on device'


def is_disk_full(e: BaseException | None) -> bool:
  """Whether `e` or an exception it was raised from says the disk is full
  (orbax wraps the OSError into other errors, keeping only its text)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or (
        _NO_SPACE in str(e)):
      return True
    e = e.__cause__ or e.__context__
  return False


_FILTER = _QuietOrbax()


def _quiet_orbax() -> None:
  for name in ('absl', ''):
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
      logger.addFilter(_FILTER)


class _DrainingLoop(asyncio.SelectorEventLoop):
  """An event loop that, closed with tasks still pending, lets them finish
  first (for `_DRAIN_SECONDS` at most)."""

  def close(self):
    if not self.is_running() and not self.is_closed():
      pending = [t for t in asyncio.all_tasks(self) if not t.done()]
      if pending:
        self.run_until_complete(asyncio.wait(pending,
                                             timeout=_DRAIN_SECONDS))
        for t in pending:  # read, so that none is reported as unread
          if t.done() and not t.cancelled():
            t.exception()
    super().close()


_DRAIN_SECONDS = 60.0


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):

  def new_event_loop(self):
    return _DrainingLoop()


@contextlib.contextmanager
def _reads_that_finish():
  """Orbax restores in an event loop of its own that it closes as soon as
  one array's read fails, while the reads of the others are still in
  flight in TensorStore's threads: each then completed into the closed
  loop ("RuntimeError: Event loop is closed", or the read's own error, a
  traceback apiece, 139 for a ResNet's checkpoint after the one line that
  says the checkpoint is unreadable). Loops made within the block wait for
  their reads before they close."""
  policy = asyncio.get_event_loop_policy()
  if type(policy) is not asyncio.DefaultEventLoopPolicy:  # pylint: disable=unidiomatic-typecheck
    yield  # someone else's loops (uvloop ...): left as they are
    return
  asyncio.set_event_loop_policy(_DrainingPolicy())
  try:
    yield
  finally:
    asyncio.set_event_loop_policy(policy)


def param_shapes(params) -> dict:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {jax.tree_util.keystr(k): list(np.shape(v)) for k, v in flat}


class Checkpointer:
  """A CheckpointManager with the project's policies and error messages."""

  def __init__(self, directory: str, keep: int = 2, best_mode: str = 'min',
               read_only: bool = False, init_from: str | None = None):
    """`init_from`: the config value this folder was named by, when it is
    another run's checkpoints to start from (for the hint of errors)."""
    _quiet_orbax()
    self.directory = os.path.abspath(directory)
    policies = [ocp.checkpoint_managers.LatestN(n=max(keep, 1))]
    # Best by the held-out metric (lower error is better).
    policies.append(ocp.checkpoint_managers.BestN(
        get_metric_fn=lambda m: m['metric'], reverse=best_mode == 'min', n=1,
        keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(
            policies),
        # best_fn only makes orbax write the metrics (it writes none
        # without one); which checkpoints stay is the policy's decision.
        best_fn=lambda m: m['metric'], best_mode=best_mode,
        create=not read_only, read_only=read_only,
        cleanup_tmp_directories=not read_only)
    self.best_mode = best_mode
    self.init_from = init_from
    if not read_only:
      _check_writable(self.directory)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_names=('state', 'meta'))

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    scored = []
    for step in self.steps():
      try:
        metrics = self.manager.metrics(step)
      except Exception:  # pylint: disable=broad-except
        metrics = None
      if metrics and 'metric' in metrics:
        scored.append((metrics['metric'], step))
    if not scored:
      return None
    return (min(scored) if self.best_mode == 'min' else max(scored))[1]

  def save(self, step: int, state, meta: dict, metric: float | None = None):
    metrics = None if metric is None else {'metric': float(metric)}
    self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta)),
        metrics=metrics, force=True)

  def resolve(self, which: str | int) -> int:
    """Step number for 'latest', 'best' or an explicit step."""
    steps = self.steps()
    if not steps:
      raise CheckpointError(f'no checkpoint in {self.directory}; train first '
                            'or point --workdir at a run that has one')
    if which == 'latest':
      return steps[-1]
    if which == 'best':
      best = self.best_step()
      if best is None:
        raise CheckpointError(f'no checkpoint in {self.directory} has a '
                              'held-out metric; use --checkpoint=latest')
      return best
    try:
      step = int(which)
    except (TypeError, ValueError):
      raise CheckpointError(f"checkpoint '{which}' is not latest, best or a "
                            f'step number; available steps: {steps}') from None
    if step not in steps:
      raise CheckpointError(f'no checkpoint for step {step} in '
                            f'{self.directory}; available steps: {steps}')
    return step

  def read_meta(self, step: int) -> dict:
    try:
      with _reads_that_finish():
        return self.manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(self._unreadable(step, e)) from None

  def restore(self, step: int, target, meta: dict | None = None):
    """Restores the state at `step` into the structure of `target`.

    Args:
      step: a step from `steps()`.
      target: a state with the expected structure, shapes and shardings.
      meta: when given, what the checkpoint's meta must match (model and
        parameter shapes); a mismatch is a CheckpointError naming both.
    """
    if meta is not None:
      saved = self.read_meta(step)
      if saved.get('model') != meta['model']:
        raise CheckpointError(
            f"checkpoint {step} in {self.directory} was written by model "
            f"'{saved.get('model')}', but the config asks for "
            f"'{meta['model']}': use a fresh --workdir or the run's own config")
      diff = _shape_mismatches(saved.get('param_shapes', {}),
                               meta['param_shapes'])
      if diff:
        raise CheckpointError(
            f'checkpoint {step} in {self.directory} does not fit the model '
            f"'{meta['model']}' ({diff}): use a fresh --workdir or the run's "
            'own config')
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      with _reads_that_finish():
        restored = self.manager.restore(
            step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract)))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(self._unreadable(step, e)) from None
    return restored['state']

  def restore_tree(self, step: int) -> dict:
    """The saved state at `step` as nested dicts of arrays on this host's
    first device, whatever its structure and whatever devices saved it (a
    checkpoint of 8 GPUs loads on one CPU: `init_from`, plots)."""
    path = os.path.join(self.directory, str(step), 'state')
    try:
      with _reads_that_finish():
        # The item's own handler: it reads the `state` folder, which has no
        # step metadata of its own (StandardCheckpointer().metadata would
        # warn that _CHECKPOINT_METADATA is missing there).
        metadata = ocp.StandardCheckpointHandler().metadata(
            epath.Path(os.path.abspath(path)))
        tree = getattr(metadata, 'tree', metadata)
        here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
            tree)
        return self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))['state']
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(self._unreadable(step, e)) from None

  def _unreadable(self, step: int, e: Exception) -> str:
    first = (str(e).strip().splitlines() or [''])[0][:160]
    others = [s for s in self.steps() if s != step]
    if self.init_from is not None:
      run = self.directory[:-len('/checkpoints')] if self.directory.endswith(
          '/checkpoints') else self.directory
      hint = (f'start from another of its steps, e.g. --config.init_from='
              f'{run}:{others[-1]}' if others else
              'retrain that run, or start from another one')
    elif others:
      hint = (f'move {self.directory}/{step} aside to resume from step '
              f'{others[-1]}')
    else:
      hint = 'use a fresh --workdir'

    return (f'checkpoint {step} in {self.directory} is unreadable '
            f'({type(e).__name__}: {first}): {hint}')

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _check_writable(directory: str) -> None:
  """Refuses, before any step is trained, a checkpoints folder that cannot
  be created or written: orbax's asynchronous save failed there with four
  tracebacks and then left the process hanging (a sweep would stall on it).
  """
  probe = os.path.join(directory, f'.write_test.{os.getpid()}')
  try:
    os.makedirs(directory, exist_ok=True)
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise CheckpointError(
        f'cannot write checkpoints in {directory} ({e.strerror or e}): make '
        'it writable (or free its disk), or choose another --workdir') from None


def _shape_mismatches(saved: dict, expected: dict) -> str:
  missing = sorted(set(expected) - set(saved))
  extra = sorted(set(saved) - set(expected))
  wrong = sorted(k for k in set(saved) & set(expected)
                 if list(saved[k]) != list(expected[k]))
  parts = []
  if missing:
    parts.append(f'{len(missing)} parameters missing, e.g. {missing[0]}')
  if extra:
    parts.append(f'{len(extra)} unexpected, e.g. {extra[0]}')
  if wrong:
    k = wrong[0]
    parts.append(f'{len(wrong)} with other shapes, e.g. {k} '
                 f'{saved[k]} vs {expected[k]}')
  return '; '.join(parts)
