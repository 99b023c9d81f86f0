"""Chat rendering with the tokenizer's template, and the loss mask over assistant turns.

The mask is found without parsing the template: for each assistant turn i, the conversation
up to turn i is rendered with the generation prompt (the prompt the model will see) and the
conversation through turn i without it; both must tokenize to prefixes of the whole
conversation's tokens, and the tokens between the two are the response (its end-of-turn
token included). Trailing whitespace-only tokens (the newline ChatML puts after
``<|im_end|>``) are left out. A template that renders earlier turns differently once more
turns follow, or a token merge across the boundary, raises a ``DataError`` naming the row.

With MiniLM's tokenizer, which has no chat template (so ``FALLBACK_TEMPLATE``, turns closed by
``[SEP]``):

>>> from peftjax.models.tokenizer import load_tokenizer
>>> tokenizer = load_tokenizer('all-minilm-l6-v2')
>>> ids, mask = encode_chat(tokenizer, pair_messages('Hi', 'Hello!'), row=0)
>>> tokenizer.decode(ids[mask == 1])
'hello! [SEP]'
"""
from __future__ import annotations

import numpy as np

from peftjax.errors import DataError

# For tokenizers that ship no chat template (GPT-2, BERT): Zephyr-style role headers, each
# turn closed by the tokenizer's eos (or sep) token.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ end_of_turn }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
ROLES = ('system', 'user', 'assistant')


def pair_messages(prompt: str, response: str, system: str | None = None) -> list[dict]:
  """A prompt/response pair as a messages list (with an optional system turn first).

  >>> pair_messages('Hi', 'Hello')
  [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello'}]
  """
  head = [{'role': 'system', 'content': system}] if system is not None else []
  return head + [{'role': 'user', 'content': prompt}, {'role': 'assistant', 'content': response}]


def render(tokenizer, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
  """The chat text of ``messages``: the tokenizer's template, else :data:`FALLBACK_TEMPLATE`."""
  end_of_turn = tokenizer.eos_token or tokenizer.sep_token
  if tokenizer.chat_template is None and end_of_turn is None:
    raise DataError('the tokenizer has no chat template and no eos/sep token to end turns with; '
                    'set tokenizer.chat_template')
  return tokenizer.apply_chat_template(
      messages, chat_template=tokenizer.chat_template or FALLBACK_TEMPLATE, tokenize=False,
      add_generation_prompt=add_generation_prompt, end_of_turn=end_of_turn)


def encode_chat(tokenizer, messages: list[dict], *, row: int | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
  """Token ids of the rendered conversation and its response mask (1 on assistant turns).

  Both are int32 of the same length; ``row`` only labels error messages.
  """
  _check_messages(messages, row)
  text = render(tokenizer, messages)
  ids = _token_ids(tokenizer, text)
  mask = np.zeros(len(ids), np.int32)
  for turn, message in enumerate(messages):
    if message['role'] != 'assistant':
      continue
    start = _prefix_length(tokenizer, messages[:turn], True, text, ids, row, turn)
    end = (len(ids) if turn == len(messages) - 1 else
           _prefix_length(tokenizer, messages[:turn + 1], False, text, ids, row, turn))
    while end > start and not tokenizer.decode([ids[end - 1]]).strip():
      end -= 1
    mask[start:end] = 1
  return np.asarray(ids, np.int32), mask


def _token_ids(tokenizer, text: str) -> list[int]:
  return tokenizer(text, add_special_tokens=False)['input_ids']


def _prefix_length(tokenizer, head, add_generation_prompt, text, ids, row, turn) -> int:
  """Length of the tokens of ``head`` rendered, checked to be a prefix of ``ids``."""
  head_text = render(tokenizer, head, add_generation_prompt=add_generation_prompt)
  what = f'row {row}, assistant turn {turn}: the rendered ' + (
      'prompt (with generation prompt)' if add_generation_prompt else 'conversation through it')
  if not text.startswith(head_text):
    raise DataError(f'{what} is not a prefix of the rendered whole conversation (the chat '
                    f'template renders earlier turns differently); cannot build the loss mask')
  head_ids = _token_ids(tokenizer, head_text)
  if ids[:len(head_ids)] != head_ids:
    at = next((i for i, (a, b) in enumerate(zip(head_ids, ids)) if a != b), len(ids))
    raise DataError(f'{what} tokenizes differently from the same text inside the whole '
                    f'conversation (tokens merge across the turn boundary at token {at}); '
                    f'cannot build the loss mask')
  return len(head_ids)


def _check_messages(messages, row) -> None:
  if not isinstance(messages, list) or not messages:
    raise DataError(f'row {row}: messages must be a non-empty list of dicts, got {messages!r}')
  for turn, m in enumerate(messages):
    if (not isinstance(m, dict) or m.get('role') not in ROLES
        or not isinstance(m.get('content'), str)):
      raise DataError(f'row {row}, turn {turn}: expected {{"role": one of {ROLES}, "content": '
                      f'str}}, got {m!r}')
  if not any(m['role'] == 'assistant' for m in messages):
    raise DataError(f'row {row}: no assistant turn, so nothing to train on')
