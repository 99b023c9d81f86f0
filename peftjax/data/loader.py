"""Fixed-shape numpy batches with seeded per-epoch shuffling and a resumable position.

Each epoch visits the rows in the order ``np.random.default_rng([seed, epoch]).permutation``
(or file order with ``shuffle=False``), cut into global batches of ``global_batch_size``;
process p of P takes rows ``[p * B / P, (p + 1) * B / P)`` of every global batch, so the
processes' slices are disjoint and together are the global batch. The position is
``LoaderState(epoch, index)`` (index = next global batch in that epoch): save
``loader.state`` in a checkpoint and pass it back as ``state=`` to continue exactly.

Batch keys (all ``[batch, seq_len]`` int32 unless noted):

- every token column of the dataset, right-padded with 0 (``input_ids`` with ``pad_id``);
- ``attention_mask``: the dataset's ``segment_ids`` when packed (0 = pad, k = segment),
  else 1 on tokens and 0 on padding;
- ``position_ids``: the packed ones, else 0, 1, ... per row (0 on padding);
- scalar columns (e.g. classification ``labels``) as ``[batch]`` arrays;
- ``example_mask`` ``[batch]``: 0 on the rows that ``last_batch='pad'`` adds, else 1.

>>> import datasets
>>> rows = datasets.Dataset.from_dict({'input_ids': [[1, 2], [3], [4, 5, 6]], 'labels': [0, 1, 1]})
>>> loader = Loader(rows, global_batch_size=2, seq_len=4, seed=0, process_count=1,
...                 process_index=0)
>>> batch = next(loader)
>>> batch['input_ids'].shape, batch['labels'].shape, loader.state
((2, 4), (2,), LoaderState(epoch=0, index=1))
"""
from __future__ import annotations

from typing import NamedTuple

import datasets
import jax
import numpy as np

from peftjax.errors import DataError

LAST_BATCH_POLICIES = ('drop', 'pad')


class LoaderState(NamedTuple):
  epoch: int
  index: int   # the next global batch within the epoch


class Loader:
  """An iterator of per-process batches; ``num_epochs=None`` runs forever."""

  def __init__(self, dataset: datasets.Dataset, *, global_batch_size: int, seq_len: int,
               seed: int = 0, shuffle: bool = True, last_batch: str = 'drop',
               num_epochs: int | None = None, pad_id: int = 0,
               process_index: int | None = None, process_count: int | None = None,
               state: LoaderState | tuple = (0, 0)):
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    if last_batch not in LAST_BATCH_POLICIES:
      raise ValueError(f'last_batch={last_batch!r}; expected one of {LAST_BATCH_POLICIES}')
    if global_batch_size % self.process_count:
      raise ValueError(f'global_batch_size={global_batch_size} is not divisible by '
                       f'process_count={self.process_count}')
    if len(dataset) == 0:
      raise DataError('the dataset to batch is empty')
    for name, feature in dataset.features.items():
      dtype = getattr(getattr(feature, 'feature', feature), 'dtype', 'nested')
      if not dtype.startswith(('int', 'uint', 'float', 'bool')):
        raise DataError(f'column {name!r} holds {dtype}, not numbers or lists of numbers: '
                        f'encode the dataset first (see peftjax.data.tokenize)')
    self.dataset, self.seq_len, self.pad_id = dataset, seq_len, pad_id
    self.global_batch_size, self.seed, self.shuffle = global_batch_size, seed, shuffle
    self.last_batch, self.num_epochs = last_batch, num_epochs
    full, rest = divmod(len(dataset), global_batch_size)
    self.batches_per_epoch = full + (rest > 0 and last_batch == 'pad')
    if self.batches_per_epoch == 0:
      raise DataError(f'{len(dataset)} rows make no full batch of {global_batch_size} '
                      f"(last_batch='drop')")
    self.state = LoaderState(*state)
    self._order = (None, None)   # (epoch, permutation) cache

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    epoch, index = self.state
    if index >= self.batches_per_epoch:
      epoch, index = epoch + 1, 0
    if self.num_epochs is not None and epoch >= self.num_epochs:
      raise StopIteration
    rows = self.global_rows(epoch, index)
    per_process = self.global_batch_size // self.process_count
    rows = rows[self.process_index * per_process:(self.process_index + 1) * per_process]
    self.state = LoaderState(epoch, index + 1)
    return self.collate(rows)

  def global_rows(self, epoch: int, index: int) -> np.ndarray:
    """Dataset row ids of global batch ``index`` of ``epoch``; -1 marks padding rows."""
    if self._order[0] != epoch:
      n = len(self.dataset)
      self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(n)
                     if self.shuffle else np.arange(n))
    rows = self._order[1][index * self.global_batch_size:(index + 1) * self.global_batch_size]
    return np.pad(rows, (0, self.global_batch_size - len(rows)), constant_values=-1)

  def collate(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The batch of dataset rows ``rows`` (-1 = an all-padding row)."""
    real = rows >= 0
    data = self.dataset[rows[real].tolist()]
    batch = {'example_mask': real.astype(np.int32)}
    for column, values in data.items():
      if isinstance(values[0], (list, np.ndarray)):
        fill = self.pad_id if column == 'input_ids' else 0
        batch[column] = np.full((len(rows), self.seq_len), fill, np.int32)
        for at, row, value in zip(np.flatnonzero(real), rows[real], values):
          if len(value) > self.seq_len:
            raise DataError(f'row {row} has {len(value)} tokens > seq_len={self.seq_len}')
          batch[column][at, :len(value)] = value
      else:
        dtype = np.float32 if isinstance(values[0], float) else np.int32
        batch[column] = np.zeros(len(rows), dtype)
        batch[column][real] = values
    if 'segment_ids' in batch:
      batch['attention_mask'] = batch.pop('segment_ids')
    elif 'input_ids' in batch:   # (preference pairs carry their own masks per sequence)
      lengths = np.zeros(len(rows), np.int32)
      lengths[real] = [len(ids) for ids in data['input_ids']]
      batch['attention_mask'] = (np.arange(self.seq_len) < lengths[:, None]).astype(np.int32)
      batch['position_ids'] = np.where(batch['attention_mask'] == 1,
                                       np.arange(self.seq_len, dtype=np.int32), 0)
    return batch
