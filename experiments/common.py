"""What every experiment script does around its work: quiet logs, one-line
errors."""
import os
import re
import signal
import sys

# Before TensorFlow is imported anywhere: hide its C++ INFO/WARNING chatter.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# TF only decodes the input here; its oneDNN graph rewrites (which announce
# themselves on every start) are not used: the decoded CIFAR-10 and MNIST
# arrays are byte-identical either way (checked).
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging  # pylint: disable=g-import-not-at-top,wrong-import-position

from cnn.errors import UserError  # pylint: disable=g-import-not-at-top,wrong-import-position

_CACHE = flags.DEFINE_string(
    'compilation_cache', '', "JAX's persistent compilation cache: a folder "
    "('' = $CNN_COMPILATION_CACHE or ~/.cache/cnn/jax), or 'off'.")


def run(fn, *args, cache_default: str = '', **kwargs):
  """Calls `fn`; a UserError becomes `error: <message>` and exit status 1.

  `cache_default`: the compilation cache's folder when --compilation_cache
  is not given ('off' for the benchmark, which times compilation).
  """
  # TFDS and orbax log every file they touch at INFO; keep the console to
  # the progress lines. --verbosity=0 (absl) brings them back.
  if logging.get_verbosity() == logging.INFO and '--verbosity' not in ' '.join(
      sys.argv):
    logging.set_verbosity(logging.WARNING)
  from cnn.training import compile_cache  # pylint: disable=g-import-not-at-top
  compile_cache.enable(_CACHE.value if flags.FLAGS['compilation_cache'].present
                       else cache_default)
  try:
    return fn(*args, **kwargs)
  except UserError as e:
    if type(e).__name__ == 'Interrupted':  # Ctrl-C / SIGTERM, step saved
      print(f'interrupted: {e}', file=sys.stderr)
      sys.exit(130)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  except KeyboardInterrupt:
    # A second Ctrl-C while a run saved its step for the first (the loop's
    # StopRequest), or a Ctrl-C under a handler other than stop_at_once's.
    # The run has closed its checkpoints, waiting for a save under way: the
    # note, read now, names the checkpoint a rerun resumes from.
    print(interrupted_line('SIGINT: stopped at once'), file=sys.stderr)
    sys.exit(130)
  except BrokenPipeError:
    _stdout_gone()


def main(fn, flags_parser=None) -> None:
  """`app.run(fn)` for an experiment script (its `__main__`), its flags
  parsed by `parse_flags` (a mistake is one line), a Ctrl-C stopping it at
  once with one line (`stop_at_once`) wherever the work has not taken
  Ctrl-C itself (a training loop saves its step).

  What `fn` prints after its work (a results line, a table) may meet a
  closed stdout (`... | head -n 1`, `... | true`): the script then ends
  quietly with status 0, as `run` does, instead of a BrokenPipeError
  traceback or, where stdout is buffered, "Exception ignored ... Broken
  pipe" and status 120 at the interpreter's last flush.
  """
  stop_at_once()

  def guarded(argv):
    try:
      result = fn(argv)
      sys.stdout.flush()  # inside the guard, not at exit
      return result
    except BrokenPipeError:
      _stdout_gone()
  app.run(guarded, flags_parser=flags_parser or parse_flags)


_NOTE = []  # what a Ctrl-C that stops the command at once leaves


def on_interrupt(note) -> None:
  """`note()` -> str: what this command leaves when a Ctrl-C stops it at
  once (where a rerun resumes), said on the interruption's line. It runs
  in a signal handler: files only, no imports."""
  _NOTE[:] = [note]


def interrupted_line(what: str) -> str:
  """`interrupted: WHAT; NOTE` (the registered note, where one is)."""
  note = ''
  if _NOTE:
    try:
      note = _NOTE[0]()
    except Exception:  # pylint: disable=broad-except
      note = ''  # the line itself must come
  return f'interrupted: {what}' + (f'; {note}' if note else '')


