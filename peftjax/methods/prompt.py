"""Prompt tuning (Lester et al. 2021) and P-tuning v1 (Liu et al. 2021): V trainable virtual
tokens placed before the input embeddings through the models' ``prompt_embeds`` hook.

The adapter is ``{'prompt_encoder': {...}}`` with HF PEFT's names: ``embedding (V, hidden)``
(logical axes ``(None, 'embed')``), plus for P-tuning the encoder that maps it to the prompts:
``mlp_head_{0,2,4}`` (Linear-ReLU-Linear-ReLU-Linear, ``kernel (in, out)``) or a bidirectional
``lstm_head`` (``l{k}`` and ``l{k}_reverse``: ``w_ih (in, 4h)``, ``w_hh (h, 4h)``, ``b_ih``,
``b_hh``, torch's gate order i, f, g, o; ``encoder_dropout`` between its layers in training
calls) followed by ``mlp_head_{0,2}``. ``fold`` runs the encoder once and gives the plain
prompt-tuning adapter (export, inference), as HF PEFT saves it. The model's outputs drop the
virtual positions (``keep_virtual=True`` keeps them).

>>> import jax, jax.numpy as jnp
>>> from peftjax.models import llama
>>> config = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
...                            num_layers=1, num_heads=4, num_kv_heads=2)
>>> model = llama.LlamaModel(config)
>>> ids = jnp.ones((2, 5), jnp.int32)
>>> params = model.init(jax.random.key(0), ids)['params']
>>> method = ptuning(num_virtual_tokens=3, encoder_hidden_size=16)
>>> adapter = method.init(jax.random.key(1), params)
>>> jax.tree.map(jnp.shape, fold(adapter))
{'prompt_encoder': {'embedding': (3, 32)}}
>>> out = method.apply(model.apply)(adapter, params, ids)
>>> folded = prompt_tuning(num_virtual_tokens=3).apply(model.apply)(fold(adapter), params, ids)
>>> bool(jnp.allclose(out.hidden, folded.hidden, atol=1e-6))
True
"""
from __future__ import annotations

import functools
import math
import re
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.methods import base, targets
from peftjax.models import families

ENCODER = 'prompt_encoder'
INITS = ('random', 'sample_vocab', 'text')
ENCODERS = ('mlp', 'lstm')
_DROPOUT_STREAM = 0x5054   # folded into the call's dropout rng: the encoder's own stream
# The input embedding of any family, and the position tables that bound the sequence length.
_EMBEDDING = '(.*/)?(' + '|'.join(sorted({re.escape(lay.embedding)
                                         for lay in families.LAYOUTS.values()})) + ')'
_POSITIONS = re.compile(r'(.*/)?(wpe|embeddings/position_embeddings)/embedding')


def check_num_virtual_tokens(n) -> int:
  if not isinstance(n, int) or isinstance(n, bool) or n < 1:
    raise ValueError(f'num_virtual_tokens must be a positive int, got {n!r}')
  return n


def input_embedding(params) -> targets.Weight:
  """The model's input embedding table (a ``targets.Weight``)."""
  found = targets.modules(params, _EMBEDDING, kinds=('embedding',))
  return next(iter(found.values()))


def check_positions(params, args, kw, extra: int, what: str):
  """Raises ValueError when ``extra`` virtual positions plus the call's tokens exceed the
  model's learned position table (GPT-2 ``wpe``, BERT ``position_embeddings``; RoPE models have
  none). A decode step on a started cache is not checked (its prompts are already cached)."""
  cache = kw.get('cache')
  if cache is not None and cache.started:
    return
  x = args[0] if args else kw.get('input_ids')
  x = kw.get('inputs_embeds') if x is None else x
  if x is None:
    return
  for path, table in tree.flatten(params).items():
    if _POSITIONS.fullmatch(path):
      rows, t = nn.meta.unbox(table).shape[0], x.shape[1]
      if extra + t > rows:
        raise ValueError(f'{what} ({extra}) plus sequence length ({t}) = {extra + t} exceeds '
                         f"the model's {rows} positions ({path})")


