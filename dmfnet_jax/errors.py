"""User-facing error types.

Every error a user can cause (a bad file, setting or checkpoint) is raised as a
subclass of `DmfnetError` with a message naming the culprit, so the CLI can print
it without a traceback from deep inside JAX.
"""


# Exit statuses of the jobs and the `dmfnet-jax` command (README, "Exit status").
EXIT_OK = 0
EXIT_CONFIG_ERROR = 2  # a bad setting, file or checkpoint stopped the run before its work
EXIT_ITEMS_SKIPPED = 3  # the run finished, but some items (pairs, volumes) were skipped


class DmfnetError(Exception):
  """Base class of errors caused by input, configuration or checkpoints."""


class ConfigError(DmfnetError):
  """A configuration key is unknown or has an impossible value."""


class DataError(DmfnetError):
  """A data root, folder or image pair is missing or malformed."""


class ImageReadError(DataError):
  """An image file cannot be read or decoded."""


class CheckpointError(DmfnetError):
  """A checkpoint is missing, corrupt or does not match the model config."""
