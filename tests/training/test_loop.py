"""End-to-end training on tfds mock data: logs, checkpoints, exact resume,
errors; plus one integration run on the real cifar10_jpeg."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from cnn import models
from cnn import runs
from cnn import tasks
from cnn.ops import compiler
from configs import cifar10
from cnn.training import optim
from cnn.errors import CheckpointError, ConfigError, NonFiniteLossError
from tests.conftest import (ROOT, SHARED_TFDS, classifier_step, metric_rows,
                            requires_cifar10_jpeg, resnet8_after_steps,
                            assert_same_training,
                            small_config)


def run(config, workdir, num_examples=24):
  with tfds.testing.mock_data(num_examples=num_examples):
    return runs.train_and_evaluate(config, str(workdir))


def records(workdir):
  return metric_rows(workdir)


def test_end_to_end_writes_logs_checkpoints_and_resumes_exactly(tmp_path):
  straight, parts = tmp_path / 'straight', tmp_path / 'parts'
  c = small_config(steps=4, val_examples=8)
  final = run(c, straight)
  assert set(final) == {'val', 'test'}
  recs = records(straight)
  assert {(r['step'], r['split']) for r in recs} >= {
      (1, 'train'), (4, 'train'), (2, 'val'), (4, 'test')}
  train_rec = [r for r in recs if r['split'] == 'train'][0]
  assert {'loss', 'error', 'learning_rate'} <= set(train_rec)
  assert os.listdir(straight / 'tensorboard')
  assert json.load(open(straight / 'config.json'))['model'] == 'cifar_resnet8'
  assert sorted(os.listdir(straight / 'checkpoints')) == ['2', '4']

  # k steps, stop, resume to 2k == 2k straight, bit for bit.
  run(small_config(steps=2, val_examples=8), parts)
  before = metric_rows(parts, timing=True)
  resumed = run(c, parts)
  assert records(parts) == recs
  assert resumed == final
  # The run's clock continues across the two sittings: the resumed rows go
  # on from where the first sitting stopped, every row carries it.
  timed = metric_rows(parts, timing=True)
  seconds = [r['wall_seconds'] for r in timed]
  assert len(seconds) == len(timed) and seconds[0] > 0
  assert seconds == sorted(seconds)
  assert timed[len(before)]['wall_seconds'] >= before[-1]['wall_seconds']


def test_loss_falls_on_a_fixed_batch():
  model = models.get_model('cifar_resnet8', num_classes=10)
  c = small_config(weight_decay=0.0)
  tx = optim.make_optimizer(c)
  train_step, state = classifier_step(model, tx, lambda s: jnp.float32(0.05),
                                      augment='none')
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
           'label': rng.integers(0, 10, 16).astype(np.int32)}
  losses = []
  for _ in range(15):
    state, m = train_step(state, batch)
    losses.append(float(m['loss']))
  assert losses[-1] < 0.5 * losses[0]
  # Jitted once: fifteen calls, one trace.
  assert train_step._cache_size() == 1  # pylint: disable=protected-access


def test_cpu_compiler_options_keep_the_math():
  """The library's CPU train-step options change speed, not results."""
  assert_same_training(*[resnet8_after_steps(compiler_options=options)
                         for options in (compiler.CPU_COMPILER_OPTIONS, None)])


def test_cpu_fusion_setting_is_on_off_or_auto(monkeypatch):
  """config.xla_cpu_fusion: 'on' keeps XLA's fusion pass, 'off' turns it
  off; 'auto' (the configs' default) keeps it only with oneDNN's
  convolutions or the chunked weight gradient on YNNPACK's; anything else
  is one line before a run."""
  from cnn.ops import conv as conv_ops  # pylint: disable=g-import-not-at-top
  from cnn.ops import onednn  # pylint: disable=g-import-not-at-top
  assert cifar10.get_config('cifar_resnet20').xla_cpu_fusion == 'auto'
  if onednn.status()[0]:
    with conv_ops.implementation('onednn'), compiler.fusion('auto'):
      assert compiler.current_fusion()
  with conv_ops.implementation('xla'):
    _check_fusion_with_xlas_convolution(monkeypatch)


