"""Run logs: `metrics.jsonl` (the source of truth), TensorBoard, console.

One JSON object per logged point: `{"step", "split", "loss", "error", ...}`.
A value that is not finite (a NaN loss) is written as `null`, so every line
is standard JSON; `read_metrics` gives it back as NaN.
On resume the lines past the restored step are dropped first: the resumed run
writes them again, identically, so the file never holds a step twice.

The console is a view of the run, not part of it: `console_may_close()`
keeps a run training when its stdout goes away (`train ... | head -n 3`);
the console lines after that are dropped, one line on stderr says so, and
metrics.jsonl, TensorBoard and the checkpoints go on to the end.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import sys
import time

from cnn.errors import ConfigError


def read_metrics(workdir: str, skipped: list | None = None) -> list[dict]:
  """All valid records of `workdir/metrics.jsonl` (empty when absent).

  A line that is not a JSON record (cut by a kill mid-write, damaged) is
  skipped, and its line number appended to `skipped`; the records after it
  are kept. A `null` value is read as NaN.

  Raises:
    ConfigError: a line is a JSON record of the wrong types (a step that is
      not an integer, a value that is not a number): refused, not dropped.
  """
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  out = []
  with open(path, errors='replace') as f:
    for number, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        record = None
      if isinstance(record, dict) and 'step' in record and 'split' in record:
        out.append(_checked(record, path, number))
      elif skipped is not None:
        skipped.append(number)
  return out


def _checked(record: dict, path: str, number: int) -> dict:
  """The record with its nulls as NaN; ConfigError (one line) for a record
  that is JSON but not one this writer writes (a hand edit, another tool):
  it is refused rather than dropped, so nothing is lost."""
  def bad(what: str) -> ConfigError:
    return ConfigError(f'{path} line {number}: {what}; fix or delete that '
                       'line (metrics.jsonl holds one record a line: an '
                       'integer step, a split name, numbers or null)')
  step, split = record['step'], record['split']
  if isinstance(step, bool) or not isinstance(step, int):
    raise bad(f'step {step!r} is not an integer')
  if not isinstance(split, str):
    raise bad(f'split {split!r} is not a name')
  out = {}
  for k, v in record.items():
    if v is None:
      v = math.nan
    elif k not in ('step', 'split') and (
        isinstance(v, bool) or not isinstance(v, (int, float))):
      raise bad(f'{k} {v!r} is not a number')
    out[k] = v
  return out


def _json_value(v) -> float | None:
  v = float(v)
  return v if math.isfinite(v) else None


class MetricWriter:
  """Appends records to metrics.jsonl and TensorBoard event files."""

  def __init__(self, workdir: str, resume_step: int = 0,
               tensorboard: bool = True):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    skipped: list[int] = []
    kept = [r for r in read_metrics(workdir, skipped)
            if r['step'] <= resume_step]
    if skipped:
      print(f'metrics.jsonl: skipped {len(skipped)} unreadable line'
            f'{"s" if len(skipped) > 1 else ""} (line '
            f'{", ".join(map(str, skipped[:5]))}); the {len(kept)} valid '
            f'records up to step {resume_step} are kept', flush=True)
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      for r in kept:
        f.write(json.dumps({k: v if not isinstance(v, float) else
                            _json_value(v) for k, v in r.items()},
                           allow_nan=False) + '\n')
    os.replace(tmp, self.path)  # Atomic: a kill here loses nothing.
    self._file = open(self.path, 'a', buffering=1)
    self._tb = None
    if tensorboard:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      self._tb = tf.summary.create_file_writer(
          os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, split: str, **values):
    record = {'step': int(step), 'split': split}
    record.update({k: _json_value(v) for k, v in values.items()})
    self._file.write(json.dumps(record, allow_nan=False) + '\n')
    if self._tb is not None:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      with self._tb.as_default(step=int(step)):
        for k, v in values.items():
          tf.summary.scalar(f'{split}/{k}', float(v))

  def flush(self):
    self._file.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    self._file.close()
    if self._tb is not None:
      self._tb.close()


class NullWriter:
  """The writer of a multi-host run's other processes: process 0 writes."""

  def write(self, step: int, split: str, **values):
    del step, split, values

  def flush(self):
    pass

  def close(self):
    pass


