"""Errors that reach the user as one clear line (no traceback).

The experiment scripts catch `UserError` and print `error: <message>`; every
message names the problem and the fix. Anything else is a bug and keeps its
traceback.
"""


class UserError(Exception):
  """Bad input that the user can fix: config, data, checkpoint."""


class ConfigError(UserError, ValueError):
  """A config value is invalid or inconsistent."""


class DataError(UserError):
  """A dataset is missing, cannot be downloaded, or has the wrong shape."""


class CheckpointError(UserError):
  """A checkpoint is corrupt or belongs to another model/run."""


class NonFiniteLossError(UserError):
  """Training produced a NaN or Inf loss."""
