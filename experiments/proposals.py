r"""How well each region-proposal method covers the synthetic objects.

  python -m experiments.proposals [--num_images=200] [--processes=2]

Renders --num_images synthetic detection canvases (objects drawn from the
--source --split images), computes the proposals of every method and prints
a markdown table: proposals per image, wall time per image, and recall at
IoU 0.5 among the first 10/50/100/300/all proposals.

For a fair comparison the baselines are sized like selective search:
sliding windows use sides spanning the objects' size range (4 sides, 3
aspect ratios, half-window stride), and each image gets as many random boxes
as selective search (fast) proposed for it.

On real photographs (any TFDS dataset with objects/bbox, e.g. coco128):

  python -m experiments.proposals --dataset=coco128 --split=validation \
    [--shorter_side=480] [--num_images=128] [--processes=2]

reads the photos with `cnn.data.objects` (shorter side resized to
--shorter_side, boxes scaled) and reports recall at IoU 0.5 and 0.7 of the
first 100 / 300 / 1000 / all proposals per method, with time per image
(selective search one image at a time per process). Sliding windows there
use 6 sides from 16 px to the shorter side (geometric) x 3 ratios.
`--rpn=runs/rac_faster` adds the class-agnostic RPN of a trained Faster
R-CNN (each photo letterboxed to the run's canvas as it trained, every
anchor scored, up to 2,000 boxes after NMS, scaled back to the photo).
"""
import contextlib

from absl import app
from absl import flags

from experiments import common

_DATA_DIR = flags.DEFINE_string('data_dir', '../shared/data/tfds',
                                'TFDS data_dir holding the source dataset.')
_SOURCE = flags.DEFINE_string('source', 'cifar10_jpeg',
                              'TFDS classification dataset of the objects.')
_SPLIT = flags.DEFINE_string('split', 'test', 'Split the objects come from.')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 200, 'Canvases to measure.')
_CANVAS = flags.DEFINE_integer('canvas', 128, 'Canvas side in pixels.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the canvases.')
_PROCESSES = flags.DEFINE_integer('processes', 2,
                                  'Worker processes for selective search.')
_DATASET = flags.DEFINE_string('dataset', None, 'A TFDS detection dataset '
                               'of real photographs (objects/bbox), e.g. '
                               'coco128; default: synthetic canvases.')
_SHORTER = flags.DEFINE_integer('shorter_side', 480, 'Photos are resized to '
                                'this shorter side (with --dataset).')
_RPN = flags.DEFINE_string('rpn', None, 'With --dataset: a Faster R-CNN run '
                           'folder whose class-agnostic RPN adds a row '
                           '(photos letterboxed to its canvas, boxes '
                           'scaled back).')
_REAL_TOP = (100, 300, 1000, 'all')
_METHODS = ('selective_search_fast', 'selective_search_quality', 'sliding',
            'random')

_TOP = (10, 50, 100, 300, 'all')


def measure(images, boxes, valid, sizes, processes: int, seed: int) -> list:
  """One row (name, mean count, ms per image, recalls) per method."""
  import time  # pylint: disable=g-import-not-at-top
  from cnn.tasks.detection import proposals  # pylint: disable=g-import-not-at-top

  rows = []
  fast_counts = None
  for method in ('selective_search_fast', 'selective_search_quality',
                 'sliding', 'random'):
    num = None
    if method == 'random':
      num = max(1, int(fast_counts.max()))
    start = time.perf_counter()
    props, counts = proposals.compute(images, method, num, seed=seed,
                                      processes=processes, sizes=sizes)
    seconds = time.perf_counter() - start
    if method == 'selective_search_fast':
      fast_counts = counts
    if method == 'random':
      # i.i.d. boxes: the first c of `num` are a draw of c boxes.
      counts = fast_counts
    rec = proposals.recall(props, counts, boxes, valid, 0.5, _TOP)
    rows.append((method, float(counts.mean()), 1000 * seconds / len(images),
                 rec))
  return rows


