"""Classification and SFT encoders: outputs, overflow policies and bad input."""
import datasets
import numpy as np
import pytest

from peftjax.data import tokenize
from peftjax.errors import DataError

REVIEWS = datasets.Dataset.from_dict({
    'text': ['good movie', 'i hate it', 'how are you i like it good movie'],
    'label': [1, 0, 1]})
PAIRS = datasets.Dataset.from_dict({
    'prompt': ['hello there', 'how are you'], 'response': ['hi friend', 'fine thanks']})


def test_classification_columns_and_labels(tiny_tokenizer):
  enc = tokenize.encode_classification(REVIEWS, tiny_tokenizer, max_length=16)
  assert enc.dataset.column_names == ['input_ids', 'labels']
  assert enc.dataset['labels'][:] == [1, 0, 1]
  assert tiny_tokenizer.convert_ids_to_tokens(enc.dataset[1]['input_ids']) == ['i', 'hate', 'it']
  assert (enc.num_skipped, enc.num_truncated) == (0, 0)


@pytest.mark.parametrize('overflow, lengths, skipped, truncated', [
    ('truncate', [2, 3, 4], 0, 1), ('skip', [2, 3], 1, 0)])
def test_classification_overflow(tiny_tokenizer, overflow, lengths, skipped, truncated):
  enc = tokenize.encode_classification(REVIEWS, tiny_tokenizer, max_length=4, overflow=overflow)
  assert [len(ids) for ids in enc.dataset['input_ids'][:]] == lengths
  assert (enc.num_skipped, enc.num_truncated) == (skipped, truncated)


def test_overflow_error_names_row_and_length(tiny_tokenizer):
  with pytest.raises(DataError, match=r'row 2 has 8 tokens > max_length=4'):
    tokenize.encode_classification(REVIEWS, tiny_tokenizer, max_length=4, overflow='error')
  rows = PAIRS.add_item({'prompt': 'hi', 'response': 'i like it good movie'})
  with pytest.raises(DataError, match=r'row 2 has 9 tokens > max_length=8'):
    tokenize.encode_sft(rows, tiny_tokenizer, max_length=8, overflow='error')


def test_minilm_pairs_truncate_keeps_special_tokens(minilm_tokenizer):
  rows = datasets.Dataset.from_dict({'a': ['A great film.', 'word ' * 40], 'b': ['Yes.', 'No.'],
                                     'y': [1, 0]})
  enc = tokenize.encode_classification(rows, minilm_tokenizer, text_column='a', pair_column='b',
                                       label_column='y', max_length=16)
  assert enc.dataset.column_names == ['input_ids', 'token_type_ids', 'labels']
  first, second = enc.dataset[0], enc.dataset[1]
  assert minilm_tokenizer.decode(first['input_ids']) == '[CLS] a great film. [SEP] yes. [SEP]'
  assert first['token_type_ids'] == [0] * 6 + [1] * 3
  assert len(second['input_ids']) == 16 and second['input_ids'][-1] == minilm_tokenizer.sep_token_id
  assert enc.num_truncated == 1


def test_sft_is_shifted_with_response_mask(tiny_tokenizer):
  enc = tokenize.encode_sft(PAIRS, tiny_tokenizer, max_length=32)
  row = enc.dataset[0]
  tokens = tiny_tokenizer.convert_ids_to_tokens
  assert tokens(row['input_ids']) == ['<|user|>', 'hello', 'there', '<|end|>', '<|assistant|>',
                                      'hi', 'friend']
  assert tokens(row['labels']) == ['hello', 'there', '<|end|>', '<|assistant|>', 'hi', 'friend',
                                   '<|end|>']
  assert row['loss_mask'] == [0, 0, 0, 0, 1, 1, 1]   # position j predicts labels[j]


def test_sft_messages_column_and_truncate(tiny_tokenizer):
  rows = datasets.Dataset.from_dict({'messages': [[
      {'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'fine'},
      {'role': 'user', 'content': 'how are you'}, {'role': 'assistant', 'content': 'good'}]]})
  full = tokenize.encode_sft(rows, tiny_tokenizer, messages_column='messages').dataset[0]
  assert np.sum(full['loss_mask']) == 4
  cut = tokenize.encode_sft(rows, tiny_tokenizer, messages_column='messages', max_length=5)
  assert cut.num_truncated == 1
  assert cut.dataset[0] == {k: v[:5] for k, v in full.items()}


def test_missing_column_lists_present_columns(tiny_tokenizer):
  with pytest.raises(DataError, match=r"column\(s\) 'sentence' missing; present columns: text, "
                                      r"label"):
    tokenize.encode_classification(REVIEWS, tiny_tokenizer, text_column='sentence')
  with pytest.raises(DataError, match=r"'response' missing; present columns: prompt, answer"):
    tokenize.encode_sft(PAIRS.rename_column('response', 'answer'), tiny_tokenizer)


def test_empty_dataset(tiny_tokenizer):
  with pytest.raises(DataError, match='the dataset is empty'):
    tokenize.encode_classification(REVIEWS.select([]), tiny_tokenizer)


def test_none_values_name_row_and_column(tiny_tokenizer):
  rows = datasets.Dataset.from_dict({'text': ['good movie', None], 'label': [1, 0]})
  with pytest.raises(DataError, match=r"row 1: column 'text' is None, expected a string"):
    tokenize.encode_classification(rows, tiny_tokenizer)
  rows = datasets.Dataset.from_dict({'text': ['good movie', 'bad movie'], 'label': [1, None]})
  with pytest.raises(DataError, match=r"row 1: column 'label' is None, expected an int"):
    tokenize.encode_classification(rows, tiny_tokenizer)


def test_row_that_fails_to_tokenize_is_named(make_tokenizer):
  strict = make_tokenizer(unk_token='[NOT-IN-VOCAB]')   # unknown words raise
  rows = datasets.Dataset.from_dict({'text': ['good movie', 'zebra', 'bad movie'],
                                     'label': [1, 0, 0]})
  with pytest.raises(DataError, match=r"row 1: tokenizing column\(s\) text failed: .*Missing"):
    tokenize.encode_classification(rows, strict)
  with pytest.raises(DataError, match=r"row 1: tokenizing column\(s\) prompt, response failed"):
    tokenize.encode_sft(PAIRS.add_item({'prompt': 'hi', 'response': 'zebra'})
                        .select([0, 2, 1]), strict)


def test_unknown_overflow_policy(tiny_tokenizer):
  with pytest.raises(ValueError, match="overflow='clip'"):
    tokenize.encode_sft(PAIRS, tiny_tokenizer, overflow='clip')
