"""Chat rendering and the assistant-only loss mask."""
import numpy as np
import pytest
import transformers

from peftjax import assets
from peftjax.data import chat
from peftjax.errors import DataError

TWO_TURNS = [
    {'role': 'user', 'content': 'hello there'},
    {'role': 'assistant', 'content': 'hi friend'},
    {'role': 'user', 'content': 'how are you'},
    {'role': 'assistant', 'content': 'fine thanks'},
]


def test_golden_mask_covers_assistant_tokens_and_end_of_turn(tiny_tokenizer):
  ids, mask = chat.encode_chat(tiny_tokenizer, TWO_TURNS)
  tokens = tiny_tokenizer.convert_ids_to_tokens(ids.tolist())
  assert tokens == ['<|user|>', 'hello', 'there', '<|end|>', '<|assistant|>', 'hi', 'friend',
                    '<|end|>', '<|user|>', 'how', 'are', 'you', '<|end|>', '<|assistant|>',
                    'fine', 'thanks', '<|end|>']
  np.testing.assert_array_equal(mask, [0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1])
  assert ids.dtype == mask.dtype == np.int32


def test_system_turn_is_not_trained(tiny_tokenizer):
  ids, mask = chat.encode_chat(tiny_tokenizer, chat.pair_messages('hi', 'hello', system='good'))
  assert tiny_tokenizer.convert_ids_to_tokens(ids[mask == 1].tolist()) == ['hello', '<|end|>']


def test_fallback_template_without_chat_template(make_tokenizer):
  tok = make_tokenizer(chat_template=None)
  text = chat.render(tok, chat.pair_messages('hi', 'fine'), add_generation_prompt=False)
  assert text == '<|user|>\nhi<|end|>\n<|assistant|>\nfine<|end|>\n'
  ids, mask = chat.encode_chat(tok, chat.pair_messages('hi', 'fine'))
  # The trailing newline after the end-of-turn token is whitespace: not trained.
  assert tok.convert_ids_to_tokens(ids[mask == 1].tolist()) == ['fine', '<|end|>']


def test_template_that_rewrites_earlier_turns_names_the_row(make_tokenizer):
  tok = make_tokenizer(chat_template=(
      "{% for m in messages %}{% if loop.last %}<|end|> {% endif %}{{ m['content'] }} "
      "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"))
  with pytest.raises(DataError, match=r'row 7, assistant turn 1: .*not a prefix'):
    chat.encode_chat(tok, chat.pair_messages('hi', 'fine'), row=7)


def test_bad_messages_name_the_row(tiny_tokenizer):
  with pytest.raises(DataError, match=r'row 3, turn 1: expected'):
    chat.encode_chat(tiny_tokenizer, [{'role': 'user', 'content': 'hi'}, {'role': 'bot'}], row=3)
  with pytest.raises(DataError, match=r'row 4: no assistant turn'):
    chat.encode_chat(tiny_tokenizer, [{'role': 'user', 'content': 'hi'}], row=4)


def test_minilm_fallback_mask_is_the_response_and_sep(minilm_tokenizer):
  ids, mask = chat.encode_chat(minilm_tokenizer, chat.pair_messages('What is AI?', 'A field.'))
  assert minilm_tokenizer.decode(ids[mask == 1]) == 'a field. [SEP]'
  assert ids[-1] == minilm_tokenizer.sep_token_id and mask[-1] == 1   # BERT drops the newline


@pytest.mark.slow
def test_smollm2_chatml_mask_is_replies_and_im_end():
  """The real ChatML template (from the SmolLM2 GGUF): the newline after <|im_end|> is not trained."""
  gguf = assets.path('smollm2-135m-instruct')
  tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
  messages = [{'role': 'user', 'content': 'Hi there'},
              {'role': 'assistant', 'content': 'Hello! How can I help?'},
              {'role': 'user', 'content': 'Tell me a joke'},
              {'role': 'assistant', 'content': 'No.'}]
  ids, mask = chat.encode_chat(tok, messages)
  assert [tok.decode([i]) for i in ids[mask == 1]] == [
      'Hello', '!', ' How', ' can', ' I', ' help', '?', '<|im_end|>', 'No', '.', '<|im_end|>']
  assert tok.decode(ids[-1:]) == '\n' and mask[-1] == 0
