"""What every experiment script does around its work: quiet logs, one-line
errors."""
import os
import sys

# Before TensorFlow is imported anywhere: hide its C++ INFO/WARNING chatter.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
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


def parse_flags(argv):
  """absl's flag parsing, with a bad `--config=FILE:ARG` or
  `--config.FIELD=VALUE` as one line.

  ml_collections' config flags raise a bare AttributeError/KeyError/
  ValueError/TypeError (with a traceback) for an unknown field or a value of
  the wrong type; turn those into `error: ...` and exit status 2, like
  absl's own usage errors.
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    if 'Error whilst parsing config file' not in str(e):
      return app.parse_flags_with_usage(argv)  # absl's usage message, exit 1
    # get_config raised (e.g. an unknown preset): its message is the last line
    # of the traceback ml_collections folds into the flag error.
    last = [l.strip() for l in str(e).splitlines() if l.strip()][-1]
    print(f'error: bad --config: {last.split(": ", 1)[-1]}', file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError, ValueError, TypeError) as e:
    message = ' '.join(str(e).replace('\\n', ' ').replace("\\'", "'").split())
    if len(message) > 1 and message[0] == message[-1] and message[0] in '\'"':
      message = message[1:-1]  # the repr quotes of a KeyError
    print(f'error: bad --config override: {message} (the fields and their '
          'types are those of the config file)', file=sys.stderr)
    sys.exit(2)
