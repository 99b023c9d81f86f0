"""Prefix tuning (Li & Liang 2021) and P-tuning v2 (Liu et al. 2022): P trainable key/value
prefixes at every layer, through the models' ``prefix_kv`` hook (a transformers
``past_key_values`` of length P).

The adapter is ``{'prefix_encoder': {...}}`` with HF PEFT's names and layout: ``embedding (P,
num_layers * 2 * kv_dim)`` (``kv_dim = num_kv_heads * head_dim``; per layer the keys then the
values, each ``[kv_heads, head_dim]``), or with ``projection=True`` ``embedding (P, kv_dim)``
and the MLP ``transform_0`` (Linear to ``encoder_hidden_size``), tanh, ``transform_2`` (Linear
to ``num_layers * 2 * kv_dim``). ``fold`` runs the MLP once and gives the plain adapter (export,
inference), as HF PEFT saves it. P-tuning v2 is prefix tuning without the projection. The model
dimensions come from its config (``model_dims``). With ``gate_target`` (UniPELT) each attention
module scales its prefix keys and values by a gate of its input (``gate.py``, ``prefix_gate``).

>>> import jax, jax.numpy as jnp
>>> from peftjax.models import llama
>>> config = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
...                            num_layers=2, num_heads=4, num_kv_heads=2)
>>> model = llama.LlamaModel(config)
>>> ids = jnp.ones((2, 5), jnp.int32)
>>> params = model.init(jax.random.key(0), ids)['params']
>>> method = prefix_tuning(num_virtual_tokens=3, projection=True, **model_dims(config))
>>> adapter = method.init(jax.random.key(1), params)
>>> jax.tree.map(jnp.shape, fold(adapter))
{'prefix_encoder': {'embedding': (3, 64)}}
>>> out = method.apply(model.apply)(adapter, params, ids)
>>> plain = prefix_tuning(num_virtual_tokens=3, **model_dims(config))
>>> again = plain.apply(model.apply)(fold(adapter), params, ids)
>>> bool(jnp.allclose(out.hidden, again.hidden, atol=1e-6))
True
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.methods import base, gate, targets
from peftjax.methods.prompt import check_num_virtual_tokens, dense, hooked, linear

ENCODER = 'prefix_encoder'


def model_dims(config) -> dict:
  """``num_layers``, ``num_kv_heads``, ``head_dim`` of a model config (the method's kwargs)."""
  return dict(num_layers=config.num_layers, num_kv_heads=config.num_kv_heads,
              head_dim=config.head_dim)


def encode(encoder) -> jax.Array:
  """The flat prefix ``(P, num_layers * 2 * kv_dim)`` an (unboxed) ``prefix_encoder`` gives."""
  x = encoder['embedding']
  if 'transform_0' in encoder:
    x = dense(encoder['transform_2'], jnp.tanh(dense(encoder['transform_0'], x)))
  return x


def to_kv(flat, num_layers: int, num_kv_heads: int, head_dim: int):
  """HF PEFT's layout ``(P, L * 2 * kv_dim)`` -> ``prefix_kv = (k, v)`` each ``[L, 1, P,
  kv_heads, head_dim]`` (HF's ``view(b, P, 2L, heads, d).permute(2, 0, 3, 1, 4)``)."""
  p = flat.shape[0]
  x = flat.reshape(p, num_layers, 2, num_kv_heads, head_dim).transpose(2, 1, 0, 3, 4)
  return x[0][:, None], x[1][:, None]


def fold(adapter) -> dict:
  """The plain prefix adapter ``{'prefix_encoder': {'embedding': (P, L * 2 * kv_dim)}}`` (the
  projection run once; other leaves of a composed adapter are kept)."""
  adapter = nn.meta.unbox(adapter)
  return {**adapter, ENCODER: {'embedding': encode(adapter[ENCODER])}}


def prefix_tuning(num_layers: int, num_kv_heads: int, head_dim: int,
                  num_virtual_tokens: int = 20, projection: bool = False,
                  encoder_hidden_size: Optional[int] = None, name: str = 'prefix',
                  gate_target: Optional[str] = None) -> base.PeftMethod:
  """Prefix tuning (``projection=True``: HF PEFT's ``prefix_projection``, an MLP with
  ``encoder_hidden_size`` hidden units, default ``kv_dim`` as HF PEFT) over a model with these
  dimensions (``model_dims(config)``). Init as torch's defaults (standard normal embedding,
  uniform Linear). ``gate_target``: a regex of the attention modules' input projections (e.g.
  the query); their parent modules (the attention) gate the prefix by their input's mean gate
  (UniPELT; no KV cache)."""
  p = check_num_virtual_tokens(num_virtual_tokens)
  for k, n in (('num_layers', num_layers), ('num_kv_heads', num_kv_heads),
               ('head_dim', head_dim)):
    if not isinstance(n, int) or n < 1:
      raise ValueError(f'prefix tuning {k} must be a positive int, got {n!r}')
  kv_dim = num_kv_heads * head_dim
  width = num_layers * 2 * kv_dim
  hparams = dict(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                 num_virtual_tokens=p)
  if name == 'prefix':
    hparams.update(projection=projection, encoder_hidden_size=encoder_hidden_size,
                   **({'gate_target': gate_target} if gate_target else {}))
  spec = base.Spec(name, hparams)

  def gates(rng, params) -> dict:
    """``{'<attention>/prefix_gate': ..., ...}``: one gate per parent of a ``gate_target``."""
    found = {}
    for path, w in targets.modules(params, gate_target).items():
      found.setdefault(path.rpartition('/')[0], w)
    return {f'{parent}/{k}': v for (parent, w, key) in targets.keyed(rng, found)
            for k, v in gate.init(key, w, gate.PREFIX).items()}

  def init(rng, params):
    boxed = any(isinstance(x, nn.Partitioned) for x in jax.tree.leaves(
        params, is_leaf=lambda x: isinstance(x, nn.Partitioned)))
    ax2 = (None, None) if boxed else None   # plain params in, plain arrays out
    if gate_target:
      rng, gate_rng = jax.random.split(rng)
      return tree.combine(init_encoder(rng, ax2),
                          tree.unflatten(gates(gate_rng, params)))
    return init_encoder(rng, ax2)

  def init_encoder(rng, ax2):
    k_emb, k0, k2 = jax.random.split(rng, 3)
    if not projection:
      return {ENCODER: {'embedding': targets.box(
          jax.random.normal(k_emb, (p, width), jnp.float32), ax2)}}
    h = encoder_hidden_size or kv_dim
    return {ENCODER: {
        'embedding': targets.box(jax.random.normal(k_emb, (p, kv_dim), jnp.float32), ax2),
        'transform_0': linear(k0, kv_dim, h, ax2), 'transform_2': linear(k2, h, width, ax2)}}

  def apply(apply_fn):
    adapted = hooked(apply_fn, lambda a, _: {'prefix_kv': to_kv(encode(a[ENCODER]), num_layers,
                                                                num_kv_heads, head_dim)},
                     lambda extra: p, f'{name} tokens')
    if not gate_target:
      return adapted

    def gated(adapter, params, *args, **kw):
      if kw.get('cache') is not None:
        raise ValueError('a gated prefix (UniPELT) does not run with a KV cache: the prefix '
                         'enters the cache at prefill, before any gate sees the layer input')
      with gate.gating_prefix():
        return adapted(adapter, params, *args, **kw)
    return gated
  return base.PeftMethod(init, apply, None, spec)


def ptuning_v2(num_layers: int, num_kv_heads: int, head_dim: int,
               num_virtual_tokens: int = 20) -> base.PeftMethod:
  """P-tuning v2: deep prompts at every layer, prefix tuning without the projection."""
  return prefix_tuning(num_layers, num_kv_heads, head_dim, num_virtual_tokens, name='ptuning_v2')
