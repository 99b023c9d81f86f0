"""The input hooks every backbone offers to PEFT methods, so no method edits model code.

- ``prompt_embeds`` [batch or 1, V, hidden] (prompt tuning, P-tuning): V virtual-token
  embeddings placed before the token embeddings (the tokens still go through the model's own
  ``nn.Embed``, so a LoRA on it applies). As HF PEFT does, the attention mask gets V ones in
  front, token-type ids V zeros, and positions are those of the longer sequence: default
  positions are computed over it; explicit ``position_ids`` (which HF PEFT drops) keep their
  values for the tokens, shifted by V, so packed rows keep working. Outputs lose the V virtual
  positions unless ``keep_virtual=True`` (HF PEFT keeps them: its logits are [batch, V+T]); the
  BERT pooler reads the first virtual token, as in HF PEFT.
- ``prefix_kv = (k, v)`` [num_layers, batch or 1, P, kv_heads, head_dim] with ``prefix_mask``
  [batch, P] (prefix tuning, P-tuning v2): per-layer keys/values before every layer's own,
  already rotated, exactly a transformers ``past_key_values`` of length P: token positions
  start after the visible prefix (default positions and explicit ``position_ids`` alike, the
  latter as HF PEFT's ``position_ids + num_virtual_tokens``).

With a KV cache both hooks act at prefill only (the first call on an empty cache): the prefix is
written into the first cache slots, virtual tokens are cached like tokens; decode steps ignore
them, as HF PEFT injects prompts only into an empty cache (explicit ``position_ids`` of decode
steps are therefore taken as given). The cache needs ``P + V`` more slots.

>>> import jax, jax.numpy as jnp
>>> from peftjax.models import llama
>>> config = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
...                            num_layers=2, num_heads=4, num_kv_heads=2)
>>> model = llama.LlamaModel(config)
>>> ids = jnp.ones((2, 5), jnp.int32)
>>> variables = model.init(jax.random.key(0), ids)
>>> prompts = jnp.zeros((1, 3, 32))
>>> model.apply(variables, ids, prompt_embeds=prompts).hidden.shape
(2, 5, 32)
>>> model.apply(variables, ids, prompt_embeds=prompts, keep_virtual=True).hidden.shape
(2, 8, 32)
>>> kv = jnp.zeros((2, 2, 4, 2, 8))                         # [layers, batch, P, kv_heads, head_dim]
>>> model.apply(variables, ids, prefix_kv=(kv, kv)).hidden.shape
(2, 5, 32)
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from peftjax.models import layers

Array = jax.Array


class Inputs(NamedTuple):
  """A call's inputs as the layers see them: V virtual tokens, then T tokens."""
  x: Array                       # [batch, V + T, hidden]
  attention_mask: Array | None   # [batch, V + T], or None (all visible)
  position_ids: Array            # [batch, V + T]
  token_type_ids: Array | None   # [batch, V + T] when given
  prefix_kv: Any                 # (k, v) for the layers; None when written into the cache
  prefix_mask: Array | None      # [batch, P] for ``attention_context``
  prefix_len: int                # prefix columns of the attention mask (0 with a cache)
  num_virtual: int               # V
  cache: Any                     # the KV cache, the prefix written in, or None


def check_prompt_embeds(prompt_embeds, batch: int, hidden: int) -> int:
  """Validates ``prompt_embeds`` [batch or 1, V, hidden]; returns V (0 when None)."""
  if prompt_embeds is None:
    return 0
  shape = tuple(prompt_embeds.shape)
  if len(shape) != 3 or shape[0] not in (1, batch) or shape[2] != hidden:
    raise ValueError(f'prompt_embeds shape {shape}; expected ({batch} or 1, num_virtual, '
                     f'{hidden}) [batch, num_virtual_tokens, hidden_size]')
  return shape[1]


def check_prefix(prefix_kv, prefix_mask, config, batch: int) -> int:
  """Validates ``prefix_kv = (k, v)`` and ``prefix_mask``; returns the prefix length (0 when
  None)."""
  if prefix_kv is None:
    if prefix_mask is not None:
      raise ValueError('prefix_mask given without prefix_kv')
    return 0
  k, v = prefix_kv
  p = k.shape[2] if k.ndim == 5 else -1
  want = (config.num_layers, batch, p, config.num_kv_heads, config.head_dim)
  for name, a in (('k', k), ('v', v)):
    if a.ndim != 5 or a.shape[1] not in (1, batch) or a.shape[:1] + a.shape[2:] != (
        want[:1] + want[2:]):
      raise ValueError(f'prefix_kv {name} shape {tuple(a.shape)}; expected {want} (batch may '
                       'be 1) [num_layers, batch, prefix_len, num_kv_heads, head_dim]')
  if prefix_mask is not None and tuple(prefix_mask.shape) != (batch, p):
    raise ValueError(f'prefix_mask shape {tuple(prefix_mask.shape)}; expected {(batch, p)} '
                     '[batch, prefix_len]')
  return p


