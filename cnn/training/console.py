"""What a run says while it cannot show its progress line; its Ctrl-C.

A run is never silent for long (issue 35): its first line names what it
loads, before the data is read; a line says when the first train step starts
compiling (the loop prints how long it took once it has run); the progress
line comes at least every `metric_writers.Progress.every_seconds` between log
points; and a Ctrl-C or SIGTERM is acknowledged when it arrives, not when the
step, the evaluation or the compilation in progress ends.

Why a thread for the last: Python runs a signal handler only when the main
thread is back in the interpreter, and a training run spends long stretches
inside one call into XLA (compiling, waiting for the steps dispatched ahead
at a log point), so a Ctrl-C during a long computation reaches the handler
only when the computation ends (tests/training/test_silence.py).
`signal.set_wakeup_fd` has the C-level handler write the signal's number
to a pipe at once; a daemon thread blocked on that pipe prints the
acknowledgement. The stop itself stays with the Python handler
(`StopRequest`) and the loop: a step is never cut in the middle.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable


def data_line(name: str, folder: str | None) -> str:
  """`loading NAME from FOLDER ...`: the first line of a run, printed
  before its data is read (which may take minutes).

  Args:
    name: what the run reads (the task's `data_name()`).
    folder: the config's `data_dir`; '' or None is TFDS's default folder.
  """
  name = name or 'the data'
  if not folder:  # TFDS's default folder
    env = os.environ.get('TFDS_DATA_DIR')
    folder = (f'$TFDS_DATA_DIR ({env})' if env
              else "TFDS's default folder (~/tensorflow_datasets)")
  return f'loading {name} from {folder} ...'


COMPILING = 'compiling the train step ...'


def stop_line(signum: int, step: int | None) -> str:
  """The acknowledgement of a stop signal, `step` the step it saves."""
  name = signal.Signals(signum).name
  if step is None:
    return f'stopping ({name}) after the current step: saving it ...'
  again = ('; Ctrl-C again stops without saving it'
           if signum == signal.SIGINT else '')
  return f'stopping ({name}): saving step {step} when it finishes{again} ...'


class SignalNotice:
  """Within the block, the first of `signals` is acknowledged on `stream`
  (stderr) as it arrives, with the line `message(signum)` returns.

  The signals must have Python handlers (the C-level handler then writes to
  the wakeup fd); main thread only, as `signal.set_wakeup_fd` requires.
  `active` is False where the notice could not start: the caller's handler
  then prints the line itself.
  """

  def __init__(self, message: Callable[[int], str],
               signals=(signal.SIGINT, signal.SIGTERM), stream=None):
    self._message = message
    self._signals = {int(s) for s in signals}
    self._stream = stream
    self._pipe = None
    self._old_fd = -1
    self._thread = None
    self.active = False
    self.said = False

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      return self
    read, write = os.pipe()
    try:
      os.set_blocking(write, False)  # the C handler must never block
      self._old_fd = signal.set_wakeup_fd(write)
    except (ValueError, OSError):
      os.close(read)
      os.close(write)
      return self
    self._pipe = (read, write)
    self._thread = threading.Thread(target=self._watch, daemon=True,
                                    name='cnn-signal-notice')
    self._thread.start()
    self.active = True
    return self

  def say(self, signum: int) -> None:
    """Prints the acknowledgement of `signum` unless one was printed."""
    if self.said:
      return
    self.said = True
    print(self._message(signum), file=self._stream or sys.stderr, flush=True)

  def _watch(self):
    read = self._pipe[0]
    while True:
      try:
        data = os.read(read, 64)
      except OSError:
        return
      if not data:  # the write end is closed: the block has ended
        return
      if self._old_fd >= 0:  # an earlier wakeup fd still hears of them
        try:
          os.write(self._old_fd, data)
        except OSError:
          pass
      for signum in data:
        if signum in self._signals:
          try:
            self.say(signum)
          except Exception:  # pylint: disable=broad-except
            pass  # a closed stderr: the loop still stops and says so

  def __exit__(self, *exc):
    if not self.active:
      return
    signal.set_wakeup_fd(self._old_fd)  # no more writes to our pipe
    os.close(self._pipe[1])
    self._thread.join(timeout=5)
    os.close(self._pipe[0])
    self.active = False


class StopRequest:
  """SIGINT / SIGTERM only set a flag, read between steps: a step is never
  cut in the middle (its donated state would be lost). A second Ctrl-C
  stops at once. The first is acknowledged on stderr as it arrives, naming
  `step`, the step it saves (`SignalNotice`)."""

  def __init__(self, stream=None):
    self.signal = None
    self.step = None
    self._old = {}
    self._notice = SignalNotice(lambda signum: stop_line(signum, self.step),
                                stream=stream)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._old[sig] = signal.signal(sig, self._handle)
      self._notice.__enter__()
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signal is not None:
      if signum == signal.SIGINT:  # Ctrl-C again: the user insists
        raise KeyboardInterrupt
      return  # e.g. a sweep runner's SIGTERM after the terminal's Ctrl-C
    self.signal = signum
    if not self._notice.active:
      self._notice.say(signum)

  def __exit__(self, *exc):
    self._notice.__exit__()
    for sig, handler in self._old.items():
      signal.signal(sig, handler)
