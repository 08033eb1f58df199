"""Sweeps: member expansion and naming, dry-run, skip/resume/failure on real
tiny runs (tfds mock data), worker subprocesses."""
import json
import math
import os
import shutil
import types

import pytest
import tensorflow_datasets as tfds

from cnn.tools import sweeps
from cnn import tasks
from cnn import runs
from cnn.errors import ConfigError, UserError
from cnn.training.metric_writers import read_metrics
from configs import lr_schedules
from configs import plain_vs_resnet
from experiments import sweep as sweep_cmd
from tests.conftest import ROOT, SHARED_TFDS, requires_cifar10_jpeg

PVR = str(ROOT / 'configs' / 'plain_vs_resnet.py')


def names(arg, module=plain_vs_resnet):
  return [n for n, _ in module.sweep(arg)]


def test_plain_vs_resnet_members_cover_the_paper():
  paper = dict(plain_vs_resnet.sweep('paper'))
  assert sorted(paper) == sorted(
      [f'plain{d}_s0' for d in (20, 32, 44, 56)] +
      [f'resnet{d}_s0' for d in (20, 32, 44, 56, 110)])
  assert paper['plain56_s0'] == {'model': 'cifar_plain56', 'seed': 0}
  # Only ResNet-110 warms up (paper: 0.01 for about 400 iterations).
  assert paper['resnet110_s0']['warmup_steps'] == 400
  assert all('warmup_steps' not in v for k, v in paper.items()
             if k != 'resnet110_s0')
  # Depth-major: a plain/ResNet pair finishes together.
  assert names('cpu,seeds=1') == ['plain8_s0', 'resnet8_s0', 'plain20_s0',
                                  'resnet20_s0']
  assert names('cpu')[:3] == ['plain8_s0', 'plain8_s1', 'resnet8_s0']
  assert len(names('cpu,seeds=3')) == 12
  assert names('paper,depths=32-44') == ['plain32_s0', 'resnet32_s0',
                                         'plain44_s0', 'resnet44_s0']


