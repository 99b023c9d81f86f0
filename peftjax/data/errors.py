"""The exception raised for bad data: its message names the column, row and value at fault."""


class DataError(ValueError):
  """A dataset, column or row cannot be used as asked.

  >>> raise DataError("column 'text' missing; present columns: label, sentence")
  Traceback (most recent call last):
  ...
  peftjax.data.errors.DataError: column 'text' missing; present columns: label, sentence
  """
