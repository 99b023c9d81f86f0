"""Preference pairs: TRL parity of the encoding and truncation, masks, proxies, bad input."""
import json
import types

import datasets
import numpy as np
import pytest
from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer

from peftjax.data import Loader, preference, sources
from peftjax.errors import DataError

USER = lambda text: [{'role': 'user', 'content': text}]
BOT = lambda text: [{'role': 'assistant', 'content': text}]
TEXT_ROWS = {'prompt': ['hello there', 'how are you i like it good movie', 'what is up'],
             'chosen': ['hi friend', 'fine thanks', 'good movie i like it'],
             'rejected': ['i hate it', 'bad movie', 'hi']}
CHAT_ROWS = {'prompt': [USER(p) for p in TEXT_ROWS['prompt']],
             'chosen': [BOT(c) for c in TEXT_ROWS['chosen']],
             'rejected': [BOT(r) for r in TEXT_ROWS['rejected']]}


def _trl(tokenizer, rows, max_length):
  """TRL 1.16's own preprocessing (``DPOTrainer._prepare_dataset``) and collator (keep_end),
  unpadded per sequence: [(chosen ids, chosen mask, rejected ids, rejected mask)]."""
  args = types.SimpleNamespace(dataset_num_proc=None, max_length=max_length,
                               truncation_mode='keep_end')
  ds = DPOTrainer._prepare_dataset(types.SimpleNamespace(_tokenizer=tokenizer),
                                   datasets.Dataset.from_dict(rows), tokenizer, args, 'train')
  collate = DataCollatorForPreference(pad_token_id=0, max_length=max_length,
                                      truncation_mode='keep_end')
  out = []
  for ex in ds:
    batch = collate([{k: ex[k] for k in ('prompt_ids', 'chosen_ids', 'rejected_ids')}])
    seqs = [(ids[m == 1].tolist(), c[m == 1].tolist()) for ids, m, c in zip(
        batch['input_ids'].numpy(), batch['attention_mask'].numpy(),
        batch['completion_mask'].numpy())]
    out.append(seqs[0] + seqs[1])
  return out


def _ours(enc):
  return [tuple(list(r[f'{x}_{k}']) for x in ('chosen', 'rejected')
                for k in ('input_ids', 'loss_mask')) for r in enc.dataset]


@pytest.mark.parametrize('rows, chat_format', [(CHAT_ROWS, True), (TEXT_ROWS, False)],
                         ids=['conversational', 'plain_text'])
@pytest.mark.parametrize('max_length', [64, 9, 6])
def test_encoding_and_truncation_equal_trl(tiny_tokenizer, rows, chat_format, max_length):
  """Same tokens and completion masks as TRL (keep the completion, cut the prompt from the
  left), at lengths that keep everything (64), cut prompts (9) and cut completions (6)."""
  enc = preference.encode_preferences(datasets.Dataset.from_dict(rows), tiny_tokenizer,
                                      max_length=max_length, chat_format=chat_format,
                                      overflow='skip')
  expected = _trl(tiny_tokenizer, rows, max_length)
  keep = [i for i, p in enumerate(rows['prompt'])
          if len(_prompt_ids(tiny_tokenizer, p)) < max_length]
  assert _ours(enc) == [expected[i] for i in keep]
  assert enc.num_skipped == len(rows['prompt']) - len(keep)
  full = preference.encode_preferences(datasets.Dataset.from_dict(rows), tiny_tokenizer,
                                       max_length=1000, chat_format=chat_format)
  longer = [max(len(r['chosen_input_ids']), len(r['rejected_input_ids'])) > max_length
            for r in full.dataset]
  assert enc.num_truncated == sum(longer[i] for i in keep) and (max_length > 6 or any(longer))
  for r in enc.dataset:
    assert r['chosen_attention_mask'] == [1] * len(r['chosen_input_ids'])


def _prompt_ids(tokenizer, prompt):
  if isinstance(prompt, list):
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                         return_dict=True)['input_ids']
  return tokenizer(prompt)['input_ids']


def test_plain_text_is_rendered_as_sft_chat(tiny_tokenizer):
  """With the chat format, plain strings give exactly the conversational rows' encoding."""
  plain = preference.encode_preferences(datasets.Dataset.from_dict(TEXT_ROWS), tiny_tokenizer)
  conv = preference.encode_preferences(datasets.Dataset.from_dict(CHAT_ROWS), tiny_tokenizer)
  assert plain.dataset[:] == conv.dataset[:]
  row = plain.dataset[0]
  tokens = tiny_tokenizer.convert_ids_to_tokens(row['chosen_input_ids'])
  assert tokens == ['<|user|>', 'hello', 'there', '<|end|>', '<|assistant|>', 'hi', 'friend',
                    '<|end|>']
  assert row['chosen_loss_mask'] == [0, 0, 0, 0, 0, 1, 1, 1]


