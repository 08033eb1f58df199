"""Tests for the Tiny ImageNet builder on a tiny fake of the official zip."""
import io
import json
import os
import pathlib
import subprocess
import sys
import zipfile

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from cnn.data import tiny_imagenet_builder as tiny
from cnn.errors import DataError
from tests.conftest import ROOT, SHARED_TFDS

# Not sorted: the labels must follow wnids.txt.
WNIDS = ['n02000003', 'n01000001', 'n03000002']
# (file name, wnid, x0 y0 x1 y1, greyscale); x1, y1 are the last column/row.
TRAIN = [
    ('n02000003_0.JPEG', 'n02000003', (0, 0, 63, 63), False),
    ('n02000003_1.JPEG', 'n02000003', (5, 10, 20, 40), True),
    ('n01000001_0.JPEG', 'n01000001', (1, 2, 3, 4), False),
    ('n01000001_1.JPEG', 'n01000001', (0, 32, 62, 63), False),
    ('n03000002_0.JPEG', 'n03000002', (7, 0, 7, 0), False),
]
VAL = [
    ('val_0.JPEG', 'n03000002', (10, 20, 30, 50), False),
    ('val_1.JPEG', 'n02000003', (0, 0, 63, 62), True),
    ('val_2.JPEG', 'n01000001', (33, 1, 63, 9), False),
]


def _jpeg(seed, grey):
  pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), np.uint8)
  image = Image.fromarray(pixels)
  out = io.BytesIO()
  (image.convert('L') if grey else image).save(out, format='JPEG')
  return out.getvalue()


def _tsv(rows):
  return ''.join('\t'.join(map(str, row)) + '\n' for row in rows)


def _make_release(folder):
  """Writes folder/tiny-imagenet-200.zip; returns {file name: JPEG bytes}."""
  images, files = {}, {}
  for seed, (name, wnid, _, grey) in enumerate(TRAIN + VAL):
    images[name] = _jpeg(seed, grey)
    split = f'train/{wnid}' if name.startswith('n') else 'val'
    files[f'{split}/images/{name}'] = images[name]
  for wnid in WNIDS:
    files[f'train/{wnid}/{wnid}_boxes.txt'] = _tsv(
        (name, *box) for name, w, box, _ in TRAIN if w == wnid)
  files['val/val_annotations.txt'] = _tsv(
      (name, wnid, *box) for name, wnid, box, _ in VAL)
  files['wnids.txt'] = '\n'.join(WNIDS) + '\n'
  files['words.txt'] = ''.join(f'{w}\tthing {i}\n' for i, w in enumerate(WNIDS))
  files['test/images/test_0.JPEG'] = _jpeg(99, False)  # Unlabelled: skipped.
  folder.mkdir(parents=True, exist_ok=True)
  with zipfile.ZipFile(folder / tiny.ZIP_NAME, 'w') as z:
    for path, data in files.items():
      z.writestr(f'{tiny.ROOT}/{path}', data)
  return images


def _expected_bbox(box):
  x0, y0, x1, y1 = box
  return np.array([y0, x0, y1 + 1, x1 + 1], np.float32) / 64


def _read(builder, split, raw=False):
  decoders = {'image': tfds.decode.SkipDecoding()} if raw else None
  ds = builder.as_dataset(split=split, decoders=decoders)
  return {ex['id'].decode(): ex for ex in tfds.as_numpy(ds)}


def _check(builder, images):
  """The built dataset holds exactly the fake release's examples."""
  assert {s: v.num_examples for s, v in builder.info.splits.items()} == {
      'train': len(TRAIN), 'validation': len(VAL)}
  assert builder.info.features['label'].names == WNIDS
  for split, rows in (('train', TRAIN), ('validation', VAL)):
    raw, decoded = _read(builder, split, raw=True), _read(builder, split)
    assert sorted(decoded) == sorted(name for name, *_ in rows)
    for name, wnid, box, grey in rows:
      ex = decoded[name]
      assert ex['label'] == WNIDS.index(wnid), name
      np.testing.assert_array_equal(ex['bbox'], _expected_bbox(box))
      assert raw[name]['image'] == images[name]  # Stored unchanged.
      image = ex['image']
      assert image.shape == (64, 64, 3) and image.dtype == np.uint8
      assert ((image == image[..., :1]).all()) == grey, name


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """The fake zip and the dataset built from it in-process."""
  tmp = tmp_path_factory.mktemp('tiny')
  images = _make_release(tmp / 'manual')
  builder = tiny.prepare(str(tmp / 'manual'), str(tmp / 'tfds'))
  return tmp, images, builder


