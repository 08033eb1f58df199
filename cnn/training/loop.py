"""`train(run, workdir)`: the one training loop, every task.

It is handed a `Run` (`cnn.runs`: the config's task, its data, model,
optimizer, step, checkpointer and numerics) and does the rest for every task
alike: resume or start, the batch order (`cnn.training.batches`), the steps,
and the side jobs as hooks in the manner of detectron2's `HookBase`
(`Hook`): the train log and NaN guard, evaluation and the plateau cut,
checkpoints, console progress, Ctrl-C / SIGTERM. It imports no task, no
convolution and no dataset.

Resumable and deterministic: the batch, the augmentation and the dropout of
step `s` depend only on (seed, s), evaluation and checkpoint steps are fixed
by the config, and the restored state is bitwise the saved one. A run killed
at any moment and restarted on the same workdir therefore ends with the same
numbers as an uninterrupted run (on CPU, where XLA is deterministic).
"""
from __future__ import annotations

import math
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from cnn.errors import NonFiniteLossError, UserError
from cnn.training import batches
from cnn.training import console
from cnn.training import metric_writers
from cnn.training import optim
from cnn.training import provenance
from cnn.training import run_folder
from cnn.training import sharding
from cnn.training import state as state_lib


def log_interval(log_every: int, eval_every: int, checkpoint_every: int) -> int:
  """Train-log interval dividing the eval and checkpoint intervals.

  Train metrics are averaged over the steps since the previous log point;
  aligning log points with checkpoints keeps that window identical after a
  resume.
  """
  return math.gcd(int(log_every), int(eval_every), int(checkpoint_every))


def _check_finite(window: list, first_step: int, checkpointer,
                  what: str = 'loss is') -> None:
  losses = np.asarray(jax.device_get([m['loss'] for m in window]))
  bad = np.flatnonzero(~np.isfinite(losses))
  if bad.size:
    step = first_step + int(bad[0]) + 1
    last = checkpointer.latest_step()
    kept = (f'the last good checkpoint, step {last}, is kept in '
            f'{checkpointer.directory}' if last is not None
            else 'no checkpoint had been written yet')
    raise NonFiniteLossError(
        f'{what} {losses[bad[0]]} at step {step}; {kept}; lower '
        '--config.learning_rate or add warm-up (--config.warmup_steps)')


@jax.jit
def _all_finite(tree):
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x))
                              for x in jax.tree.leaves(tree)]))


def _check_finite_params(state, step: int, checkpointer) -> None:
  """Never checkpoint a diverged state (finite loss, overflowed weights)."""
  if not bool(_all_finite(state.params)):
    _check_finite([{'loss': jnp.float32(np.nan)}], step - 1, checkpointer,
                  what='parameters are')


class Interrupted(UserError):
  """Ctrl-C or SIGTERM: the run saved its current step and stopped."""


def _saved_window(meta: dict, start: int):
  """The train-log window a Ctrl-C checkpoint carries (see `_interrupt`)."""
  w = meta.get('window')
  if not w:
    return [], start
  return ([{k: np.float32(v) for k, v in m.items()} for m in w['metrics']],
          int(w['start']))


class _Clock:
  """Seconds of this run's training loop, summed over every sitting.

  Saved in each checkpoint's meta (`wall_seconds`) and restored on resume,
  so time-to-accuracy curves of a run split over several sittings leave
  out the gaps between them. None when the run was resumed from a
  checkpoint written before the clock existed (its time is unknown).
  """

  def __init__(self, meta: dict | None):
    self._base = 0.0 if meta is None else meta.get('wall_seconds')
    self._t0 = time.perf_counter()

  def seconds(self) -> float | None:
    if self._base is None:
      return None
    return self._base + time.perf_counter() - self._t0

  def stamp(self, meta: dict) -> dict:
    """`meta` with the run's seconds so far."""
    if self._base is not None:
      meta['wall_seconds'] = self.seconds()
    return meta

  def fields(self) -> dict:
    return {} if self._base is None else {'wall_seconds': self.seconds()}


def _logged(result: dict) -> dict:
  """A result's metrics for metrics.jsonl: 'examples' is a count."""
  return {k: v for k, v in result.items() if k != 'examples'}


class Hook:
  """A side job of the loop. `before_step(t)` runs before step `t.s + 1` is
  dispatched, `after_step(t)` once it is (`t.s` steps done); hooks run in
  the order the loop lists them and share the loop's state (`Trainer`)."""

  def before_step(self, t: 'Trainer') -> None:
    pass

  def after_step(self, t: 'Trainer') -> None:
    pass


class FirstStep(Hook):
  """Says that the step compiles, and how long the first one took."""

  def __init__(self):
    self.done = False

  def before_step(self, t):
    if not self.done:
      print(console.COMPILING, flush=True)

  def after_step(self, t):
    if not self.done:
      jax.block_until_ready(t.state.step)
      print(f'step {t.s}/{t.total}: compiled and ran the first step in '
            f'{time.perf_counter() - t.t_start:.1f}s', flush=True)
      t.progress.reset_clock(t.s)
      self.done = True


