"""LoRA (Hu et al. 2021), rsLoRA (Kalajdzievski 2023), DoRA (Liu et al. 2024) and LoRA+ groups.

For a targeted Dense with kernel ``W (in, out)`` the adapter holds ``lora_A (in, r)`` (kaiming-
uniform with a=sqrt(5), as HF PEFT) and ``lora_B (r, out)`` (zeros); the layer computes the
factored form ``x W + s * (dropout(x) A) B`` with ``s = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``),
never ``W + s A B``. DoRA adds ``lora_magnitude_vector (out,)`` = column norms of ``W`` and
rescales each output feature by ``m / ||W + s A B||`` (norm detached, as HF PEFT / the paper);
with dropout the base output it rescales is ``dropout(x) W``, as HF PEFT.
Leaves map to HF PEFT names: ``<path>/lora_A`` <-> ``<path>.lora_A.weight`` (transposed).
With ``gate`` (UniPELT) a gate of the layer's input (``gate.py``: ``lora_gate``,
``lora_gate_bias``) takes the place of ``s``, as the paper's code; a gated LoRA is not mergeable.

>>> import jax, jax.numpy as jnp, flax.linen as nn
>>> model = nn.Dense(8, name='q_proj')
>>> params = {'q_proj': model.init(jax.random.key(0), jnp.ones((1, 8)))['params']}
>>> method = lora(rank=2, alpha=4, target='q_proj')
>>> jax.tree.map(jnp.shape, method.init(jax.random.key(1), params))
{'q_proj': {'lora_A': (8, 2), 'lora_B': (2, 8)}}
"""
import functools
import math
import re
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from peftjax import quant, tree
from peftjax.methods import base, gate as gates, targets


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


def pattern_value(patterns, path: str, default):
  """The value of the first key of ``patterns`` (regexes over module paths) that
  ``re.fullmatch``-es ``path`` (HF PEFT's ``rank_pattern``/``alpha_pattern`` semantics)."""
  return next((v for k, v in (patterns or {}).items() if re.fullmatch(k, path)), default)


def _embedding_lora(adapter_vars, module, ids, scale):
  """HF PEFT's ``Embedding`` LoRA: ``s * A[ids] @ B`` (no dropout on token ids)."""
  a, b = nn.dtypes.promote_dtype(adapter_vars['lora_embedding_A'],
                                 adapter_vars['lora_embedding_B'], dtype=module.dtype)
  return (jnp.take(a, ids, axis=0) * scale) @ b


