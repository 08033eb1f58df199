r"""Restores a run's checkpoint and prints its loss and error (detection
runs: mAP@0.5 and time per test image).

  python -m experiments.evaluate --workdir=runs/r20 [--split=test] \
    [--checkpoint=latest|best|STEP]
"""
from absl import app
from absl import flags

from experiments import common

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training run folder.')
_SPLIT = flags.DEFINE_string('split', 'test', 'Held-out split: test or val.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', 'latest',
                                  'latest, best or a step number.')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from cnn import train  # pylint: disable=g-import-not-at-top
  r = common.run(train.evaluate_checkpoint, _WORKDIR.value, _SPLIT.value,
                 _CHECKPOINT.value)
  if 'map' in r:  # a detection run
    print(f"step {r['step']} {_SPLIT.value}: mAP@0.5 {r['map']:.4f}, "
          f"{r['seconds_per_image'] * 1000:.1f} ms per image "
          f"({r['examples']:.0f} images)")
    return
  print(f"step {r['step']} {_SPLIT.value}: loss {r['loss']:.4f} "
        f"error {r['error']:.4f} ({r['examples']:.0f} examples)")


if __name__ == '__main__':
  app.run(main)
