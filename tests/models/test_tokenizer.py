"""load_tokenizer: SmolLM2 GGUF tokenizer + chat template, MiniLM tokenizer.json, pad fallback."""
import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')

import gguf
import jinja2
import pytest
import tokenizers
import transformers

from peftjax import assets
from peftjax.errors import CheckpointError
from peftjax.models.tokenizer import load_tokenizer

CHAT = [{'role': 'user', 'content': 'What is 2 + 2? Answer in one word.'}]
SMOLLM2_RENDERED = (
    '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face'
    '<|im_end|>\n<|im_start|>user\nWhat is 2 + 2? Answer in one word.<|im_end|>\n'
    '<|im_start|>assistant\n')


@pytest.mark.slow
def test_smollm2_gguf_chat_template_and_special_tokens():
  path = assets.path('smollm2-135m-instruct')
  tok = load_tokenizer('smollm2-135m-instruct')
  text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
  assert text == SMOLLM2_RENDERED
  # the template is the one stored in the GGUF metadata
  raw = gguf.GGUFReader(path).get_field('tokenizer.chat_template').contents()
  assert jinja2.Template(raw).render(messages=CHAT, add_generation_prompt=True) == text
  # ids equal transformers' own GGUF tokenizer; special tokens are single ids
  reference = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
  ids = tok(text)['input_ids']
  assert ids == reference(text)['input_ids']
  assert ids[0] == tok.convert_tokens_to_ids('<|im_start|>') == 1
  assert ids.count(2) == 2 and ids[-1] != 2     # two <|im_end|>, prompt ends after 'assistant\n'
  assert tok.decode(ids) == text
  assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id) == ('<|im_end|>', 2, 2)


def test_minilm_tokenizer_json():
  tok = load_tokenizer('all-minilm-l6-v2')
  raw = tokenizers.Tokenizer.from_file(str(assets.path('all-minilm-l6-v2') / 'tokenizer.json'))
  assert raw.padding['length'] == 128    # the file pads to 128; transformers ignores that
  raw.no_padding()
  text = 'Parameter-efficient fine-tuning, in JAX!'
  assert tok(text)['input_ids'] == raw.encode(text).ids
  assert tok(text)['input_ids'][0] == tok.cls_token_id == 101
  assert tok.pad_token == '[PAD]'


def test_missing_pad_token_falls_back_to_eos(tmp_path):
  vocab = {'<unk>': 0, '</s>': 1, 'hello': 2, 'world': 3}
  raw = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token='<unk>'))
  raw.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  transformers.PreTrainedTokenizerFast(
      tokenizer_object=raw, unk_token='<unk>', eos_token='</s>').save_pretrained(tmp_path)
  tok = load_tokenizer(tmp_path)
  assert (tok.pad_token, tok.pad_token_id) == ('</s>', 1)
  assert tok(['hello', 'hello world'], padding=True)['input_ids'] == [[2, 1], [2, 3]]


def test_directory_without_tokenizer_is_named(tmp_path):
  (tmp_path / 'config.json').write_text('{"model_type": "llama"}')
  with pytest.raises(CheckpointError, match=f'{tmp_path}: no loadable tokenizer'):
    load_tokenizer(tmp_path)
