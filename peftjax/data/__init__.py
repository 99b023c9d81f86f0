"""peftjax.data: datasets, chat templates, tokenisation, loss masks, packing, batching.

>>> from peftjax import data
>>> pairs = data.chatterbot_pairs()                                      # doctest: +SKIP
>>> enc = data.encode_sft(pairs, tokenizer, max_length=256)              # doctest: +SKIP
>>> batches = data.Loader(data.pack(enc.dataset, 256), global_batch_size=8,
...                       seq_len=256, seed=0)                           # doctest: +SKIP
"""
from peftjax.data.chat import encode_chat, pair_messages, render
from peftjax.errors import DataError
from peftjax.data.loader import Loader, LoaderState
from peftjax.data.packing import pack
from peftjax.data.sources import chatterbot_pairs, open_dataset, sentiment_tweets
from peftjax.data.tokenize import Encoded, encode_classification, encode_sft
