"""Figure 6, Table 6, lr and filter plots from run folders.

The run folders are written here record by record in the format of
cnn/training/metric_writers.py, so every number in the table is known in
advance; the filter grid reads a real orbax checkpoint of a freshly
initialised net.
"""
import json
import struct

import numpy as np
import pytest

from cnn.training import checkpointing
from cnn import models
from cnn.training import optim
from cnn.tools import plotting
from cnn.training import state as state_lib
from cnn.tasks.classification import task as classification
from cnn.errors import ConfigError
from configs import plain_vs_resnet

# (name, model, seed, train errors, test errors) at steps 100 and 200.
RUNS = [
    ('plain20_s0', 'cifar_plain20', 0, (0.50, 0.30), (0.55, 0.35)),
    ('plain56_s0', 'cifar_plain56', 0, (0.70, 0.45), (0.72, 0.48)),
    ('resnet20_s0', 'cifar_resnet20', 0, (0.45, 0.25), (0.50, 0.31)),
    ('resnet20_s1', 'cifar_resnet20', 1, (0.47, 0.27), (0.52, 0.33)),
    ('resnet56_s0', 'cifar_resnet56', 0, (0.40, 0.20), (0.45, 0.28)),
]


def write_run(root, name, model, seed, train, test):
  d = root / name
  d.mkdir()
  config = plain_vs_resnet.get_config('cpu')
  config.model, config.seed = model, seed
  (d / 'config.json').write_text(config.to_json_best_effort())
  with open(d / 'metrics.jsonl', 'w') as f:
    for step, tr, te in zip((100, 200), train, test):
      f.write(json.dumps({'step': step, 'split': 'train', 'loss': 1.0,
                          'error': tr, 'learning_rate': 0.1 / step}) + '\n')
      f.write(json.dumps({'step': step, 'split': 'test', 'loss': 1.0,
                          'error': te}) + '\n')
  return d


@pytest.fixture(name='sweep_dir')
def fixture_sweep_dir(tmp_path):
  for run in RUNS:
    write_run(tmp_path, *run)
  (tmp_path / 'not_a_run').mkdir()  # Ignored: no config.json.
  return tmp_path


def png_size(path):
  with open(path, 'rb') as f:
    head = f.read(24)
  assert head[:8] == b'\x89PNG\r\n\x1a\n' and head[12:16] == b'IHDR'
  return struct.unpack('>II', head[16:24])


def test_a_sweep_of_other_nets_gets_one_panel_not_two_empty_ones(tmp_path):
  for seed in (0, 1):
    write_run(tmp_path, f'lenet5_s{seed}', 'lenet5', seed, (0.1, 0.02),
              (0.12, 0.03 + 0.01 * seed))
  fig = plotting.figure6(plotting.load_runs(str(tmp_path)))
  assert len(fig.axes) == 1 and fig.axes[0].get_title() == 'lenet5'
  lines = fig.axes[0].get_lines()
  assert len(lines) == 2  # training (dashed) and test, seed-averaged
  np.testing.assert_allclose(lines[1].get_ydata(), [12.0, 3.5])


def test_figure6_has_the_papers_layout(sweep_dir):
  runs = plotting.load_runs(str(sweep_dir))
  assert [r.name for r in runs] == ['plain20_s0', 'plain56_s0',
                                    'resnet20_s0', 'resnet20_s1',
                                    'resnet56_s0']
  fig = plotting.figure6(runs)
  left, right = fig.axes[:2]
  assert (left.get_title(), right.get_title()) == ('plain nets', 'ResNets')
  assert left.get_xlabel() == right.get_xlabel() == 'iterations'
  assert left.get_ylabel() == 'error (%)'
  assert left.get_ylim() == right.get_ylim()
  lo, hi = left.get_ylim()
  assert lo <= 20 and hi >= 72  # Every curve is inside the shared range.
  for ax in (left, right):
    lines = ax.get_lines()
    assert len(lines) == 4  # Train (dashed) and test (bold) per depth.
    dashed = [l for l in lines if l.get_linestyle() == '--']
    bold = [l for l in lines if l.get_linestyle() == '-']
    assert len(dashed) == len(bold) == 2
    assert min(l.get_linewidth() for l in bold) > max(
        l.get_linewidth() for l in dashed)
    assert [t.get_text() for t in ax.get_legend().get_texts()][:2] == [
        'training error', 'test error']
  # The same colour for a depth on both panels.
  assert [l.get_color() for l in left.get_lines()] == [
      l.get_color() for l in right.get_lines()]
  legend = [t.get_text() for t in right.get_legend().get_texts()]
  assert legend[2:] == ['ResNet-20 (2 seeds)', 'ResNet-56']
  # Two seeds of ResNet-20 are averaged: test error 50/52 -> 51 %.
  r20_test = [l for l in right.get_lines() if l.get_linestyle() == '-'][0]
  np.testing.assert_allclose(r20_test.get_ydata(), [51.0, 32.0])
  np.testing.assert_array_equal(r20_test.get_xdata(), [100, 200])


