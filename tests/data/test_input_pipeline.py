"""Deterministic batches, whole-split evaluation, data errors."""
import numpy as np
import pytest
import tensorflow_datasets as tfds

from cnn.data import input_pipeline as ip
from cnn.errors import DataError
from cnn.training.batches import TrainBatches
from tests.conftest import SHARED_TFDS, requires_cifar10_jpeg, small_config


def toy(n=10):
  images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones(
      (1, 2, 2, 1), np.uint8)
  return ip.ArrayData(images, np.arange(n, dtype=np.int32))


def test_train_batches_cover_each_epoch_once_and_depend_only_on_step():
  data = toy(10)
  b = TrainBatches(data, batch_size=4, seed=3)
  first_two_epochs = np.concatenate([b.indices(s) for s in range(5)])
  assert sorted(first_two_epochs[:10]) == list(range(10))
  assert sorted(first_two_epochs[10:20]) == list(range(10))
  # A fresh object (a resumed run) gives the same batch for the same step.
  again = TrainBatches(data, batch_size=4, seed=3)
  np.testing.assert_array_equal(again.indices(3), b.indices(3))
  other = TrainBatches(data, batch_size=4, seed=4)
  assert not np.array_equal(other.indices(0), b.indices(0))
  batch = b.batch(2)
  np.testing.assert_array_equal(batch['label'], b.indices(2))


def test_eval_batches_pad_and_mask_the_tail():
  data = toy(10)
  batches = list(ip.eval_batches(data, 4))
  assert [len(x['label']) for x in batches] == [4, 4, 4]
  assert batches[-1]['mask'].tolist() == [1, 1, 0, 0]
  seen = np.concatenate([x['label'][x['mask'] > 0] for x in batches])
  np.testing.assert_array_equal(seen, np.arange(10))


def test_pixel_mean_modes():
  images = np.stack([np.full((2, 2, 3), 0, np.uint8),
                     np.full((2, 2, 3), 255, np.uint8)])
  np.testing.assert_allclose(ip.pixel_mean(images, 'per_pixel'),
                             np.full((2, 2, 3), 0.5))
  np.testing.assert_allclose(ip.pixel_mean(images, 'per_channel'),
                             np.full(3, 0.5))
  with pytest.raises(DataError, match='mean_subtraction'):
    ip.pixel_mean(images, 'bogus')


def test_get_datasets_holds_out_validation_on_mock_data():
  c = small_config(val_examples=10)
  with tfds.testing.mock_data(num_examples=50):
    d = ip.get_datasets(c)
  assert len(d.train) == 40 and len(d.evals['val']) == 10
  assert len(d.evals['test']) == 50
  assert d.train.images.dtype == np.uint8 and d.image_shape == (32, 32, 3)
  assert d.num_classes == 10 and d.mean.shape == (32, 32, 3)


def test_missing_dataset_is_one_clear_line(tmp_path):
  c = small_config(dataset='cifar100', data_dir=str(tmp_path))
  with pytest.raises(DataError) as e:
    ip.get_datasets(c)
  msg = str(e.value)
  assert '\n' not in msg and 'data_dir' in msg and 'cifar100' in msg
  c = small_config(dataset='no_such_dataset', data_dir=str(tmp_path))
  with pytest.raises(DataError, match='no_such_dataset'):
    ip.get_datasets(c)


@requires_cifar10_jpeg
def test_real_cifar10_jpeg_loads_whole_splits():
  test = ip.load_arrays('cifar10_jpeg', 'test', str(SHARED_TFDS))
  assert test.images.shape == (10000, 32, 32, 3)
  assert test.images.dtype == np.uint8
  assert np.bincount(test.labels).tolist() == [1000] * 10


@pytest.mark.parametrize('image_size, expected', [(0, 32), (48, 48)])
def test_a_streamed_split_keeps_the_images_own_size_unless_told(image_size,
                                                                 expected):
  # CIFAR streamed on request: its 32x32, not a resize to ImageNet's 224.
  c = small_config(in_memory='no', image_size=image_size)
  with tfds.testing.mock_data(num_examples=8):
    d = ip.get_datasets(c)
  assert d.train is None and d.train_stream.image_size == expected
  assert d.image_shape == (expected, expected, 3)
  assert d.evals['test'].image_size == expected