def measure_photos(data, processes: int, seed: int, rpn=None):
  """Rows (method, mean count, ms per image, {iou: recalls}) on photos of
  different sizes: each photo is its own batch of one. `rpn`: (name,
  callable photo -> (boxes, seconds)) for one more row, e.g. a trained
  Faster R-CNN's RPN (`inference.RPNProposer`); its time excludes the first
  call (compilation)."""
  import time  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cnn.tasks.detection import proposals  # pylint: disable=g-import-not-at-top
  n = len(data.images)
  keep = [i for i in range(n) if len(data.boxes[i])]
  rows, fast_counts = [], None
  for method in _METHODS + ((rpn[0],) if rpn else ()):
    start = time.perf_counter()
    lists = []
    if rpn and method == rpn[0]:
      rpn[1](data.images[0])  # compile
      start = time.perf_counter()
      lists = [rpn[1](img)[0] for img in data.images]
    elif method.startswith('selective_search') and processes > 1:
      import multiprocessing  # pylint: disable=g-import-not-at-top
      mode = method[len('selective_search_'):]
      with multiprocessing.get_context('spawn').Pool(processes) as pool:
        lists = pool.map(proposals._ss_one,  # pylint: disable=protected-access
                         [(img, mode) for img in data.images], chunksize=1)
    else:
      for i, img in enumerate(data.images):
        h, w = img.shape[:2]
        num = int(fast_counts[i]) if method == 'random' else None
        sizes = tuple(np.geomspace(16, min(h, w), 6))
        b, c = proposals.compute(img[None], method, num, seed=seed + i,
                                 processes=1, sizes=sizes)
        lists.append(b[0, :c[0]])
    seconds = time.perf_counter() - start
    counts = np.array([len(b) for b in lists])
    if method == 'selective_search_fast':
      fast_counts = np.maximum(counts, 1)
    width = max(int(counts.max()), 1)
    props = np.zeros((n, width, 4), np.float32)
    for i, b in enumerate(lists):
      props[i, :len(b)] = b
    m = max(len(data.boxes[i]) for i in keep)
    gt = np.zeros((n, m, 4), np.float32)
    valid = np.zeros((n, m), bool)
    for i in keep:
      gt[i, :len(data.boxes[i])] = data.boxes[i]
      valid[i, :len(data.boxes[i])] = True
    rec = {iou: proposals.recall(props, counts, gt, valid, iou, _REAL_TOP)
           for iou in (0.5, 0.7)}
    rows.append((method, float(counts.mean()), 1000 * seconds / n, rec))
  return rows


def photo_table(rows) -> str:
  head = ' | '.join(f'R{iou}@{k}' for iou in (0.5, 0.7) for k in _REAL_TOP)
  lines = [f'| method | proposals/image (mean) | time/image (ms) | {head} |',
           '|---' * (3 + 2 * len(_REAL_TOP)) + '|']
  for method, count, ms, rec in rows:
    cells = ' | '.join(f'{rec[iou][k]:.3f}' for iou in (0.5, 0.7)
                       for k in _REAL_TOP)
    lines.append(f'| {method} | {count:.1f} | {ms:.1f} | {cells} |')
  return '\n'.join(lines)


def table(rows) -> str:
  head = ' | '.join(f'R@{k}' for k in _TOP)
  lines = [f'| method | proposals/image (mean) | time/image (ms) | {head} |',
           '|---' * (3 + len(_TOP)) + '|']
  for method, count, ms, rec in rows:
    cells = ' | '.join(f'{rec[k]:.3f}' for k in _TOP)
    lines.append(f'| {method} | {count:.1f} | {ms:.2f} | {cells} |')
  return '\n'.join(lines)


