"""peftjax.data: datasets, chat templates, tokenisation, loss masks, packing, batching.

>>> from peftjax import data
>>> from peftjax.models.tokenizer import load_tokenizer
>>> tokenizer = load_tokenizer('all-minilm-l6-v2')
>>> pairs = data.chatterbot_pairs().select(range(8))
>>> enc = data.encode_sft(pairs, tokenizer, max_length=32)
>>> batches = data.Loader(data.pack(enc.dataset, 32), global_batch_size=2, seq_len=32, seed=0)
>>> batch = next(batches)
>>> batch['input_ids'].shape, sorted(batch)
((2, 32), ['attention_mask', 'example_mask', 'input_ids', 'labels', 'loss_mask', 'position_ids'])
"""
from peftjax.data.chat import encode_chat, pair_messages, render
from peftjax.errors import DataError
from peftjax.data.loader import Loader, LoaderState
from peftjax.data.packing import pack
from peftjax.data.preference import (chatterbot_preferences, encode_preferences,
                                     preference_splits, sentiment_preferences)
from peftjax.data.sources import chatterbot_pairs, open_dataset, sentiment_tweets
from peftjax.data.tokenize import Encoded, encode_classification, encode_sft
