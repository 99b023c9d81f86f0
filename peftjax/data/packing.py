"""Greedy sequence packing: ragged token rows -> fixed-length rows holding whole examples.

Examples are placed best-fit-decreasing (longest first, each into the fullest row it still
fits), so no example is split across rows and every token is kept. Each packed row gets
``segment_ids`` (1..k for its k examples, 0 on padding) and ``position_ids`` restarting at 0
for every example; the other token columns (``input_ids``, ``labels``, ``loss_mask``, ...)
are concatenated and padded with 0. Models attend where segment ids are equal and nonzero
(and causal), so ``segment_ids`` is the packed row's attention mask.

>>> import datasets
>>> rows = datasets.Dataset.from_dict({'input_ids': [[5, 6, 7], [8, 9], [4]]})
>>> packed = pack(rows, seq_len=4)
>>> packed[:]['input_ids'], packed[:]['segment_ids'], packed[:]['position_ids']
([[5, 6, 7, 4], [8, 9, 0, 0]], [[1, 1, 1, 2], [1, 1, 0, 0]], [[0, 1, 2, 0], [0, 1, 0, 0]])
"""
from __future__ import annotations

import bisect

import datasets
import numpy as np

from peftjax.errors import DataError


def assign_rows(lengths, seq_len: int) -> list[list[int]]:
  """Best-fit-decreasing bins: for each packed row, the example indices it holds, in order.

  >>> assign_rows([3, 2, 1, 2], seq_len=4)
  [[0, 2], [1, 3]]
  """
  rows, free = [], []   # free: sorted (remaining capacity, row id)
  for example in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
    n = lengths[example]
    if n > seq_len:
      raise DataError(f'row {example} has {n} tokens > seq_len={seq_len}; encode with '
                      f'max_length <= seq_len')
    at = bisect.bisect_left(free, (n, -1))
    if at < len(free):
      remaining, row = free.pop(at)
    else:
      remaining, row = seq_len, len(rows)
      rows.append([])
    rows[row].append(example)
    bisect.insort(free, (remaining - n, row))
  return rows


def pack(dataset: datasets.Dataset, seq_len: int) -> datasets.Dataset:
  """Packs every (ragged, token-level) column of ``dataset`` into rows of ``seq_len``."""
  if len(dataset) == 0:
    raise DataError('the dataset to pack is empty')
  data = {c: dataset[c][:] for c in dataset.column_names}
  for c in ('segment_ids', 'position_ids'):
    if c in data:
      raise DataError(f'column {c!r} is already present: the dataset looks packed')
  for c, values in data.items():
    if not isinstance(values[0], (list, np.ndarray)):
      raise DataError(f'column {c!r} is not token-level (row 0 is {values[0]!r}); only '
                      f'token columns can be packed')
  lengths = [len(ids) for ids in next(iter(data.values()))]
  for c, values in data.items():
    bad = next((r for r, v in enumerate(values) if len(v) != lengths[r]), None)
    if bad is not None:
      raise DataError(f'row {bad}: column {c!r} has {len(values[bad])} entries but '
                      f'{dataset.column_names[0]!r} has {lengths[bad]}')
  bins = assign_rows(lengths, seq_len)
  out = {c: np.zeros((len(bins), seq_len), np.int32)
         for c in [*data, 'segment_ids', 'position_ids']}
  for row, examples in enumerate(bins):
    start = 0
    for segment, example in enumerate(examples, 1):
      end = start + lengths[example]
      for c, values in data.items():
        out[c][row, start:end] = values[example]
      out['segment_ids'][row, start:end] = segment
      out['position_ids'][row, start:end] = np.arange(end - start)
      start = end
  return datasets.Dataset.from_dict({c: v.tolist() for c, v in out.items()})