def test_system_turn_and_multi_turn_prompt_are_not_completion(tiny_tokenizer):
  system = preference.encode_preferences(
      datasets.Dataset.from_dict({k: v[:1] for k, v in TEXT_ROWS.items()}), tiny_tokenizer,
      system='good')
  ids = system.dataset[0]['rejected_input_ids']
  assert tiny_tokenizer.convert_ids_to_tokens(ids[:4]) == ['<|system|>', 'good', '<|end|>',
                                                          '<|user|>']
  rows = {'prompt': [USER('hello there') + BOT('hi friend') + USER('how are you')],
          'chosen': [BOT('fine thanks')], 'rejected': [BOT('bad movie')]}
  row = preference.encode_preferences(datasets.Dataset.from_dict(rows), tiny_tokenizer).dataset[0]
  masked = [t for t, m in zip(row['chosen_input_ids'], row['chosen_loss_mask']) if m]
  assert tiny_tokenizer.convert_ids_to_tokens(masked) == ['fine', 'thanks', '<|end|>']


def test_max_prompt_length_keeps_the_prompt_end(tiny_tokenizer):
  rows = datasets.Dataset.from_dict({k: v[1:2] for k, v in TEXT_ROWS.items()})
  full = preference.encode_preferences(rows, tiny_tokenizer).dataset[0]
  cut = preference.encode_preferences(rows, tiny_tokenizer, max_prompt_length=3).dataset[0]
  n_prompt = full['chosen_loss_mask'].index(1)
  assert cut['chosen_input_ids'] == full['chosen_input_ids'][n_prompt - 3:]
  assert cut['rejected_input_ids'][:3] == full['rejected_input_ids'][n_prompt - 3:n_prompt]
  assert tiny_tokenizer.convert_ids_to_tokens(cut['chosen_input_ids'][:3]) == [
      'movie', '<|end|>', '<|assistant|>']


def test_loader_pads_both_sequences_to_seq_len(tiny_tokenizer):
  enc = preference.encode_preferences(datasets.Dataset.from_dict(TEXT_ROWS), tiny_tokenizer)
  batch = next(Loader(enc.dataset, global_batch_size=3, seq_len=16, shuffle=False,
                      process_count=1, process_index=0))
  assert sorted(batch) == ['chosen_attention_mask', 'chosen_input_ids', 'chosen_loss_mask',
                           'example_mask', 'rejected_attention_mask', 'rejected_input_ids',
                           'rejected_loss_mask']
  for x in ('chosen', 'rejected'):
    assert batch[f'{x}_input_ids'].shape == (3, 16)
    lengths = [len(ids) for ids in enc.dataset[f'{x}_input_ids'][:]]
    np.testing.assert_array_equal(batch[f'{x}_attention_mask'].sum(1), lengths)
    assert (batch[f'{x}_loss_mask'] <= batch[f'{x}_attention_mask']).all()


def test_margin_column_is_kept(tiny_tokenizer):
  rows = datasets.Dataset.from_dict({**TEXT_ROWS, 'margin': [1.0, 0.5, 2]})
  assert preference.encode_preferences(rows, tiny_tokenizer).dataset['margin'][:] == [1.0, 0.5, 2.0]
  rows = datasets.Dataset.from_dict({**TEXT_ROWS, 'margin': ['1', '2', '3']})
  with pytest.raises(DataError, match=r"row 0: column 'margin' is '1', expected a number"):
    preference.encode_preferences(rows, tiny_tokenizer)


# --- bad input -------------------------------------------------------------------------------

def _one(**row):
  return datasets.Dataset.from_dict({k: [v] for k, v in {
      'prompt': 'hello there', 'chosen': 'hi friend', 'rejected': 'i hate it', **row}.items()})


def _two(**row):   # the bad row is row 1
  good = {'prompt': 'hello there', 'chosen': 'hi friend', 'rejected': 'i hate it'}
  bad = {**good, **row}
  return datasets.Dataset.from_list([good, bad])


@pytest.mark.parametrize('chat_format', [True, False])
def test_chosen_equal_to_rejected_names_the_row(tiny_tokenizer, chat_format):
  with pytest.raises(DataError, match=r"row 1: chosen equals rejected \('hi friend'\)"):
    preference.encode_preferences(_two(rejected='hi friend'), tiny_tokenizer,
                                  chat_format=chat_format)
  # Different text, same tokens (the word-level tokenizer splits on whitespace).
  with pytest.raises(DataError, match=r'row 1: chosen equals rejected once tokenized'):
    preference.encode_preferences(_two(rejected='hi  friend'), tiny_tokenizer,
                                  chat_format=chat_format)


def test_empty_completion_names_row_and_column(tiny_tokenizer):
  with pytest.raises(DataError, match=r"row 1: column 'rejected' is an empty completion \(' '\)"):
    preference.encode_preferences(_two(rejected=' '), tiny_tokenizer)
  rows = datasets.Dataset.from_dict({'prompt': [USER('hi')] * 2, 'chosen': [BOT('hi'), BOT('')],
                                     'rejected': [BOT('fine'), BOT('bad')]})
  with pytest.raises(DataError, match=r"row 1: column 'chosen' is an empty completion"):
    preference.encode_preferences(rows, tiny_tokenizer)


