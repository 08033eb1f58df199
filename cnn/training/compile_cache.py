"""JAX's persistent compilation cache: compile a step once, reuse it.

A train step takes seconds to tens of seconds to compile on a CPU, more for
deep nets (results/speed/README.md), paid again by every run, every resumed
run and every sweep member. With the cache, XLA's executable is stored on
disk keyed by the computation, the compile options, the jax/jaxlib version
and the device, so an identical step in another process loads in well under
a second; anything different compiles afresh (the key cannot match a
different program).

The experiment scripts turn it on (`--compilation_cache`, default
`~/.cache/cnn/jax`, or `$CNN_COMPILATION_CACHE`; `off` turns it off).
"""
from __future__ import annotations

import os

DEFAULT_DIR = os.path.join('~', '.cache', 'cnn', 'jax')
OFF = ('off', 'none', 'false', '0')
# Every compiled program is written, however quick its compile (JAX's
# default skips those under 1 s): the cache is looked up for every compile
# anyway, a small entry costs a few kB and milliseconds, and the many
# sub-second compiles of small steps, eval steps and box ops added up: the
# warm suite ran faster with all of them cached (results/speed/README.md,
# "The compilation cache and the suite's time").
MIN_COMPILE_SECONDS = 0.0


def resolve(path: str | None = None) -> str | None:
  """The cache folder `path` asks for (None: off). '' or None: the
  default, `$CNN_COMPILATION_CACHE` when set."""
  if not path:
    path = os.environ.get('CNN_COMPILATION_CACHE', '') or DEFAULT_DIR
  if path.lower() in OFF:
    return None
  return os.path.abspath(os.path.expanduser(path))


def _settings(folder: str) -> dict:
  """JAX's config options that put the cache in `folder`."""
  return {'jax_enable_compilation_cache': True,
          'jax_compilation_cache_dir': folder,
          'jax_persistent_cache_min_compile_time_secs': MIN_COMPILE_SECONDS,
          'jax_persistent_cache_min_entry_size_bytes': 0}


def enable(path: str | None = None) -> str | None:
  """Turns the persistent cache on in `path` (see `resolve`), or leaves it
  off; returns the folder used. Call before the first compilation."""
  import jax  # pylint: disable=g-import-not-at-top
  folder = resolve(path)
  if folder is None:
    jax.config.update('jax_enable_compilation_cache', False)
    return None
  os.makedirs(folder, exist_ok=True)
  for name, value in _settings(folder).items():
    jax.config.update(name, value)
  return folder


def environment(folder: str) -> dict:
  """The variables that give a child Python process the cache in `folder`
  (`enable`'s settings as JAX reads them from the environment, for children
  that never call `enable`, e.g. `python -c` scripts), and
  `$CNN_COMPILATION_CACHE` for the experiment scripts."""
  env = {name.upper(): str(value).lower() if isinstance(value, bool)
         else str(value) for name, value in _settings(folder).items()}
  env['CNN_COMPILATION_CACHE'] = folder
  return env
