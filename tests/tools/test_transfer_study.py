"""The transfer study from a real source run (Tiny ImageNet -> CIFAR-10)."""
import json
import subprocess
import sys

from tests.conftest import ROOT, SHARED_TFDS, requires_shared

pytestmark = [requires_shared('tiny_imagenet'), requires_shared('cifar10_jpeg')]


def _train(args):
  return subprocess.run([sys.executable, '-m'] + args, cwd=str(ROOT),
                        capture_output=True, text=True)


def test_source_study_upsamples_cifar_to_the_source_net(tmp_path):
  # The source run in this process (the study below is the command under
  # test; a child process would only import TensorFlow once more).
  from cnn import runs  # pylint: disable=g-import-not-at-top
  from configs import tiny_imagenet  # pylint: disable=g-import-not-at-top
  source = tmp_path / 'source'
  c = tiny_imagenet.get_config('resnet18_64,local')
  c.data_dir = str(SHARED_TFDS)
  runs.train_and_evaluate(c, str(source))
  study = tmp_path / 'study'
  args = ['experiments.transfer_study', f'--workdir={study}',
          f'--source={source}', '--quick', '--sizes=2', '--seeds=2',
          '--batch_size=8', f'--data_dir={SHARED_TFDS}']
  out = _train(args)
  assert out.returncode == 0, out.stderr[-2000:]
  table = (study / 'results.md').read_text()
  assert 'upsampled to 64x64' in table and '| 2 |' in table
  row = table.strip().splitlines()[-1]
  assert row.startswith('| 2 |') and row.count(' +- ') == 3  # one per mode
  for mode in ('head', 'finetune', 'scratch'):
    cfg = json.loads((study / f'{mode}_2_s1' / 'config.json').read_text())
    assert cfg['image_size'] == 64 and cfg['seed'] == 1
    assert cfg['model_kwargs'] == {'num_filters': 16, 'stem_strides': 2}
    assert cfg['init_from'] == ('' if mode == 'scratch' else str(source))
  # A rerun reuses every finished cell.
  again = _train(args)
  assert again.returncode == 0 and '--- ' not in again.stdout
  # A source that is not a run: one line.
  bad = _train(['experiments.transfer_study', f'--workdir={tmp_path / "x"}',
                f'--source={tmp_path / "nothing"}'])
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines()[-1].startswith('error: --source=')
