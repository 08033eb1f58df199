"""Builds the oneDNN convolution (`python -m cnn.ops.native.build`).

Compiles `onednn_conv.cc` with the system C++ compiler against XLA's FFI
headers (shipped with jaxlib: `jax.ffi.include_dir()`) and the oneDNN headers
and library that the `onednn-devel-cpu-gomp` / `onednn-cpu-gomp` wheels put
under the environment's prefix (`<prefix>/include`, `<prefix>/lib`). The
library lands in `cnn/ops/native/_lib/` (ignored by git), next to a stamp of
the source it came from; an up-to-date build is left alone. `make setup` runs
this after installing the package; a failed build prints why and leaves the
convolution to XLA (exit status 0 unless --strict).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, 'onednn_conv.cc')
OUT_DIR = os.path.join(HERE, '_lib')
LIBRARY = os.path.join(OUT_DIR, 'libonednn_conv.so')
STAMP = LIBRARY + '.sha1'
DNNL_SONAME = 'libdnnl.so.3'


def onednn_prefixes() -> list[str]:
  """Where the oneDNN wheels may have put `lib/` and `include/`."""
  import site  # pylint: disable=g-import-not-at-top
  found = []
  for p in (os.environ.get('CNN_ONEDNN_ROOT'), sys.prefix,
            site.getuserbase()):
    if p and p not in found:
      found.append(p)
  return found


def find_onednn_library() -> str | None:
  """The oneDNN shared library (`libdnnl.so.3`), None where it is missing."""
  for prefix in onednn_prefixes():
    path = os.path.join(prefix, 'lib', DNNL_SONAME)
    if os.path.exists(path):
      return path
  return None


def _find_header_root() -> str | None:
  for prefix in onednn_prefixes():
    inc = os.path.join(prefix, 'include')
    if os.path.exists(os.path.join(inc, 'oneapi', 'dnnl', 'dnnl.hpp')):
      return inc
  return None


def source_digest() -> str:
  with open(SOURCE, 'rb') as f:
    return hashlib.sha1(f.read()).hexdigest()


def is_built() -> bool:
  """The library exists and was built from the source as it is now."""
  try:
    with open(STAMP, encoding='utf-8') as f:
      return os.path.exists(LIBRARY) and f.read().strip() == source_digest()
  except OSError:
    return False


def build(force: bool = False, quiet: bool = False) -> str:
  """Compiles the library; returns its path. Raises RuntimeError (one line
  naming what is missing) where it cannot be built."""
  if is_built() and not force:
    return LIBRARY
  if sys.platform != 'linux':
    raise RuntimeError(f'the oneDNN convolution is built on Linux only (this '
                       f'is {sys.platform}); XLA\'s convolution is used')
  cxx = os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++')
  if not cxx:
    raise RuntimeError('no C++ compiler (g++) found: install one (apt-get '
                       'install g++) and rerun make setup')
  lib = find_onednn_library()
  inc = _find_header_root()
  if not lib or not inc:
    raise RuntimeError(
        'oneDNN not found under ' + ', '.join(onednn_prefixes()) + ': pip '
        'install -c constraints.txt onednn-cpu-gomp onednn-devel-cpu-gomp')
  import jax  # pylint: disable=g-import-not-at-top
  libdir = os.path.dirname(lib)
  os.makedirs(OUT_DIR, exist_ok=True)
  tmp = f'{LIBRARY}.{os.getpid()}.tmp'
  cmd = [cxx, '-std=c++17', '-O2', '-fPIC', '-shared', '-fopenmp',
         '-w', '-I', jax.ffi.include_dir(), '-I', inc,
         SOURCE, '-o', tmp, os.path.join(libdir, DNNL_SONAME),
         f'-Wl,-rpath,{libdir}']
  if not quiet:
    print('building the oneDNN convolution:', ' '.join(cmd), flush=True)
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError('the oneDNN convolution did not compile: ' +
                       (proc.stderr.strip().splitlines() or ['?'])[-1])
  os.replace(tmp, LIBRARY)
  with open(STAMP, 'w', encoding='utf-8') as f:
    f.write(source_digest())
  return LIBRARY


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--force', action='store_true', help='rebuild')
  parser.add_argument('--strict', action='store_true',
                      help='exit 1 when it cannot be built')
  args = parser.parse_args(argv)
  try:
    path = build(force=args.force)
  except RuntimeError as e:
    print(f'oneDNN convolution not built: {e}', file=sys.stderr)
    return 1 if args.strict else 0
  print(f'oneDNN convolution: {path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