def test_prompt_alone_exceeding_max_length_names_the_row(tiny_tokenizer):
  rows = _two(prompt='how are you i like it good movie')   # 11 prompt tokens with its headers
  with pytest.raises(DataError, match=r"row 1: column 'prompt' alone has 11 tokens >= "
                                      r'max_length=10, leaving no room for the completion'):
    preference.encode_preferences(rows, tiny_tokenizer, max_length=10)
  enc = preference.encode_preferences(rows, tiny_tokenizer, max_length=10, overflow='skip')
  assert (len(enc.dataset), enc.num_skipped) == (1, 1)
  enc = preference.encode_preferences(rows, tiny_tokenizer, max_length=10, max_prompt_length=6)
  assert len(enc.dataset) == 2 and enc.num_truncated == 1


def test_missing_column_and_bad_values_are_named(tiny_tokenizer):
  rows = datasets.Dataset.from_dict({'prompt': ['hi'], 'chosen': ['fine']})
  with pytest.raises(DataError, match=r"column\(s\) 'rejected' missing; present columns: "
                                      r'prompt, chosen'):
    preference.encode_preferences(rows, tiny_tokenizer)
  with pytest.raises(DataError, match=r"row 0: column 'chosen' is None, expected a string"):
    preference.encode_preferences(_one(chosen=None), tiny_tokenizer)
  rows = datasets.Dataset.from_dict({'prompt': ['hi'], 'chosen': [BOT('fine')],
                                     'rejected': [BOT('bad')]})
  with pytest.raises(DataError, match=r'row 0: columns mix plain text and conversations '
                                      r'\(prompt: text, chosen: messages, rejected: messages\)'):
    preference.encode_preferences(rows, tiny_tokenizer)
  with pytest.raises(ValueError, match=r"overflow='truncate'; expected one of"):
    preference.encode_preferences(_one(), tiny_tokenizer, overflow='truncate')


# --- sources -------------------------------------------------------------------------------

def test_files_load_as_preference_splits(tmp_path, tiny_tokenizer):
  path = tmp_path / 'pairs.jsonl'
  lines = [json.dumps({k: CHAT_ROWS[k][i % 3] for k in CHAT_ROWS}) for i in range(10)]
  path.write_text('\n'.join(lines) + '\n')
  splits = preference.preference_splits(str(path), validation_fraction=0.2)
  assert (len(splits['train']), len(splits['validation'])) == (8, 2)
  enc = preference.encode_preferences(splits['train'], tiny_tokenizer)
  assert len(enc.dataset) == 8
  csv = tmp_path / 'pairs.csv'
  datasets.Dataset.from_dict(TEXT_ROWS).to_csv(str(csv))
  assert preference.preference_splits(str(csv), validation_fraction=1 / 3)['train'].num_rows == 2
  parquet = tmp_path / 'bad.parquet'
  datasets.Dataset.from_dict({'prompt': ['a'], 'answer': ['b']}).to_parquet(str(parquet))
  with pytest.raises(DataError, match=r"column\(s\) 'chosen', 'rejected' missing"):
    preference.preference_splits(str(parquet))


def test_chatterbot_proxy_pairs():
  splits = preference.chatterbot_preferences(seed=0)
  again = preference.chatterbot_preferences(seed=0)
  assert splits['train'][:] == again['train'][:]                         # deterministic
  assert (len(splits['train']), len(splits['validation'])) == (1088, 141)
  pairs = sources.chatterbot_pairs(deduplicate=True, drop_blank=True)
  own = set(zip(pairs['prompt'][:], pairs['response'][:]))
  categories = {}   # a reply text can occur in several categories
  for reply, category in zip(pairs['response'][:], pairs['category'][:]):
    categories.setdefault(reply, set()).add(category)
  norm = sources.normalize_text
  for split in splits.values():
    rows = split[:]
    assert all((p, c) in own for p, c in zip(rows['prompt'], rows['chosen']))
    assert all(norm(c) != norm(r) for c, r in zip(rows['chosen'], rows['rejected']))
    assert all(categories[r] - {k} for r, k in zip(rows['rejected'], rows['category']))
  train, held = ({norm(p) for p in s['prompt'][:]} for s in splits.values())
  assert not train & held                                                 # held out by prompt
  assert preference.chatterbot_preferences(seed=1)['train'][:] != splits['train'][:]


def test_sentiment_proxy_pairs():
  splits = preference.sentiment_preferences(seed=0)
  tweets = sources.sentiment_tweets(seed=0)
  for name, split in splits.items():
    label = dict(zip(tweets[name]['text'][:], tweets[name]['label'][:]))
    rows = split[:]
    assert set(rows['prompt']) == {preference.POSITIVE_TWEET_PROMPT}
    assert sorted(rows['chosen']) == sorted(t for t, l in label.items() if l == 1)
    assert {label[t] for t in rows['rejected']} == {0}
    assert len(set(rows['rejected'])) == len(rows['rejected'])
  assert (len(splits['train']), len(splits['validation'])) == (6134, 682)