class TrainLog(Hook):
  """At log points: the NaN guard on the steps since the last one, their
  mean metrics into metrics.jsonl and the progress line."""

  def after_step(self, t):
    s = t.s
    if s % t.log_every == 0 or t.is_eval() or t.is_checkpoint():
      host = jax.device_get(t.window)  # one transfer per log point
      _check_finite(host, t.window_start, t.run.checkpointer)
      # The loss first, then the task's metrics (sorted, as jit returns).
      keys = ['loss'] + [k for k in host[0]
                         if k not in ('loss', 'learning_rate')]
      means = {k: float(np.mean([m[k] for m in host])) for k in keys}
      lr = float(host[-1]['learning_rate'])
      t.writer.write(s, 'train', learning_rate=lr, epoch=t.epoch_of(s),
                     **means, **t.clock.fields())
      t.progress.log(s, **{k: means[k] for k in t.run.task.log_keys}, lr=lr)
      t.window, t.window_start = [], s


class Evaluate(Hook):
  """At eval points: every held-out split, then the plateau cut."""

  def after_step(self, t):
    if not t.is_eval():
      return
    t.evaluate_all(final=t.s == t.total)
    config, run = t.run.config, t.run
    if config.lr_schedule == 'plateau':
      metric = t.last_eval[run.monitor][run.task.metric]
      # plateau_update lowers the rate when its metric stops falling.
      signed = metric if run.task.metric_mode == 'min' else -metric
      state = t.state.replace(plateau=optim.plateau_update(
          jax.device_get(t.state.plateau), signed, config))
      t.state = sharding.replicate(state, run.mesh)
    t.progress.reset_clock(t.s)


class Checkpoint(Hook):
  """At checkpoint points: a finite state, saved with the held-out metric
  that picks the best checkpoint."""

  def after_step(self, t):
    if not t.is_checkpoint():
      return
    run = t.run
    _check_finite_params(t.state, t.s, run.checkpointer)
    metric = (t.last_eval[run.monitor][run.task.metric]
              if t.is_eval() and run.monitor else None)
    run.checkpointer.save(t.s, t.state, t.clock.stamp(run.meta(t.state)),
                          metric=metric)


class Progress(Hook):
  """Flushes the metric files; a console line when the last is ~30 s old."""

  def after_step(self, t):
    t.writer.flush()
    t.progress.tick(t.s, lambda: jax.block_until_ready(t.state.step))


class Interrupt(Hook):
  """Ctrl-C or SIGTERM: saves step `s` with the steps since the last log
  point (so the resumed run logs the same averages) and stops with one
  line."""

  def __init__(self, stop: console.StopRequest):
    self.stop = stop

  def before_step(self, t):
    self.stop.step = t.s + 1  # the step a Ctrl-C now saves

  def after_step(self, t):
    if self.stop.signal is None or t.s >= t.total:
      return
    ckpt, s = t.run.checkpointer, t.s
    if ckpt.latest_step() != s:
      if t.window:
        _check_finite(t.window, t.window_start, ckpt)
      _check_finite_params(t.state, s, ckpt)
      meta = t.clock.stamp(t.run.meta(t.state))
      meta['window'] = {'start': t.window_start, 'metrics': [
          {k: float(v) for k, v in m.items()}
          for m in jax.device_get(t.window)]}
      ckpt.save(s, t.state, meta)
    name = signal.Signals(self.stop.signal).name
    raise Interrupted(f'{name} at step {s}: checkpoint {s} saved in '
                      f'{ckpt.directory}; rerun the same command to resume')