def _check_fusion_with_xlas_convolution(monkeypatch):
  from cnn.ops import conv as conv_ops  # pylint: disable=g-import-not-at-top
  with conv_ops.engine('eigen'), conv_ops.policy('auto'):
    engine = conv_ops.engine_compiler_options()
    for value, fused in (('on', True), ('off', False), ('auto', False)):
      with compiler.fusion(value):
        assert compiler.current_fusion() == fused
        assert compiler.train_step_options() == (
            engine if fused else {**engine, **compiler.CPU_COMPILER_OPTIONS})
  # auto: on only where it measured faster.
  for engine_name, pol, fused in (('ynnpack', 'auto', True),
                                  ('ynnpack', '8', True),
                                  ('ynnpack', 'xla', False),
                                  ('eigen', '8', False)):
    with conv_ops.engine(engine_name), conv_ops.policy(pol), \
        compiler.fusion('auto'):
      assert compiler.current_fusion() == fused, (engine_name, pol)
      want = dict(conv_ops.engine_compiler_options() or {})
      if not fused:
        want.update(compiler.CPU_COMPILER_OPTIONS)
      assert compiler.train_step_options() == (want or None)
  # A step over several devices keeps XLA's weight gradient, so no fusion.
  monkeypatch.setattr(jax, 'device_count', lambda: 2)
  with conv_ops.engine('ynnpack'), conv_ops.policy('auto'), \
      compiler.fusion('auto'):
    assert not conv_ops.may_chunk() and not compiler.current_fusion()
  c = small_config(xla_cpu_fusion='yes')
  with pytest.raises(ConfigError, match="^xla_cpu_fusion='yes' is not a "
                     "fusion setting: use 'on'"):
    runs.validate_config(c, tasks.get(c))


def test_bad_config_values_are_one_line_errors(tmp_path):
  with pytest.raises(ConfigError, match='cifar_resnet{6n'):
    run(small_config(model='cifar_resnet21'), tmp_path / 'a')
  with pytest.raises(ConfigError, match='lr_schedule'):
    run(small_config(lr_schedule='bogus'), tmp_path / 'b')
  with pytest.raises(ConfigError, match='val_examples'):
    run(small_config(lr_schedule='plateau'), tmp_path / 'c')
  assert not (tmp_path / 'a').exists()  # nothing created for a bad config


def test_foreign_and_corrupt_checkpoints_are_clear_errors(tmp_path):
  wd = tmp_path / 'run'
  run(small_config(steps=2), wd)
  before = records(wd)
  # The config check names the change first ...
  with pytest.raises(ConfigError, match="model 'cifar_resnet8' -> "
                     "'cifar_plain8'"):
    run(small_config(model='cifar_plain8', steps=4), wd)
  # ... and so it does without a config.json: the checkpoint carries the
  # config it was trained with.
  saved_config = (wd / 'config.json').read_text()
  os.remove(wd / 'config.json')
  with pytest.raises(ConfigError, match="model 'cifar_resnet8' -> "
                     "'cifar_plain8'"):
    run(small_config(model='cifar_plain8', steps=4), wd)
  with pytest.raises(ConfigError, match="model_kwargs.shortcut"):
    run(small_config(steps=4, model_kwargs={'shortcut': 'B'}), wd)
  (wd / 'config.json').write_text(saved_config)
  # Corrupt the saved arrays: restoring fails with one line, nothing lost.
  state_dir = wd / 'checkpoints' / '2' / 'state'
  for root, _, files in os.walk(state_dir):
    for name in files:
      if name.startswith('ocdbt') or root.endswith('d'):
        with open(os.path.join(root, name), 'r+b') as f:
          f.write(b'\0' * 64)
  for root, _, files in os.walk(state_dir / 'd'):
    for name in files:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'garbage')
  with pytest.raises(CheckpointError, match='unreadable') as e:
    run(small_config(steps=4), wd)
  assert '\n' not in str(e.value)
  assert records(wd) == before
  assert (wd / 'checkpoints' / '2').exists()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  wd = tmp_path / 'run'
  # Two sane steps (checkpoint 2), then a rate of 1e29.
  c = small_config('lenet5', steps=6, lr_schedule='step', lr_milestones=(2,),
                   lr_factor=1e30)
  with pytest.raises(NonFiniteLossError, match='at step') as e:
    run(c, wd)
  assert 'step 2' in str(e.value)  # The last good checkpoint is named.
  assert (wd / 'checkpoints' / '2').exists()
  assert not (wd / 'checkpoints' / '6').exists()


