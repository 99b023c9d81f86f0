"""Exceptions shared across peftjax; each message names the offending path, key or value."""


class CheckpointError(ValueError):
  """A checkpoint (directory, safetensors, GGUF, adapter) is missing, corrupt or does not fit.

  >>> raise CheckpointError('/m/model.safetensors: tensor lm_head.weight missing')
  Traceback (most recent call last):
  ...
  peftjax.errors.CheckpointError: /m/model.safetensors: tensor lm_head.weight missing
  """


class UnsupportedModelError(ValueError):
  """The checkpoint's architecture / model_type is not in the model zoo."""


class DataError(ValueError):
  """A dataset, column or row cannot be used as asked; the message names column, row and value.

  >>> raise DataError("column 'text' missing; present columns: label, sentence")
  Traceback (most recent call last):
  ...
  peftjax.errors.DataError: column 'text' missing; present columns: label, sentence
  """