class Trainer:
  """The loop's state: the run, the train state, the step `s` (steps done),
  the train-log window, the last evaluation, the writers and the clock."""

  def __init__(self, run, workdir: str):
    self.run, self.workdir = run, workdir
    config = run.config
    self.total = int(config.num_train_steps)
    self.log_every = log_interval(config.log_every_steps,
                                  config.eval_every_steps,
                                  config.checkpoint_every_steps)
    self.primary = sharding.is_primary()
    self.state, self.s, saved_meta = self._start()
    self.window, self.window_start = _saved_window(saved_meta or {}, self.s)
    self.writer = (metric_writers.MetricWriter(
        workdir, resume_step=self.s, tensorboard=config.tensorboard)
                   if self.primary else metric_writers.NullWriter())
    self.progress = metric_writers.Progress(self.total, self.s,
                                            config.batch_size)
    self.clock = _Clock(saved_meta)
    self.last_eval: dict = {}
    self.t_start = time.perf_counter()
    self._batches()

  def _start(self):
    """(state, step, checkpoint meta or None): the run resumed from its
    latest checkpoint (checked against the config it was trained with),
    or started fresh (from `init_from` where set)."""
    run, workdir, config = self.run, self.workdir, self.run.config
    saved = run_folder.read_config(workdir)
    latest = run.checkpointer.latest_step()
    start, meta = 0, None
    if latest is not None:
      if saved is None:  # config.json is gone: the checkpoint carries it.
        saved = run_folder.config_of_checkpoint(
            run.checkpointer.read_meta(latest), workdir, latest)
      # Before anything is written: a resumed run is the run on disk.
      for note in run_folder.resume_check(saved, config, latest):
        print(f'resuming with {note}', flush=True)
      # Restored straight into the abstract state: no init to compile.
      state = run.restore(run.abstract_state(), 'latest')
      start = int(state.step)
      meta = run.checkpointer.read_meta(start)
      print(f'resuming from step {start} in {workdir}', flush=True)
    else:
      state = run.init_state()
      if config.init_from:
        # Only a fresh run starts from another run's weights; a resumed one
        # continues from its own checkpoint above.
        state = run.load_init_from(state)
    if self.primary and (latest is None or start < self.total):
      # A rerun that trains nothing leaves the record as it is.
      run_folder.write_config(workdir, config,
                              saved if latest is not None else None)
    return state, start, meta

  def _batches(self):
    data, config = self.run.data, self.run.config
    if self.s >= self.total:
      return
    if data.train is not None:
      order = batches.TrainBatches(data.train, config.batch_size, config.seed)
      self.next_batch = lambda s: data.train.batch(order.indices(s))
      self.epoch_of = order.epoch_of
    else:
      stream = iter(data.train_stream)
      self.next_batch = lambda _: next(stream)
      self.epoch_of = lambda _: 0.0

  def is_eval(self) -> bool:
    return (self.s % self.run.config.eval_every_steps == 0
            or self.s == self.total)

  def is_checkpoint(self) -> bool:
    return (self.s % self.run.config.checkpoint_every_steps == 0
            or self.s == self.total)

  def evaluate_all(self, final: bool) -> dict:
    t_eval = time.perf_counter()
    results = {}
    # The moving average (config.ema_decay) is a model of its own: SPLIT_ema.
    averages = ((False, True) if state_lib.average(self.state) is not None
                else (False,))
    for split in self.run.data.evals:
      for ema in averages:
        name = f'{split}_ema' if ema else split
        results[name] = self.run.evaluate(self.state, split, final=final,
                                          ema=ema)
        self.writer.write(self.s, name, **_logged(results[name]),
                          **self.clock.fields())
    keys = self.run.task.eval_keys
    print('  eval ' + ' | '.join(
        f'{split} {metric_writers.format_metrics(r, keys)}'
        for split, r in results.items())
          + f' ({time.perf_counter() - t_eval:.1f}s)', flush=True)
    self.last_eval = results
    return results

  def loop(self, hooks: list[Hook]) -> None:
    """The steps from `s` to the end, each hook around each step."""
    run = self.run
    batch = run.shard(self.next_batch(self.s)) if self.s < self.total else None
    for step in range(self.s, self.total):
      for h in hooks:
        h.before_step(self)
      self.state, metrics = run.train_step(self.state, batch)
      self.window.append(metrics)
      self.s = step + 1
      if self.s < self.total:
        # Prepared while the device runs the step just dispatched.
        batch = run.shard(self.next_batch(self.s))
      for h in hooks:
        h.after_step(self)


def train(run, workdir: str) -> dict:
  """Trains `run` (a `cnn.runs.Run`) in `workdir` to
  `config.num_train_steps`, resuming the run there; the caller holds the
  folder (`cnn.runs.train_and_evaluate`).

  Returns:
    The last evaluation's metrics by split, e.g. {'test': {'error': ...}}.
  """
  if jax.process_count() > 1:
    print(f'multi-host: process {jax.process_index()} of '
          f'{jax.process_count()}, {jax.device_count()} devices in all '
          f'({jax.local_device_count()} here)', flush=True)
  convolution = run.convolution()
  if sharding.is_primary():
    print(f'convolution: {convolution}', flush=True)
  t = Trainer(run, workdir)
  training = t.s < t.total
  if t.primary and training:
    was = provenance.start_sitting(workdir, t.s, convolution)
    if was:
      print(f'resuming with another convolution: {was} -> {convolution} '
            '(the steps from here differ by float32 rounding)', flush=True)
    for note in optim.schedule_notes(run.config):  # a warning: on stderr
      print(f'schedule: {note}', file=sys.stderr, flush=True)
  stop = console.StopRequest()
  try:
    stop.__enter__()
    if t.total == 0:
      # An evaluation-only run (e.g. localization's `both` stage).
      t.evaluate_all(final=True)
      if run.checkpointer.latest_step() is None:
        run.checkpointer.save(0, t.state, t.clock.stamp(run.meta(t.state)))
    t.loop([FirstStep(), TrainLog(), Evaluate(), Checkpoint(), Progress(),
            Interrupt(stop)])
  finally:
    stop.__exit__()
    run.checkpointer.close()
    t.writer.close()
    if t.primary and training:
      provenance.end_sitting(workdir, int(jax.device_get(t.state.step)),
                             t.clock.fields().get('wall_seconds'))
  return t.last_eval

