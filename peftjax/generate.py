"""Batched sampling with the KV cache: greedy, temperature, top-k, top-p; left-padded prompts;
stops a row at ``eos_token_id`` (later tokens are ``pad_token_id``) and the loop when all stop.

>>> out = generate(module, {'params': params}, ids, mask, max_new_tokens=16)   # doctest: +SKIP
>>> out.tokens.shape          # [batch, 16]                                    # doctest: +SKIP

``apply_fn(variables, input_ids, **kw)`` defaults to ``module.apply``; pass a PEFT-wrapped apply
to sample from an adapted model. Compiled loops are cached per (module, apply_fn, settings).
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from peftjax.models import layers


class Sampling(NamedTuple):
  """``temperature == 0`` is greedy; ``top_k == 0`` and ``top_p == 1`` disable those filters."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0


class GenerateOutput(NamedTuple):
  tokens: jax.Array      # [batch, max_new_tokens], pad after eos
  lengths: jax.Array     # [batch] generated tokens per row, eos included


def sample_logits(rng, logits, sampling: Sampling):
  """Next tokens [batch] from logits [batch, vocab]."""
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1)
  logits = logits.astype(jnp.float32) / sampling.temperature
  if sampling.top_k:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    keep = jnp.cumsum(probs, axis=-1) - probs < sampling.top_p   # always keeps the top token
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1)


@functools.lru_cache(maxsize=32)
def _compiled(module, apply_fn: Callable, max_new_tokens: int, sampling: Sampling,
              eos_token_ids: tuple, pad_token_id: int, cache_dtype):

  def run(variables, input_ids, attention_mask, rng):
    b, t = input_ids.shape
    cache = layers.init_cache(module.config, b, t + max_new_tokens, cache_dtype)
    out = apply_fn(variables, input_ids, attention_mask=attention_mask, cache=cache)
    eos = jnp.asarray(eos_token_ids or (-1,), jnp.int32)

    def cond(state):
      step, _, _, done, _, _, _ = state
      return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
      step, logits, cache, done, tokens, lengths, rng = state
      rng, key = jax.random.split(rng)
      token = jnp.where(done, pad_token_id, sample_logits(key, logits, sampling)).astype(jnp.int32)
      tokens = tokens.at[:, step].set(token)
      lengths = lengths + (~done).astype(jnp.int32)
      done = done | jnp.isin(token, eos)
      out = apply_fn(variables, token[:, None], attention_mask=jnp.ones((b, 1), jnp.int32),
                     cache=cache)
      return step + 1, out.logits[:, -1], out.cache, done, tokens, lengths, rng

    state = (jnp.zeros((), jnp.int32), out.logits[:, -1], out.cache, jnp.zeros((b,), bool),
             jnp.full((b, max_new_tokens), pad_token_id, jnp.int32), jnp.zeros((b,), jnp.int32),
             rng)
    _, _, _, _, tokens, lengths, _ = jax.lax.while_loop(cond, body, state)
    return GenerateOutput(tokens, lengths)

  return jax.jit(run)


def generate(module, variables, input_ids, attention_mask=None, *, max_new_tokens: int,
             rng=None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             eos_token_id=None, pad_token_id: int | None = None, apply_fn=None,
             cache_dtype=jnp.float32) -> GenerateOutput:
  """Samples ``max_new_tokens`` after left-padded prompts ``input_ids`` [batch, prompt_len].

  ``eos_token_id``/``pad_token_id`` default to ``module.config``'s (an int or a tuple of ids)."""
  cfg = module.config
  eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
  eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
  pad = pad_token_id if pad_token_id is not None else (cfg.pad_token_id or 0)
  if attention_mask is None:
    attention_mask = jnp.ones(input_ids.shape, jnp.int32)
  fn = _compiled(module, apply_fn or module.apply, max_new_tokens,
                 Sampling(float(temperature), int(top_k), float(top_p)), eos, int(pad),
                 jnp.dtype(cache_dtype))
  return fn(variables, jnp.asarray(input_ids), jnp.asarray(attention_mask),
            jax.random.key(0) if rng is None else rng)