def test_table6_numbers_come_from_the_metrics(sweep_dir):
  table = plotting.table6(plotting.load_runs(str(sweep_dir)))
  rows = {tuple(c.strip() for c in line.split('|')[1:3]): line
          for line in table.splitlines()[2:]}
  assert set(rows) == {('plain', '20'), ('plain', '56'), ('ResNet', '20'),
                       ('ResNet', '56')}
  cells = [c.strip() for c in rows[('ResNet', '20')].split('|')[1:-1]]
  # params, runs, iterations, final train, final test, best test, paper.
  assert cells[2:] == ['0.27M', '2', '200', '26.00 ± 1.41', '32.00 ± 1.41',
                       '32.00 ± 1.41', '8.75 (0.27M)']
  cells = [c.strip() for c in rows[('plain', '56')].split('|')[1:-1]]
  assert cells[2:] == ['0.85M', '1', '200', '45.00', '48.00', '48.00', '-']
  assert '6.97 (0.85M)' in rows[('ResNet', '56')]


def test_filters_come_from_the_checkpoint(tmp_path):
  d = write_run(tmp_path, 'resnet8_s0', 'cifar_resnet8', 0, (0.5, 0.4),
                (0.6, 0.5))
  model = models.get_model('cifar_resnet8', num_classes=10)
  config = plain_vs_resnet.get_config('local')
  state = state_lib.create(
      lambda r: classification.init_variables(model, (32, 32, 3), r),
      optim.make_optimizer(config), 3)
  ckpt = checkpointing.Checkpointer(str(d / 'checkpoints'))
  ckpt.save(200, state, {'model': config.model, 'param_shapes':
                         checkpointing.param_shapes(state.params)})
  ckpt.close()
  kernel, layer, step = plotting.first_conv_kernel(str(d))
  assert (layer, step) == ('stem/conv', 200)
  np.testing.assert_array_equal(
      kernel, np.asarray(state.params['stem']['conv']['kernel']))
  fig = plotting.filters_figure(kernel)
  images = [ax.get_images()[0].get_array() for ax in fig.axes
            if ax.get_images()]
  assert len(images) == 16 and images[0].shape == (3, 3, 3)
  assert all(0 <= im.min() and im.max() <= 1 for im in images)

  # Everything experiments.plot writes: valid PNGs and the table.
  written, table = plotting.write_all(str(tmp_path), str(tmp_path / 'out'),
                                      dpi=50)
  assert '| ResNet | 8 | 0.08M | 1 | 200 |' in table
  names = sorted(p.split('/')[-1] for p in written)
  assert names == ['figure6.png', 'filters.png', 'lr_resnet8_s0.png',
                   'table6.md']
  w, h = png_size(tmp_path / 'out' / 'figure6.png')
  assert (w, h) == (500, 200)  # 10 x 4 inches at dpi 50.
  png_size(tmp_path / 'out' / 'filters.png')
  png_size(tmp_path / 'out' / 'lr_resnet8_s0.png')


def test_runs_other_than_seeds_are_not_averaged(tmp_path):
  # A schedule sweep: same net, different members -> separate curves/rows.
  write_run(tmp_path, 'step_s0', 'cifar_resnet20', 0, (0.5, 0.4), (0.5, 0.4))
  write_run(tmp_path, 'plateau_f0.1_p1_s0', 'cifar_resnet20', 0, (0.6, 0.2),
            (0.6, 0.3))
  runs = plotting.load_runs(str(tmp_path))
  right = plotting.figure6(runs).axes[1]
  labels = [t.get_text() for t in right.get_legend().get_texts()][2:]
  assert labels == ['ResNet-20 plateau_f0.1_p1', 'ResNet-20 step']
  colours = {str(l.get_color()) for l in right.get_lines()}
  assert len(colours) == 2
  table = plotting.table6(runs)
  assert '| ResNet step | 20 | 0.27M | 1 | 200 | 40.00 | 40.00 | 40.00 |' in (
      table)
  assert '| ResNet plateau_f0.1_p1 | 20 |' in table


def test_lr_plot_and_errors(sweep_dir, tmp_path):
  run = plotting.load_runs(str(sweep_dir))[0]
  ax = plotting.lr_figure(run).axes[0]
  assert ax.get_yscale() == 'log' and ax.get_ylabel() == 'learning rate'
  np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), [1e-3, 5e-4])
  assert [r.name for r in plotting.load_runs(str(sweep_dir), only='^resnet20')
          ] == ['resnet20_s0', 'resnet20_s1']
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ConfigError, match='no run with metrics'):
    plotting.load_runs(str(tmp_path / 'empty'))
  with pytest.raises(ConfigError, match='not a folder'):
    plotting.load_runs(str(tmp_path / 'missing'))
