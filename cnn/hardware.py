"""The CPU this process runs on, as /proc/cpuinfo describes it."""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def cpuinfo() -> dict:
  """The first CPU's fields of /proc/cpuinfo ({} where there is none)."""
  fields = {}
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        name, _, value = line.partition(':')
        fields.setdefault(name.strip(), value.strip())
  except OSError:
    pass
  return fields