def stop_at_once() -> None:
  """SIGINT ends the process at once with one line and status 130.

  Python's own Ctrl-C raises KeyboardInterrupt wherever the main thread
  is: inside `import jax` it became an ImportError traceback or a C++
  abort (SIGABRT), inside a garbage-collector callback it was swallowed
  ("Exception ignored") and the command went on. Until a command's work
  takes Ctrl-C itself (the training loop's `StopRequest`, the sweep's
  scheduler), nothing it has begun needs saving: its files are written
  whole (a temporary file renamed), its checkpoints by orbax's rename.
  A SIGINT that was ignored when the process started (`nohup`, a
  background job) stays ignored.
  """
  if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _stop_at_once)


def _stop_at_once(signum, frame) -> None:
  del frame
  try:
    sys.stdout.flush()
  except Exception:  # pylint: disable=broad-except
    pass  # mid-write in the main thread, or a closed pipe
  line = interrupted_line(f'{signal.Signals(signum).name}: stopped at once')
  try:
    os.write(2, (line + '\n').encode())
  finally:
    os._exit(128 + signum)  # pylint: disable=protected-access


def _stdout_gone() -> None:
  """Exit status 0 for a reader that has what it wanted (`... | head`);
  stdout goes to /dev/null so that the interpreter's last flush is quiet."""
  null = os.open(os.devnull, os.O_WRONLY)
  os.dup2(null, sys.stdout.fileno())
  os.close(null)
  sys.exit(0)


def whole_numbers(flag) -> list[int]:
  """The values of a list flag (absl's DEFINE_list holds strings) as
  integers; a UserError (one line) naming the value that is not one.

  Args:
    flag: the FlagHolder that DEFINE_list returned.
  """
  given = ','.join(flag.value or [])
  example = f"--{flag.name}={','.join(flag.default or ['1', '2'])}"
  out = []
  for v in flag.value or []:
    try:
      out.append(int(v))
    except ValueError:
      raise UserError(f"--{flag.name}={given}: '{v}' is not a whole number; "
                      f'give whole numbers separated by commas, e.g. '
                      f'{example}') from None
  if not out:
    raise UserError(f'--{flag.name} is empty; give whole numbers separated '
                    f'by commas, e.g. {example}')
  return out


def parse_flags(argv):
  """absl's flag parsing, every mistake one line (exit status 2).

  A bad `--config=FILE:ARG` or `--config.FIELD=VALUE`: ml_collections
  raises a bare AttributeError/KeyError/ValueError/TypeError (with a
  traceback) for an unknown field or a value of the wrong type. Any other
  flag error is absl's message, once: absl's own fallback parsed again and
  reported the overrides parsed the first time as 'defined twice'. An
  override may be written `--config.FIELD VALUE` (bool fields too) and
  before `--config=FILE`; an argument that is no flag (a forgotten
  `--workdir=`) is named.
  """
  normalized = _normalized(argv)
  if list(argv) == sys.argv:  # ml_collections reads its overrides there
    sys.argv = normalized
  argv = normalized
  _check_config_file(argv)
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    _flag_error(e, argv)
  except (AttributeError, KeyError, ValueError, TypeError) as e:
    message = ' '.join(str(e).replace('\\n', ' ').replace("\\'", "'").split())
    if len(message) > 1 and message[0] == message[-1] and message[0] in '\'"':
      message = message[1:-1]  # the repr quotes of a KeyError
    _usage(f'bad --config override: {message} (the fields and their types '
           'are those of the config file)')
  if len(rest) > 1:
    _unexpected(rest[1:])
  return rest


