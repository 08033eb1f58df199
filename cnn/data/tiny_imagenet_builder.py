"""TFDS builder for Tiny ImageNet (Stanford CS231N) from the official zip.

Builds `tiny_imagenet` 1.0.0 with the features of the prepared copy in
`../shared/data/tfds/tiny_imagenet` (see `../shared/data/README.md`): `id`
(the image's file name, e.g. `n01443537_0.JPEG`, `val_0.JPEG`), `image`
(64x64x3 uint8 JPEG), `label` (200 WordNet ids in the order of `wnids.txt`)
and `bbox` (one box per image); supervised keys (image, label). `train` holds
all 500 images of each class (the shared copy keeps the first 250 of them),
`validation` the 10,000 validation images; the unlabelled `test` images are
skipped.

Download http://cs231n.stanford.edu/tiny-imagenet-200.zip, put it (zipped,
or extracted as tiny-imagenet-200/) in a folder DIR, then from the project
root:

    .venv/bin/python -c "from cnn.data import tiny_imagenet_builder as t; \
        t.prepare('DIR', 'DATA_DIR')"

or, the same with TFDS's CLI, which in TFDS 4.9.10 imports apache-beam and
mlcroissant at start-up even for datasets that use neither
(tensorflow/datasets#5463):

    .venv/bin/pip install apache-beam mlcroissant
    .venv/bin/tfds build cnn/data/tiny_imagenet_builder.py --manual_dir=DIR \
        --data_dir=DATA_DIR

The dataset lands in DATA_DIR/tiny_imagenet/1.0.0; `--config.data_dir=DATA_DIR`
reads it as any other TFDS dataset.

Images: the JPEG bytes are stored unchanged, as in the shared copy, so
nothing is recompressed; the greyscale JPEGs among them decode to three equal
channels because the feature decodes with `channels=3`. An image that is
neither RGB nor greyscale would be converted to RGB and re-encoded.

Boxes: the annotations give pixel corners `x0 y0 x1 y1`, 0-based, with the
last row and column inside the box (values 0..63). The box is TFDS
`BBox(ymin=y0/64, xmin=x0/64, ymax=(y1+1)/64, xmax=(x1+1)/64)`. This is the
conversion of the shared copy, made from the same annotations: there every
coordinate is a multiple of 1/64; ymax and xmax reach exactly 1.0 in 40-45%
of the boxes (the full-width and full-height ones) but are never 0, while
ymin and xmin are 0 in 22-39% but never above 63/64 (counted over the
50,000 training and 10,000 validation boxes of the shared copy). With
`y1/64` no box could reach 1.0.

Importing this module registers `tiny_imagenet` in TFDS; a prepared copy
(the shared one included) still loads through it with the same features,
the label names coming from its `label.labels.txt`.
"""
from __future__ import annotations

import io
import os
from typing import Iterator
import zipfile

from etils import epath
import tensorflow_datasets as tfds

from cnn.errors import DataError

URL = 'http://cs231n.stanford.edu/tiny-imagenet-200.zip'
ZIP_NAME = 'tiny-imagenet-200.zip'
ROOT = 'tiny-imagenet-200'
SIZE = 64

_MISSING = (f'Tiny ImageNet: no {ZIP_NAME} (nor an extracted {ROOT}/) in '
            '{where}; download {url} and put it there (--manual_dir=DIR)')


