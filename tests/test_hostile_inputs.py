"""Hostile inputs (issue 36): damaged records, bad flags and paths end in
one line naming the fix, never a traceback, and lose nothing computed."""
import json
import math
import os
import signal
import subprocess
import sys
import types

import pytest
import tensorflow_datasets as tfds

from cnn.errors import ConfigError, UserError
from cnn.training import metric_writers
from cnn.training import run_folder
from tests.conftest import ROOT, endless_lenet5_args, small_config


def _lines(workdir) -> list[str]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return f.read().splitlines()


def test_a_nan_is_written_as_null_and_read_back_as_nan(tmp_path):
  w = metric_writers.MetricWriter(str(tmp_path), tensorboard=False)
  w.write(1, 'train', loss=float('nan'), error=float('inf'),
          learning_rate=0.1)
  w.close()
  line, = _lines(tmp_path)
  record = json.loads(line, parse_constant=lambda c: pytest.fail(
      f'metrics.jsonl holds the non-JSON token {c}'))
  assert record['loss'] is None and record['error'] is None
  r, = metric_writers.read_metrics(str(tmp_path))
  assert math.isnan(r['loss']) and math.isnan(r['error'])
  assert r['learning_rate'] == 0.1
  # A resume rewrites the kept records: still standard JSON.
  metric_writers.MetricWriter(str(tmp_path), resume_step=1,
                              tensorboard=False).close()
  assert json.loads(_lines(tmp_path)[0])['loss'] is None


def test_the_readers_take_null_as_a_missing_number(tmp_path):
  from cnn.tools import sweeps  # pylint: disable=g-import-not-at-top
  from cnn.tools import time_accuracy  # pylint: disable=g-import-not-at-top
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    f.write('{"step": 2, "split": "train", "loss": null, "error": null, '
            '"epoch": 0.5, "wall_seconds": 1.0}\n')
    f.write('{"step": 2, "split": "test", "loss": null, "error": null, '
            '"wall_seconds": 2.0}\n')
  row = sweeps.summary_row(str(tmp_path), 'm', 4)
  assert math.isnan(row['train']) and math.isnan(row['held_out'])
  assert '-' in sweeps.format_table([row])
  pts, _ = time_accuracy.points(str(tmp_path))
  assert math.isnan(pts[0].error) and math.isnan(pts[0].train_error)


@pytest.mark.parametrize('line,what', [
    ('{"step": "2", "split": "train", "loss": 1.0}', "step '2'"),
    ('{"step": 2, "split": 3, "loss": 1.0}', 'split 3'),
    ('{"step": 2, "split": "train", "loss": "1.0"}', "loss '1.0'"),
])
def test_a_record_of_the_wrong_types_is_one_line(tmp_path, line, what):
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    f.write('{"step": 1, "split": "train", "loss": 1.0}\n' + line + '\n')
  with pytest.raises(ConfigError) as e:
    metric_writers.read_metrics(str(tmp_path))
  message = str(e.value)
  assert 'metrics.jsonl line 2' in message and what in message
  assert 'fix or delete that line' in message and '\n' not in message
  # A resume refuses too, and leaves the file as it was (nothing lost).
  with pytest.raises(ConfigError):
    metric_writers.MetricWriter(str(tmp_path), resume_step=2,
                                tensorboard=False)
  assert _lines(tmp_path)[1] == line


def test_a_config_json_that_is_not_an_object_is_one_line(tmp_path):
  (tmp_path / 'config.json').write_text('[1, 2]')
  with pytest.raises(ConfigError, match='holds a JSON list'):
    run_folder.read_config(str(tmp_path))


@pytest.mark.parametrize('field,value', [
    ('lr_milestones', ('abc',)), ('lr_milestones', (1.5,)),
    ('lr_milestones', (-1,)), ('lr_milestone_fractions', ('x',))])
def test_milestones_that_are_not_steps_are_refused_before_data(field, value):
  from cnn import tasks  # pylint: disable=g-import-not-at-top
  from cnn import runs  # pylint: disable=g-import-not-at-top
  c = small_config(lr_schedule='step', warmup_steps=0)
  with c.unlocked():
    c.lr_milestones, c.lr_milestone_fractions = (), ()
    c[field] = value
  with pytest.raises(ConfigError, match=field):
    runs.validate_config(c, tasks.get(c))


