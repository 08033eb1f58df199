r"""Transfer-learning study: new head vs fine-tuning vs scratch on CIFAR-10.

  python -m experiments.transfer_study --workdir=runs/transfer [--quick] \
    [--dataset=cifar10_jpeg --data_dir=../shared/data/tfds]

Pretrains a CIFAR ResNet on classes 0-4 (airplane, automobile, bird, cat,
deer), then learns classes 5-9 (dog, frog, horse, ship, truck) from 100 and
from 1000 training images per class in three ways: (a) a new head on the
frozen pretrained trunk (`freeze=trunk`), (b) fine-tuning every layer from the
pretrained weights, (c) training from scratch. Every cell trains for the same
number of steps and is scored on the 5000 test images of classes 5-9. Each
run is an ordinary training run folder under --workdir (pretrain/,
head_100/, ...); rerunning the command skips finished cells and resumes an
interrupted one. The Markdown table goes to stdout and WORKDIR/results.md.

Sized for a 2-core CPU (24 minutes measured on a shared one:
results/transfer/README.md); --quick runs a few steps of each cell to check
the plumbing.

`--source=RUN` transfers from a real source instead: RUN is a finished
classification run on another dataset (the Tiny ImageNet preset,
`configs/tiny_imagenet.py:resnet18_64,cpu`), and the cells learn all ten
CIFAR-10 classes from 100 and 1000 training images per class with RUN's
net, CIFAR's 32x32 images upsampled on the device to RUN's input size (64x64
for Tiny ImageNet, so objects appear at the scale the net learned),
`--seeds` seeds per cell (seed s also picks which trunk-less parts start
where: the new head, and every weight of a scratch run). The table gives
mean +- std over the seeds of the test error on the 10,000 test images,
and the time per cell.

  python -m experiments.transfer_study --workdir=runs/transfer_tin \
    --source=runs/tin_r18_cpu --seeds=2 --steps=600
"""
import json
import os
import time

from absl import app
from absl import flags

from experiments import common

_WORKDIR = flags.DEFINE_string('workdir', None, 'Study folder.')
_QUICK = flags.DEFINE_bool('quick', False, 'A few steps per cell only.')
_DATASET = flags.DEFINE_string('dataset', 'cifar10_jpeg', 'TFDS name.')
_DATA_DIR = flags.DEFINE_string('data_dir', '../shared/data/tfds',
                                'TFDS data_dir.')
_MODEL = flags.DEFINE_string('model', 'cifar_resnet8', 'A CIFAR net.')
_PRETRAIN_STEPS = flags.DEFINE_integer('pretrain_steps', 1500, 'Pretraining '
                                       'steps on classes 0-4.')
_STEPS = flags.DEFINE_integer('steps', 300, 'Training steps of every cell.')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Batch size of every run.')
_SOURCE = flags.DEFINE_string('source', None, 'A finished classification '
                              'run on another dataset to transfer from; '
                              'then every CIFAR-10 class is learnt.')
_SEEDS = flags.DEFINE_integer('seeds', 1, 'Seeds per cell (with --source).')
_SIZES = flags.DEFINE_list('sizes', ['100', '1000'], 'Training images per '
                           'class, one row each (with --source).')
flags.mark_flags_as_required(['workdir'])

OLD, NEW = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
SIZES = (100, 1000)
# mode: (column title, config overrides; init_from is filled in).
MODES = {
    'head': ('(a) new head, trunk frozen',
             dict(freeze='trunk', new_head=True, learning_rate=0.1)),
    'finetune': ('(b) fine-tune all layers',
                 dict(new_head=True, learning_rate=0.02)),
    'scratch': ('(c) from scratch', dict(learning_rate=0.1)),
}


_HEADER = ('| train images per class | ' +
           ' | '.join(title for title, _ in MODES.values()) + ' |',
           '|---|' + '---|' * len(MODES))


