"""Receptive fields, top-9 selection, occlusion maps and the visualize
command on a tiny trained run (tfds mock data)."""
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn import models
from cnn.errors import ConfigError
from cnn.tasks.classification import task as classification
from cnn.tools import visualize
from configs import localization
from tests.conftest import ROOT


def conv(x, kernel, stride=1):
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), ((1, 1), (1, 1)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@pytest.fixture(name='kernels')
def fixture_kernels():
  rng = np.random.default_rng(0)
  return {'a': rng.normal(size=(3, 3, 2, 4)).astype(np.float32),
          'b': rng.normal(size=(3, 3, 4, 3)).astype(np.float32)}


def test_receptive_fields_of_known_conv_stacks(kernels):
  def features(k, x):
    one = conv(x, k['a'])
    down = jax.nn.relu(conv(x, k['a'], stride=2))
    return {'one': one, 'two': conv(jax.nn.relu(one), k['b']),
            'down_then_one': conv(down, k['b'])}

  units = [('one', 8, 8, 0), ('two', 8, 8, 2), ('two', 0, 0, 1),
           ('two', 15, 3, 0), ('down_then_one', 4, 4, 1),
           ('down_then_one', 0, 0, 0), ('down_then_one', 7, 2, 2)]
  boxes = visualize.receptive_fields(features, kernels, units, (16, 16, 2),
                                     repeats=4, chunk=8)
  # (y0, y1, x0, x1), half-open: one 3x3 conv sees 3x3, two see 5x5, both
  # centred on the unit; padding has no pixels, so corners are clipped.
  assert boxes.tolist() == [
      [7, 10, 7, 10], [6, 11, 6, 11], [0, 3, 0, 3], [13, 16, 1, 6],
      # 3x3/2 then 3x3: 7x7 centred on input pixel 2y, clipped at 0 and 16.
      [5, 12, 5, 12], [0, 4, 0, 4], [11, 16, 1, 8]]


def test_stages_filters_and_fields_of_a_cifar_resnet():
  model = models.get_model('cifar_resnet8', num_classes=10)
  variables = classification.init_variables(model, (32, 32, 3),
                                            jax.random.PRNGKey(0))
  calls = visualize.layer_calls(model, variables, (32, 32, 3))
  assert visualize.stage_paths(calls) == ['stage1', 'stage2', 'stage3']
  kernel, path = visualize.first_conv_kernel(variables, calls)
  assert path == 'stem/conv' and kernel.shape == (3, 3, 3, 16)
  features = visualize.stage_features(model, ['stage1', 'stage2'])
  boxes = visualize.receptive_fields(
      lambda v, x: features(v, x)[1], variables,
      [('stage1', 16, 16, 3), ('stage2', 8, 8, 5)], (32, 32, 3), chunk=16)
  # stage1: the stem and two 3x3 convs, 7x7; stage2 adds a 3x3/2 and a 3x3
  # conv: 13x13 around input pixel 2 * 8.
  assert boxes.tolist() == [[13, 20, 13, 20], [10, 23, 10, 23]]


def test_top_9_are_the_largest_activations():
  rng = np.random.default_rng(1)
  acts = rng.normal(size=(30, 3, 4, 5)).astype(np.float32)
  values, where = jax.device_get(visualize.spatial_max(jnp.asarray(acts)))
  top = visualize.top_k_images(values, 9)
  assert top.shape == (9, 5)
  for c in range(5):
    best = [acts[n, :, :, c].max() for n in range(30)]
    assert top[:, c].tolist() == list(np.argsort(best)[::-1][:9])
    for n in top[:, c]:
      y, x = divmod(int(where[n, c]), 4)
      assert acts[n, y, x, c] == best[n]
  # The channels with the highest mean peak come first.
  acts[..., 3] += 10.0
  acts[..., 1] += 5.0
  values, _ = visualize.spatial_max(acts)
  assert visualize.pick_channels(values, 2).tolist() == [3, 1]
  assert visualize.top_k_images(values[:4], 9).shape == (4, 5)


def test_occlusion_images_are_the_surest_right_ones_one_per_class():
  p_true = np.array([0.1, 0.9, 0.8, 0.95, 0.3, 0.7])
  labels = np.array([0, 1, 1, 2, 0, 3])
  # 0.95 (class 2), 0.9 (class 1), not 0.8 (class 1 again), 0.7 (class 3)
  assert visualize.confident_examples(p_true, labels, 3) == [3, 1, 5]
  assert visualize.confident_examples(p_true, labels, 9) == [3, 1, 5, 4]


def test_occlusion_changes_the_map_only_where_the_model_looks():
  def prob_fn(x):  # a "net" that only looks at the top-left 8x8 quadrant
    p = jax.nn.sigmoid(jnp.sum(x[:, :8, :8], axis=(1, 2, 3)) / 50.0)
    return jnp.stack([1 - p, p], axis=-1)

  image = np.random.default_rng(2).uniform(0.1, 1.0, (16, 20, 3))
  prob, ys, xs = visualize.occlusion_map(prob_fn, image, 1, patch=4,
                                         stride=3, batch=8)
  assert ys.tolist() == [0, 3, 6, 9, 12]  # the last flush with the border
  assert xs.tolist() == [0, 3, 6, 9, 12, 15, 16]
  p0 = float(prob_fn(image[None])[0, 1])
  covers = (ys[:, None] < 8) & (xs[None, :] < 8)
  np.testing.assert_allclose(prob[~covers], p0, rtol=1e-6)
  assert np.all(prob[covers] < p0 - 1e-4)  # less evidence: lower p


def is_png(path):
  with open(path, 'rb') as f:
    return f.read(8) == b'\x89PNG\r\n\x1a\n' and path.stat().st_size > 1000


def cli(*args, train_to=None):
  """Runs the command on tfds mock data in a fresh process, after training
  `small_config(steps=2)` into `train_to` there (one TensorFlow start)."""
  train = (f'  runs.train_and_evaluate(small_config(steps=2), '
           f'{str(train_to)!r})\n' if train_to else '')
  script = (
      'import sys; import tensorflow_datasets as tfds; from absl import app\n'
      'from experiments import visualize\n'
      'from cnn import runs; from tests.conftest import small_config\n'
      'with tfds.testing.mock_data(num_examples=24):\n'
      f'{train}  sys.argv = ["visualize", *{list(args)!r}]\n'
      '  app.run(visualize.main)')
  return subprocess.run([sys.executable, '-c', script], cwd=ROOT,
                        capture_output=True, text=True, timeout=300,
                        check=False, env=dict(os.environ, JAX_PLATFORMS='cpu',
                                              TF_CPP_MIN_LOG_LEVEL='2'))


def test_the_command_draws_a_tiny_run(tmp_path):
  wd = tmp_path / 'run'
  proc = cli(f'--workdir={wd}', '--units=2', '--occlusion=2', train_to=wd)
  assert proc.returncode == 0, proc.stderr[-3000:]
  names = ['filters.png', 'top9_stage1.png', 'top9_stage2.png',
           'top9_stage3.png', 'occlusion.png']
  wrote = [l.split()[1] for l in proc.stdout.splitlines()
           if l.startswith('wrote ')]
  assert wrote == [str(wd / 'visualize' / n) for n in names]
  assert all(is_png(wd / 'visualize' / n) for n in names)


def test_other_runs_and_missing_folders_are_one_line(tmp_path):
  other = tmp_path / 'loc'
  other.mkdir()
  (other / 'config.json').write_text(
      localization.get_config().to_json_best_effort())
  with pytest.raises(ConfigError, match=re.escape(
      f'{other} is a localization run; visualize shows classification runs '
      'only')):
    visualize.write_all(str(other))
  with pytest.raises(ConfigError, match='--units=0 must be at least 1'):
    visualize.write_all(str(other), units=0)
  proc = cli(f'--workdir={tmp_path / "nowhere"}')
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr
  assert [l for l in proc.stderr.splitlines() if l.startswith('error')] == [
      f'error: {tmp_path / "nowhere" / "config.json"} not found: --workdir '
      'must be a training run folder']
