"""The benchmark's library helpers, its command line, and the PyTorch twin of
the CIFAR nets (skipped where torch is not installed)."""
import subprocess
import sys

import jax
import numpy as np
import pytest

from cnn.tools import benchmarking
from cnn.data import input_pipeline
from cnn import models
from cnn.tools import summary
from tests.conftest import ROOT


def test_synthetic_batch_looks_like_a_host_batch():
  b = benchmarking.synthetic_batch(6, (32, 32, 3), 10, seed=3, mask=True)
  assert b['image'].shape == (6, 32, 32, 3) and b['image'].dtype == np.uint8
  assert b['label'].dtype == np.int32 and b['label'].max() < 10
  assert b['mask'].tolist() == [1.0] * 6
  again = benchmarking.synthetic_batch(6, (32, 32, 3), 10, seed=3)
  np.testing.assert_array_equal(b['image'], again['image'])


def test_time_interleaved_alternates_and_counts():
  calls = []
  times = benchmarking.time_interleaved(
      {'a': lambda: calls.append('a'), 'b': lambda: calls.append('b')},
      steps=3, warmup=1)
  assert calls == ['a', 'b'] * 4
  assert {k: len(v) for k, v in times.items()} == {'a': 3, 'b': 3}
  assert all(t >= 0 for v in times.values() for t in v)


def test_pipeline_rate_and_memory_probes():
  data = benchmarking.synthetic_arrays(64, (8, 8, 3), 10)
  assert isinstance(data, input_pipeline.ArrayData) and len(data) == 64
  assert benchmarking.pipeline_rate(data, 16, num_batches=5) > 0
  assert benchmarking.peak_host_rss_bytes() > 10 << 20
  # The CPU backend keeps no allocator statistics: None, not a made-up 0.
  if jax.default_backend() == 'cpu':
    assert benchmarking.device_peak_bytes() is None


def test_bad_model_is_one_error_line():
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.benchmark',
       '--config=configs/cifar10.py:cifar_resnet7'],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and 'depth 7 is not of the form 6n+2' in last


# --- PyTorch reference -----------------------------------------------------

def _torch_twin():
  torch = pytest.importorskip('torch')
  from experiments import torch_reference  # pylint: disable=g-import-not-at-top
  return torch, torch_reference


@pytest.mark.parametrize('name,kwargs', [
    ('cifar_resnet20', {}), ('cifar_plain8', {}),
    ('cifar_resnet8', {'shortcut': 'B'})])
def test_torch_twin_has_the_papers_parameter_count(name, kwargs):
  _, tr = _torch_twin()
  flax_model = models.get_model(name, num_classes=10, **kwargs)
  _, params = summary.trace(flax_model, (32, 32, 3))
  # 0.27M for ResNet-20 in He et al. 2015, Table 6.
  assert tr.count_params(tr.model_from_name(name, **kwargs)) == \
      summary.count_params(params)


def _copy_flax_to_torch(torch, variables, net):
  """Loads Flax variables into the twin, module by module."""
  params, stats = variables['params'], variables['batch_stats']
  t = lambda a: torch.from_numpy(np.asarray(a).copy())

  def conv(mod, p):
    mod.weight.data = t(p['kernel']).permute(3, 2, 0, 1).contiguous()

  def bn(mod, p, s):
    mod.weight.data, mod.bias.data = t(p['scale']), t(p['bias'])
    mod.running_mean.data, mod.running_var.data = t(s['mean']), t(s['var'])

  conv(net.stem[0], params['stem']['conv'])
  bn(net.stem[1], params['stem']['bn'], stats['stem']['bn'])
  blocks = iter(net.blocks)
  for stage in ('stage1', 'stage2', 'stage3'):
    for key in sorted(params[stage], key=lambda k: int(k[5:])):
      p, s, block = params[stage][key], stats[stage][key], next(blocks)
      conv(block.conv1, p['conv1'])
      bn(block.bn1, p['bn1'], s['bn1'])
      conv(block.conv2, p['conv2'])
      bn(block.bn2, p['bn2'], s['bn2'])
  net.head.weight.data = t(params['head']['kernel']).T.contiguous()
  net.head.bias.data = t(params['head']['bias'])


