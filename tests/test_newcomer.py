"""A new user's first hour (issue 35): `make train`'s variables, one rule for
the data folder, a config printed without a run, a missing dataset as one
line that leaves no run folder behind."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from configs import cifar10
from configs import common
from configs import localization
from configs import mnist
from configs import tiny_imagenet
from tests.conftest import ROOT


@pytest.fixture(autouse=True)
def cifar10_on_mock_data():
  """Overrides conftest's: these tests check the configs' own rule."""
  yield


def _make_n(*args) -> str:
  """The `experiments.train` command `make -n train ARGS` would run."""
  if shutil.which('make') is None:
    pytest.skip('no make')
  out = subprocess.run(['make', '-n', 'train', *args], cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout
  # The recipe's continuation lines joined: one command.
  command = out.replace('\\\n', ' ')
  return ' '.join(next(l for l in command.splitlines()
                       if 'experiments.train' in l).split())


def test_make_train_is_the_paper_recipe_and_variables_choose():
  paper = _make_n()
  assert '--config=configs/cifar10.py:cifar_resnet20 ' in paper
  assert '--workdir=runs/cifar_resnet20 ' in paper
  assert 'num_train_steps' not in paper and 'data_dir' not in paper
  assert 'TFDS_DATA_DIR' not in paper
  fast = _make_n('PRESET=fast', 'STEPS=1000')
  assert '--config=configs/cifar10.py:cifar_resnet20,fast ' in fast
  assert '--config.num_train_steps=1000' in fast
  assert '--workdir=runs/cifar_resnet20_fast_1000steps ' in fast
  own = _make_n('MODEL=cifar_resnet56', 'WORKDIR=runs/mine',
                'DATA_DIR=/data/tfds')
  assert own.startswith('TFDS_DATA_DIR=/data/tfds ')
  assert '--config=configs/cifar10.py:cifar_resnet56 ' in own
  assert '--workdir=runs/mine ' in own
  # An interrupted run (130, its step saved) is not a second error from
  # make; any other failure still is.
  assert paper.endswith('|| test $? -eq 130')


def test_make_test_is_the_ci_command():
  assert 'make test' in (ROOT / '.ci' / 'run').read_text()
  if shutil.which('make') is None:
    pytest.skip('no make')
  out = subprocess.run(['make', '-n', 'test'], cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout
  assert '-m pytest' in out


def test_data_dir_is_tfds_data_dir_then_the_shared_folder(tmp_path,
                                                          monkeypatch):
  shared = tmp_path / 'shared'
  monkeypatch.setattr(common, 'SHARED_TFDS', str(shared))
  monkeypatch.delenv('TFDS_DATA_DIR', raising=False)
  # Neither: TFDS's own folder and dataset.
  assert common.data_dir() is None
  c = cifar10.get_config()
  assert (c.dataset, c.data_dir) == ('cifar10', None)
  # The shared folder, absolute away from the project's root ...
  shared.mkdir()
  monkeypatch.chdir(tmp_path)
  assert common.data_dir() == str(shared)
  assert cifar10.get_config().dataset == 'cifar10'
  (shared / 'cifar10_jpeg').mkdir()
  c = cifar10.get_config()
  assert (c.dataset, c.data_dir) == ('cifar10_jpeg', str(shared))
  # ... relative from it, as the README's commands and earlier runs name it.
  monkeypatch.chdir(ROOT)
  assert common.data_dir() == os.path.relpath(shared)
  # $TFDS_DATA_DIR first, whatever it holds.
  env = tmp_path / 'env'
  env.mkdir()
  monkeypatch.setenv('TFDS_DATA_DIR', str(env))
  c = cifar10.get_config()
  assert (c.dataset, c.data_dir) == ('cifar10', str(env))
  (env / 'cifar10_jpeg').mkdir()
  assert cifar10.get_config().dataset == 'cifar10_jpeg'
  # Every config reads its folder by the same rule.
  for config in (mnist.get_config(), tiny_imagenet.get_config(),
                 localization.get_config()):
    assert config.data_dir == str(env)
  assert mnist.get_config().dataset == 'mnist'
  # config.json records the resolved values; an override still parses.
  from cnn.training import run_folder  # pylint: disable=g-import-not-at-top
  saved = run_folder.as_json(c)
  assert (saved['dataset'], saved['data_dir']) == ('cifar10', str(env))
  c.data_dir = None
  c.data_dir = '/elsewhere'
  assert run_folder.as_json(c)['data_dir'] == '/elsewhere'


def _train(*args, env=None, script=''):
  """`python -m experiments.train ARGS` in a fresh process (after `script`,
  which may patch TFDS)."""
  code = (f'{script}\nimport runpy, sys\n'
          f'sys.argv = ["experiments.train", *{list(args)!r}]\n'
          'runpy.run_module("experiments.train", run_name="__main__")')
  return subprocess.run([sys.executable, '-c', code], cwd=ROOT,
                        capture_output=True, text=True, timeout=300,
                        check=False, env=dict(os.environ, **(env or {})))


def test_print_config_prints_the_resolved_config_and_exits(tmp_path):
  proc = _train('--config=configs/cifar10.py:cifar_resnet20,fast',
                '--config.num_train_steps=300', '--print_config',
                env={'TFDS_DATA_DIR': str(tmp_path)})
  assert proc.returncode == 0, proc.stderr
  c = json.loads(proc.stdout)
  assert (c['model'], c['num_train_steps'], c['lr_schedule']) == (
      'cifar_resnet20', 300, 'cosine')
  assert (c['dataset'], c['data_dir']) == ('cifar10', str(tmp_path))
  # Without it a run folder is needed: one line saying so.
  proc = _train('--config=configs/cifar10.py:cifar_resnet20')
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr
  assert proc.stderr.strip().splitlines() == [
      'error: --workdir=DIR is required: the run folder (or --print_config '
      'to print the config)']


# TFDS with no network: it announces the download on stdout, then fails.
_NO_NETWORK = '''
import tensorflow_datasets as tfds
def download_and_prepare(self, *args, **kwargs):
  print(f"Downloading and preparing dataset to {self.data_dir}...")
  raise ConnectionError("Failed to resolve 'www.cs.toronto.edu'")
tfds.core.DatasetBuilder.download_and_prepare = download_and_prepare
'''


def test_a_dataset_not_on_disk_is_one_line_and_leaves_no_run_folder(
    tmp_path):
  work, data = tmp_path / 'runs' / 'r', tmp_path / 'tfds'
  proc = _train('--config=configs/cifar10.py:cifar_resnet8',
                f'--workdir={work}', '--config.dataset=cifar100',
                f'--config.data_dir={data}', script=_NO_NETWORK)
  assert proc.returncode == 1, proc.stderr
  assert 'Downloading' not in proc.stdout + proc.stderr
  assert 'Traceback' not in proc.stderr
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1, proc.stderr
  assert errors[0].startswith(
      f"error: dataset 'cifar100' is not in data_dir {data} (looked for "
      f'{data}/cifar100/')
  assert '--config.data_dir=DIR' in errors[0]
  assert 'TFDS_DATA_DIR' in errors[0] and 'tfds build cifar100' in errors[0]
  assert 'ConnectionError' in errors[0]  # the cause, last
  assert not work.exists()
  # A folder that was there before is the user's: left as it was.
  work.mkdir(parents=True)
  (work / 'notes.txt').write_text('mine')
  proc = _train('--config=configs/cifar10.py:cifar_resnet8',
                f'--workdir={work}', '--config.dataset=cifar100',
                f'--config.data_dir={data}', script=_NO_NETWORK)
  assert proc.returncode == 1
  assert (work / 'notes.txt').read_text() == 'mine'


def test_the_imagenet_config_loads_and_streams():
  # Its in_memory was the bool False while the field is a string ('auto'):
  # the config did not load at all.
  from configs import imagenet  # pylint: disable=g-import-not-at-top
  c = imagenet.get_config('resnet50')
  assert c.in_memory == 'no' and c.dataset == 'imagenet2012'
