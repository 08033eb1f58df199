"""`provenance.json`: where and with what a run was trained.

One entry per sitting (a run killed and resumed has several): the commit of
the code (and whether the tree had uncommitted changes), the CPU model and
flags or the accelerator, the jax / jaxlib / flax versions, the convolution
in use, the steps it trained and the seconds of its training loop, with the
dates. With `metrics.jsonl` and `config.json` it is what a study keeps of a
run under results/ (`cnn.tools.records`), so a table quoting the run says
what produced it.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess

import jax

from cnn import hardware

FILE = 'provenance.json'
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def _git(*args) -> str | None:
  try:
    out = subprocess.run(['git', '-C', _REPO, *args], capture_output=True,
                         text=True, timeout=10, check=True)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip()


def code_version() -> dict:
  """The commit of the code this process runs, and whether the tree had
  changes to tracked files (None where it is not a git checkout)."""
  commit = _git('rev-parse', 'HEAD')
  dirty = _git('status', '--porcelain', '--untracked-files=no')
  return {'commit': commit, 'dirty': None if dirty is None else bool(dirty)}


def _cpu() -> dict:
  fields = hardware.cpuinfo()
  flags = fields.get('flags', '').split()
  simd = [f for f in flags if f.startswith(('avx', 'amx', 'fma'))]
  return {'model': fields.get('model name') or platform.processor(),
          'cores': os.cpu_count(), 'simd_flags': ' '.join(sorted(simd))}


def environment() -> dict:
  """Hardware and software of this process."""
  import flax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  return {
      'cpu': _cpu(),
      'backend': jax.default_backend(),
      'devices': f'{len(devices)} x {devices[0].device_kind}',
      'jax': jax.__version__, 'jaxlib': jaxlib.__version__,
      'flax': flax.__version__, 'python': platform.python_version(),
  }


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec='seconds')


def read(workdir: str) -> dict:
  try:
    with open(os.path.join(workdir, FILE), encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError):
    return {'sittings': []}


def _write(workdir: str, record: dict) -> None:
  path = os.path.join(workdir, FILE)
  tmp = f'{path}.{os.getpid()}.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(record, f, indent=1)
    f.write('\n')
  os.replace(tmp, path)


def start_sitting(workdir: str, start_step: int, convolution: str
                  ) -> str | None:
  """Appends this sitting (the code, the machine, the convolution).

  Returns:
    The convolution of the previous sitting where it differs from this
    one's (e.g. `conv='auto'` resumed where oneDNN is not built), else None:
    the steps from here differ from an unchanged run by float32 rounding.
  """
  record = read(workdir)
  before = [s.get('convolution') for s in record.get('sittings', [])]
  changed = before[-1] if before and before[-1] != convolution else None
  record.setdefault('sittings', []).append({
      'started': _now(), 'start_step': start_step, **code_version(),
      **environment(), 'convolution': convolution})
  _write(workdir, record)
  return changed


def end_sitting(workdir: str, end_step: int, loop_seconds: float | None
                ) -> None:
  """Closes the last sitting: the step it reached, when, the run's loop
  seconds so far (summed over sittings, as metrics.jsonl's
  wall_seconds)."""
  record = read(workdir)
  if not record.get('sittings'):
    return
  record['sittings'][-1].update(ended=_now(), end_step=end_step)
  if loop_seconds is not None:
    record['loop_seconds'] = round(loop_seconds, 1)
  _write(workdir, record)
