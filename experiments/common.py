"""What every experiment script does around its work: quiet logs, one-line
errors."""
import os
import sys

# Before TensorFlow is imported anywhere: hide its C++ INFO/WARNING chatter.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import logging  # pylint: disable=g-import-not-at-top,wrong-import-position

from cnn.errors import UserError  # pylint: disable=g-import-not-at-top,wrong-import-position


def run(fn, *args, **kwargs):
  """Calls `fn`; a UserError becomes `error: <message>` and exit status 1."""
  # TFDS and orbax log every file they touch at INFO; keep the console to
  # the progress lines. --verbosity=0 (absl) brings them back.
  if logging.get_verbosity() == logging.INFO and '--verbosity' not in ' '.join(
      sys.argv):
    logging.set_verbosity(logging.WARNING)
  try:
    return fn(*args, **kwargs)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
