"""IA3 (Liu et al. 2022): learned vectors rescaling activations, initialised to ones.

As HF PEFT: a targeted Dense ``W (in, out)`` gets ``ia3_l`` of shape ``(out, 1)`` scaling its
output, or, for a feedforward module, ``(1, in)`` scaling its input; the shapes (and the leaf
name) are HF PEFT's own, so ``<path>/ia3_l`` <-> ``<path>.ia3_l`` needs no reshaping.

>>> import jax, jax.numpy as jnp
>>> params = {'k_proj': {'kernel': jnp.ones((4, 6))}, 'down_proj': {'kernel': jnp.ones((6, 4))}}
>>> method = ia3(target='k_proj|down_proj', feedforward='down_proj')
>>> jax.tree.map(jnp.shape, method.init(jax.random.key(0), params))
{'down_proj': {'ia3_l': (1, 6)}, 'k_proj': {'ia3_l': (6, 1)}}
"""
from typing import Optional

import jax.numpy as jnp

from peftjax import quant, tree
from peftjax.methods import base, targets


def _is_feedforward(ia3_l) -> bool:
  return ia3_l.shape[-2] == 1


def ia3(target: str, feedforward: Optional[str] = None) -> base.PeftMethod:
  """IA3 on Dense layers matching ``target``; those also matching ``feedforward`` scale inputs.

  ``target``/``feedforward`` are regexes over module paths (HF PEFT's ``target_modules`` /
  ``feedforward_modules``; see ``targets.default_target('ia3' / 'ia3_feedforward', ...)``).
  """
  def init(rng, params):
    del rng
    weights = targets.modules(params, target)
    ff = set()
    if feedforward:
      ff = set(tree.match(weights, feedforward, what='targeted module path'))
    adapter = {}
    for path, w in weights.items():
      d_in, d_out = w.value.shape[-2:]
      adapter[f'{path}/ia3_l'] = (
          targets.box(jnp.ones((*w.stack, 1, d_in)), w.axes(None, 'in')) if path in ff else
          targets.box(jnp.ones((*w.stack, d_out, 1)), w.axes('out', None)))
    return tree.unflatten(adapter)

  def hook(adapter_vars, module, call, x, train):
    del module, train
    scale = adapter_vars['ia3_l']
    if _is_feedforward(scale):
      return call(x * scale[0].astype(x.dtype))
    y = call(x)
    return y * scale[:, 0].astype(y.dtype)

  def merge(adapter, params):
    flat = tree.flatten(params)
    for module, av in base.by_module(adapter).items():
      if 'ia3_l' in av:
        scale = av['ia3_l']
        kernel = quant.require_float(flat[f'{module}/kernel'], f'{module}/kernel')
        flat[f'{module}/kernel'] = (kernel * jnp.swapaxes(scale, -1, -2)).astype(kernel.dtype)
        if not _is_feedforward(scale) and f'{module}/bias' in flat:
          bias = flat[f'{module}/bias']
          flat[f'{module}/bias'] = (bias * scale[..., 0]).astype(bias.dtype)
    return tree.unflatten(flat)

  return base.weight_space(init, hook, leaves=('ia3_l',), merge=merge,
                           spec=base.Spec('ia3', dict(target=target, feedforward=feedforward)))
