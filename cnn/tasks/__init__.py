"""The task registry: `config.task` -> the Task class (`cnn.tasks.base`).

The built-in tasks are imported on first use (detection pulls in OpenCV);
`register` adds another without touching the loop.
"""
from __future__ import annotations

import importlib

from cnn.errors import ConfigError

_BUILTIN = {
    'classification': 'cnn.tasks.classification',
    'localization': 'cnn.tasks.localization',
    'detection': 'cnn.tasks.detection',
}
_REGISTRY: dict = {}


def register(name: str, task_class) -> None:
  """Makes `config.task=name` train `task_class` (a `base.Task`)."""
  task_class.name = name
  _REGISTRY[name] = task_class


def names() -> list[str]:
  return sorted(set(_BUILTIN) | set(_REGISTRY))


def get(config):
  """The Task instance for `config` (its `task` field).

  Raises:
    ConfigError: the config names no task or an unknown one.
  """
  if 'task' not in config or not config.task:
    raise ConfigError('config has no task field; start from a config in '
                      f"configs/ (task is one of {', '.join(names())})")
  name = config.task
  if name not in _REGISTRY and name in _BUILTIN:
    importlib.import_module(_BUILTIN[name])  # registers itself
  if name not in _REGISTRY:
    raise ConfigError(f"task='{name}' is unknown; use one of "
                      f"{', '.join(names())}")
  return _REGISTRY[name](config)
