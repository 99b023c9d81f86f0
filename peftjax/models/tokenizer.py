"""Tokenizers for checkpoints: transformers ``AutoTokenizer`` from a directory, hub id or GGUF file.

A GGUF file carries its tokenizer (vocab, merges, special ids) and chat template as metadata, which
transformers rebuilds into a fast tokenizer without network access. A tokenizer without a pad token
gets ``pad_token = eos_token``: batches are padded with eos and the padding is masked out by the
attention mask / loss mask, so the choice never reaches the loss.

>>> tok = load_tokenizer('smollm2-135m-instruct')
>>> tok.apply_chat_template([{'role': 'user', 'content': 'Hi'}], tokenize=False)[:14]
'<|im_start|>sy'
>>> tok.eos_token, tok.pad_token
('<|im_end|>', '<|im_end|>')
"""
from __future__ import annotations

import pathlib

import transformers

from peftjax.errors import CheckpointError
from peftjax.models.checkpoint import resolve


def load_tokenizer(source: str | pathlib.Path) -> transformers.PreTrainedTokenizerBase:
  """Loads the tokenizer of a model directory, ``.gguf`` file, asset alias or hub id."""
  path = resolve(source)
  try:
    if path.suffix == '.gguf':
      tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    else:
      tokenizer = transformers.AutoTokenizer.from_pretrained(path)
  except (OSError, ValueError) as err:
    raise CheckpointError(f'{path}: no loadable tokenizer ({err})') from err
  if tokenizer.pad_token is None and tokenizer.eos_token is not None:
    tokenizer.pad_token = tokenizer.eos_token
  return tokenizer
