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
"""
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


def table(rows) -> str:
  head = ' | '.join(f'R@{k}' for k in _TOP)
  lines = [f'| method | proposals/image (mean) | time/image (ms) | {head} |',
           '|---' * (3 + len(_TOP)) + '|']
  for method, count, ms, rec in rows:
    cells = ' | '.join(f'{rec[k]:.3f}' for k in _TOP)
    lines.append(f'| {method} | {count:.1f} | {ms:.2f} | {cells} |')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')

  def run():
    import numpy as np  # pylint: disable=g-import-not-at-top
    from cnn.data import synthetic_detection  # pylint: disable=g-import-not-at-top
    from cnn.errors import ConfigError, DataError  # pylint: disable=g-import-not-at-top

    canvas = _CANVAS.value
    if canvas < 32 or _NUM_IMAGES.value < 1:
      raise ConfigError(f'--canvas={canvas} and --num_images='
                        f'{_NUM_IMAGES.value} must be at least 32 and 1')
    # The default object range (24..64 on 128) scaled to the canvas.
    min_size, max_size = round(canvas * 3 / 16), canvas // 2
    try:
      data = synthetic_detection.load(
          _SOURCE.value, _SPLIT.value, _DATA_DIR.value, canvas=canvas,
          seed=_SEED.value, num_examples=_NUM_IMAGES.value,
          min_size=min_size, max_size=max_size).materialize()
    except DataError as e:  # the library's advice names the config field
      raise DataError(str(e).replace('--config.data_dir', '--data_dir')
                      ) from None
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
  app.run(main)