def write_prefix(cache: layers.KVCache, prefix_kv, prefix_mask) -> layers.KVCache:
  """The cache with ``prefix_kv`` in the slots from ``cache.index``, as transformers'
  ``past_key_values``: the mask marks the visible ones, ``pos`` advances by their count."""
  k, v = prefix_kv
  p = k.shape[2]
  valid = (jnp.ones((cache.mask.shape[0], p), bool) if prefix_mask is None
           else prefix_mask.astype(bool))
  write = lambda buf, a: jax.lax.dynamic_update_slice_in_dim(
      buf, jnp.swapaxes(a, 1, 2).astype(buf.dtype), cache.index, axis=2)
  return cache.replace(
      k=tuple(map(write, cache.k, k)), v=tuple(map(write, cache.v, v)),
      mask=jax.lax.dynamic_update_slice_in_dim(cache.mask, valid, cache.index, axis=1),
      index=cache.index + p, pos=cache.pos + valid.sum(axis=1, dtype=jnp.int32))


def prepare(config, x, *, attention_mask=None, position_ids=None, prompt_embeds=None,
            prefix_kv=None, prefix_mask=None, cache=None, token_type_ids=None,
            valid=None, positions: Callable) -> Inputs:
  """Applies the hooks to embedded tokens ``x`` [batch, T, hidden].

  ``valid`` [batch, T] marks the tokens that count for default positions (None: the attention
  mask); ``positions(valid [batch, n] bool, offset [batch], cache) -> [batch, n]`` is the
  family's default position rule over n tokens after ``offset`` visible prefix positions."""
  b, t = x.shape[:2]
  if cache is not None and cache.started:   # decode steps: the hooks are already in the cache
    prompt_embeds = prefix_kv = prefix_mask = None
  n_virtual = check_prompt_embeds(prompt_embeds, b, x.shape[-1])
  p = check_prefix(prefix_kv, prefix_mask, config, b)
  layers.check_length(config, p + n_virtual + t,
                      f'prefix {p} + virtual tokens {n_virtual} + tokens {t}')
  if cache is not None and cache.mask.shape[1] < p + n_virtual + t:
    raise ValueError(f'the KV cache has {cache.mask.shape[1]} slots; this call needs at least '
                     f'{p + n_virtual + t} (prefix {p} + virtual tokens {n_virtual} + tokens {t})')
  if p:
    prefix_kv = jax.tree.map(
        lambda a: jnp.broadcast_to(a, (a.shape[0], b) + a.shape[2:]), tuple(prefix_kv))
  offset = jnp.zeros((b,), jnp.int32)
  if p and prefix_mask is None:
    offset = offset + p
  elif p:
    offset = prefix_mask.astype(bool).sum(axis=1, dtype=jnp.int32)
  prefix_len = p
  if cache is not None and p:
    cache = write_prefix(cache, prefix_kv, prefix_mask)
    prefix_kv = prefix_mask = None
    prefix_len = 0
  if valid is None:
    valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask != 0
  default_offset = jnp.zeros((b,), jnp.int32) if cache is not None else offset
  if n_virtual:
    prompts = jnp.broadcast_to(prompt_embeds.astype(x.dtype), (b,) + prompt_embeds.shape[1:])
    x = jnp.concatenate([prompts, x], axis=1)
    ones = jnp.ones((b, n_virtual), jnp.int32)
    if attention_mask is not None:
      attention_mask = jnp.concatenate([ones.astype(attention_mask.dtype), attention_mask], 1)
    if token_type_ids is not None:
      token_type_ids = jnp.concatenate([0 * ones.astype(token_type_ids.dtype), token_type_ids],
                                       axis=1)
    valid = jnp.concatenate([ones.astype(bool), valid], axis=1)
  if position_ids is None:
    position_ids = positions(valid, default_offset, cache)
  else:
    position_ids = position_ids + offset[:, None] + n_virtual
    if n_virtual:
      first = positions(jnp.ones((b, n_virtual), bool), default_offset, cache)
      position_ids = jnp.concatenate([first.astype(position_ids.dtype), position_ids], axis=1)
  return Inputs(x, attention_mask, position_ids, token_type_ids, prefix_kv, prefix_mask,
                prefix_len, n_virtual, cache)


def drop_virtual(out: layers.ModelOutput, num_virtual: int,
                 keep_virtual: bool = False) -> layers.ModelOutput:
  """``out`` without its first ``num_virtual`` positions (``hidden``, per-token ``logits``)."""
  if not num_virtual or keep_virtual:
    return out
  cut = lambda a: None if a is None else a[:, num_virtual:]
  return out.replace(hidden=cut(out.hidden), logits=cut(out.logits))
