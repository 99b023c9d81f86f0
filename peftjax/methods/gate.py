"""Input-dependent gates (UniPELT, Mao et al. 2022) that scale a submodule's contribution:
``g = pool(sigmoid(x W_g + b_g))`` for the submodule's input ``x``.

``pool='mean'`` averages over the sequence, a scalar per example, as the paper's code
(``torch.mean(torch.sigmoid(gate(x)), dim=1)``, padding included); ``pool='token'`` keeps one
gate per token (causal: no token sees later ones, so it suits decoders and packed rows).
A gate named ``n`` is two adapter leaves beside its submodule's: ``n`` ``(*stack, in, 1)`` ~
N(0, 0.02) and ``n_bias`` ``(*stack, 1)`` zeros (BERT's init of the paper's ``nn.Linear(in,
1)``), so every gate starts near 0.5.

>>> import jax, jax.numpy as jnp
>>> from peftjax.methods import targets
>>> w = targets.Weight(jnp.ones((4, 6)), None)
>>> leaves = init(jax.random.key(0), w, 'lora_gate')
>>> {k: v.shape for k, v in leaves.items()}
{'lora_gate': (4, 1), 'lora_gate_bias': (1,)}
>>> x = jnp.ones((2, 5, 4))                                 # [batch, seq, in]
>>> value(leaves, 'lora_gate', x, 'mean').shape, value(leaves, 'lora_gate', x, 'token').shape
((2, 1, 1), (2, 5, 1))
"""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from peftjax.methods import base, targets
from peftjax.models import layers

POOLS = ('mean', 'token')
STD = 0.02
PREFIX = 'prefix_gate'   # the gated prefix's leaves, in each attention module


def check_pool(pool: Optional[str], what: str) -> Optional[str]:
  """``pool`` if it is None (no gate) or one of ``POOLS``; else ValueError naming ``what``."""
  if pool is not None and pool not in POOLS:
    raise ValueError(f'{what} gate {pool!r} unknown; valid: None (no gate), {", ".join(POOLS)}')
  return pool


def init(key, w: targets.Weight, name: str, side: str = 'in') -> dict:
  """The leaves of a gate named ``name`` on the input (``side='in'``) or the output
  (``'out'``) of ``w``'s module (flat names)."""
  d = w.value.shape[-2 if side == 'in' else -1]
  return {name: targets.box(STD * jax.random.normal(key, (*w.stack, d, 1), jnp.float32),
                            w.axes(side, None)),
          f'{name}_bias': targets.box(jnp.zeros((*w.stack, 1), jnp.float32), w.axes(None))}


def value(adapter_vars, name: str, x, pool: str, dtype=None):
  """The gate ``[batch, 1.., 1]`` (``'mean'``: every axis between batch and features pooled) or
  ``[..., 1]`` (``'token'``) for input ``x [batch, ..., in]``, computed in ``dtype``."""
  x, k, b = nn.dtypes.promote_dtype(x, adapter_vars[name], adapter_vars[f'{name}_bias'],
                                    dtype=dtype)
  g = jax.nn.sigmoid(x @ k + b)
  if pool == 'mean' and g.ndim > 2:
    g = g.mean(axis=tuple(range(1, g.ndim - 1)), keepdims=True)
  return g


def _prefix_interceptor(next_fun, args, kwargs, context):
  """Scales the per-layer prefix key/values that an attention module holding ``PREFIX`` leaves
  receives (called as ``attention(x, ..., layer_prefix, ctx)``, the zoo's convention,
  ``models/hooks.py``) by the mean gate of its input ``x``, as the paper's code."""
  av = context.module.variables.get(base.ADAPTER, {})
  if context.method_name != '__call__' or PREFIX not in av:
    return next_fun(*args, **kwargs)
  where = [i for i, a in enumerate(args) if isinstance(a, layers.AttentionContext)]
  path = '/'.join(context.module.path)
  if not where or where[0] < 2:
    raise ValueError(f'{path}: a gated prefix needs the attention called as (x, ..., '
                     'layer_prefix, ctx)')
  i = where[0] - 1
  if args[i] is not None:
    g = value(av, PREFIX, args[0], 'mean', args[0].dtype)[..., None]
    args = (*args[:i], tuple(p * g.astype(p.dtype) for p in args[i]), *args[i + 1:])
  return next_fun(*args, **kwargs)


def gating_prefix():
  """A context in which every attention module holding ``PREFIX`` leaves gates its prefix."""
  return nn.intercept_methods(_prefix_interceptor)