def test_a_picture_into_a_missing_folder_is_drawn_there(tmp_path,
                                                        monkeypatch):
  from cnn import runs  # pylint: disable=g-import-not-at-top

  def picture(model, variables, data, path):
    del model, variables, data
    with open(path, 'wb') as f:
      f.write(b'png')

  run = types.SimpleNamespace(
      data=types.SimpleNamespace(train=None, evals={'test': None}),
      evaluate=lambda state, split, final, ema: {'error': 0.5},
      task=types.SimpleNamespace(picture=picture, name='fake',
                                 eval_keys=('error',)),
      model=None)
  state = types.SimpleNamespace(variables={})
  monkeypatch.setattr(runs, 'restore_run', lambda *a: (run, state, 3))
  png = tmp_path / 'new' / 'folder' / 'p.png'
  r = runs.evaluate_checkpoint(str(tmp_path), picture=str(png))
  assert r['error'] == 0.5 and png.read_bytes() == b'png'


def test_a_picture_that_cannot_be_written_is_refused_before_evaluating(
    tmp_path, monkeypatch):
  from cnn import runs  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(runs, 'restore_run',
                      lambda *a: pytest.fail('evaluated first'))
  (tmp_path / 'a_file').write_text('')
  with pytest.raises(ConfigError, match='not a writable folder'):
    runs.evaluate_checkpoint(str(tmp_path),
                             picture=str(tmp_path / 'a_file' / 'p.png'))
  with pytest.raises(ConfigError, match='is a folder'):
    runs.evaluate_checkpoint(str(tmp_path), picture=str(tmp_path))


def _script(*args) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  return subprocess.run([sys.executable, '-m', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300,
                        check=False)


def test_a_missing_config_file_is_one_line(tmp_path):
  p = _script('experiments.train', '--config=configs/nope.py',
              f'--workdir={tmp_path / "run"}')
  assert p.returncode == 2, p.stderr
  assert p.stderr.strip().splitlines() == [p.stderr.strip()]
  assert 'no config file configs/nope.py' in p.stderr
  assert 'configs/cifar10.py' in p.stderr
  assert 'configs/common.py' not in p.stderr  # no get_config there
  assert not (tmp_path / 'run').exists()


def test_proposals_names_its_own_data_dir_flag(tmp_path):
  p = _script('experiments.proposals', '--dataset=no_such_dataset',
              f'--data_dir={tmp_path}')
  assert p.returncode == 1, p.stderr
  assert '--data_dir=DIR' in p.stderr, p.stderr
  assert '--config.data_dir' not in p.stderr
  assert 'Traceback' not in p.stderr



def test_a_checkpoints_folder_that_cannot_be_written_is_one_line_first(
    tmp_path, monkeypatch):
  """Orbax's asynchronous save failed there with four tracebacks, then the
  process hung; now the run refuses before it trains a step."""
  from cnn.errors import CheckpointError  # pylint: disable=g-import-not-at-top
  from cnn.training import checkpointing  # pylint: disable=g-import-not-at-top
  from cnn import runs  # pylint: disable=g-import-not-at-top
  blocked = tmp_path / 'a_file'
  blocked.write_text('')
  with pytest.raises(CheckpointError, match='cannot write checkpoints in'):
    checkpointing.Checkpointer(str(blocked / 'checkpoints'))
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'checkpoints').write_text('not a folder')
  monkeypatch.setattr(runs.Run, 'train_step',
                      lambda *a: pytest.fail('trained a step'),
                      raising=False)
  with tfds.testing.mock_data(num_examples=24), pytest.raises(
      CheckpointError, match='choose another --workdir'):
    runs.train_and_evaluate(small_config(), str(workdir))
  assert (workdir / 'checkpoints').read_text() == 'not a folder'


def test_orbax_s_disk_full_tracebacks_are_dropped_for_the_loop_s_line():
  """On a full disk orbax's save threads logged four tracebacks (two whose
  message says nothing of the disk) before the loop's one line; only those
  go, any other error of orbax's still shows."""
  import logging  # pylint: disable=g-import-not-at-top
  from cnn.training import checkpointing  # pylint: disable=g-import-not-at-top

  def record(message, exc=None):
    exc_info = (type(exc), exc, None) if exc else None
    return logging.LogRecord('absl', logging.ERROR, __file__, 1, message,
                             None, exc_info)

  full = ValueError('RESOURCE_EXHAUSTED: Failed to write 43461 bytes to '
                    'file 9: No space left on device')
  wrapped = RuntimeError('Save Finalize thread (save_finalize) failed.')
  wrapped.__cause__ = full
  quiet = checkpointing._FILTER  # pylint: disable=protected-access
  assert not quiet.filter(record(f'_SignalingThread.run() raised: {full}'))
  assert not quiet.filter(record('Save Finalize thread failed.', wrapped))
  assert quiet.filter(record('Save Finalize thread failed.',
                             ValueError('permission denied')))
  assert quiet.filter(record('some other orbax error'))


