"""Errors that mean "the input is wrong", as opposed to a bug in jaxdpo.

`python -m jaxdpo.main` (and `jaxdpo.convert`) print a `UserError` as one line, `error: ...`,
and exit with status 2; every other exception keeps its traceback, so an internal bug is never
disguised as bad input. Each subclass also derives from the built-in error it used to be
(ValueError, FileNotFoundError, ...), so callers that caught those keep working.
"""

from __future__ import annotations


class UserError(Exception):
  """Bad input (a config key, a data record, a file, a mesh): the message says where and how to fix it."""


class ConfigError(UserError, ValueError):
  """A config value that cannot be used; the message names the key (`config.train.batch_size`)."""


class DataError(UserError, ValueError):
  """A record, file or tokenizer that cannot be used; the message says where and why."""


class ImageError(UserError, ValueError):
  """An image file that cannot be used; the message names the file."""


class ConversionError(UserError, ValueError):
  """A checkpoint or HF model that cannot be converted or loaded."""


class TokenizerSourceError(ConversionError):
  """hf-to-jax was given no tokenizer (or, for a vision-language model, image processor) that loads."""


class CheckpointNotFoundError(ConversionError, FileNotFoundError):
  """A path that should hold a checkpoint does not."""


class OutputExistsError(UserError, FileExistsError):
  """An output directory already exists and overwriting was not asked for."""


class MeshConfigError(ConfigError):
  """A mesh or batch size that cannot work on the devices at hand."""


class MemoryPlanError(ConfigError):
  """The run cannot fit in device memory; the message lists what to change."""


class DistributedInitError(UserError, RuntimeError):
  """The multi-host runtime could not be started; the message says what to check."""


class NonFiniteError(UserError, FloatingPointError):
  """A step's loss or gradient norm was NaN or inf; the message names the step and the metric."""


class CheckpointError(UserError, RuntimeError):
  """No training checkpoint in the workdir can be restored; the message says what to do."""
