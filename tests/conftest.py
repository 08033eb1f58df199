"""Shared test fixtures: small configs on tfds mock data, the real data path."""
import os
import pathlib

import pytest

# The CPU train step is compiled without XLA's fusion pass by default (faster
# steps, 2.5x slower compiles; see cnn/steps.py). The suite compiles many tiny
# nets and runs few steps, so it keeps XLA's defaults;
# tests/test_train.py::test_cpu_compiler_options_keep_the_math checks the
# library default against them explicitly.
os.environ.setdefault('CNN_XLA_CPU_FUSION', '1')

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The prepared CIFAR-10 copy beside the project (see shared/data/README.md).
SHARED_TFDS = pathlib.Path(os.environ.get(
    'CNN_SHARED_TFDS', ROOT.parent / 'shared' / 'data' / 'tfds'))
HAS_CIFAR10_JPEG = (SHARED_TFDS / 'cifar10_jpeg').is_dir()

requires_cifar10_jpeg = pytest.mark.skipif(
    not HAS_CIFAR10_JPEG, reason=f'no cifar10_jpeg under {SHARED_TFDS}')


def small_config(model='cifar_resnet8', steps=4, **overrides):
  """The CIFAR recipe shrunk to a few steps of a tiny net."""
  from configs import cifar10  # pylint: disable=g-import-not-at-top
  c = cifar10.get_config(model)
  c.num_train_steps = steps
  c.batch_size = 8
  c.eval_batch_size = 16
  c.eval_every_steps = 2
  c.checkpoint_every_steps = 2
  c.log_every_steps = 1
  c.tensorboard = True
  for k, v in overrides.items():
    setattr(c, k, v)
  return c