def hooked(apply_fn, hook_kwargs, extra_positions, what: str):
  """The adapted call of a prompt-family method: ``hook_kwargs(own adapter leaves, call kwargs)
  -> model kwargs`` (``prompt_embeds`` or ``prefix_kv``; the call's kwargs say whether it
  trains and hold its ``rngs``) added to every whole-model call (a ``method=`` call, e.g. the
  LM head alone, passes through)."""
  @functools.wraps(apply_fn)
  def adapted(adapter, params, *args, **kw):
    adapter = nn.meta.unbox(adapter)
    variables = {'params': params, base.ADAPTER: adapter}
    if kw.get('method') is not None:
      return apply_fn(variables, *args, **kw)
    extra = hook_kwargs(adapter, kw)
    check_positions(params, args, kw, extra_positions(extra), what)
    try:
      return apply_fn(variables, *args, **extra, **kw)
    except TypeError as e:
      if any(k in str(e) for k in extra):
        raise ValueError(f'{what}: the model does not take {sorted(extra)} (no prompt-family '
                         f'hook): {e}') from e
      raise
  return adapted


def _uniform(key, shape, bound):
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def linear(key, d_in: int, d_out: int, axes: Optional[tuple]) -> dict:
  """A torch ``nn.Linear``'s default init as ``{'kernel' (in, out), 'bias'}``, boxed with
  the kernel's ``axes`` (None: plain arrays)."""
  k1, k2 = jax.random.split(key)
  bound = 1 / math.sqrt(d_in)
  return {'kernel': targets.box(_uniform(k1, (d_in, d_out), bound), axes),
          'bias': targets.box(_uniform(k2, (d_out,), bound), axes[1:] if axes else None)}


def dense(p, x):
  return x @ p['kernel'] + p['bias']


def _lstm_direction(p, x, reverse: bool):
  """One direction of a torch LSTM layer over x [T, in]; returns [T, h]."""
  h_size = p['w_hh'].shape[0]

  def step(carry, xt):
    h, c = carry
    i, f, g, o = jnp.split(xt @ p['w_ih'] + p['b_ih'] + h @ p['w_hh'] + p['b_hh'], 4)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h, c), h
  zeros = jnp.zeros((h_size,), x.dtype)
  _, hs = jax.lax.scan(step, (zeros, zeros), x, reverse=reverse)
  return hs