@pytest.mark.parametrize('train', [False, True])
def test_torch_twin_computes_the_same_function(train):
  """Same weights in, same logits out: the timing compares the same net,
  option-A shortcut and BatchNorm (batch or running statistics) included."""
  torch, tr = _torch_twin()
  model = models.get_model('cifar_resnet8', num_classes=10)
  x = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
  variables = model.init(jax.random.PRNGKey(0), x, train=False)
  # Non-trivial running statistics, so eval mode tests them too.
  variables = jax.tree.map(
      lambda a: a + 0.1 * np.random.default_rng(1).uniform(
          0.5, 1.5, a.shape).astype(np.float32), dict(variables))
  if train:
    expected, _ = model.apply(variables, x, train=True,
                              mutable=['batch_stats'])
  else:
    expected = model.apply(variables, x, train=False)
  net = tr.model_from_name('cifar_resnet8')
  _copy_flax_to_torch(torch, variables, net)
  net.train(train)
  with torch.no_grad():
    got = net(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  np.testing.assert_allclose(got, np.asarray(expected), rtol=1e-4, atol=1e-4)


def test_torch_train_step_learns_a_fixed_batch():
  torch, tr = _torch_twin()
  torch.manual_seed(0)
  step = tr.TrainStep(tr.model_from_name('cifar_resnet8'),
                      np.full((32, 32, 3), 0.5, np.float32), lr=0.05, pad=0)
  b = benchmarking.synthetic_batch(16, (32, 32, 3), 10, seed=0)
  images = torch.from_numpy(b['image'])
  labels = torch.from_numpy(b['label']).long()
  losses = [float(step(images, labels)) for _ in range(8)]
  assert losses[-1] < 0.7 * losses[0]
  assert step.eval(images).shape == (16, 10)


def test_per_layer_view_lists_the_convolutions_and_their_gradients():
  model = models.get_model('cifar_resnet8', num_classes=10)
  shapes = benchmarking.conv_shapes(model, (32, 32, 3), 4)
  # Stem, then per stage (16, 32, 64 filters at 32, 16, 8 px) one block of
  # two 3x3 convs, the first of stages 2 and 3 with stride 2.
  assert [(s.describe(), s.count) for s in shapes] == [
      ('32x32x3->16 3x3/1', 1), ('32x32x16->16 3x3/1', 2),
      ('32x32x16->32 3x3/2', 1), ('16x16x32->32 3x3/1', 1),
      ('16x16x32->64 3x3/2', 1), ('8x8x64->64 3x3/1', 1)]
  times = benchmarking.conv_layer_times(shapes[1], steps=2)
  from cnn.ops import onednn  # pylint: disable=g-import-not-at-top
  want = {'forward', 'input_grad', 'weight_grad', 'weight_grad_shifted',
          'weight_grad_chunked', 'chunks'}
  if onednn.status()[0]:  # oneDNN's three kernels beside XLA's
    want |= {'onednn_forward', 'onednn_input_grad', 'onednn_weight_grad'}
  assert set(times) == want
  assert all(t > 0 for t in times.values())
  # At batch 4 the weight gradient is too small to measure chunks for.
  assert times['chunks'] == 1
  # The shifted-GEMM weight gradient is the convolution's weight gradient.
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 6, 5, 3)).astype(np.float32)
  g = rng.standard_normal((2, 6, 5, 4)).astype(np.float32)
  k = np.zeros((3, 3, 3, 4), np.float32)
  want = jax.vjp(lambda v: benchmarking._conv(x, v, 1), k)[1](g)[0]  # pylint: disable=protected-access
  np.testing.assert_allclose(benchmarking.shifted_weight_grad(x, g, 3), want,
                             rtol=1e-5, atol=1e-5)