def test_builds_the_zip(built):
  _, images, builder = built
  assert builder.name == 'tiny_imagenet' and str(builder.version) == '1.0.0'
  assert builder.info.supervised_keys == ('image', 'label')
  _check(builder, images)


def test_builds_the_extracted_folder(built, tmp_path):
  tmp, images, _ = built
  with zipfile.ZipFile(tmp / 'manual' / tiny.ZIP_NAME) as z:
    z.extractall(tmp_path / 'manual')
  builder = tiny.prepare(str(tmp_path / 'manual'), str(tmp_path / 'tfds'))
  _check(builder, images)


def test_features_match_the_shared_copy(built):
  shared = SHARED_TFDS / 'tiny_imagenet' / '1.0.0'
  if not shared.is_dir():
    pytest.skip(f'no tiny_imagenet under {SHARED_TFDS}')
  want = json.loads((shared / 'features.json').read_text())
  got = json.loads((pathlib.Path(built[2].data_dir) / 'features.json')
                   .read_text())
  label = got['featuresDict']['features']['label']['classLabel']
  assert label == {'numClasses': str(len(WNIDS))}
  label['numClasses'] = '200'  # The fake has 3 classes, the release 200.
  assert got == want
  # The registered builder still reads the prepared copy, features intact.
  read_only = tfds.builder_from_directory(str(shared))
  builder = tfds.builder('tiny_imagenet', data_dir=str(SHARED_TFDS))
  assert isinstance(builder, tiny.TinyImagenet)
  assert (builder.info.features.to_json_content()
          == read_only.info.features.to_json_content())
  names = (shared / 'label.labels.txt').read_text().split()
  assert builder.info.features['label'].names == names
  assert builder.info.splits['validation'].num_examples == 10000
  ex = next(iter(builder.as_dataset(split='validation[:1]')))
  assert ex['image'].shape == (64, 64, 3) and ex['bbox'].shape == (4,)


@pytest.mark.parametrize('content', ['empty', 'other_file', 'no_dir'])
def test_missing_zip_is_one_clear_error(tmp_path, content):
  manual = tmp_path / 'manual'
  if content != 'no_dir':
    manual.mkdir()
  if content == 'other_file':
    (manual / 'tiny-imagenet-200.tar').write_bytes(b'')
  with pytest.raises(DataError) as info:
    tiny.prepare(str(manual), str(tmp_path / 'tfds'))
  message = str(info.value)
  assert '\n' not in message
  assert tiny.ZIP_NAME in message and tiny.URL in message
  assert str(manual) in message


def test_tfds_build_cli(tmp_path):
  """The documented `tfds build PATH.py --manual_dir --data_dir` command."""
  cli = pathlib.Path(sys.executable).parent / 'tfds'
  if not cli.exists():
    pytest.skip(f'no tfds CLI beside {sys.executable}')
  images = _make_release(tmp_path / 'manual')
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', JAX_PLATFORMS='cpu')
  # TFDS 4.9.10's CLI imports apache_beam and mlcroissant at start-up even
  # for a plain generator builder (tensorflow/datasets#5463); where they are
  # not installed, stand-ins with the two names it touches let it start.
  stubs = tmp_path / 'stubs'
  for module, name in (('apache_beam', 'DoFn'), ('mlcroissant', 'Dataset')):
    try:
      __import__(module)
    except ImportError:
      (stubs / module).mkdir(parents=True)
      (stubs / module / '__init__.py').write_text(f'class {name}:\n  pass\n')
  if stubs.exists():
    env['PYTHONPATH'] = os.pathsep.join(
        p for p in (str(stubs), env.get('PYTHONPATH')) if p)
  proc = subprocess.run(
      [str(cli), 'build', 'cnn/data/tiny_imagenet_builder.py',
       f'--manual_dir={tmp_path / "manual"}',
       f'--data_dir={tmp_path / "tfds"}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
      check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  _check(tfds.builder_from_directory(
      str(tmp_path / 'tfds' / 'tiny_imagenet' / '1.0.0')), images)