@contextlib.contextmanager
def _data_dir_flag():
  """The library's data advice names the config field; here it is a flag."""
  from cnn.errors import DataError  # pylint: disable=g-import-not-at-top
  try:
    yield
  except DataError as e:
    raise DataError(str(e).replace('--config.data_dir', '--data_dir')
                    ) from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')

  def photos():
    from cnn.data import objects  # pylint: disable=g-import-not-at-top
    from cnn.errors import ConfigError  # pylint: disable=g-import-not-at-top
    split = _SPLIT.value if _SPLIT.value != 'test' or _DATASET.value != (
        'coco128') else 'validation'
    if _RPN.value:  # before the photos load: the flag's error comes first
      from cnn.training import run_folder  # pylint: disable=g-import-not-at-top
      if run_folder.read_config(_RPN.value) is None:
        raise ConfigError(
            f'--rpn={_RPN.value} holds no training run (no config.json); '
            'give the folder of a faster_rcnn run: python -m experiments.'
            'train --config=configs/detection.py:faster_rcnn,raccoon '
            '--workdir=DIR')
    with _data_dir_flag():
      data = objects.load_objects(_DATASET.value, split, _DATA_DIR.value,
                                  shorter_side=_SHORTER.value,
                                  limit=_NUM_IMAGES.value)
    rpn = None
    if _RPN.value:
      from cnn.tasks.detection import inference  # pylint: disable=g-import-not-at-top
      from cnn import runs  # pylint: disable=g-import-not-at-top
      run, state, _ = runs.restore_run(_RPN.value)
      if run.task.name != 'detection' or run.config.kind != 'faster_rcnn':
        raise ConfigError(f'--rpn={_RPN.value} is not a faster_rcnn run; '
                          'give the folder of one (configs/detection.py:'
                          'faster_rcnn,raccoon)')
      rpn = (f'rpn ({run.config.dataset}, {run.config.canvas} px)',
             inference.RPNProposer(run.model, state.variables, run.config,
                                   run.task.spec))
    rows = measure_photos(data, _PROCESSES.value, _SEED.value, rpn)
    print(photo_table(rows))
    print(f'{len(data.images)} photos of {_DATASET.value}/{split}, shorter '
          f'side {_SHORTER.value} px ({data.num_boxes} boxes); recall at IoU '
          f'0.5 / 0.7; selective search wall time with {_PROCESSES.value} '
          'processes (pool start included); random: as many boxes as '
          'selective search fast per image')

  def run():
    if _DATASET.value:
      return photos()
    import numpy as np  # pylint: disable=g-import-not-at-top
    from cnn.data import synthetic_detection  # pylint: disable=g-import-not-at-top
    from cnn.errors import ConfigError  # pylint: disable=g-import-not-at-top

    canvas = _CANVAS.value
    if canvas < 32 or _NUM_IMAGES.value < 1:
      raise ConfigError(f'--canvas={canvas} and --num_images='
                        f'{_NUM_IMAGES.value} must be at least 32 and 1')
    # The default object range (24..64 on 128) scaled to the canvas.
    min_size, max_size = round(canvas * 3 / 16), canvas // 2
    with _data_dir_flag():
      data = synthetic_detection.load(
          _SOURCE.value, _SPLIT.value, _DATA_DIR.value, canvas=canvas,
          seed=_SEED.value, num_examples=_NUM_IMAGES.value,
          min_size=min_size, max_size=max_size).materialize()
    sizes = tuple(np.geomspace(min_size, max_size, 4))
    rows = measure(data.images, data.boxes, data.valid, sizes,
                   _PROCESSES.value, _SEED.value)
    print(table(rows))
    print(f'{len(data)} canvases {canvas}x{canvas} of {_SOURCE.value}/'
          f'{_SPLIT.value} objects ({int(data.num_objects.sum())} boxes, '
          f'sides {min_size}..{max_size}); recall at IoU 0.5; selective '
          f'search wall time with {_PROCESSES.value} processes (pool start '
          f'included); sliding sides {", ".join(f"{s:.0f}" for s in sizes)} '
          'x ratios 3:4, 1, 4:3 at half-window stride; random: as many as '
          'selective search fast per image')
  common.run(run)


if __name__ == '__main__':
  common.main(main)