def lora(rank: int = 8, alpha: float = 8.0, target: str = targets.ALL_LINEAR,
         dropout: float = 0.0, rslora: bool = False, dora: bool = False,
         rank_pattern: Optional[dict] = None, alpha_pattern: Optional[dict] = None,
         gate: Optional[str] = None) -> base.PeftMethod:
  """LoRA on Dense (and ``nn.Embed``) layers whose module path matches ``target``.

  ``rank``/``alpha``/``dropout`` are HF PEFT's ``r``/``lora_alpha``/``lora_dropout``;
  ``rslora``/``dora`` are ``use_rslora``/``use_dora``; ``rank_pattern``/``alpha_pattern`` map
  module-path regexes to per-module ranks/alphas (the first key that ``re.fullmatch``-es wins).
  A targeted embedding gets ``lora_embedding_A (vocab, r)`` (zeros) and ``lora_embedding_B (r,
  dim)`` (normal), as HF PEFT (transposed). ``gate`` ('mean' or 'token', ``gate.POOLS``) gates
  each Dense LoRA by its input in place of ``alpha / r`` (UniPELT); not with DoRA or embeddings.
  """
  ranks = [rank, *(rank_pattern or {}).values()]
  if not all(isinstance(r, int) and r > 0 for r in ranks):
    raise ValueError(f'LoRA rank must be a positive int, got {rank!r} '
                     f'(rank_pattern {rank_pattern!r})')
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f'LoRA dropout must be in [0, 1), got {dropout!r}')
  if gates.check_pool(gate, 'LoRA') and dora:
    raise ValueError(f'LoRA gate={gate!r} does not combine with DoRA')
  spec = base.Spec('lora', dict(rank=rank, alpha=alpha, target=target, dropout=dropout,
                                rslora=rslora, dora=dora, rank_pattern=dict(rank_pattern or {}),
                                alpha_pattern=dict(alpha_pattern or {}),
                                **({'gate': gate} if gate else {})))

  def module_scale(path: str, r: int) -> float:
    return _scale(pattern_value(alpha_pattern, path, alpha), r, rslora)

  def init(rng, params):
    adapter = {}
    weights = targets.modules(params, target, kinds=('kernel', 'embedding'))
    for path, w, key in targets.keyed(rng, weights):
      r = pattern_value(rank_pattern, path, rank)
      d_in, d_out = w.value.shape[-2:]
      if w.kind == 'embedding':
        if dora or gate:
          raise ValueError(f'{path}: {"DoRA" if dora else "a LoRA gate"} on an embedding is '
                           'not supported')
        adapter[f'{path}/lora_embedding_A'] = targets.box(
            jnp.zeros((*w.stack, d_in, r), jnp.float32), w.axes('in', None))
        adapter[f'{path}/lora_embedding_B'] = targets.box(
            jax.random.normal(key, (*w.stack, r, d_out), jnp.float32), w.axes(None, 'out'))
        continue
      if r > min(d_in, d_out):
        raise ValueError(f'LoRA rank {r} exceeds min(in, out) = {min(d_in, d_out)} '
                         f'of {path} (kernel {tuple(w.value.shape)})')
      if gate:
        key, gate_key = jax.random.split(key)
        adapter.update({f'{path}/{k}': v
                        for k, v in gates.init(gate_key, w, 'lora_gate').items()})
      bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)) on torch's (r, in) weight
      adapter[f'{path}/lora_A'] = targets.box(
          jax.random.uniform(key, (*w.stack, d_in, r), jnp.float32, -bound, bound),
          w.axes('in', None))
      adapter[f'{path}/lora_B'] = targets.box(jnp.zeros((*w.stack, r, d_out), jnp.float32),
                                              w.axes(None, 'out'))
      if dora:
        adapter[f'{path}/lora_magnitude_vector'] = targets.box(_column_norm(quant.value(w.value)),
                                                               w.axes('out'))
    return tree.unflatten(adapter)

  def hook(adapter_vars, module, call, x, train):
    y = call(x)
    path = '/'.join(module.path)
    if 'lora_embedding_A' in adapter_vars:
      r = adapter_vars['lora_embedding_A'].shape[-1]
      return y + _embedding_lora(adapter_vars, module, x, module_scale(path, r)).astype(y.dtype)
    scale = module_scale(path, adapter_vars['lora_A'].shape[-1])
    h = x
    dropped = train and dropout > 0.0
    if dropped:
      keep = jax.random.bernoulli(module.make_rng('dropout'), 1.0 - dropout, x.shape)
      h = jnp.where(keep, x / (1.0 - dropout), 0).astype(x.dtype)
    h, a, b = nn.dtypes.promote_dtype(h, adapter_vars['lora_A'], adapter_vars['lora_B'],
                                      dtype=module.dtype)
    if 'lora_gate' in adapter_vars:
      g = gates.value(adapter_vars, 'lora_gate', x, gate, h.dtype)
      return y + (low_rank(h, a, b, 1.0) * g).astype(y.dtype)
    lora_out = low_rank(h, a, b, scale)
    if 'lora_magnitude_vector' not in adapter_vars:
      return y + lora_out
    w = quant.value(module.get_variable('params', 'kernel'))   # dequantised: a 4-bit base
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
      factors = ('lora_embedding_A', 'lora_embedding_B', 'embedding')
      if 'lora_A' in av:
        factors = ('lora_A', 'lora_B', 'kernel')
      elif 'lora_embedding_A' not in av:
        continue
      a, b, leaf = factors
      w = quant.require_float(flat[f'{module}/{leaf}'], f'{module}/{leaf}')
      if w.shape != (*av[a].shape[:-1], av[b].shape[-1]):
        raise ValueError(f'{module}: LoRA factors {av[a].shape} x {av[b].shape} do not fit '
                         f'{leaf} {w.shape}')
      merged = w.astype(jnp.float32) + _delta({'lora_A': av[a], 'lora_B': av[b]},
                                              module_scale(module, av[a].shape[-1]))
      if 'lora_magnitude_vector' in av:
        merged = merged * (av['lora_magnitude_vector'] / _column_norm(merged))[..., None, :]
      flat[f'{module}/{leaf}'] = merged.astype(w.dtype)
    return tree.unflatten(flat)

  return base.weight_space(
      init, hook, leaves=('lora_A', 'lora_B', 'lora_magnitude_vector', 'lora_embedding_A',
                          'lora_embedding_B', 'lora_gate', 'lora_gate_bias'),
      merge=None if gate else merge, spec=spec)


def lora_plus_labels(adapter) -> dict:
  """LoRA+ (Hayou et al. 2024) parameter groups: ``'lora_B'`` for B leaves, else ``'default'``;
  ``train.optim`` gives each label its learning-rate multiplier (``lr_multipliers``)."""
  return tree.unflatten({p: 'lora_B' if p.endswith('/lora_B') else 'default'
                         for p in tree.flatten(adapter)})