def base_config(steps: int, quick: bool):
  from configs import cifar10  # pylint: disable=g-import-not-at-top
  c = cifar10.get_config(_MODEL.value)
  c.dataset = _DATASET.value
  c.data_dir = _DATA_DIR.value
  c.batch_size = _BATCH.value
  c.num_train_steps = steps
  c.lr_schedule = 'cosine'
  c.eval_every_steps = steps  # One evaluation, at the end.
  c.checkpoint_every_steps = steps
  c.log_every_steps = max(steps // 5, 1)
  c.keep_checkpoints = 1
  c.tensorboard = False
  if quick:  # the first images only: enough for 100 per class of 5
    c.train_split, c.test_split = 'train[:5000]', 'test[:500]'
  return c


def run_cell(workdir: str, config) -> dict:
  """Trains one run (or reuses its result) -> accuracy and wall time."""
  from cnn.training import metric_writers  # pylint: disable=g-import-not-at-top
  from cnn import runs  # pylint: disable=g-import-not-at-top
  done = os.path.join(workdir, 'result.json')
  if os.path.exists(done):
    with open(done) as f:
      return json.load(f)
  print(f'--- {workdir}', flush=True)
  t0 = time.perf_counter()
  runs.train_and_evaluate(config, workdir)
  wall = time.perf_counter() - t0
  test = [r for r in metric_writers.read_metrics(workdir)
          if r['split'] == 'test' and r['step'] == config.num_train_steps]
  result = {'accuracy': 1.0 - test[-1]['error'], 'wall_s': wall,
            'steps': int(config.num_train_steps)}
  # Atomic: a study stopped mid-write reruns the cell, never reads half.
  with open(done + '.tmp', 'w') as f:
    json.dump(result, f)
  os.replace(done + '.tmp', done)
  return result


def study(root: str, quick: bool) -> str:
  """Runs all cells and returns the Markdown table."""
  pre_steps = 20 if quick else _PRETRAIN_STEPS.value
  steps = 10 if quick else _STEPS.value
  pre = base_config(pre_steps, quick)
  pre.classes = OLD
  pre_dir = os.path.join(root, 'pretrain')
  pre_result = run_cell(pre_dir, pre)
  results = {}
  for n in SIZES:
    for mode, (_, overrides) in MODES.items():
      c = base_config(steps, quick)
      c.classes = NEW
      c.train_examples_per_class = n
      for k, v in overrides.items():
        setattr(c, k, v)
      if mode != 'scratch':
        c.init_from = pre_dir
      results[n, mode] = run_cell(os.path.join(root, f'{mode}_{n}'), c)

  lines = [
      f'Pretraining: {_MODEL.value}, classes 0-4, {pre_steps} steps of batch '
      f'{_BATCH.value}: test accuracy {100 * pre_result["accuracy"]:.1f} % '
      f'on classes 0-4 ({pre_result["wall_s"]:.0f} s).',
      '',
      f'Classes 5-9, {steps} steps of batch {_BATCH.value} per cell (cosine '
      'lr); test accuracy on the 5000 test images of classes 5-9 (chance '
      '20 %) and wall time of the whole run (data, compilation, training, '
      'evaluation):',
      '',
      *_HEADER]
  for n in SIZES:
    cells = [f'{100 * results[n, m]["accuracy"]:.1f} % '
             f'({results[n, m]["wall_s"]:.0f} s)' for m in MODES]
    lines.append(f'| {n} | ' + ' | '.join(cells) + ' |')
  table = '\n'.join(lines) + '\n'
  with open(os.path.join(root, 'results.md'), 'w') as f:
    f.write(table)
  return table


def source_study(root: str, source: str, seeds: int, quick: bool) -> str:
  """Cells transferring from the finished run `source` to all of CIFAR-10.

  Raises:
    ConfigError: `source` is not a finished classification run.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cnn import models  # pylint: disable=g-import-not-at-top
  from cnn.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from cnn import runs  # pylint: disable=g-import-not-at-top
  from cnn.training import run_folder  # pylint: disable=g-import-not-at-top
  from cnn.tools import sweeps  # pylint: disable=g-import-not-at-top
  src = run_folder.read_config(source)
  if src is None:
    raise ConfigError(f'--source={source} is not a run folder (no '
                      'config.json): pass a finished classification run')
  if src.get('task', 'classification') != 'classification':
    raise ConfigError(f"--source={source} is a {src['task']} run; transfer "
                      'needs a classification run')
  if not run_folder.checkpoint_steps(source):
    raise ConfigError(f'--source={source} has no checkpoint yet: train it '
                      'first')
  size = int(src.get('image_size') or 0) or models.default_input_shape(
      src['model'])[0]
  steps = 4 if quick else _STEPS.value
  sizes = tuple(common.whole_numbers(_SIZES))
  results = {}
  for n in sizes:
    for mode, (_, overrides) in MODES.items():
      for seed in range(seeds):
        c = base_config(steps, quick)
        c.model = src['model']
        c.model_kwargs = dict(src.get('model_kwargs') or {})
        c.image_size = size
        c.train_examples_per_class = n
        c.seed = seed
        for k, v in overrides.items():
          setattr(c, k, v)
        if mode != 'scratch':
          c.init_from = source
        results[n, mode, seed] = run_cell(
            os.path.join(root, f'{mode}_{n}_s{seed}'), c)
  pre = runs.load_config(source)
  src_rows = [r for r in _read(source) if r['split'] == 'test']
  src_err = (f'{100 * src_rows[-1]["error"]:.1f} % top-1 error on its '
             f'{pre.test_split}' if src_rows else 'no evaluation')
  lines = [
      f'Source: {source} ({pre.model}, {pre.dataset}, step '
      f'{src_rows[-1]["step"] if src_rows else "?"}: {src_err}).',
      '',
      f'CIFAR-10, all ten classes, images upsampled to {size}x{size}; '
      f'{steps} steps of batch {_BATCH.value} per cell (cosine lr), '
      f'{seeds} seed(s) each; test error on the '
      f'{"500" if quick else "10,000"} test images (chance 90 %), mean '
      '+- std over seeds, and the mean wall time of a cell (data, '
      'compilation, training, evaluation):',
      '',
      *_HEADER]
  for n in sizes:
    cells = []
    for m in MODES:
      err = [100 * (1 - results[n, m, s]['accuracy']) for s in range(seeds)]
      wall = np.mean([results[n, m, s]['wall_s'] for s in range(seeds)])
      cells.append(f'{sweeps.mean_std(err)} % ({wall:.0f} s)')
    lines.append(f'| {n} | ' + ' | '.join(cells) + ' |')
  table = '\n'.join(lines) + '\n'
  with open(os.path.join(root, 'results.md'), 'w') as f:
    f.write(table)
  return table


def _read(workdir):
  from cnn.training import metric_writers  # pylint: disable=g-import-not-at-top
  return metric_writers.read_metrics(workdir)


def _study():
  """The study's table; a --workdir that is a file or cannot be written,
  or --sizes that are not numbers, are refused before anything trains."""
  from cnn.training import run_folder  # pylint: disable=g-import-not-at-top
  if not _SOURCE.value:
    run_folder.prepare(_WORKDIR.value)
    return study(_WORKDIR.value, _QUICK.value)
  common.whole_numbers(_SIZES)  # before the folder is made
  run_folder.prepare(_WORKDIR.value)
  return source_study(_WORKDIR.value, _SOURCE.value, max(1, _SEEDS.value),
                      _QUICK.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  print(common.run(_study), end='')


if __name__ == '__main__':
  common.main(main)
