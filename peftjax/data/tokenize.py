"""Encoders: datasets of text rows -> datasets of token ids, for classification and SFT.

A row longer than ``max_length`` tokens is handled by the ``overflow`` policy: ``'truncate'``
(cut to ``max_length``), ``'skip'`` (drop it; counted in ``Encoded.num_skipped``) or
``'error'`` (raise, naming the row index and its length). Missing columns, ``None`` or
non-string values and rows the tokenizer rejects raise a ``DataError`` naming column and row.

>>> import datasets
>>> from peftjax.models.tokenizer import load_tokenizer
>>> rows = datasets.Dataset.from_dict({'text': ['good', 'bad'], 'label': [1, 0]})
>>> enc = encode_classification(rows, load_tokenizer('all-minilm-l6-v2'), max_length=16)
>>> enc.dataset.column_names, enc.num_skipped
(['input_ids', 'token_type_ids', 'labels'], 0)
"""
from __future__ import annotations

from typing import NamedTuple

import datasets
import numpy as np

from peftjax.data import chat
from peftjax.errors import DataError

OVERFLOW_POLICIES = ('truncate', 'skip', 'error')


class Encoded(NamedTuple):
  dataset: datasets.Dataset   # ragged int32 token columns (plus scalar ``labels``)
  num_skipped: int            # rows dropped by overflow='skip'
  num_truncated: int          # rows cut by overflow='truncate'


def encode_classification(dataset: datasets.Dataset, tokenizer, *, text_column: str = 'text',
                          pair_column: str | None = None, label_column: str = 'label',
                          max_length: int = 128, overflow: str = 'truncate',
                          chunk_size: int = 1000) -> Encoded:
  """Tokenizes ``text_column`` (and ``pair_column`` as the second segment) with special tokens.

  Output columns: ``input_ids``, ``token_type_ids`` (if the tokenizer makes them), ``labels``
  (int, from ``label_column``).
  """
  text_columns = [text_column] + ([pair_column] if pair_column else [])
  _check_columns(dataset, text_columns + [label_column], overflow)
  texts = [_strings(dataset, c) for c in text_columns]
  labels = dataset[label_column][:]
  for row, label in enumerate(labels):
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
      raise DataError(f'row {row}: column {label_column!r} is {label!r}, expected an int class id')
  encoded = {}
  for lo in range(0, len(dataset), chunk_size):
    chunk = [t[lo:lo + chunk_size] for t in texts]
    try:
      part = tokenizer(*chunk)
    except Exception:  # pylint: disable=broad-except  # find and name the offending row
      part = {}
      for i in range(len(chunk[0])):
        single = _tokenize_row(tokenizer, [t[i] for t in chunk], lo + i, text_columns)
        for key, value in single.items():
          part.setdefault(key, []).append(value)
    for key in ('input_ids', 'token_type_ids'):
      if key in part:
        encoded.setdefault(key, []).extend(part[key])
  lengths = [len(ids) for ids in encoded['input_ids']]
  keep, cut = _apply_overflow(lengths, max_length, overflow)
  for row in cut:
    single = tokenizer(*[t[row] for t in texts], truncation=True, max_length=max_length)
    for key in encoded:
      encoded[key][row] = single[key]
  columns = {k: [np.asarray(v[r], np.int32) for r in keep] for k, v in encoded.items()}
  columns['labels'] = [int(labels[r]) for r in keep]
  return Encoded(datasets.Dataset.from_dict(columns), len(lengths) - len(keep), len(cut))


def encode_sft(dataset: datasets.Dataset, tokenizer, *, messages_column: str | None = None,
               prompt_column: str = 'prompt', response_column: str = 'response',
               system: str | None = None, max_length: int = 512,
               overflow: str = 'truncate') -> Encoded:
  """Renders each row as a chat (see :mod:`peftjax.data.chat`) and shifts it for causal LM.

  Rows are ``messages_column`` lists of ``{'role', 'content'}``, or else
  ``prompt_column``/``response_column`` pairs (with an optional ``system`` turn). With the
  conversation's tokens ``t`` and response mask ``m``, the output columns are
  ``input_ids = t[:-1]``, ``labels = t[1:]`` (targets already shifted: position j predicts
  ``labels[j]``) and ``loss_mask = m[1:]``. ``max_length`` bounds ``len(input_ids)``;
  ``'truncate'`` keeps the first ``max_length`` positions.
  """
  columns = [messages_column] if messages_column else [prompt_column, response_column]
  _check_columns(dataset, columns, overflow)
  if messages_column:
    conversations = dataset[messages_column][:]
  else:
    prompts, responses = (_strings(dataset, c) for c in columns)
    conversations = [chat.pair_messages(p, r, system) for p, r in zip(prompts, responses)]
  rows = []
  for row, messages in enumerate(conversations):
    if messages is None:
      raise DataError(f'row {row}: column {messages_column!r} is None')
    try:
      ids, mask = chat.encode_chat(tokenizer, messages, row=row)
    except DataError:
      raise
    except Exception as e:
      raise _tokenizer_failed(row, columns, e) from e
    rows.append((ids[:-1], ids[1:], mask[1:]))
  keep, cut = _apply_overflow([len(r[0]) for r in rows], max_length, overflow)
  cut = set(cut)
  out = {'input_ids': [], 'labels': [], 'loss_mask': []}
  for row in keep:
    for key, value in zip(out, rows[row]):
      out[key].append(value[:max_length] if row in cut else value)
  return Encoded(datasets.Dataset.from_dict(out), len(rows) - len(keep), len(cut))


def _check_columns(dataset, columns, overflow) -> None:
  if overflow not in OVERFLOW_POLICIES:
    raise ValueError(f'overflow={overflow!r}; expected one of {OVERFLOW_POLICIES}')
  missing = [c for c in columns if c not in dataset.column_names]
  if missing:
    raise DataError(f'column(s) {", ".join(map(repr, missing))} missing; present columns: '
                    f'{", ".join(dataset.column_names) or "(none)"}')
  if len(dataset) == 0:
    raise DataError(f'the dataset is empty (columns: {", ".join(dataset.column_names)})')


def _strings(dataset, column) -> list[str]:
  values = dataset[column][:]
  for row, value in enumerate(values):
    if not isinstance(value, str):
      raise DataError(f'row {row}: column {column!r} is {value!r}, expected a string')
  return values


def _tokenize_row(tokenizer, texts, row, columns):
  try:
    return tokenizer(*texts)
  except Exception as e:
    raise _tokenizer_failed(row, columns, e) from e


def _tokenizer_failed(row, columns, error) -> DataError:
  return DataError(f'row {row}: tokenizing column(s) {", ".join(columns)} failed: '
                   f'{type(error).__name__}: {error}')


def _apply_overflow(lengths, max_length, overflow) -> tuple[list[int], list[int]]:
  """(rows kept, rows among them to truncate) under the ``overflow`` policy."""
  long = [row for row, n in enumerate(lengths) if n > max_length]
  if long and overflow == 'error':
    row = long[0]
    raise DataError(f'row {row} has {lengths[row]} tokens > max_length={max_length} '
                    f'({len(long)} row(s) too long; overflow="error")')
  if overflow == 'skip':
    long_set = set(long)
    return [r for r in range(len(lengths)) if r not in long_set], []
  return list(range(len(lengths))), long