def _usage(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _normalized(argv: list[str]) -> list[str]:
  """`--config.FIELD VALUE` as `--config.FIELD=VALUE` (absl leaves the
  VALUE of a bool field as a stray argument), `--config FILE` as
  `--config=FILE`, and `--config=FILE` first (ml_collections refuses an
  override before it)."""
  out, i = [argv[0]], 1
  while i < len(argv):
    a = argv[i]
    if a == '--':
      out += argv[i:]
      break
    if ((a == '--config' or a.startswith('--config.')) and '=' not in a
        and i + 1 < len(argv) and not argv[i + 1].startswith('--')):
      out.append(f'{a}={argv[i + 1]}')
      i += 2
      continue
    out.append(a)
    i += 1
  first = [a for a in out[1:] if a.startswith('--config=')]
  return out[:1] + first + [a for a in out[1:] if a not in first]


def _flag_error(e, argv) -> None:
  """One line for absl's flag error `e` (its parse of `argv` failed)."""
  bad = _mistyped_override(e, argv)
  if bad:
    _usage(f'bad --config override: {bad}')
  text = str(e)
  if 'Error whilst parsing config file' in text:
    # get_config raised (e.g. an unknown preset): its message is the last
    # line of the traceback ml_collections folds into the flag error.
    last = [l.strip() for l in text.splitlines() if l.strip()][-1]
    _usage(f'bad --config: {last.split(": ", 1)[-1]}')
  missing = re.match(r'Missing value for flag (--[\w.]+)', text)
  if missing:
    name = missing.group(1)
    _usage(f'{name} needs a value: write {name}=VALUE')
  required = re.search(r'Flag (--\w+) must have a value other than None',
                       text)
  if required:
    name = required.group(1)
    stray = [a for i, a in enumerate(argv[1:], 1) if not a.startswith('-')
             and not (argv[i - 1].startswith('--') and '=' not in argv[i - 1])]
    fix = (f'the run folder? write {name}={stray[0]} (a flag)'
           if stray and name == '--workdir' else
           f'{name}={name[2:].upper()} (see --helpshort)')
    _usage(f'{name} is required: {fix}')
  _usage(f'{text.splitlines()[0]} (see --helpshort)')


def _unexpected(extra: list[str]) -> None:
  """One line for arguments that are no flag."""
  hint = 'flags are written --NAME=VALUE'
  if 'workdir' in flags.FLAGS and not flags.FLAGS['workdir'].present:
    hint = f'the run folder? write --workdir={extra[0]} (a flag)'
  _usage(f"unexpected argument{'s' if len(extra) > 1 else ''} "
         f"{' '.join(extra)}: {hint}")


def _check_config_file(argv) -> None:
  """`--config=FILE[:ARG]` whose FILE is not there: one line and exit
  status 2 (ml_collections defers the error to a traceback at first use)."""
  for a in argv[1:]:
    if a == '--':
      return
    if not a.startswith('--config='):
      continue
    value = a.split('=', 1)[1]
    path = value.partition(':')[0]
    if os.path.isfile(path):
      continue
    folder = os.path.dirname(path) or '.'
    choices = [os.path.join(folder, f) for f in sorted(
        os.listdir(folder) if os.path.isdir(folder) else ())
               if f.endswith('.py') and _has_get_config(
                   os.path.join(folder, f))]
    hint = (f'choose one of {", ".join(choices)}' if choices
            else 'e.g. --config=configs/cifar10.py:cifar_resnet20')
    print(f'error: --config={value}: no config file {path}; {hint}',
          file=sys.stderr)
    sys.exit(2)


def _has_get_config(path: str) -> bool:
  try:
    with open(path, encoding='utf-8') as f:
      return 'def get_config(' in f.read()
  except (OSError, UnicodeDecodeError):
    return False


def _mistyped_override(error, argv) -> str | None:
  """The message for `--config.FIELD=VALUE` whose VALUE is not of FIELD's
  type: ml_collections then leaves the flag undefined, and absl reports an
  unknown flag (or, on a second parse, one defined twice)."""
  name = getattr(error, 'flagname', None) or ''
  if isinstance(error, flags.IllegalFlagValueError):
    match = re.search(r'--(config\.[\w.]+)=', str(error))
    name = match.group(1) if match else ''
  if not name.startswith('config.'):
    return None
  field = name[len('config.'):]
  given = [a.split('=', 1)[1] for a in argv if a.startswith(f'--{name}=')]
  if not given:
    return None
  # The one absl refused (a field given twice: not always the first).
  value = next((v for v in given if f'--{name}={v}:' in str(error)),
               given[-1])
  kind = 'the type of the field in the config file'
  try:
    from cnn.tools import sweeps  # pylint: disable=g-import-not-at-top
    spec = next(a.split('=', 1)[1] for a in argv if a.startswith('--config='))
    path, _, arg = spec.partition(':')
    node = sweeps.load_module(path).get_config(arg or None)
    for part in field.split('.'):
      node = node[part]
    t = type(node).__name__
    kind = f"{'an' if t[0] in 'aeiou' else 'a'} {t}, like its value {node!r}"
  except Exception:  # pylint: disable=broad-except
    pass  # The plain message below is still right.
  return f"--{name}={value}: '{value}' is not {kind}"