def test_evaluate_checkpoint_restores_latest_and_best(tmp_path):
  wd = tmp_path / 'run'
  final = run(small_config('lenet5', steps=4, val_examples=8), wd)
  with tfds.testing.mock_data(num_examples=24):
    r = runs.evaluate_checkpoint(str(wd), 'test', 'latest')
    assert r['step'] == 4
    assert r['error'] == pytest.approx(final['test']['error'])
    assert r['examples'] == 24
    best = runs.evaluate_checkpoint(str(wd), 'val', 'best')
    assert best['step'] in (2, 4)
    with pytest.raises(CheckpointError, match='available steps'):
      runs.evaluate_checkpoint(str(wd), 'test', '3')
    # The run's own training images (24 - 8 held out as val), eval mode.
    train = runs.evaluate_checkpoint(str(wd), 'train')
    assert train['examples'] == 16 and 0.0 <= train['error'] <= 1.0
    first = runs.evaluate_checkpoint(str(wd), 'train', examples=5)
    assert first['examples'] == 5
    assert runs.evaluate_checkpoint(str(wd), 'train', examples=16) == train
    with pytest.raises(ConfigError, match='between 1 and the 8 examples of '
                       'val') as e:
      runs.evaluate_checkpoint(str(wd), 'val', examples=9)
    assert '\n' not in str(e.value)
    for examples in (0, 3):
      with pytest.raises(ConfigError, match=r"not held out in this run; "
                         r"choose one of \['test', 'val'\] or 'train'"):
        runs.evaluate_checkpoint(str(wd), 'bogus', examples=examples)


@requires_cifar10_jpeg
def test_integration_real_cifar10_jpeg(tmp_path):
  """A few real steps on the prepared CIFAR-10 copy, with a held-out split."""
  c = small_config(steps=6, dataset='cifar10_jpeg', data_dir=str(SHARED_TFDS),
                   val_examples=500, test_split='test[:500]', batch_size=32,
                   eval_batch_size=250)
  c.eval_every_steps = 6
  c.checkpoint_every_steps = 6
  final = runs.train_and_evaluate(c, str(tmp_path))
  assert final['val']['examples'] == 500
  assert final['test']['examples'] == 500
  assert 0.0 <= final['test']['error'] <= 1.0
  assert np.isfinite(final['test']['loss'])
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['6']


