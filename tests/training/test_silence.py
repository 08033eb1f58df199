"""A run is never silent for long (issue 35): what loads and that the step
compiles are said before either starts, a line comes at least every ~30 s
between log points, and a Ctrl-C is acknowledged as it arrives."""
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import tensorflow_datasets as tfds

from cnn.data import input_pipeline
from cnn.training import console
from cnn import runs
from cnn.training import metric_writers
from cnn.training import step as step_lib
from tests.conftest import ROOT, endless_lenet5_args, small_config


def test_what_loads_and_the_compilation_are_said_before_they_start(
    tmp_path, capsys, monkeypatch):
  monkeypatch.delenv('TFDS_DATA_DIR', raising=False)
  seen = {}
  get_datasets = input_pipeline.get_datasets

  def reading(config):
    seen['before the data'] = capsys.readouterr().out
    return get_datasets(config)
  monkeypatch.setattr(input_pipeline, 'get_datasets', reading)
  make_train_step = step_lib.make_train_step

  def made(*args, **kwargs):
    train_step = make_train_step(*args, **kwargs)

    def step(state, batch):
      if 'before compiling' not in seen:  # the first call compiles
        seen['before compiling'] = capsys.readouterr().out
      return train_step(state, batch)
    return step
  monkeypatch.setattr(step_lib, 'make_train_step', made)
  with tfds.testing.mock_data(num_examples=24):
    runs.train_and_evaluate(small_config('lenet5', steps=2), str(tmp_path))
  after = capsys.readouterr().out.splitlines()
  assert seen['before the data'].splitlines() == [
      "loading cifar10 from TFDS's default folder (~/tensorflow_datasets) ..."]
  before = seen['before compiling'].splitlines()
  assert before[0].startswith('convolution: ')
  assert before[-1] == 'compiling the train step ...'
  assert re.fullmatch(r'step 1/2: compiled and ran the first step in '
                      r'\d+\.\ds', after[0]), after


def test_the_data_line_names_the_dataset_and_its_folder(monkeypatch):
  from cnn import tasks  # pylint: disable=g-import-not-at-top
  from configs import cifar10, localization  # pylint: disable=g-import-not-at-top
  c = cifar10.get_config('lenet5')
  c.dataset, c.data_dir = 'cifar10_jpeg', '../shared/data/tfds'
  assert console.data_line(tasks.get(c).data_name(), c.data_dir) == (
      'loading cifar10_jpeg from ../shared/data/tfds ...')
  monkeypatch.setenv('TFDS_DATA_DIR', '/data/tfds')
  c = localization.get_config('local')
  c.source, c.data_dir = 'cifar10', ''
  assert console.data_line(tasks.get(c).data_name(), c.data_dir) == (
      'loading synthetic canvases of cifar10 from $TFDS_DATA_DIR '
      '(/data/tfds) ...')


def test_a_line_comes_when_the_last_is_30_seconds_old():
  now = [0.0]
  out = io.StringIO()
  progress = metric_writers.Progress(100, 0, 8, stream=out,
                                     clock=lambda: now[0])
  lines = lambda: out.getvalue().splitlines()
  progress.reset_clock(1)  # after the first step's compilation line
  now[0] = 29.9
  assert not progress.tick(3) and not lines()
  now[0] = 30.0
  waited = []
  assert progress.tick(4, wait=lambda: waited.append(True))
  assert waited == [True]  # the dispatched steps are counted once run
  assert lines() == ['step 4/100 | 0.10 steps/s 1 img/s | ETA 0:16:00']
  # Each line, a log point's or an evaluation's, starts the 30 s again.
  now[0] = 40.0
  progress.log(5, loss=1.25)
  assert lines()[-1].startswith('step 5/100 | loss 1.25 | ')
  now[0] = 69.9
  assert not progress.tick(6)
  now[0] = 75.0
  progress.reset_clock(7)  # after an evaluation's line
  now[0] = 104.9
  assert not progress.tick(8)
  now[0] = 105.0
  assert progress.tick(9) and len(lines()) == 3


