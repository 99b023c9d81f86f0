"""Greedy packing: golden segment/position ids and loss masks, whole examples, all tokens."""
import datasets
import numpy as np
import pytest

from peftjax.data import packing, tokenize
from peftjax.errors import DataError


def test_golden_small_example():
  rows = datasets.Dataset.from_dict({
      'input_ids': [[11, 12, 13], [21, 22], [31, 32, 33, 34], [41]],
      'loss_mask': [[0, 1, 1], [0, 1], [0, 0, 1, 1], [1]]})
  packed = packing.pack(rows, seq_len=5)[:]
  # Longest first: [31..34] then [41] fill row 0; [11..13] then [21, 22] fill row 1.
  assert packed['input_ids'] == [[31, 32, 33, 34, 41], [11, 12, 13, 21, 22]]
  assert packed['segment_ids'] == [[1, 1, 1, 1, 2], [1, 1, 1, 2, 2]]
  assert packed['position_ids'] == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
  assert packed['loss_mask'] == [[0, 0, 1, 1, 1], [0, 1, 1, 0, 1]]


def test_padding_gets_segment_zero():
  packed = packing.pack(datasets.Dataset.from_dict({'input_ids': [[7, 8, 9], [5, 6, 4]]}), 4)[:]
  assert packed['segment_ids'] == [[1, 1, 1, 0], [1, 1, 1, 0]]
  assert packed['input_ids'] == [[7, 8, 9, 0], [5, 6, 4, 0]]


def test_sft_packing_keeps_every_token_and_no_example_crosses_rows(tiny_tokenizer):
  words = 'hello there hi friend how are you fine thanks good movie'.split()
  rng = np.random.default_rng(0)
  pairs = datasets.Dataset.from_dict({
      'prompt': [' '.join(rng.choice(words, rng.integers(1, 6))) for _ in range(40)],
      'response': [' '.join(rng.choice(words, rng.integers(1, 9))) for _ in range(40)]})
  enc = tokenize.encode_sft(pairs, tiny_tokenizer, max_length=24).dataset
  packed = packing.pack(enc, seq_len=24)
  assert packed.column_names == ['input_ids', 'labels', 'loss_mask', 'segment_ids',
                                 'position_ids']
  seg = np.array(packed['segment_ids'][:])
  assert (seg > 0).sum() == sum(len(ids) for ids in enc['input_ids'][:])
  assert len(packed) < len(enc) / 2
  # Each segment is one encoded example, intact: rebuild the multiset of examples.
  original = sorted(tuple(ids) + tuple(m) for ids, m in zip(enc['input_ids'][:],
                                                            enc['loss_mask'][:]))
  rebuilt = []
  for row in packed:
    ids, mask, seg_row = map(np.array, (row['input_ids'], row['loss_mask'], row['segment_ids']))
    for s in range(1, seg_row.max() + 1):
      at = seg_row == s
      np.testing.assert_array_equal(np.array(row['position_ids'])[at], np.arange(at.sum()))
      rebuilt.append(tuple(ids[at]) + tuple(mask[at]))
  assert sorted(rebuilt) == original


def test_too_long_and_scalar_columns_are_errors():
  with pytest.raises(DataError, match=r'row 1 has 5 tokens > seq_len=4'):
    packing.pack(datasets.Dataset.from_dict({'input_ids': [[1], [1, 2, 3, 4, 5]]}), 4)
  with pytest.raises(DataError, match=r"column 'labels' is not token-level"):
    packing.pack(datasets.Dataset.from_dict({'input_ids': [[1]], 'labels': [0]}), 4)
  with pytest.raises(DataError, match=r"row 0: column 'loss_mask' has 1 entries but "
                                      r"'input_ids' has 2"):
    packing.pack(datasets.Dataset.from_dict({'input_ids': [[1, 2]], 'loss_mask': [[1]]}), 4)