def encode(encoder, dropout: Sequence[jax.Array] = ()) -> jax.Array:
  """The virtual-token embeddings [V, hidden] that an (unboxed) ``prompt_encoder`` gives.
  ``dropout``: for a training call of an LSTM encoder, one multiplier [V, 2 * h] (keep mask / (1
  - rate), as torch's) per LSTM layer but the last, applied to that layer's output (torch's
  ``LSTM(dropout=...)``)."""
  x = encoder['embedding']
  if 'lstm_head' in encoder:
    lstm = encoder['lstm_head']
    for k in range(len(lstm) // 2):
      if k and dropout:
        x = x * dropout[k - 1]
      x = jnp.concatenate([_lstm_direction(lstm[f'l{k}'], x, False),
                           _lstm_direction(lstm[f'l{k}_reverse'], x, True)], axis=-1)
    return dense(encoder['mlp_head_2'], jax.nn.relu(dense(encoder['mlp_head_0'], x)))
  if 'mlp_head_0' in encoder:
    for i in (0, 2):
      x = jax.nn.relu(dense(encoder[f'mlp_head_{i}'], x))
    return dense(encoder['mlp_head_4'], x)
  return x


def lstm_dropout(encoder, rate: float, rng) -> list[jax.Array]:
  """The multipliers ``encode`` takes for a training call: Bernoulli(1 - ``rate``) / (1 -
  ``rate``), one [V, 2 * h] per LSTM layer but the last (HF PEFT runs the encoder once per
  batch, so the whole batch shares them)."""
  lstm = encoder['lstm_head']
  shape = (encoder['embedding'].shape[0], 2 * lstm['l0']['w_hh'].shape[0])
  keys = jax.random.split(rng, len(lstm) // 2 - 1)
  return [jax.random.bernoulli(key, 1.0 - rate, shape) / (1.0 - rate) for key in keys]


def fold(adapter) -> dict:
  """The plain prompt-tuning adapter ``{'prompt_encoder': {'embedding': encoder output}}``
  (P-tuning's encoder run once; other leaves of a composed adapter are kept)."""
  adapter = nn.meta.unbox(adapter)
  return {**adapter, ENCODER: {'embedding': encode(adapter[ENCODER])}}


def _method(init, spec: base.Spec, dropout: float = 0.0) -> base.PeftMethod:
  def prompts(adapter, kw):
    encoder, masks = adapter[ENCODER], ()
    if dropout and base._training(kw):
      rng = (kw.get('rngs') or {}).get('dropout')
      if rng is None:
        raise ValueError(f"{spec.name} encoder_dropout={dropout} in a training call needs "
                         "rngs={'dropout': key}")
      masks = lstm_dropout(encoder, dropout, jax.random.fold_in(rng, _DROPOUT_STREAM))
    return {'prompt_embeds': encode(encoder, masks)[None]}

  def apply(apply_fn):
    return hooked(apply_fn, prompts, lambda extra: extra['prompt_embeds'].shape[1],
                  f'{spec.name} virtual tokens')
  return base.PeftMethod(init, apply, None, spec)


def prompt_tuning(num_virtual_tokens: int = 20, init: str = 'random',
                  init_token_ids: Optional[Sequence[int]] = None,
                  init_text: Optional[str] = None,
                  tokenizer_name_or_path: Optional[str] = None) -> base.PeftMethod:
  """Prompt tuning: ``num_virtual_tokens`` trainable embeddings before the input.

  ``init`` is HF PEFT's ``prompt_tuning_init``: ``'random'`` (standard normal, as a torch
  ``nn.Embedding``), ``'sample_vocab'`` (rows of the input embedding at uniformly drawn token
  ids) or ``'text'``: the embeddings of ``init_token_ids``, or else of ``init_text`` tokenized
  by ``tokenizer_name_or_path`` (HF PEFT's ``prompt_tuning_init_text`` and tokenizer), cut or
  repeated to ``num_virtual_tokens`` as HF PEFT does. The text and tokenizer, when given, go
  into the spec and the exported ``adapter_config.json``.
  """
  v = check_num_virtual_tokens(num_virtual_tokens)
  if init not in INITS:
    raise ValueError(f'prompt tuning init must be one of {INITS}, got {init!r}')
  named = {k: x for k, x in (('init_token_ids', init_token_ids), ('init_text', init_text),
                             ('tokenizer_name_or_path', tokenizer_name_or_path))
           if x is not None}
  if init != 'text' and named:
    raise ValueError(f"prompt tuning: {sorted(named)} are for init='text', not init={init!r}")
  if init == 'text' and init_token_ids is None and not (init_text and tokenizer_name_or_path):
    raise ValueError("prompt tuning init='text' needs init_token_ids, or init_text and "
                     f'tokenizer_name_or_path (got {sorted(named) or "neither"})')
  if init_token_ids is not None and not init_token_ids:
    raise ValueError("prompt tuning init='text' needs at least one token id")
  ids = None if init_token_ids is None else [int(i) for i in init_token_ids]
  hparams = dict(num_virtual_tokens=v, init=init, init_token_ids=ids)
  if init == 'text':
    hparams.update(init_text=init_text, tokenizer_name_or_path=tokenizer_name_or_path)
  spec = base.Spec('prompt', hparams)

  def token_ids() -> list[int]:
    if ids is not None:
      return ids
    from peftjax.models import tokenizer   # lazy: transformers
    found = tokenizer.load_tokenizer(tokenizer_name_or_path)(init_text)['input_ids']
    if not found:
      raise ValueError(f'prompt tuning init_text {init_text!r} gives no tokens with '
                       f'{tokenizer_name_or_path}')
    return found

  def init_fn(rng, params):
    w = input_embedding(params)
    vocab, hidden = w.value.shape[-2:]
    if init == 'random':
      e = jax.random.normal(rng, (v, hidden), jnp.float32)
    else:
      if init == 'sample_vocab':
        ids = jax.random.randint(rng, (v,), 0, vocab)
      else:
        text = token_ids()
        ids = jnp.asarray((text * math.ceil(v / len(text)))[:v])
      e = jnp.take(w.value, ids, axis=0).astype(jnp.float32)
    return {ENCODER: {'embedding': targets.box(e, w.axes(None, 'out'))}}

  return _method(init_fn, spec)


def ptuning(num_virtual_tokens: int = 20, encoder: str = 'mlp',
            encoder_hidden_size: Optional[int] = None, encoder_num_layers: int = 2,
            encoder_dropout: float = 0.0) -> base.PeftMethod:
  """P-tuning v1: virtual tokens from a prompt encoder over trainable embeddings (HF PEFT's
  ``PromptEncoder``): ``encoder`` ``'mlp'`` (3 Linear layers with ReLU) or ``'lstm'`` (a
  bidirectional LSTM of ``encoder_num_layers`` layers, then 2 Linear layers);
  ``encoder_hidden_size`` defaults to the model's hidden size. ``encoder_dropout`` (LSTM only)
  drops each LSTM layer's output but the last's in training calls, as torch's ``LSTM``. Init as
  torch's defaults."""
  v = check_num_virtual_tokens(num_virtual_tokens)
  if encoder not in ENCODERS:
    raise ValueError(f'P-tuning encoder must be one of {ENCODERS}, got {encoder!r}')
  if not isinstance(encoder_num_layers, int) or encoder_num_layers < 1:
    raise ValueError(f'P-tuning encoder_num_layers must be a positive int, got '
                     f'{encoder_num_layers!r}')
  if not 0.0 <= encoder_dropout < 1.0:
    raise ValueError(f'P-tuning encoder_dropout must be in [0, 1), got {encoder_dropout!r}')
  if encoder_dropout and encoder != 'lstm':
    raise ValueError(f'P-tuning encoder_dropout ({encoder_dropout}) acts between LSTM layers; '
                     f'the {encoder!r} encoder has none (HF PEFT ignores it there)')
  hparams = dict(num_virtual_tokens=v, encoder=encoder, encoder_hidden_size=encoder_hidden_size,
                 encoder_num_layers=encoder_num_layers)
  if encoder_dropout:
    hparams['encoder_dropout'] = encoder_dropout
  spec = base.Spec('ptuning', hparams)

  def init_fn(rng, params):
    w = input_embedding(params)
    d = w.value.shape[-1]
    h = encoder_hidden_size or d
    keys = iter(jax.random.split(rng, 4 + 8 * encoder_num_layers))
    enc = {'embedding': targets.box(jax.random.normal(next(keys), (v, d), jnp.float32),
                                    w.axes(None, 'out'))}
    out_axes, hidden_axes = w.axes(None, 'out'), w.axes(None, None)
    if encoder == 'mlp':
      enc['mlp_head_0'] = linear(next(keys), d, h, hidden_axes)
      enc['mlp_head_2'] = linear(next(keys), h, h, hidden_axes)
      enc['mlp_head_4'] = linear(next(keys), h, d, out_axes)
      return {ENCODER: enc}
    lstm, bound = {}, 1 / math.sqrt(h)
    for k in range(encoder_num_layers):
      for name in (f'l{k}', f'l{k}_reverse'):
        d_in = d if k == 0 else 2 * h
        lstm[name] = {n: targets.box(_uniform(next(keys), shape, bound),
                                     hidden_axes and hidden_axes[:len(shape)])
                      for n, shape in (
            ('w_ih', (d_in, 4 * h)), ('w_hh', (h, 4 * h)), ('b_ih', (4 * h,)),
            ('b_hh', (4 * h,)))}
    enc['lstm_head'] = lstm
    enc['mlp_head_0'] = linear(next(keys), 2 * h, 2 * h, hidden_axes)
    enc['mlp_head_2'] = linear(next(keys), 2 * h, d, out_axes)
    return {ENCODER: enc}

  return _method(init_fn, spec, encoder_dropout)
