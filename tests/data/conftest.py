"""Tokenizers for the data tests: a WordLevel one trained offline here, and MiniLM's."""
import pytest
import tokenizers
import transformers
from tokenizers import models, pre_tokenizers, trainers

from peftjax import assets

SENTENCES = ['hello there', 'hi friend', 'how are you', 'fine thanks', 'good movie',
             'bad movie', 'i like it', 'i hate it', 'what is up']
SPECIALS = ['[PAD]', '[UNK]', '<|end|>', '<|system|>', '<|user|>', '<|assistant|>']
# Renders 'role content <|end|>' turns, space-separated; the assistant header opens a reply.
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def word_level(unk_token='[UNK]', chat_template=TEMPLATE):
  backend = tokenizers.Tokenizer(models.WordLevel(unk_token=unk_token))
  backend.pre_tokenizer = pre_tokenizers.Whitespace()
  specials = [t for t in SPECIALS if t != '[UNK]' or unk_token == '[UNK]']
  backend.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=specials))
  tok = transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, pad_token='[PAD]', eos_token='<|end|>')
  tok.chat_template = chat_template
  return tok


@pytest.fixture(scope='session')
def make_tokenizer():
  """The factory :func:`word_level` (test modules must not import conftest by name)."""
  return word_level


@pytest.fixture(scope='session')
def tiny_tokenizer():
  return word_level()


@pytest.fixture(scope='session')
def minilm_tokenizer():
  return transformers.AutoTokenizer.from_pretrained(str(assets.path('all-minilm-l6-v2')))