class _ClosableConsole:
  """sys.stdout that drops what it is given once its reader has gone."""

  def __init__(self, stream, workdir: str):
    self._stream = stream
    self._workdir = workdir
    self.gone = False

  def _closed(self) -> None:
    self.gone = True
    try:  # Later writes and the interpreter's last flush go nowhere.
      null = os.open(os.devnull, os.O_WRONLY)
      os.dup2(null, self._stream.fileno())
      os.close(null)
    except (OSError, ValueError, AttributeError):
      pass  # Not a file descriptor (a test's capture): writes are dropped.
    print(f'stdout closed (its reader ended): training goes on, logged to '
          f'{os.path.join(self._workdir, "metrics.jsonl")}', file=sys.stderr,
          flush=True)

  def _call(self, fn, *args):
    if self.gone:
      return None
    try:
      return fn(*args)
    except OSError as e:
      if not isinstance(e, BrokenPipeError) and e.errno != errno.EPIPE:
        raise
      self._closed()
      return None

  def write(self, text: str) -> int:
    self._call(self._stream.write, text)
    return len(text)

  def flush(self) -> None:
    self._call(self._stream.flush)

  def __getattr__(self, name):
    return getattr(self._stream, name)


@contextlib.contextmanager
def console_may_close(workdir: str):
  """Within the block, a closed stdout (a broken pipe) neither stops nor
  ends the run: its console lines are dropped, the run's files go on."""
  if isinstance(sys.stdout, _ClosableConsole):
    yield
    return
  original = sys.stdout
  sys.stdout = _ClosableConsole(original, workdir)
  try:
    yield
  finally:
    sys.stdout = original


class Progress:
  """A console line per log point: step, loss, error, lr, steps/s, ETA.

  And between log points a line of the step, the rate and the ETA whenever
  the last line is `every_seconds` old (`tick`, called after each step), so
  that a run with long log intervals is never silent for long. `clock` is
  the time source (seconds), injectable for tests.
  """

  def __init__(self, total_steps: int, start_step: int, batch_size: int,
               stream=None, clock=time.perf_counter,
               every_seconds: float = 30.0):
    self.total = total_steps
    self.batch_size = batch_size
    self.stream = stream or sys.stdout
    self.every_seconds = every_seconds
    self._clock = clock
    self._t0 = clock()
    self._s0 = start_step
    self._last_line = self._t0

  def reset_clock(self, step: int):
    """Restarts the rate clock (after compilation or evaluation, each of
    which has just printed its line)."""
    self._t0 = self._last_line = self._clock()
    self._s0 = step

  def rate(self, step: int) -> float:
    dt = self._clock() - self._t0
    return (step - self._s0) / dt if dt > 0 and step > self._s0 else 0.0

  def line(self, step: int, **values) -> str:
    rate = self.rate(step)
    eta = (self.total - step) / rate if rate else float('nan')
    vals = ' '.join(f'{k} {format_value(k, v)}' for k, v in values.items())
    return (f'step {step}/{self.total} | {vals + " | " if vals else ""}'
            f'{rate:.2f} steps/s {rate * self.batch_size:.0f} img/s | '
            f'ETA {_hms(eta)}')

  def log(self, step: int, **values):
    print(self.line(step, **values), file=self.stream, flush=True)
    self._last_line = self._clock()

  def tick(self, step: int, wait=None) -> bool:
    """After step `step`: prints its line (no metrics: they stay on the
    device until the next log point) if the last line is `every_seconds`
    old. `wait()` is called first, to count only the steps that have run
    (the loop dispatches steps ahead of the device). True if it printed."""
    if self._clock() - self._last_line < self.every_seconds:
      return False
    if wait is not None:
      wait()
    self.log(step)
    return True


def format_value(key: str, value: float) -> str:
  """A metric as a person reads it: error and accuracy rates in percent, as
  the sweep and plot tables print them; anything else to 4 digits."""
  if 'error' in key or 'accuracy' in key:
    return f'{100 * value:.2f}%'
  return f'{value:.4g}'


def _hms(seconds: float) -> str:
  if seconds != seconds:  # NaN
    return '?'
  s = int(seconds)
  return f'{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}'


def format_metrics(result: dict, keys) -> str:
  """`error 34.12% loss 1.023`: rates in percent (`format_value`)."""
  return ' '.join(f'{k} {format_value(k, result[k])}'
                  for k in keys if k in result)