class _Stamped:
  """A stream recording when and from which thread each line came."""

  def __init__(self):
    self.lines = []

  def write(self, text):
    if text.strip():
      self.lines.append((text.strip(), time.perf_counter(),
                         threading.current_thread() is threading.main_thread()))

  def flush(self):
    pass


def test_ctrl_c_is_acknowledged_while_the_main_thread_is_inside_xla():
  """Python runs its signal handler only when the main thread is back in
  the interpreter: the acknowledgement must not wait for that."""
  @jax.jit
  def slow(x, n):
    return jax.lax.fori_loop(0, n, lambda i, y: jnp.tanh(y @ y), x)
  x = jnp.full((256, 256), 0.01, jnp.float32)
  jax.block_until_ready(slow(x, 1))  # compiled
  t = time.perf_counter()
  jax.block_until_ready(slow(x, 20))
  n = max(20, int(20 * 2.0 / max(time.perf_counter() - t, 1e-6)))  # ~2 s
  stream = _Stamped()
  stop = console.StopRequest(stream=stream)
  stop.__enter__()
  try:
    stop.step = 7
    threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
    jax.block_until_ready(slow(x, n))
    returned = time.perf_counter()
    time.sleep(0.1)  # the Python handler runs now at the latest
  finally:
    stop.__exit__()
  assert stop.signal == signal.SIGINT
  [(line, when, main)] = stream.lines
  assert line == ('stopping (SIGINT): saving step 7 when it finishes; '
                  'Ctrl-C again stops without saving it ...')
  assert when < returned and not main


_MOCK_TRAIN = (
    'import sys\n'
    'import tensorflow_datasets as tfds\n'
    'from absl import app\n'
    'from configs import common as configs\n'
    'from experiments import common, train\n'
    '# TFDS cifar10 on mock data, as tests/conftest.py does.\n'
    'configs.dataset_and_dir = lambda prepared, name: (name, None)\n'
    'with tfds.testing.mock_data(num_examples=24):\n'
    '  app.run(train.main, argv=sys.argv, flags_parser=common.parse_flags)\n')


def test_ctrl_c_of_the_cli_says_stopping_and_exits_130(tmp_path):
  wd = tmp_path / 'run'
  args = endless_lenet5_args(wd)
  proc = subprocess.Popen([sys.executable, '-c', _MOCK_TRAIN, *args],
                          cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env={
                              k: v for k, v in os.environ.items()
                              if k != 'TFDS_DATA_DIR'})
  try:
    out = []
    while not any('compiled and ran the first step' in l for l in out):
      line = proc.stdout.readline()
      assert line, proc.communicate(timeout=60)[1][-3000:]
      out.append(line)
    assert out[0].startswith("loading cifar10 from TFDS's default folder")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 130, err[-3000:]
  assert 'Traceback' not in err
  acked = re.search(r'^stopping \(SIGINT\): saving step (\d+) when it '
                    'finishes', err, re.M)
  saved = re.search(r'^interrupted: SIGINT at step (\d+): checkpoint \1 '
                    'saved', err, re.M)
  assert acked and saved, err[-3000:]
  assert err.index(acked.group(0)) < err.index(saved.group(0))
  # The step named is the one in progress; the loop may have dispatched
  # another before the flag was read, never fewer.
  assert 1 <= int(acked.group(1)) <= int(saved.group(1))
  assert os.listdir(wd / 'checkpoints') == [saved.group(1)]


def test_errors_read_in_percent_on_the_console_as_in_the_tables():
  from cnn.training import metric_writers  # pylint: disable=g-import-not-at-top
  assert metric_writers.format_metrics({'error': 0.34125, 'loss': 1.0234,
                              'error_top5': 0.1}, ['error', 'error_top5',
                                                   'loss']) == (
                                                       'error 34.12% '
                                                       'error_top5 10.00% '
                                                       'loss 1.023')
  p = metric_writers.Progress(10, 0, 8)
  assert ' | error 6.25% lr 0.1 | ' in p.line(2, error=0.0625, lr=0.1)
