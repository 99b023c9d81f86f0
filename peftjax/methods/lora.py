"""LoRA (Hu et al. 2021), rsLoRA (Kalajdzievski 2023), DoRA (Liu et al. 2024) and LoRA+ groups.

For a targeted Dense with kernel ``W (in, out)`` the adapter holds ``lora_A (in, r)`` (kaiming-
uniform with a=sqrt(5), as HF PEFT) and ``lora_B (r, out)`` (zeros); the layer computes the
factored form ``x W + s * (dropout(x) A) B`` with ``s = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``),
never ``W + s A B``. DoRA adds ``lora_magnitude_vector (out,)`` = column norms of ``W`` and
rescales each output feature by ``m / ||W + s A B||`` (norm detached, as HF PEFT / the paper);
with dropout the base output it rescales is ``dropout(x) W``, as HF PEFT.
Leaves map to HF PEFT names: ``<path>/lora_A`` <-> ``<path>.lora_A.weight`` (transposed).

>>> import jax, jax.numpy as jnp, flax.linen as nn
>>> model = nn.Dense(8, name='q_proj')
>>> params = {'q_proj': model.init(jax.random.key(0), jnp.ones((1, 8)))['params']}
>>> method = lora(rank=2, alpha=4, target='q_proj')
>>> jax.tree.map(jnp.shape, method.init(jax.random.key(1), params))
{'q_proj': {'lora_A': (8, 2), 'lora_B': (2, 8)}}
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.methods import base, targets


def _scale(alpha: float, rank: int, rslora: bool) -> float:
  return alpha / math.sqrt(rank) if rslora else alpha / rank


def _delta(adapter_vars, scale):
  """``s * A @ B`` with stacked leading axes, shape ``(*stack, in, out)``."""
  return scale * jnp.einsum('...ir,...ro->...io', adapter_vars['lora_A'], adapter_vars['lora_B'])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def low_rank(x, a, b, scale: float):
  """``s * (x A) B`` for x ``(..., in)``, A ``(in, r)``, B ``(r, out)``.

  The custom VJP contracts the token axes directly (``dB = (s x A)^T g``, ``dA = x^T (s g B^T)``):
  JAX's generic rule emits ``transpose(dot(g, h))``, which XLA:CPU turns into a transposed copy
  of the full-width gradient ``g`` (measured: about a third of an all-linear LoRA step).
  """
  return ((x @ a) * scale) @ b


def _low_rank_fwd(x, a, b, scale):
  h = (x @ a) * scale
  return h @ b, (x, a, b, h)


def _low_rank_bwd(scale, res, g):
  x, a, b, h = res
  x2, h2, g2 = x.reshape(-1, x.shape[-1]), h.reshape(-1, h.shape[-1]), g.reshape(-1, g.shape[-1])
  dh = (g2 @ b.T) * scale
  return ((dh @ a.T).reshape(x.shape).astype(x.dtype), (x2.T @ dh).astype(a.dtype),
          (h2.T @ g2).astype(b.dtype))


low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)


def _column_norm(w):
  return jnp.linalg.norm(w.astype(jnp.float32), axis=-2)


def lora(rank: int = 8, alpha: float = 8.0, target: str = targets.ALL_LINEAR,
         dropout: float = 0.0, rslora: bool = False, dora: bool = False) -> base.PeftMethod:
  """LoRA on Dense layers whose module path matches ``target`` (see ``targets``).

  ``rank``/``alpha``/``dropout`` are HF PEFT's ``r``/``lora_alpha``/``lora_dropout``;
  ``rslora``/``dora`` are ``use_rslora``/``use_dora``.
  """
  if not isinstance(rank, int) or rank <= 0:
    raise ValueError(f'LoRA rank must be a positive int, got {rank!r}')
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f'LoRA dropout must be in [0, 1), got {dropout!r}')
  scale = _scale(alpha, rank, rslora)

  def init(rng, params):
    adapter = {}
    for path, w, key in targets.keyed(rng, targets.linear_kernels(params, target)):
      *stack, d_in, d_out = w.shape
      if rank > min(d_in, d_out):
        raise ValueError(f'LoRA rank {rank} exceeds min(in, out) = {min(d_in, d_out)} '
                         f'of {path} (kernel {tuple(w.shape)})')
      bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)) on torch's (r, in) weight
      adapter[f'{path}/lora_A'] = jax.random.uniform(key, (*stack, d_in, rank), jnp.float32,
                                                     -bound, bound)
      adapter[f'{path}/lora_B'] = jnp.zeros((*stack, rank, d_out), jnp.float32)
      if dora:
        adapter[f'{path}/lora_magnitude_vector'] = _column_norm(w)
    return tree.unflatten(adapter)

  def hook(adapter_vars, module, call, x, train):
    y = call(x)
    h = x
    dropped = train and dropout > 0.0
    if dropped:
      keep = jax.random.bernoulli(module.make_rng('dropout'), 1.0 - dropout, x.shape)
      h = jnp.where(keep, x / (1.0 - dropout), 0).astype(x.dtype)
    h, a, b = nn.dtypes.promote_dtype(h, adapter_vars['lora_A'], adapter_vars['lora_B'],
                                      dtype=module.dtype)
    lora_out = low_rank(h, a, b, scale)
    if 'lora_magnitude_vector' not in adapter_vars:
      return y + lora_out
    w = nn.meta.unbox(module.get_variable('params', 'kernel'))
    norm = jax.lax.stop_gradient(_column_norm(w + _delta(adapter_vars, scale)))
    mag = (adapter_vars['lora_magnitude_vector'] / norm).astype(y.dtype)
    if dropped:  # rescale the dropped input's base output, as HF PEFT (an extra matmul)
      base_out = h @ w.astype(h.dtype)
    elif module.use_bias:
      base_out = y - nn.meta.unbox(module.get_variable('params', 'bias')).astype(y.dtype)
    else:
      base_out = y
    return y + (mag - 1) * base_out.astype(y.dtype) + mag * lora_out

  def merge(adapter, params):
    flat = tree.flatten(params)
    for module, av in base.by_module(adapter).items():
      if 'lora_A' in av:
        w = flat[f'{module}/kernel']
        merged = w.astype(jnp.float32) + _delta(av, scale)
        if 'lora_magnitude_vector' in av:
          merged = merged * (av['lora_magnitude_vector'] / _column_norm(merged))[..., None, :]
        flat[f'{module}/kernel'] = merged.astype(w.dtype)
    return tree.unflatten(flat)

  return base.weight_space(init, hook, leaves=('lora_A', 'lora_B', 'lora_magnitude_vector'),
                           merge=merge)


def lora_plus_labels(adapter) -> dict:
  """LoRA+ (Hayou et al. 2024) parameter groups: ``'lora_B'`` for B leaves, else ``'default'``;
  ``train.optim`` gives each label its learning-rate multiplier (``lr_multipliers``)."""
  return tree.unflatten({p: 'lora_B' if p.endswith('/lora_B') else 'default'
                         for p in tree.flatten(adapter)})