@requires_cifar10_jpeg
def test_sigkill_and_restart_ends_with_the_same_metrics(tmp_path):
  """The CLI killed with SIGKILL mid-run, restarted, matches a clean run
  (trained in this process: the same library call, one TensorFlow import
  less)."""
  import signal
  import subprocess
  import sys
  import time
  from configs import cifar10  # pylint: disable=g-import-not-at-top
  overrides = dict(dataset='cifar10_jpeg', data_dir=str(SHARED_TFDS),
                   train_split='train[:2048]', test_split='test[:500]',
                   batch_size=32, num_train_steps=120, eval_every_steps=20,
                   checkpoint_every_steps=20, log_every_steps=10,
                   tensorboard=False)
  args = ['--config=configs/cifar10.py:lenet5'] + [
      f'--config.{k}={v}' for k, v in overrides.items()]
  cmd = [sys.executable, '-m', 'experiments.train'] + args
  clean, killed = tmp_path / 'clean', tmp_path / 'killed'
  c = cifar10.get_config('lenet5')
  for k, v in overrides.items():
    setattr(c, k, v)
  runs.train_and_evaluate(c, str(clean))
  proc = subprocess.Popen(cmd + [f'--workdir={killed}'], cwd=str(ROOT),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    ckpts = killed / 'checkpoints'
    if ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir()):
      break
    time.sleep(0.05)
  assert proc.poll() is None, 'the run ended before it could be killed'
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  out = subprocess.run(cmd + [f'--workdir={killed}'], cwd=str(ROOT),
                       check=True, capture_output=True, text=True)
  lines = out.stdout.splitlines()
  # A quiet console: what loads, the convolution in use, the resume, the
  # compilation's start and end, then our progress lines.
  assert lines[0] == f'loading cifar10_jpeg from {SHARED_TFDS} ...', lines[:5]
  assert lines[1].startswith('convolution: '), lines[:5]
  assert lines[2].startswith('resuming from step'), lines[:5]
  assert lines[3] == 'compiling the train step ...', lines[:5]
  assert lines[4].startswith('step ') and (
      '/120: compiled and ran the first step in' in lines[4]), lines[:5]
  assert 'checkpoint_manager.py' not in out.stderr
  assert records(killed) == records(clean)


def test_misspelt_config_override_is_one_line_and_writes_nothing(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = str(ROOT)
  work = tmp_path / 'run'
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.train',
       '--config=configs/cifar10.py:cifar_resnet8', f'--workdir={work}',
       '--config.lr_schedul=step'], cwd=root, capture_output=True, text=True)
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert lines == [lines[0]] and 'Did you mean "lr_schedule"' in lines[0]
  assert 'Traceback' not in proc.stderr
  assert not work.exists()


def test_unknown_config_preset_is_one_line(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = str(ROOT)
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.train',
       '--config=configs/detection.py:yolo', f'--workdir={tmp_path / "r"}'],
      cwd=root, capture_output=True, text=True)
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr
  assert [l for l in proc.stderr.splitlines() if l.startswith('error:')] == [
      "error: bad --config: unknown preset 'yolo'; use one of rcnn, "
      "fast_rcnn, faster_rcnn: write rcnn|fast_rcnn|faster_rcnn"
      "[,raccoon|coco128][,local]"]


def test_label_smoothing_and_the_fast_preset():
  from cnn.tasks.classification import task as classification  # pylint: disable=g-import-not-at-top
  logits = jnp.log(jnp.asarray([[0.7, 0.2, 0.1]]))
  got = classification.smoothed_cross_entropy(logits, jnp.asarray([0]), 0.3)
  # targets 0.7 + 0.1, 0.1, 0.1
  want = -(0.8 * np.log(0.7) + 0.1 * np.log(0.2) + 0.1 * np.log(0.1))
  np.testing.assert_allclose(got[0], want, rtol=1e-6)
  from configs import cifar10  # pylint: disable=g-import-not-at-top
  fast = cifar10.get_config('cifar_resnet20,fast')
  assert (fast.num_train_steps, fast.lr_schedule, fast.nesterov,
          fast.label_smoothing, fast.decay_bn_and_bias) == (
              11730, 'cosine', True, 0.1, False)
  with pytest.raises(ValueError, match='unknown preset'):
    cifar10.get_config('cifar_resnet20,slow')


def test_the_fast_preset_runs_locally(tmp_path):
  from configs import cifar10  # pylint: disable=g-import-not-at-top
  final = run(cifar10.get_config('cifar_resnet8,fast_local'), tmp_path)
  lrs = [r['learning_rate'] for r in records(tmp_path) if r['split'] == 'train']
  assert lrs[0] < lrs[1]  # the linear warm-up
  assert 0.0 <= final['test']['error'] <= 1.0
