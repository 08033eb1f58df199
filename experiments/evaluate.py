r"""Restores any task's checkpoint and prints its held-out metrics.

  python -m experiments.evaluate --workdir=runs/r20 [--split=test] \
    [--checkpoint=latest|best|STEP] [--picture=PNG] [--examples=N]

`--split=train` scores the run's own training images as it scores the test
images (clean, eval mode; classification runs, whose training split sits in
memory): with the test error it gives the generalisation gap.
`--examples=N` scores the first N examples of the split only.

Classification: loss and top-1 error; localization: class error, mean IoU,
localization error, single-window and multi-scale dense; detection: mAP@0.5,
proposal recall and time per image. --picture draws the checkpoint's
predictions on test images (localization, detection).
"""
from absl import app
from absl import flags

from experiments import common

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training run folder.')
_SPLIT = flags.DEFINE_string('split', 'test', 'test, val or train (the '
                             "run's training images, eval mode).")
_CHECKPOINT = flags.DEFINE_string('checkpoint', 'latest',
                                  'latest, best or a step number.')
_PICTURE = flags.DEFINE_string('picture', None,
                               'Also draw predictions on test images to '
                               'this PNG.')
_EXAMPLES = flags.DEFINE_integer('examples', 0, 'Only the first N examples '
                                 'of the split (0: all).')
_EMA = flags.DEFINE_bool('ema', False, 'Evaluate the moving average of the '
                         'weights (a run with ema_decay > 0).')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from cnn import runs  # pylint: disable=g-import-not-at-top
  from cnn.training import metric_writers  # pylint: disable=g-import-not-at-top
  r = common.run(runs.evaluate_checkpoint, _WORKDIR.value, _SPLIT.value,
                 _CHECKPOINT.value, _PICTURE.value, _EXAMPLES.value,
                 _EMA.value)
  keys = tuple(r['eval_keys']) + tuple(
      k for k in ('loss', 'iou50', 'dense_error', 'dense_mean_iou',
                  'mean_box_mean_iou', 'network_seconds', 'proposal_seconds')
      if k not in r['eval_keys'])
  split = _SPLIT.value + ('_ema' if _EMA.value else '')
  print(f"step {r['step']} {split} ({r['task']}, "
        f"{r['examples']:.0f} examples): {metric_writers.format_metrics(r, keys)}")
  if _PICTURE.value:
    print(f'picture: {_PICTURE.value}')


if __name__ == '__main__':
  common.main(main)