class TinyImagenet(tfds.core.GeneratorBasedBuilder):
  """Tiny ImageNet: 200 ImageNet classes at 64x64, one box per image."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'The CS231N release; all 500 images per class.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f'Download {URL} and place {ZIP_NAME} (or the folder {ROOT}/ extracted '
      'from it) in the manual dir, e.g. `tfds build '
      'cnn/data/tiny_imagenet_builder.py --manual_dir=DIR`.')

  # TFDS 4.9.10 looks for the file of a builder defined in a package through
  # `importlib_resources`, which it installs only for Python < 3.9, so
  # `download_and_prepare` fails on an import error; this is the path its
  # own fallback gives.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            'Tiny ImageNet (Stanford CS231N): 200 ImageNet classes at 64x64. '
            'train: the 500 training images of each class; validation: the '
            '10,000 validation images (50 per class). Each image has its '
            'class and one bounding box (from the ImageNet localization '
            'annotations). Some images are greyscale; they decode to 3 '
            'equal channels.'),
        features=tfds.features.FeaturesDict({
            'id': tfds.features.Text(),
            'image': tfds.features.Image(
                shape=(SIZE, SIZE, 3), encoding_format='jpeg'),
            # Names come from wnids.txt when building, from
            # label.labels.txt when reading a prepared copy.
            'label': tfds.features.ClassLabel(),
            'bbox': tfds.features.BBoxFeature(),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://cs231n.stanford.edu/',
    )

  def _split_generators(self, dl_manager):
    try:
      manual_dir = dl_manager.manual_dir
    except AssertionError:  # TFDS: the manual dir is missing or empty.
      raise DataError(_MISSING.format(
          where=dl_manager._manual_dir,  # pylint: disable=protected-access
          url=URL)) from None
    with _Release(manual_dir) as release:
      wnids = release.lines('wnids.txt')
    self.info.features['label'].names = wnids
    return {
        'train': self._generate_examples(manual_dir, 'train', wnids),
        'validation': self._generate_examples(manual_dir, 'validation', wnids),
    }

  def _generate_examples(self, manual_dir: epath.Path, split: str,
                         wnids: list[str]) -> Iterator[tuple[str, dict]]:
    label_of = {wnid: i for i, wnid in enumerate(wnids)}
    with _Release(manual_dir) as release:
      for name, wnid, corners, path in _index(release, split, wnids):
        if wnid not in label_of:
          raise DataError(f'Tiny ImageNet: {name} has class {wnid}, which '
                          f'is not in {ROOT}/wnids.txt')
        yield name, {
            'id': name,
            'image': _jpeg(release.read(path), path),
            'label': label_of[wnid],
            'bbox': _bbox(corners, name),
        }


def prepare(manual_dir: str, data_dir: str) -> TinyImagenet:
  """Builds `tiny_imagenet` under `data_dir` from the zip in `manual_dir`.

  The same as `tfds build` (see the module docstring) without the CLI.

  Args:
    manual_dir: folder holding tiny-imagenet-200.zip or tiny-imagenet-200/.
    data_dir: TFDS data dir; the dataset goes to DATA_DIR/tiny_imagenet/1.0.0.

  Returns:
    The prepared builder.
  """
  builder = TinyImagenet(data_dir=os.path.expanduser(data_dir))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=os.path.expanduser(manual_dir)))
  return builder


class _Release:
  """The release in the manual dir, zipped or extracted.

  Inside `with release:`, `read(path)` and `lines(path)` give the files at
  tiny-imagenet-200/`path`.
  """

  def __init__(self, manual_dir: epath.PathLike):
    manual_dir = epath.Path(manual_dir)
    self._zip_path = manual_dir / ZIP_NAME
    self._folder = manual_dir / ROOT
    self._zip = None
    if not (self._zip_path.exists() or (self._folder / 'wnids.txt').exists()):
      raise DataError(_MISSING.format(where=manual_dir, url=URL))

  def __enter__(self) -> _Release:
    if self._zip_path.exists():
      self._zip = zipfile.ZipFile(self._zip_path.open('rb'))
    return self

  def __exit__(self, *exc_info):
    if self._zip is not None:
      self._zip.fp.close()  # ZipFile leaves a file object it got open.
      self._zip.close()
      self._zip = None

  def read(self, path: str) -> bytes:
    try:
      if self._zip is None:
        return (self._folder / path).read_bytes()
      return self._zip.read(f'{ROOT}/{path}')
    except (KeyError, FileNotFoundError):
      where = self._zip_path if self._zip else self._folder.parent
      raise DataError(f'Tiny ImageNet: {ROOT}/{path} is missing from '
                      f'{where}; download {URL} again') from None

  def lines(self, path: str) -> list[str]:
    """The non-empty lines of the text file at `path`, stripped."""
    lines = self.read(path).decode('utf-8').splitlines()
    return [line.strip() for line in lines if line.strip()]


def _index(release: _Release, split: str, wnids: list[str]
           ) -> Iterator[tuple[str, str, list[str], str]]:
  """Yields (file name, wnid, pixel corners, path) of each image of split."""
  if split == 'train':
    for wnid in wnids:
      for line in release.lines(f'train/{wnid}/{wnid}_boxes.txt'):
        name, *corners = line.split()
        yield name, wnid, corners, f'train/{wnid}/images/{name}'
  else:
    for line in release.lines('val/val_annotations.txt'):
      name, wnid, *corners = line.split()
      yield name, wnid, corners, f'val/images/{name}'


def _bbox(corners: list[str], name: str) -> tfds.features.BBox:
  """TFDS box of pixel corners x0 y0 x1 y1 (last row/column inside)."""
  try:
    x0, y0, x1, y1 = (int(c) for c in corners)
  except ValueError:
    raise DataError(f'Tiny ImageNet: the box of {name} is {corners}, not '
                    'four integers x0 y0 x1 y1') from None
  if not 0 <= x0 <= x1 < SIZE or not 0 <= y0 <= y1 < SIZE:
    raise DataError(f'Tiny ImageNet: the box of {name} ({x0} {y0} {x1} {y1})'
                    f' is not within the {SIZE}x{SIZE} image')
  return tfds.features.BBox(ymin=y0 / SIZE, xmin=x0 / SIZE,
                            ymax=(y1 + 1) / SIZE, xmax=(x1 + 1) / SIZE)


def _jpeg(data: bytes, path: str) -> bytes:
  """The image's JPEG bytes, unchanged when RGB or greyscale."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(io.BytesIO(data)) as image:
    if image.format != 'JPEG' or image.size != (SIZE, SIZE):
      raise DataError(f'Tiny ImageNet: {ROOT}/{path} is a {image.size} '
                      f'{image.format}, not a {SIZE}x{SIZE} JPEG')
    if image.mode in ('RGB', 'L'):
      return data
    out = io.BytesIO()
    image.convert('RGB').save(out, format='JPEG', quality=95)
    return out.getvalue()
