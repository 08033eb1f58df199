"""Run folders that cannot mix or lose runs: the config check on resume, the
lock, Ctrl-C, damaged logs, and one line for every failure."""
import errno
import json
import os
import signal
import subprocess
import sys

import pytest
import tensorflow_datasets as tfds

from cnn.errors import ConfigError, UserError
from cnn import runs
from cnn.training import batches, loop, metric_writers, run_folder
from tests.conftest import ROOT, SMALL_NUMERICS, metric_rows, small_config


def train(config, workdir, num_examples=24):
  with tfds.testing.mock_data(num_examples=num_examples):
    return runs.train_and_evaluate(config, str(workdir))


def lines(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return f.read().splitlines()


@pytest.fixture(scope='module')
def two_steps(tmp_path_factory):
  """A finished 2-step run and its files, to reuse (copy) in the tests."""
  wd = tmp_path_factory.mktemp('two')
  train(small_config('lenet5', steps=2), wd)
  return wd


def copy(src, dst):
  subprocess.run(['cp', '-r', str(src), str(dst)], check=True)
  return dst


def test_a_changed_config_is_refused_naming_every_field(two_steps, tmp_path):
  wd = copy(two_steps, tmp_path / 'run')
  before = (wd / 'config.json').read_text()
  c = small_config('lenet5', steps=4, batch_size=4, learning_rate=0.5, seed=7)
  with pytest.raises(ConfigError) as e:
    train(c, wd)
  message = str(e.value)
  assert '\n' not in message and 'step 2' in message
  for field in ('batch_size 8 -> 4', 'learning_rate 0.1 -> 0.5',
                'seed 0 -> 7'):
    assert field in message
  assert (wd / 'config.json').read_text() == before


def test_longer_run_and_cadence_are_allowed_only_when_the_past_stays(
    two_steps, tmp_path):
  # Step schedule with absolute milestones: steps 0-1 keep their rate.
  wd = copy(two_steps, tmp_path / 'longer')
  train(small_config('lenet5', steps=4, eval_every_steps=4,
                     log_every_steps=2), wd)
  assert json.loads((wd / 'config.json').read_text())['num_train_steps'] == 4
  # Cosine over the run: a longer run changes the rates already used.
  wd = tmp_path / 'cosine'
  train(small_config('lenet5', steps=2, lr_schedule='cosine'), wd)
  with pytest.raises(ConfigError, match='changes the learning rate'):
    train(small_config('lenet5', steps=4, lr_schedule='cosine'), wd)
  # Milestones as fractions of the run move with its length.
  c = small_config('lenet5', steps=2, lr_milestone_fractions=(0.5,))
  c.lr_milestones = ()
  wd = tmp_path / 'fractions'
  train(c, wd)
  c.num_train_steps = 4
  with pytest.raises(ConfigError, match='num_train_steps 2 -> 4'):
    train(c, wd)


def test_a_rerun_that_trains_nothing_keeps_config_json(two_steps, tmp_path):
  wd = copy(two_steps, tmp_path / 'done')
  before = (wd / 'config.json').read_text()
  records = lines(wd)
  train(small_config('lenet5', steps=2, eval_every_steps=1), wd)
  assert (wd / 'config.json').read_text() == before
  assert lines(wd) == records


def test_milestone_fractions_follow_the_length_of_the_run():
  from cnn.training import optim  # pylint: disable=g-import-not-at-top
  c = small_config(lr_milestone_fractions=(0.5, 0.75), steps=40)
  c.lr_milestones = ()
  sched = optim.make_schedule(c)
  assert [round(float(sched(s)), 6) for s in (19, 20, 29, 30)] == [
      0.1, 0.01, 0.01, 0.001]
  c.lr_milestones = (3,)
  with pytest.raises(ConfigError, match='lr_milestone_fractions'):
    optim.validate(c)


def test_a_second_process_on_the_workdir_is_refused_by_pid(tmp_path):
  wd = tmp_path / 'run'
  os.makedirs(wd)
  with run_folder.lock(str(wd)):
    with pytest.raises(run_folder.WorkdirInUse,
                       match=f'in use by pid {os.getpid()}'):
      train(small_config('lenet5', steps=2), wd)
    # Another process sees the same lock.
    code = ('import sys; from cnn.training import run_folder\n'
            'try:\n  run_folder.lock(sys.argv[1]).__enter__()\n'
            'except run_folder.WorkdirInUse as e:\n  print(e)\n')
    out = subprocess.run([sys.executable, '-c', code, str(wd)], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert f'in use by pid {os.getpid()}' in out
  # Released with the holder (a dead process releases it too: flock).
  with run_folder.lock(str(wd)):
    pass


def test_one_bad_line_in_metrics_jsonl_loses_nothing_else(two_steps,
                                                          tmp_path, capsys):
  wd = copy(two_steps, tmp_path / 'bad')
  good = lines(wd)
  damaged = good[:1] + ['{"step": 1, "spl'] + good[1:]
  (wd / 'metrics.jsonl').write_text('\n'.join(damaged) + '\n')
  assert metric_writers.read_metrics(str(wd)) == [json.loads(l) for l in good]
  train(small_config('lenet5', steps=4), wd)
  after = lines(wd)
  assert after[:len(good)] == good  # every valid record kept
  assert 'skipped 1 unreadable line' in capsys.readouterr().out


def test_ctrl_c_saves_the_step_and_the_resumed_run_is_exact(tmp_path,
                                                            monkeypatch):
  straight, parts = tmp_path / 'straight', tmp_path / 'parts'
  c = small_config('lenet5', steps=6, log_every_steps=2,
                   checkpoint_every_steps=6, eval_every_steps=6)
  train(c, straight)
  indices = batches.TrainBatches.indices

  def ctrl_c_during_step_3(self, step):
    if step == 3:  # the batch of step 4 is read while step 3 runs
      signal.raise_signal(signal.SIGINT)
    return indices(self, step)
  monkeypatch.setattr(batches.TrainBatches, 'indices',
                      ctrl_c_during_step_3)
  with pytest.raises(loop.Interrupted, match='step 3') as e:
    train(c, parts)
  assert '\n' not in str(e.value)
  # Step 3 is half a log window (2 steps): the window is saved with it.
  assert sorted(os.listdir(parts / 'checkpoints')) == ['3']
  monkeypatch.setattr(batches.TrainBatches, 'indices', indices)
  train(c, parts)
  assert metric_rows(parts) == metric_rows(straight)


def test_disk_full_is_one_line_and_keeps_the_checkpoints(tmp_path,
                                                         monkeypatch):
  wd = tmp_path / 'run'
  c = small_config('lenet5', steps=4, log_every_steps=1)
  write = metric_writers.MetricWriter.write

  def full_after_step_2(self, step, split, **values):
    if step > 2:
      raise OSError(errno.ENOSPC, 'No space left on device')
    write(self, step, split, **values)
  monkeypatch.setattr(metric_writers.MetricWriter, 'write', full_after_step_2)
  with pytest.raises(UserError, match='disk full') as e:
    train(c, wd)
  assert '\n' not in str(e.value) and 'step 2' in str(e.value)
  assert '2' in os.listdir(wd / 'checkpoints')


def test_bad_workdirs_and_config_json_are_one_line(two_steps, tmp_path):
  a_file = tmp_path / 'file'
  a_file.write_text('x')
  with pytest.raises(UserError, match='is a file'):
    train(small_config('lenet5', steps=2), a_file)
  wd = copy(two_steps, tmp_path / 'broken')
  (wd / 'config.json').write_text('{"model": ')
  with pytest.raises(ConfigError, match='not valid JSON'):
    with tfds.testing.mock_data(num_examples=24):
      runs.evaluate_checkpoint(str(wd))
  from cnn.tools import plotting  # pylint: disable=g-import-not-at-top
  with pytest.raises(ConfigError, match='not valid JSON'):
    plotting.load_runs(str(tmp_path))
  from cnn.errors import CheckpointError  # pylint: disable=g-import-not-at-top
  with pytest.raises(CheckpointError, match="'last' is not latest, best"):
    with tfds.testing.mock_data(num_examples=24):
      runs.evaluate_checkpoint(str(two_steps), checkpoint='last')


def _cli(*args, timeout=300):
  return subprocess.run([sys.executable, '-m', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout,
                        check=False)


def test_command_line_mistakes_are_one_line(tmp_path):
  proc = _cli('experiments.train', '--config=configs/cifar10.py:lenet5',
              f'--workdir={tmp_path / "r"}', '--config.batch_size=abc')
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert errors == ["error: bad --config override: --config.batch_size=abc: "
                    "'abc' is not an int, like its value 128"]
  assert not (tmp_path / 'r').exists()
  proc = _cli('experiments.benchmark', '--config=configs/cifar10.py:lenet5',
              '--batch_size=0')
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith(
      'error: --batch_size, --eval_batch_size and --steps must be positive')
  # A reader that stops early (`| head`) is no error.
  summary = subprocess.Popen(
      [sys.executable, '-m', 'cnn.tools.summary', 'vgg_d'], cwd=ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  first = summary.stdout.readline()
  summary.stdout.close()  # what `head -1` does
  _, err = summary.communicate(timeout=300)
  assert first and summary.returncode == 0 and 'Traceback' not in err


def test_an_unreadable_init_from_checkpoint_names_another_step(two_steps,
                                                               tmp_path):
  from cnn.errors import CheckpointError  # pylint: disable=g-import-not-at-top
  src = copy(two_steps, tmp_path / 'pre')
  train(small_config('lenet5', steps=4), src)  # checkpoints 2 and 4
  for root, _, files in os.walk(src / 'checkpoints' / '4' / 'state'):
    for name in files:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'garbage')
  c = small_config('lenet5', steps=2, init_from=str(src))
  with pytest.raises(CheckpointError) as e:
    train(c, tmp_path / 'fine_tune')
  message = str(e.value)
  assert '\n' not in message and 'unreadable' in message
  assert f'--config.init_from={src}:2' in message


def test_a_field_added_later_at_its_neutral_value_is_no_change(two_steps,
                                                                tmp_path):
  wd = copy(two_steps, tmp_path / 'old_run')
  saved = json.loads((wd / 'config.json').read_text())
  del saved['label_smoothing'], saved['lr_milestone_fractions']
  (wd / 'config.json').write_text(json.dumps(saved))  # an older version's
  train(small_config('lenet5', steps=4), wd)  # resumes
  # (the resumed run recorded the field: a real change is still refused)
  with pytest.raises(ConfigError, match='label_smoothing 0.0 -> 0.1'):
    train(small_config('lenet5', steps=6, label_smoothing=0.1), wd)


def test_the_numerics_are_recorded_and_a_change_on_resume_is_said(
    two_steps, tmp_path, capsys):
  """Issue 34: the step's numerics (once environment variables, which
  config.json did not record and a resume could not see change) are config
  fields: in config.json, a change on resume said; a run recorded before
  the fields resumes at their default, 'auto', without a word."""
  wd = copy(two_steps, tmp_path / 'run')
  saved = json.loads((wd / 'config.json').read_text())
  assert {k: saved[k] for k in runs.NUMERICS} == {'conv': 'auto',
                                                  **SMALL_NUMERICS}
  capsys.readouterr()
  train(small_config('lenet5', steps=4, xla_cpu_fusion='off'), wd)
  out = capsys.readouterr().out
  assert ("resuming with xla_cpu_fusion 'on' -> 'off' (the steps from here "
          'differ by float32 rounding') in out
  old = copy(two_steps, tmp_path / 'old_run')
  for field in runs.NUMERICS:
    del saved[field]
  (old / 'config.json').write_text(json.dumps(saved))  # an older version's
  auto = {k: 'auto' for k in runs.NUMERICS}
  train(small_config('lenet5', steps=4, **auto), old)
  out = capsys.readouterr().out
  assert 'resuming from step 2' in out
  assert not any(f'resuming with {f} ' in out for f in runs.NUMERICS), out


def test_a_resumed_run_keeps_its_conv_chunks_whatever_the_machine_plan(
    tmp_path, monkeypatch):
  """Issue 36, silent 1: a run stopped, the machine-wide chunk plan then
  rewritten by another process's measurement, and the run resumed: it keeps
  the chunk counts it recorded (numerics.json) and ends with the numbers of
  an uninterrupted run."""
  from cnn.ops import conv  # pylint: disable=g-import-not-at-top
  plan = tmp_path / 'conv_plan.json'
  monkeypatch.setenv(conv.ENV_PLAN, str(plan))
  # The measurement, without timing anything: one chunk wins.
  monkeypatch.setattr(conv, 'measure_chunks',
                      lambda *a, **k: {1: 1.0, 8: 2.0})
  straight, parts, fresh = (tmp_path / n for n in ('straight', 'parts',
                                                    'fresh'))
  train(small_config(steps=4, conv='xla', conv_weight_grad='auto'), straight)
  measured = json.loads(plan.read_text())[conv.machine_key()]
  assert measured and {e['chunks'] for e in measured.values()} == {1}
  train(small_config(steps=2, conv='xla', conv_weight_grad='auto'), parts)
  record = json.loads((parts / 'numerics.json').read_text())
  assert record == {'conv_weight_grad_chunks': {k: 1 for k in measured}}
  # Another worker measures the same shapes and writes 8 chunks.
  rewritten = json.loads(plan.read_text())
  for entry in rewritten[conv.machine_key()].values():
    entry['chunks'] = 8
  plan.write_text(json.dumps(rewritten))
  train(small_config(steps=4, conv='xla', conv_weight_grad='auto'), parts)
  assert metric_rows(parts) == metric_rows(straight)
  assert _same_params(parts, straight, 4)
  assert json.loads((parts / 'numerics.json').read_text()) == record
  # The rewritten plan does change the numbers: a fresh run takes it.
  train(small_config(steps=2, conv='xla', conv_weight_grad='auto'), fresh)
  assert json.loads((fresh / 'numerics.json').read_text()) == {
      'conv_weight_grad_chunks': {k: 8 for k in measured}}
  assert not _same_params(fresh, straight, 2)


def _same_params(a, b, step: int) -> bool:
  """Whether two runs' parameters at checkpoint `step` are bitwise equal."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cnn.training import checkpointing  # pylint: disable=g-import-not-at-top
  trees = []
  for wd in (a, b):
    ckpt = checkpointing.Checkpointer(str(wd / 'checkpoints'), read_only=True)
    try:
      trees.append(jax.device_get(ckpt.restore_tree(step)['params']))
    finally:
      ckpt.close()
  return all(np.array_equal(x, y) for x, y in zip(
      jax.tree.leaves(trees[0]), jax.tree.leaves(trees[1])))


def test_a_missing_config_json_still_refuses_a_changed_config(two_steps,
                                                              tmp_path):
  """Issue 36, silent 2: config.json deleted, then a resume with another
  learning rate. The checkpoint carries the config: refused, nothing
  written; the same config resumes and config.json is written again."""
  wd = copy(two_steps, tmp_path / 'run')
  records = lines(wd)
  os.remove(wd / 'config.json')
  with pytest.raises(ConfigError) as e:
    train(small_config('lenet5', steps=4, learning_rate=0.05), wd)
  assert '\n' not in str(e.value)
  assert 'learning_rate 0.1 -> 0.05' in str(e.value)
  assert lines(wd) == records and not (wd / 'config.json').exists()
  # A checkpoint written before checkpoints carried the config: refused.
  old = copy(wd, tmp_path / 'old')
  meta = old / 'checkpoints' / '2' / 'meta' / 'metadata'
  meta.write_text(json.dumps({k: v for k, v in json.loads(
      meta.read_text()).items() if k != 'config'}))
  with pytest.raises(ConfigError, match='^.*config.json is missing and '
                     'checkpoint 2 does not carry its config: restore'):
    train(small_config('lenet5', steps=4), old)
  train(small_config('lenet5', steps=4), wd)
  assert json.loads((wd / 'config.json').read_text())['learning_rate'] == 0.1
  lrs = [r['learning_rate'] for r in metric_rows(wd) if r['split'] == 'train']
  assert len(lrs) == 4 and lrs == pytest.approx([0.1] * 4)


def test_a_closed_stdout_neither_stops_nor_silently_ends_training(tmp_path):
  """Issue 36, silent 3: `train ... | head -n 3`. The run trains to its
  end, writing metrics.jsonl and checkpoints; the console lines after the
  pipe closed are dropped, and stderr says so."""
  wd = tmp_path / 'run'
  script = (
      'import sys\n'
      'import tensorflow_datasets as tfds\n'
      'from absl import app\n'
      'from configs import common as configs\n'
      'from experiments import common, train\n'
      '# TFDS cifar10 on mock data, as tests/conftest.py does.\n'
      'configs.dataset_and_dir = lambda prepared, name: (name, None)\n'
      'with tfds.testing.mock_data(num_examples=24):\n'
      '  app.run(train.main, argv=sys.argv, flags_parser=common.parse_flags)\n')
  args = ['--config=configs/plain_vs_resnet.py:local', f'--workdir={wd}',
          '--config.num_train_steps=6', '--config.log_every_steps=1']
  proc = subprocess.run(
      ['bash', '-c', '"$@" | head -n 3; exit "${PIPESTATUS[0]}"', 'bash',
       sys.executable, '-c', script, *args],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert max(r['step'] for r in metric_rows(wd)) == 6
  assert {r['split'] for r in metric_rows(wd) if r['step'] == 6} == {
      'train', 'test'}
  assert '6' in os.listdir(wd / 'checkpoints')
  assert len(proc.stdout.splitlines()) == 3
  assert 'stdout closed' in proc.stderr and 'Traceback' not in proc.stderr


def test_a_negative_seed_is_one_line_on_every_task():
  """Issue 36: `--config.seed=-1` was a traceback (numpy's seeding) on
  every task; the loop's config check refuses it first."""
  from cnn import tasks  # pylint: disable=g-import-not-at-top
  from configs import detection, localization  # pylint: disable=g-import-not-at-top
  for c in (small_config('lenet5'), detection.get_config('fast_rcnn,local'),
            localization.get_config('local')):
    c.seed = -1
    with pytest.raises(ConfigError) as e:
      runs.validate_config(c, tasks.get(c))
    assert str(e.value) == ('seed=-1 must be an integer in [0, 2**31), e.g. '
                            '--config.seed=0')


def test_milestones_beyond_the_run_are_said_on_stderr(tmp_path, capsys):
  """Issue 36, silent 4: cifar10.py's milestones at 32k and 48k in a short
  run never fire; the run says so when it starts (stdout keeps to its
  progress lines)."""
  train(small_config('lenet5', steps=2), tmp_path / 'run')
  out, err = capsys.readouterr()
  assert ('schedule: lr_milestones 32000, 48000 lie at or beyond '
          'num_train_steps=2') in err
  assert 'schedule:' not in out


def test_a_run_recorded_before_fields_were_declared_loads_and_resumes(
    two_steps, tmp_path, capsys):
  """Issue 34: the config.json of a run from before configs/ declared the
  fields the library read with defaults of its own (crop_area, image_size,
  decay_bn_and_bias, keep_checkpoints, ...) and before config.task loads
  with their values then (run_folder.RECORD_DEFAULTS), evaluates, and
  resumes without a change said."""
  wd = copy(two_steps, tmp_path / 'old_run')
  saved = json.loads((wd / 'config.json').read_text())
  table = {**run_folder.RECORD_DEFAULTS[''],
           **run_folder.RECORD_DEFAULTS['classification']}
  # An older version wrote none of the fields at the value then read.
  gone = {k for k, v in table.items() if saved.get(k) == v} | {'task'}
  assert {'crop_area', 'image_size', 'decay_bn_and_bias', 'warmup', 'pad',
          'keep_checkpoints', 'conv', 'model_kwargs', 'in_memory'} <= gone
  old = {k: v for k, v in saved.items() if k not in gone}
  (wd / 'config.json').write_text(json.dumps(old))
  assert run_folder.complete(old) == saved
  config = runs.load_config(str(wd))
  assert run_folder.as_json(config) == saved
  with tfds.testing.mock_data(num_examples=24):
    result = runs.evaluate_checkpoint(str(wd), 'test')
  assert result['step'] == 2 and 0.0 <= result['error'] <= 1.0
  capsys.readouterr()
  train(small_config('lenet5', steps=4), wd)
  out = capsys.readouterr().out
  notes = [l for l in out.splitlines() if l.startswith('resuming with')]
  assert 'resuming from step 2' in out, out
  assert notes == ['resuming with num_train_steps 2 -> 4'], notes
  assert json.loads((wd / 'config.json').read_text())['num_train_steps'] == 4


def test_the_committed_fig6_records_resume_with_todays_config():
  """results/plain_vs_resnet_fig6/runs: recorded before crop_area,
  image_size and three numerics fields were declared; today's fig6 member
  config (the record's model, seed, data and log cadence) is no change."""
  from configs import plain_vs_resnet  # pylint: disable=g-import-not-at-top
  paths = sorted((ROOT / 'results' / 'plain_vs_resnet_fig6' / 'runs').glob(
      '*/config.json'))
  assert paths
  lacking = set()  # the fields some record predates
  for path in paths:
    saved = json.loads(path.read_text())
    lacking |= {k for k in ('crop_area', 'xla_cpu_fusion') if k not in saved}
    c = plain_vs_resnet.get_config('fig6')
    for k in ('model', 'seed', 'dataset', 'data_dir', 'log_every_steps'):
      c[k] = saved[k]
    assert run_folder.resume_check(saved, c, 391) == [], path
  assert lacking == {'crop_area', 'xla_cpu_fusion'}
