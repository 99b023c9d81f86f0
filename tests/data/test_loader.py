"""Loader: seeded order, exact resume, disjoint per-process slices, last-batch policies."""
import datasets
import numpy as np
import pytest

from peftjax.data import loader as loader_lib, packing
from peftjax.errors import DataError

ROWS = datasets.Dataset.from_dict({
    'input_ids': [[i + 1] * (1 + i % 4) for i in range(10)], 'labels': list(range(10))})


def make(**kw):
  kw = {'global_batch_size': 4, 'seq_len': 6, 'seed': 3, 'process_index': 0,
        'process_count': 1, **kw}
  return loader_lib.Loader(ROWS, **kw)


def ids(batches):
  return [b['labels'].tolist() for b in batches]


def take(loader, n):
  return [next(loader) for _ in range(n)]


def test_same_seed_same_order_and_epochs_differ():
  a, b = take(make(), 6), take(make(), 6)
  assert ids(a) == ids(b)
  assert ids(take(make(seed=4), 2)) != ids(a[:2])
  assert ids(a[:2]) != ids(a[2:4])   # epoch 1 is reshuffled
  for epoch in (a[:2], a[2:4]):      # 2 full batches of 4 out of 10 rows, none repeated
    assert len(set(sum(ids(epoch), []))) == 8


def test_resume_mid_epoch_continues_exactly():
  uninterrupted = take(make(), 7)
  first = make()
  take(first, 3)
  saved = tuple(first.state)                        # e.g. stored in a checkpoint
  assert saved == (1, 1)
  resumed = take(make(state=saved), 4)
  for got, want in zip(resumed, uninterrupted[3:]):
    assert got.keys() == want.keys()
    for key in got:
      np.testing.assert_array_equal(got[key], want[key])


def test_processes_get_disjoint_slices_covering_the_global_batch():
  whole = take(make(), 4)
  parts = [take(make(process_index=p, process_count=2), 4) for p in range(2)]
  for step in range(4):
    halves = [parts[p][step]['labels'].tolist() for p in range(2)]
    assert not set(halves[0]) & set(halves[1])
    assert halves[0] + halves[1] == whole[step]['labels'].tolist()
    assert parts[0][step]['input_ids'].shape == (2, 6)


def test_batch_shapes_masks_and_positions():
  batch = next(make(shuffle=False, pad_id=99))
  np.testing.assert_array_equal(batch['input_ids'][1], [2, 2, 99, 99, 99, 99])
  np.testing.assert_array_equal(batch['attention_mask'][1], [1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(batch['position_ids'][2], [0, 1, 2, 0, 0, 0])
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      'input_ids': ((4, 6), np.int32), 'labels': ((4,), np.int32),
      'attention_mask': ((4, 6), np.int32), 'position_ids': ((4, 6), np.int32),
      'example_mask': ((4,), np.int32)}


def test_last_batch_drop_or_pad():
  dropped = list(make(num_epochs=1, shuffle=False))
  assert ids(dropped) == [[0, 1, 2, 3], [4, 5, 6, 7]]
  padded = list(make(num_epochs=1, shuffle=False, last_batch='pad'))
  assert len(padded) == 3      # ceil(10 rows / 4)
  np.testing.assert_array_equal(padded[2]['example_mask'], [1, 1, 0, 0])
  np.testing.assert_array_equal(padded[2]['attention_mask'][2:], 0)


def test_packed_rows_use_segment_ids_as_attention_mask():
  packed = packing.pack(ROWS.remove_columns('labels'), seq_len=6)
  batch = next(loader_lib.Loader(packed, global_batch_size=2, seq_len=6, shuffle=False,
                                 process_index=0, process_count=1))
  np.testing.assert_array_equal(batch['attention_mask'], packed['segment_ids'][:2])
  np.testing.assert_array_equal(batch['position_ids'], packed['position_ids'][:2])
  assert 'segment_ids' not in batch


def test_errors():
  with pytest.raises(DataError, match='no full batch'):
    make(global_batch_size=16)
  with pytest.raises(ValueError, match='not divisible by process_count=3'):
    make(process_count=3)
  with pytest.raises(DataError, match=r'row \d+ has 4 tokens > seq_len=3'):
    take(make(seq_len=3), 3)
  with pytest.raises(DataError, match=r"column 'text' holds string, not numbers"):
    loader_lib.Loader(ROWS.add_column('text', ['x'] * 10), global_batch_size=2, seq_len=6)
