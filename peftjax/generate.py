"""Batched sampling with the KV cache from any PEFT-adapted model, as one compiled pure function
of ``(adapter, params, prompts, rng)``: swapping adapters or calling again never recompiles.

Greedy, temperature, top-k, top-p; left-padded prompts; a row stops at ``eos_token_id`` (later
tokens are ``pad_token_id``, their log-probs 0) and the loop (``lax.while_loop``) when all rows
have stopped. ``log_probs`` are the chosen tokens' log-probabilities under the model's own
logits (``log_softmax`` at temperature 1, before any top-k/top-p filter): what a
teacher-forced forward of prompt + completion gives, and what PPO/GRPO ratios start from.

>>> import jax, jax.numpy as jnp, flax.linen as nn
>>> from peftjax import methods
>>> from peftjax.models import llama, registry
>>> config = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
...                            num_layers=2, num_heads=4, num_kv_heads=2, eos_token_id=2)
>>> module = registry.build(config, 'causal_lm')
>>> params = nn.unbox(module.init(jax.random.key(0), jnp.ones((1, 1), jnp.int32)))['params']
>>> lora = methods.lora(rank=4, target='.*/(q_proj|v_proj)')
>>> sample = sampler(lora.apply(module.apply), config, max_new_tokens=8,
...                  sampling=Sampling(temperature=0.7, top_p=0.9))
>>> adapter = lora.init(jax.random.key(1), params)
>>> ids = jnp.array([[0, 5, 6], [7, 8, 9]])             # left padded
>>> out = sample(adapter, params, ids, ids != 0, jax.random.key(2))
>>> out.tokens.shape, out.log_probs.shape, out.lengths.shape
((2, 8), (2, 8), (2,))

A plain model: ``sampler(module.apply, ...)`` called with ``adapter=None``. Extra model
kwargs (the input hooks of ``models.hooks``: ``prompt_embeds``, ``prefix_kv``/``prefix_mask``)
go to the prefill call, which writes them into the cache; decode steps read them from there.
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
  tokens: jax.Array      # [batch, max_new_tokens] int32, pad after eos
  log_probs: jax.Array   # [batch, max_new_tokens] float32, log p(token | prefix), 0 after eos
  lengths: jax.Array     # [batch] generated tokens per row, eos included


def sample_logits(rng, logits, sampling: Sampling):
  """Next tokens [batch] from logits [batch, vocab]."""
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1)
  logits = logits.astype(jnp.float32) / sampling.temperature
  if sampling.top_k:
    top, idx = jax.lax.top_k(logits, sampling.top_k)   # top-p then sorts k values, not vocab
    if sampling.top_p < 1.0:
      top = jnp.where(_top_p_keep(top, sampling.top_p), top, -jnp.inf)
    choice = jax.random.categorical(rng, top, axis=-1)
    return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]
  if sampling.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    keep = _top_p_keep(sorted_logits, sampling.top_p)
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1)


def _top_p_keep(sorted_logits, top_p: float):
  """Mask of the smallest head of descending ``sorted_logits`` whose mass reaches ``top_p``
  (always keeps the top token)."""
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  return jnp.cumsum(probs, axis=-1) - probs < top_p


def _hook_slots(model_kwargs) -> int:
  """Cache slots that the input hooks (``models.hooks``) given at prefill take."""
  slots = 0
  if model_kwargs.get('prefix_kv') is not None:
    slots += model_kwargs['prefix_kv'][0].shape[2]     # [layers, batch, P, kv_heads, head_dim]
  if model_kwargs.get('prompt_embeds') is not None:
    slots += model_kwargs['prompt_embeds'].shape[1]    # [batch, V, hidden]
  return slots


def _eos_ids(eos) -> tuple:
  return tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else (
      () if eos is None else (int(eos),))


def sampler(apply_fn: Callable, config, *, max_new_tokens: int, sampling: Sampling = Sampling(),
            eos_token_id=None, pad_token_id: int | None = None, cache_dtype=None,
            extra_cache_slots: int = 0) -> Callable:
  """The compiled ``sample(adapter, params, input_ids, attention_mask=None, rng=None,
  **model_kwargs) -> GenerateOutput``.

  ``apply_fn(adapter, params, input_ids, **kw)`` is a PEFT-applied model
  (``method.apply(module.apply)``); with ``adapter=None`` it is called Flax-style,
  ``apply_fn({'params': params}, input_ids, **kw)`` (e.g. ``module.apply``). ``input_ids``
  [batch, prompt_len] are left padded (``attention_mask`` 0 on padding). ``eos_token_id`` (an
  int or ids) and ``pad_token_id`` default to ``config``'s; ``cache_dtype`` to ``config.dtype``.
  ``model_kwargs`` go to the prefill call; the cache gets room for the ``prefix_kv`` and
  ``prompt_embeds`` given there, and ``extra_cache_slots`` more for those a method adds itself.
  Adapter, params, prompts, rng and kwargs are traced: one compilation per shape.
  """
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens must be >= 1, got {max_new_tokens}')
  if sampling.temperature < 0 or sampling.top_k < 0 or not 0 < sampling.top_p <= 1:
    raise ValueError(f'invalid sampling {sampling}: need temperature >= 0, top_k >= 0, '
                     '0 < top_p <= 1')
  eos = jnp.asarray(_eos_ids(config.eos_token_id if eos_token_id is None else eos_token_id)
                    or (-1,), jnp.int32)
  pad = int(pad_token_id if pad_token_id is not None else (config.pad_token_id or 0))
  dtype = jnp.dtype(cache_dtype or config.dtype)

  def sample(adapter, params, input_ids, attention_mask=None, rng=None, **model_kwargs):
    call = (functools.partial(apply_fn, {'params': params}) if adapter is None
            else functools.partial(apply_fn, adapter, params))
    b, t = input_ids.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), jnp.int32)
    rng = jax.random.key(0) if rng is None else rng
    slots = t + max_new_tokens - 1 + _hook_slots(model_kwargs) + extra_cache_slots
    cache = layers.init_cache(config, b, slots, dtype)

    def pick(key, logits, done):
      """Samples from logits [b, V]: (token, its log-prob, done after it)."""
      token = sample_logits(key, logits, sampling).astype(jnp.int32)
      logp = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)),
                                 token[:, None], axis=-1)[:, 0]
      token = jnp.where(done, pad, token)
      return token, jnp.where(done, 0.0, logp), done | jnp.isin(token, eos)

    if t > 1:   # the prompt but its last token: logits unused, so XLA drops the head's matmul
      cache = call(input_ids[:, :-1], attention_mask=attention_mask[:, :-1], cache=cache,
                   **model_kwargs).cache
      model_kwargs = {}
    out = call(input_ids[:, -1:], attention_mask=attention_mask[:, -1:], cache=cache,
               **model_kwargs)
    rng, key = jax.random.split(rng)
    token, logp, done = pick(key, out.logits[:, -1], jnp.zeros((b,), bool))
    tokens = jnp.full((b, max_new_tokens), pad, jnp.int32).at[:, 0].set(token)
    log_probs = jnp.zeros((b, max_new_tokens), jnp.float32).at[:, 0].set(logp)
    ones = jnp.ones((b, 1), jnp.int32)

    def cond(state):
      step, done = state[0], state[3]
      return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
      step, token, cache, done, tokens, log_probs, rng = state
      out = call(token[:, None], attention_mask=ones, cache=cache)
      rng, key = jax.random.split(rng)
      token, logp, new_done = pick(key, out.logits[:, -1], done)
      tokens = jax.lax.dynamic_update_index_in_dim(tokens, token, step, axis=1)
      log_probs = jax.lax.dynamic_update_index_in_dim(log_probs, logp, step, axis=1)
      return step + 1, token, out.cache, new_done, tokens, log_probs, rng

    state = (jnp.ones((), jnp.int32), token, out.cache, done, tokens, log_probs, rng)
    _, _, _, _, tokens, log_probs, _ = jax.lax.while_loop(cond, body, state)
    stopped = jnp.cumsum(jnp.isin(tokens, eos), axis=1) - jnp.isin(tokens, eos) > 0
    return GenerateOutput(tokens, log_probs, jnp.sum(~stopped, axis=1, dtype=jnp.int32))

  return jax.jit(sample)


@functools.lru_cache(maxsize=32)
def _cached_sampler(apply_fn, config, max_new_tokens, sampling, eos, pad, cache_dtype):
  return sampler(apply_fn, config, max_new_tokens=max_new_tokens, sampling=sampling,
                 eos_token_id=eos, pad_token_id=pad, cache_dtype=cache_dtype)


def generate(module, variables, input_ids, attention_mask=None, *, max_new_tokens: int,
             rng=None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             eos_token_id=None, pad_token_id: int | None = None, apply_fn=None, adapter=None,
             cache_dtype=None, **model_kwargs) -> GenerateOutput:
  """One call of a ``sampler`` for ``module`` (cached per settings and ``apply_fn``).

  ``variables`` is ``{'params': params}``; ``apply_fn`` defaults to ``module.apply`` and, given
  an ``adapter``, is a PEFT-applied ``apply_fn(adapter, params, ...)``.
  """
  eos = _eos_ids(module.config.eos_token_id if eos_token_id is None else eos_token_id)
  fn = _cached_sampler(apply_fn or module.apply, module.config, max_new_tokens,
                       Sampling(float(temperature), int(top_k), float(top_p)), eos,
                       pad_token_id, None if cache_dtype is None else jnp.dtype(cache_dtype))
  return fn(adapter, variables['params'], jnp.asarray(input_ids),
            None if attention_mask is None else jnp.asarray(attention_mask), rng, **model_kwargs)