def test_presets_share_one_recipe_scaled_to_their_length():
  from cnn.training import optim  # pylint: disable=g-import-not-at-top
  paper = plain_vs_resnet.get_config('paper')
  assert (paper.num_train_steps, optim.milestone_steps(paper)) == (
      64_000, (32_000, 48_000))
  assert (paper.batch_size, paper.learning_rate, paper.momentum,
          paper.weight_decay) == (128, 0.1, 0.9, 1e-4)
  cpu = plain_vs_resnet.get_config('cpu')
  assert optim.milestone_steps(cpu) == (cpu.num_train_steps // 2,
                                        cpu.num_train_steps * 3 // 4)
  # Fractions of the run: an overridden length moves the milestones too.
  cpu.num_train_steps = 40
  assert optim.milestone_steps(cpu) == (20, 30)
  assert cpu.batch_size == 128 and cpu.augment == 'crop_flip'
  with pytest.raises(ConfigError, match='unknown preset'):
    plain_vs_resnet.get_config('gpu')
  with pytest.raises(ConfigError, match="unknown option 'seed=2' in 'cpu,"
                     "seed=2'; did you mean 'seeds'"):
    plain_vs_resnet.sweep('cpu,seed=2')


def test_detection_study_members_share_one_proposal_cache():
  from configs import detection  # pylint: disable=g-import-not-at-top
  members = dict(detection.sweep('fast_rcnn,raccoon'))
  assert len(members) == 3 * 2 * 2
  assert list(members)[:4] == ['rcnn_scratch_s0', 'rcnn_scratch_s1',
                               'rcnn_pretrained_s0', 'rcnn_pretrained_s1']
  base = detection.get_config('fast_rcnn,raccoon')
  c = sweeps.apply_overrides(base, members['faster_rcnn_pretrained_s1'])
  assert (c.kind, c.seed, c.init_from) == ('faster_rcnn', 1,
                                           'runs/tin_det_trunk')
  assert c.dataset == 'raccoon' and c.canvas == 256
  assert c.proposals.cache_dir == 'runs/detection_cache'
  scratch = sweeps.apply_overrides(base, members['rcnn_scratch_s0'])
  assert (scratch.kind, scratch.init_from) == ('rcnn', '')
  # The synthetic canvases start from the CIFAR-10 det_trunk instead.
  assert dict(detection.sweep('rcnn'))['rcnn_pretrained_s0'][
      'init_from'] == 'runs/det_trunk'
  # coco128 photos start from the Tiny ImageNet trunk too.
  assert dict(detection.sweep('rcnn,coco128'))['rcnn_pretrained_s0'][
      'init_from'] == 'runs/tin_det_trunk'
  with pytest.raises(ValueError, match='unknown preset'):
    detection.sweep('fast_rcnn,racoon')
  with pytest.raises(ValueError, match="'coco128' is out of place"):
    detection.get_config('fast_rcnn,raccoon,coco128')


def test_lr_schedule_members_override_nested_fields():
  members = dict(lr_schedules.sweep('cpu'))
  assert list(members)[0] == 'step_s0'
  assert len(members) == 1 + 2 * 2  # step + factors x patiences
  base = lr_schedules.get_config('cpu')
  c = sweeps.apply_overrides(base, members['plateau_f0.5_p2_s0'])
  assert (c.lr_schedule, c.lr_factor, c.plateau.patience) == (
      'plateau', 0.5, 2)
  assert base.lr_schedule == 'step'  # The base is not modified.
  assert c.val_examples == 5000 and c.plateau.monitor == 'val'
  runs.validate_config(c, tasks.get(c))  # Plateau on a held-out split: a valid config.
  with pytest.raises(ConfigError, match="no field 'patients'"):
    sweeps.apply_overrides(base, {'plateau.patients': 3})


def test_member_names_must_be_unique_and_safe():
  dup = types.SimpleNamespace(__file__='dup.py',
                              sweep=lambda arg: [('a', {}), ('a', {})])
  with pytest.raises(ConfigError, match='twice'):
    sweeps.members(dup, None)
  bad = types.SimpleNamespace(__file__='bad.py',
                              sweep=lambda arg: [('../x', {})])
  with pytest.raises(ConfigError, match='safe folder name'):
    sweeps.members(bad, None)
  ms = sweeps.members(plain_vs_resnet, 'cpu,seeds=1')
  assert [m.name for m in sweeps.select(ms, '20')] == ['plain20_s0',
                                                       'resnet20_s0']
  with pytest.raises(ConfigError, match='matches no member'):
    sweeps.select(ms, 'vgg')


def _run(arg, workdir, **kwargs):
  base = plain_vs_resnet.get_config(arg)
  with tfds.testing.mock_data(num_examples=24):
    sweep_cmd.run(f'{PVR}:{arg}', base, str(workdir), **kwargs)


def test_sweep_dry_run_skip_resume_and_failure(tmp_path, capsys):
  # Depth 9 is not 6n+2: those members fail; the others must still run.
  arg = 'local,depths=9-8'
  plain8 = tmp_path / 'plain8_s0'
  # An interrupted member: its run killed after 2 of its 4 steps.
  c = sweeps.apply_overrides(plain_vs_resnet.get_config(arg),
                             {'model': 'cifar_plain8'})
  with tfds.testing.mock_data(num_examples=24):
    runs.train_and_evaluate(c, str(plain8))
  shutil.rmtree(plain8 / 'checkpoints' / '4')
  capsys.readouterr()

  _run(arg, tmp_path, dry_run=True)
  out = capsys.readouterr().out
  assert '4 members' in out and "model='cifar_resnet9'" in out
  assert [line.split()[:2] for line in out.splitlines()[1:]] == [
      ['plain9_s0', 'new'], ['resnet9_s0', 'new'], ['plain8_s0', 'partial'],
      ['resnet8_s0', 'new']]
  assert sorted(os.listdir(tmp_path)) == ['plain8_s0']  # Nothing ran.

  with pytest.raises(UserError, match='2 member.*failed: plain9_s0, '
                     'resnet9_s0'):
    _run(arg, tmp_path)
  out = capsys.readouterr().out
  assert 'resuming from step 2' in out  # plain8 went on from its checkpoint.
  assert '| plain8_s0 | done | 4/4 |' in out
  assert '| resnet8_s0 | done | 4/4 |' in out
  assert '| plain9_s0 | failed | 0/4 |' in out and 'cifar_plain{6n+2}' in out
  for name, model in (('plain8_s0', 'cifar_plain8'),
                      ('resnet8_s0', 'cifar_resnet8')):
    d = tmp_path / name
    assert json.load(open(d / 'config.json'))['model'] == model
    assert sweeps.status(str(d), 4) == sweeps.DONE
    assert [r['step'] for r in read_metrics(str(d))
            if r['split'] == 'train'] == [1, 2, 3, 4]  # No step twice.
  assert sweeps.read_error(str(tmp_path / 'resnet9_s0')).startswith('error: ')

  # A finished sweep: nothing is trained, the table is printed.
  mtime = os.path.getmtime(plain8 / 'metrics.jsonl')
  _run(arg, tmp_path, only='8_')
  out = capsys.readouterr().out
  assert '===' not in out and 'resuming' not in out
  assert out.count('| done |') == 2
  assert os.path.getmtime(plain8 / 'metrics.jsonl') == mtime


def test_parallel_workers_report_their_failures(tmp_path):
  # Workers are separate processes (no mock data there): members whose
  # config is invalid fail before reading data, which is what is checked.
  arg = 'local,depths=9'
  with pytest.raises(UserError, match='2 member'):
    sweep_cmd.run(f'{PVR}:{arg}', plain_vs_resnet.get_config(arg),
                  str(tmp_path), parallel=2,
                  argv=[f'--config={PVR}:{arg}', f'--workdir={tmp_path}',
                        '--parallel=2', '--only', 'x'])
  for name in ('plain9_s0', 'resnet9_s0'):
    d = tmp_path / name
    assert 'is not of the form 6n+2' in sweeps.read_error(str(d))
    assert sweeps.status(str(d), 4) == sweeps.FAILED
    assert 'error:' in (d / 'sweep.log').read_text()


def test_a_sweep_rerun_with_other_overrides_is_refused(tmp_path, capsys):
  arg = 'local,depths=8'
  _run(arg, tmp_path, only='plain')
  capsys.readouterr()
  base = plain_vs_resnet.get_config(arg)
  base.learning_rate = 0.5  # another --config.learning_rate
  with pytest.raises(UserError, match='1 member.*failed: plain8_s0'):
    with tfds.testing.mock_data(num_examples=24):
      sweep_cmd.run(f'{PVR}:{arg}', base, str(tmp_path), only='plain')
  captured = capsys.readouterr()
  assert 'learning_rate 0.1 -> 0.5' in captured.err
  assert '| done |' not in captured.out  # not reported as the old result


@requires_cifar10_jpeg
def test_sigterm_stops_the_parallel_workers(tmp_path):
  """SIGTERM to the runner while both workers train: each saves its step,
  the runner exits 130 and leaves no worker behind."""
  import signal  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  runner = subprocess.Popen(
      [sys.executable, '-m', 'experiments.sweep',
       '--config=configs/plain_vs_resnet.py:local,depths=8',
       f'--workdir={tmp_path}', '--parallel=2',
       '--config.dataset=cifar10_jpeg', f'--config.data_dir={SHARED_TFDS}',
       '--config.train_split=train[:512]', '--config.test_split=test[:32]',
       '--config.num_train_steps=100000'], cwd=ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  pids = []
  while len(pids) < 2:
    line = runner.stdout.readline()
    assert line, runner.stderr.read()
    if 'started (pid' in line:
      pids.append(int(line.split('pid ')[1].split(',')[0]))
  # Until both workers have run a train step (their progress line), not a
  # fixed sleep: the signal must find them training, not importing.
  logs = lambda: [p.read_text() for p in sorted(tmp_path.glob('*/sweep.log'))]
  deadline = time.time() + 240
  while True:
    texts = logs()
    if len(texts) == 2 and all('compiled and ran the first step' in t
                               for t in texts):
      break
    assert time.time() < deadline and runner.poll() is None, texts
    time.sleep(0.2)
  runner.send_signal(signal.SIGTERM)
  _, err = runner.communicate(timeout=200)
  assert runner.returncode == 130, err
  assert 'sweep stopped: 2 worker(s)' in err
  for text in logs():  # each worker saved the step it was at
    assert ': checkpoint ' in text and ' saved in ' in text, text[-2000:]
  for pid in pids:  # no worker left behind
    with pytest.raises(ProcessLookupError):
      os.kill(pid, 0)


def test_workers_sharing_a_gpu_split_its_memory(tmp_path, capsys,
                                               monkeypatch):
  # One GPU, two workers: both on device 0, 45 % of its memory each.
  assert [sweeps.worker_env(s, 2, 1) for s in (0, 1)] == [
      {'CUDA_VISIBLE_DEVICES': '0', 'XLA_PYTHON_CLIENT_MEM_FRACTION': '0.45'}
  ] * 2
  # Two GPUs, three workers: GPU 0 holds two of them.
  assert [sweeps.worker_env(s, 3, 2) for s in range(3)] == [
      {'CUDA_VISIBLE_DEVICES': '0', 'XLA_PYTHON_CLIENT_MEM_FRACTION': '0.45'},
      {'CUDA_VISIBLE_DEVICES': '1'},
      {'CUDA_VISIBLE_DEVICES': '0', 'XLA_PYTHON_CLIENT_MEM_FRACTION': '0.45'}]
  # CPU: each worker gets its share of the cores for OpenMP, unless the
  # user set OMP_NUM_THREADS; one worker needs nothing.
  monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
  monkeypatch.setattr(os, 'cpu_count', lambda: 4)
  assert sweeps.worker_env(1, 2, 0) == {'OMP_NUM_THREADS': '2'}
  assert sweeps.worker_env(0, 1, 0) == {}
  monkeypatch.setenv('OMP_NUM_THREADS', '3')
  assert sweeps.worker_env(0, 2, 0) == {}
  _run('local,depths=8', tmp_path, parallel=2, dry_run=True)
  out = capsys.readouterr().out
  assert 'worker 0:' in out and 'worker 1:' in out


def test_the_table_ends_with_mean_and_std_over_members():
  rows = [{'member': f's{i}', 'status': 'done', 'step': 4, 'total': 4,
           'metric': 'error', 'train': t, 'held_out': h, 'best': h,
           'note': ''} for i, (t, h) in enumerate([(0.1, 0.2), (0.3, 0.4)])]
  last = sweeps.format_table(rows).splitlines()[-1]
  # mean 20 / 30 %, sample std 14.14 %
  assert last == ('| mean ± std (2) | | | 20.00 ± 14.14 | 30.00 ± 14.14 | '
                  '30.00 ± 14.14 | |')
  from configs import mnist  # pylint: disable=g-import-not-at-top
  assert [n for n, _ in mnist.sweep('lenet5')] == [
      'lenet5_s0', 'lenet5_s1', 'lenet5_s2']
  assert mnist.get_config('lenet5,seeds=2').model == 'lenet5'


def test_the_mean_rows_pool_only_members_that_differ_by_seed():
  # Two settings x two seeds, a setting with one finished seed, and a member
  # without a seed suffix: a mean over all of them would mix settings.
  values = {'fast_scratch_s0': 0.70, 'fast_scratch_s1': 0.80,
            'fast_pretrained_s0': 0.75, 'fast_pretrained_s1': 0.85,
            'faster_scratch_s0': 0.60, 'faster_scratch_s1': math.nan,
            'baseline': 0.10}
  rows = [{'member': n, 'status': 'done', 'step': 4, 'total': 4,
           'metric': 'map', 'train': 0.5, 'held_out': v, 'best': v,
           'note': ''} for n, v in values.items()]
  means = [l for l in sweeps.format_table(rows).splitlines()
           if l.startswith('| mean')]
  assert means == [
      '| mean ± std fast_scratch (2) | | | 0.5000 ± 0.0000 | '
      '0.7500 ± 0.0707 | 0.7500 ± 0.0707 | |',
      '| mean ± std fast_pretrained (2) | | | 0.5000 ± 0.0000 | '
      '0.8000 ± 0.0707 | 0.8000 ± 0.0707 | |']
  assert [sweeps.seed_group(n) for n in ('lenet5_s2', 's0', 'plain20',
                                         'a_s1x', 'resnet_s12')] == [
      'lenet5', '', None, None, 'resnet']


def test_mean_std_uses_the_sample_std():
  assert sweeps.mean_std([1.0]) == '1.0'
  assert sweeps.mean_std([1.0, 3.0]) == '2.0 +- 1.4'  # stdev = sqrt(2)
  assert sweeps.mean_std([10, 10, 10], digits=2) == '10.00 +- 0.00'


def test_a_misspelt_preset_gets_the_closest_name():
  with pytest.raises(ConfigError, match=r"unknown preset 'fgi6'; did you "
                     r"mean 'fig6'\? use one of paper, fig6"):
    plain_vs_resnet.sweep('fgi6')
  with pytest.raises(ConfigError, match=r"unknown preset 'zzz'; use one"):
    plain_vs_resnet.get_config('zzz')
