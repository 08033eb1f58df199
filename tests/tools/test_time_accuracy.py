"""Time to accuracy: the run clock, the TensorBoard fallback, the figure."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from cnn.errors import ConfigError
from cnn.tools import time_accuracy
from cnn import runs
from cnn.training import metric_writers
from tests.conftest import ROOT, small_config


def _events(path, stamps):
  """An event file with a 'test/error' scalar at each (step, wall_time)."""
  with tf.io.TFRecordWriter(path) as w:
    w.write(tf.compat.v1.Event(wall_time=stamps[0][1] - 1,
                               file_version='brain.Event:2')
            .SerializeToString())
    for step, t in stamps:
      e = tf.compat.v1.Event(wall_time=t, step=step)
      e.summary.value.add(tag='test/error', simple_value=0.5)
      w.write(e.SerializeToString())


def test_tensorboard_clock_leaves_out_the_gap_between_sittings(tmp_path):
  os.makedirs(tmp_path / 'tensorboard')
  # Sitting 1: 1 s a step; a 15-minute stop; sitting 2: 0.5 s a step.
  _events(str(tmp_path / 'tensorboard' / 'events.out.tfevents.1.a'),
          [(10, 100.0), (20, 110.0), (30, 120.0)])
  _events(str(tmp_path / 'tensorboard' / 'events.out.tfevents.2.b'),
          [(40, 1000.0), (50, 1005.0)])
  rows = [{'step': s, 'split': 'train', 'epoch': s / 10} for s in
          (10, 20, 30, 40, 50)] + [
              {'step': s, 'split': 'test', 'error': e}
              for s, e in ((20, 0.4), (50, 0.2))]
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    f.write(''.join(json.dumps(r) + '\n' for r in rows))
  secs = time_accuracy._tensorboard_seconds(str(tmp_path))  # pylint: disable=protected-access
  assert secs == {10: 10.0, 20: 20.0, 30: 30.0, 40: 35.0, 50: 40.0}
  pts, clock = time_accuracy.points(str(tmp_path))
  assert 'TensorBoard' in clock
  assert [(p.step, p.epoch, p.minutes * 60, p.error) for p in pts] == [
      (20, 2.0, 20.0, 0.4), (50, 5.0, 40.0, 0.2)]
  assert [(p.top5, p.train_error) for p in pts] == [(None, None)] * 2
  with pytest.raises(ConfigError, match='no val evaluation'):
    time_accuracy.points(str(tmp_path), 'val')
  with pytest.raises(ConfigError, match='typo holds no run'):
    time_accuracy.points(str(tmp_path / 'typo'))


def _script(*args):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  return subprocess.run([sys.executable, '-m', 'experiments.time_accuracy',
                         *args], cwd=str(ROOT), capture_output=True,
                        text=True, check=False)


def test_run_clock_and_the_command(tmp_path):
  wd = tmp_path / 'run'
  with tfds.testing.mock_data(num_examples=24):
    runs.train_and_evaluate(small_config(steps=4, tensorboard=False),
                            str(wd))
  pts, clock = time_accuracy.points(str(wd))
  assert 'run clock' in clock
  assert [p.step for p in pts] == [2, 4]
  assert 0 < pts[0].minutes < pts[1].minutes
  np.testing.assert_allclose([p.epoch for p in pts], [2 * 8 / 24, 4 * 8 / 24])
  # The training error of an evaluation: the mean of the training rows
  # logged since the one before.
  train = {r['step']: r['error'] for r in metric_writers.read_metrics(
      str(wd)) if r['split'] == 'train'}
  assert sorted(train) == [1, 2, 3, 4]
  np.testing.assert_allclose([p.train_error for p in pts],
                             [np.mean([train[1], train[2]]),
                              np.mean([train[3], train[4]])], rtol=1e-6)
  out = _script(f'--workdir={wd}', f'--out={tmp_path / "fig"}',
                '--mark=study,0.1,0.5,40')
  assert out.returncode == 0, out.stderr
  assert (tmp_path / 'fig' / 'time_accuracy.png').stat().st_size > 10_000
  assert '| 0.7 | 2 |' in (tmp_path / 'fig' / 'time_accuracy.md').read_text()
  two = _script(f'--workdir={wd},{wd}', f'--out={tmp_path / "two"}',
                '--paper=-1', '--goal=-1')
  assert two.returncode == 0, two.stderr
  assert (tmp_path / 'two' / 'time_accuracy.md').read_text().count(
      'Clock:') == 2
  bad = _script(f'--workdir={wd}', '--mark=study,0.1')
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines()[-1].startswith("error: --mark=")


def test_table_has_a_top5_column_only_where_the_run_has_top5():
  one = time_accuracy.Point(391, 1.0, 2.5, 0.5, None, 0.6)
  assert time_accuracy.table([one]).splitlines()[2] == (
      '| 1.0 | 391 | 2.5 | 50.00 | 60.00 |')
  five = time_accuracy.Point(391, 1.0, 2.5, 0.5, 0.25, None)
  lines = time_accuracy.table([five]).splitlines()
  assert 'top-5 test error %' in lines[0]
  assert lines[2] == '| 1.0 | 391 | 2.5 | 50.00 | 25.00 |  |'