@pytest.mark.parametrize('keep', [0.5, 0.97])
def test_a_truncated_proposal_cache_is_recomputed(tmp_path, keep):
  """A cut .npz (a kill mid-copy, a full disk) is a damaged zip: np.load
  raised zipfile.BadZipFile through the detection run's start."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cnn.tasks.detection import proposals  # pylint: disable=g-import-not-at-top
  images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3),
                                             dtype=np.uint8)
  cache = tmp_path / 'random.npz'
  boxes, counts = proposals.compute(images, 'random', 20, cache=str(cache))
  whole = cache.read_bytes()
  cache.write_bytes(whole[:int(len(whole) * keep)])
  again, again_counts = proposals.compute(images, 'random', 20,
                                          cache=str(cache))
  np.testing.assert_array_equal(again, boxes)
  np.testing.assert_array_equal(again_counts, counts)
  assert cache.read_bytes() == whole  # rewritten whole


def test_a_size_that_is_not_a_number_is_one_line():
  p = _script('experiments.overfeat_benchmark', '--sizes=231,abc')
  assert p.returncode == 1, p.stderr
  assert p.stderr.strip().splitlines() == [
      "error: --sizes=231,abc: 'abc' is not a whole number; give whole "
      'numbers separated by commas, e.g. --sizes=231,295,359']


def _without_root_s_override() -> list[str]:
  """A command prefix under which the file modes hold for this user: none
  for a user, `setpriv` dropping CAP_DAC_OVERRIDE for root (who may write
  read-only files and folders otherwise)."""
  import shutil  # pylint: disable=g-import-not-at-top
  if os.geteuid() != 0:
    return []
  if not shutil.which('setpriv'):
    pytest.skip('root without setpriv: read-only modes do not hold')
  caps = '-dac_override,-dac_read_search'
  return ['setpriv', f'--bounding-set={caps}', f'--inh-caps={caps}']


def _script_as_user(*args, timeout=300) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  return subprocess.run([*_without_root_s_override(), sys.executable, '-m',
                         *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout, check=False)


def test_a_transfer_study_folder_that_is_a_file_or_read_only_is_one_line(
    tmp_path):
  a_file = tmp_path / 'a_file'
  a_file.write_text('mine')
  read_only = tmp_path / 'read_only'
  read_only.mkdir(mode=0o555)
  for workdir, why in ((a_file, 'is a file, not a folder'),
                       (read_only, 'cannot be written (Permission denied)')):
    p = _script_as_user('experiments.transfer_study', f'--workdir={workdir}',
                        '--quick')
    assert p.returncode == 1, p.stderr
    assert p.stderr.strip().splitlines() == [
        f'error: --workdir={workdir} {why}; choose '
        + ('another --workdir' if workdir == a_file
           else 'a folder you can write')], p.stderr
    assert not p.stdout  # before the first cell
  assert a_file.read_text() == 'mine' and not os.listdir(read_only)
  p = _script('experiments.transfer_study', f'--workdir={tmp_path / "new"}',
              f'--source={tmp_path}', '--sizes=100,a')
  assert p.returncode == 1 and p.stderr.strip().splitlines() == [
      "error: --sizes=100,a: 'a' is not a whole number; give whole numbers "
      'separated by commas, e.g. --sizes=100,1000'], p.stderr
  assert not (tmp_path / 'new').exists()


_MOCK_EVALUATE = (
    'import tensorflow_datasets as tfds\n'
    'from experiments import common, evaluate\n'
    'with tfds.testing.mock_data(num_examples=24):\n'
    '  common.main(evaluate.main)\n')


def test_evaluate_into_a_closed_stdout_ends_quietly(tmp_path):
  """`evaluate ... | true`: the results line meets a closed pipe (at the
  interpreter's last flush where stdout is buffered, as it is for a pipe:
  'Exception ignored ... Broken pipe', status 120; at the print itself with
  PYTHONUNBUFFERED: a traceback)."""
  from cnn import runs  # pylint: disable=g-import-not-at-top
  wd = tmp_path / 'run'
  with tfds.testing.mock_data(num_examples=24):
    runs.train_and_evaluate(small_config('lenet5', steps=2), str(wd))
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='')
  proc = subprocess.Popen(
      [sys.executable, '-c', _MOCK_EVALUATE, f'--workdir={wd}'], cwd=ROOT,
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  proc.stdout.close()  # what `| true` does
  err = proc.communicate(timeout=300)[1]
  assert proc.returncode == 0, err
  assert 'Traceback' not in err and 'Broken pipe' not in err, err


@pytest.mark.parametrize('cut', ['half the arrays', 'every file'])
def test_an_unreadable_checkpoint_is_its_one_line_only(tmp_path, capfd,
                                                       monkeypatch, cut):
  """Orbax closed its event loop at the first array that failed to read,
  with the other reads still in flight: each then completed into the closed
  loop ('RuntimeError: Event loop is closed', or the read's own error, a
  traceback apiece: 139 after the one line of `init_from` a truncated
  checkpoint). A race, hence thirty tries."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cnn.errors import CheckpointError  # pylint: disable=g-import-not-at-top
  from cnn.training import checkpointing  # pylint: disable=g-import-not-at-top
  unraised = []
  monkeypatch.setattr(sys, 'unraisablehook', unraised.append)
  rng = np.random.default_rng(0)
  saver = checkpointing.Checkpointer(str(tmp_path))
  saver.save(1, {'params': {f'w{i:02d}': rng.random((64, 64), np.float32)
                            for i in range(40)}}, {'model': 'm'})
  saver.close()
  for root, _, files in os.walk(tmp_path / '1' / 'state'):
    for name in files:
      path = os.path.join(root, name)
      if os.path.basename(root) != 'd':
        continue
      if cut == 'every file':  # its metadata cannot be read either
        os.truncate(path, 7)
      elif os.path.getsize(path) > 10000:  # the arrays' data
        os.truncate(path, os.path.getsize(path) // 2)
  reader = checkpointing.Checkpointer(str(tmp_path), read_only=True)
  capfd.readouterr()
  for _ in range(30):
    with pytest.raises(CheckpointError, match='checkpoint 1 in .* is '
                       'unreadable'):
      reader.restore_tree(1)
  reader.close()
  import gc  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  time.sleep(0.3)  # the reads still in flight complete
  gc.collect()
  assert not unraised, unraised[0].exc_value
  err = capfd.readouterr().err
  assert 'Event loop is closed' not in err and 'Traceback' not in err, err


def test_init_from_a_classifier_into_localization_names_a_fix_that_works(
    tmp_path):
  """The hint was `set --config.model=lenet5`, which then failed the same
  way (the localizer of lenet5 is still not lenet5). Runs of 0 steps (an
  evaluation and a checkpoint of the initial weights) stand for trained
  ones: what is checked is which checkpoint fits which model."""
  import re  # pylint: disable=g-import-not-at-top
  from cnn.errors import CheckpointError  # pylint: disable=g-import-not-at-top
  from cnn import runs  # pylint: disable=g-import-not-at-top
  from tests.tasks.test_localization import recipe_config  # pylint: disable=g-import-not-at-top
  classifier, localizer = tmp_path / 'classifier', tmp_path / 'localizer'
  joint = lambda init_from: recipe_config(
      'joint', num_train_steps=0, dense_eval=False, init_from=init_from)
  with tfds.testing.mock_data(num_examples=16):
    runs.train_and_evaluate(small_config('lenet5', steps=0), str(classifier))
    with pytest.raises(CheckpointError) as e:
      runs.train_and_evaluate(joint(str(classifier)), str(tmp_path / 'a'))
    message = str(e.value)
    fix = re.search(r'--config=configs/localization\.py:(\w+) '
                    r'--config\.model=(\w+) --workdir=DIR, then set '
                    r'--config\.init_from=DIR$', message)
    assert fix and '\n' not in message, message
    stage, model = fix.groups()
    runs.train_and_evaluate(recipe_config(stage, model=model,
                                          num_train_steps=0), str(localizer))
    runs.train_and_evaluate(joint(str(localizer)), str(tmp_path / 'b'))
  assert (tmp_path / 'b' / 'checkpoints' / '0').is_dir()


_HOLD_LOCK = (
    'import sys, time\n'
    'from cnn.training import run_folder\n'
    'with run_folder.lock(sys.argv[1]):\n'
    '  print("held", flush=True)\n'
    '  time.sleep(300)\n')


def test_a_sweep_member_in_use_is_noted_only_while_its_holder_lives(
    tmp_path, capsys):
  """A second sweep on one workdir recorded 'in use by pid N' as the
  member's error.txt: every later table showed it, the holder long gone."""
  from cnn.errors import UserError  # pylint: disable=g-import-not-at-top
  from cnn.tools import sweeps  # pylint: disable=g-import-not-at-top
  from configs import plain_vs_resnet  # pylint: disable=g-import-not-at-top
  from experiments import sweep  # pylint: disable=g-import-not-at-top
  member = tmp_path / 'plain8_s0'
  member.mkdir()
  holder = subprocess.Popen([sys.executable, '-c', _HOLD_LOCK, str(member)],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == 'held\n'
    arg = 'local,depths=8'
    with pytest.raises(UserError, match=rf'in use by another process, not '
                       rf'trained here: plain8_s0 \(pid {holder.pid}\)'):
      sweep.run(f'configs/plain_vs_resnet.py:{arg}',
                plain_vs_resnet.get_config(arg), str(tmp_path), only='plain')
    assert f'| in use by pid {holder.pid} |' in capsys.readouterr().out
    assert not (member / sweeps.ERROR_FILE).exists()
  finally:
    holder.kill()
    holder.wait()
  row = sweeps.summary_row(str(member), 'plain8_s0', 4)
  assert (row['status'], row['note']) == (sweeps.NEW, '')


def test_a_read_only_record_in_the_run_folder_is_one_line_first(tmp_path):
  """A run rewrites metrics.jsonl (and config.json ...) whole: a read-only
  one was replaced where the folder was writable (its mode dropped without
  a word), and failed with a traceback where it was not."""
  from cnn.training import run_folder  # pylint: disable=g-import-not-at-top
  wd = tmp_path / 'run'
  wd.mkdir()
  metrics = wd / 'metrics.jsonl'
  metrics.write_text('{"step": 1, "split": "train", "loss": 2.5}\n')
  metrics.chmod(0o444)
  p = _script_as_user('experiments.train', '--config=configs/cifar10.py:lenet5',
                      f'--workdir={wd}', timeout=60)  # (it trained on)
  assert p.returncode == 1, p.stderr
  assert p.stderr.strip().splitlines() == [
      f'error: {metrics} is read-only, and a run in this folder rewrites it: '
      f'make it writable (chmod u+w {metrics}), or choose another --workdir']
  assert not p.stdout  # refused before the data loads
  assert metrics.read_text() == '{"step": 1, "split": "train", "loss": 2.5}\n'
  assert metrics.stat().st_mode & 0o777 == 0o444
  metrics.chmod(0o644)
  (wd / 'config.json').mkdir()
  with pytest.raises(UserError, match=r"config.json is a folder, not the "
                     r"run's config.json: move it aside"):
    run_folder.prepare(str(wd))


@pytest.mark.parametrize('args,line', [
    (['--config.seed=2', '--config.seed=abc'],
     "error: bad --config override: --config.seed=abc: 'abc' is not an int, "
     'like its value 0'),
    (['--config.seed'],
     'error: --config.seed needs a value: write --config.seed=VALUE'),
    (['--config.seed=1', '--config.seed'],
     'error: --config.seed needs a value: write --config.seed=VALUE'),
    (['--config.seed', 'abc'],
     "error: bad --config override: --config.seed=abc: 'abc' is not an int, "
     'like its value 0'),
])
def test_config_override_mistakes_are_one_line_naming_them(args, line):
  """absl's fallback parsed the command line a second time, and reported
  the overrides of the first as 'defined twice'; a repeated field named
  the value it had accepted."""
  p = _script('experiments.train', '--config=configs/mnist.py:lenet5',
              '--print_config', *args)
  assert p.returncode == 2 and not p.stdout, p.stderr
  assert p.stderr.strip().splitlines() == [line]


def test_a_forgotten_workdir_flag_is_named(tmp_path):
  run = str(tmp_path / 'run')
  p = _script('experiments.train', '--config=configs/mnist.py:lenet5', run)
  assert p.returncode == 2, p.stderr
  assert p.stderr.strip().splitlines() == [
      f'error: unexpected argument {run}: the run folder? write '
      f'--workdir={run} (a flag)']
  p = _script('experiments.evaluate', run)
  assert p.stderr.strip().splitlines() == [
      f'error: --workdir is required: the run folder? write --workdir={run} '
      '(a flag)']
  assert not os.path.exists(run)


def test_overrides_may_be_space_separated_and_before_the_config_file():
  """`--config.tensorboard false` left 'false' as a stray argument, and an
  override before --config=FILE was a two-line absl error."""
  p = _script('experiments.train', '--config.seed', '3', '--config',
              'configs/mnist.py:lenet5', '--print_config',
              '--config.tensorboard', 'false', '--config.lr_milestones=5,6')
  assert p.returncode == 0, p.stderr
  config = json.loads(p.stdout)
  assert (config['seed'], config['tensorboard'], config['lr_milestones']) == (
      3, False, [5, 6])


_CTRL_C_IN_IMPORT_JAX = (
    'import os, signal, sys\n'
    'class CtrlC:  # the Ctrl-C of a user, as `import jax` begins\n'
    '  def find_spec(self, name, path=None, target=None):\n'
    '    if name == "jax":\n'
    '      sys.meta_path.remove(self)\n'
    '      os.kill(os.getpid(), signal.SIGINT)\n'
    'sys.meta_path.insert(0, CtrlC())\n'
    'from experiments import common, train\n'
    'common.main(train.main, flags_parser=common.parse_flags)\n')


def _sigint_as_at_a_terminal():
  """A command typed at a terminal starts with SIGINT's default action. The
  suite itself may not: a background job (`make test &`) inherits SIGINT
  ignored, and a command started so keeps ignoring it (common.stop_at_once,
  as `nohup` asks), so the Ctrl-C would never come."""
  signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_in_the_first_second_is_one_line(tmp_path):
  """Python's KeyboardInterrupt inside `import jax` became an ImportError
  traceback, or a C++ abort (status -6), or was swallowed in a garbage
  collector callback and the run went on."""
  wd = tmp_path / 'run'
  p = subprocess.run(
      [sys.executable, '-c', _CTRL_C_IN_IMPORT_JAX,
       '--config=configs/cifar10.py:lenet5', f'--workdir={wd}'], cwd=ROOT,
      env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True,
      text=True, timeout=120, check=False,
      preexec_fn=_sigint_as_at_a_terminal)
  assert p.returncode == 130, p.stderr[-3000:]
  assert p.stderr.strip().splitlines() == [
      'interrupted: SIGINT: stopped at once; a rerun of the same command '
      f'resumes from the last checkpoint in {wd}, if it has one']


_MOCK_TRAIN_CTRL_C_IN_SAVE = (
    'import os, signal\n'
    'import tensorflow_datasets as tfds\n'
    'from configs import common as configs\n'
    'from cnn.training import checkpointing\n'
    'from experiments import common, train\n'
    '# TFDS cifar10 on mock data, as tests/conftest.py does.\n'
    'configs.dataset_and_dir = lambda prepared, name: (name, None)\n'
    'save = checkpointing.Checkpointer.save\n'
    'def save_and_ctrl_c(self, *args, **kwargs):  # Ctrl-C again, mid-save\n'
    '  save(self, *args, **kwargs)\n'
    '  os.kill(os.getpid(), signal.SIGINT)\n'
    'checkpointing.Checkpointer.save = save_and_ctrl_c\n'
    'with tfds.testing.mock_data(num_examples=24):\n'
    '  common.main(train.main, flags_parser=common.parse_flags)\n')


def test_a_second_ctrl_c_during_the_save_says_where_the_run_resumes(
    tmp_path):
  """It said 'stopped at once, nothing more saved' while the first Ctrl-C's
  checkpoint, whose save was under way, was completed and kept."""
  import re  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top
  wd = tmp_path / 'run'
  args = endless_lenet5_args(wd)
  proc = subprocess.Popen(
      [sys.executable, '-c', _MOCK_TRAIN_CTRL_C_IN_SAVE, *args], cwd=ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env={k: v for k, v in os.environ.items() if k != 'TFDS_DATA_DIR'})
  try:
    line = ' '
    while line and 'compiled and ran the first step' not in line:
      line = proc.stdout.readline()
    assert line, proc.communicate(timeout=60)[1][-3000:]
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=300)[1]
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 130 and 'Traceback' not in err, err[-3000:]
  last = err.strip().splitlines()[-1]
  saved = re.fullmatch(r'interrupted: SIGINT: stopped at once; a rerun of the '
                       r'same command resumes from step (\d+) \((.*)\)', last)
  assert saved, last
  assert saved.group(2) == str(wd / 'checkpoints' / saved.group(1))
  assert os.listdir(wd / 'checkpoints') == [saved.group(1)]
