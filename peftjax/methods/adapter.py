"""Bottleneck adapters: Houlsby et al. 2019 and Pfeiffer et al. 2021.

A targeted Dense output ``y (.., out)`` becomes ``y + up(act(down(y)))`` (before the residual
add); ``down (out, m)`` ~ truncated normal with std 1e-2 as in the paper, ``up (m, out)`` zeros
so the layer is exactly the identity at init. Houlsby adapts the attention output and the FFN
output projections, Pfeiffer only the FFN output: the two differ only in their targets
(``targets.default_target('houlsby' | 'pfeiffer', model_type)``).
Not mergeable (``merge`` is None).

>>> import jax, jax.numpy as jnp
>>> params = {'o_proj': {'kernel': jnp.ones((4, 6))}}
>>> adapter = bottleneck_adapter(target='o_proj', bottleneck=2).init(jax.random.key(0), params)
>>> {k: v.shape for k, v in adapter['o_proj'].items()}  # doctest: +NORMALIZE_WHITESPACE
{'adapter_down': (6, 2), 'adapter_down_bias': (2,), 'adapter_up': (2, 6),
 'adapter_up_bias': (6,)}
"""
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.methods import base, targets


_LEAVES = ('adapter_down', 'adapter_down_bias', 'adapter_up', 'adapter_up_bias')


def bottleneck_adapter(target: str, bottleneck: int = 64,
                       activation: Callable = nn.relu) -> base.PeftMethod:
  """Residual bottleneck after each Dense whose module path matches ``target``."""
  if not isinstance(bottleneck, int) or bottleneck <= 0:
    raise ValueError(f'adapter bottleneck must be a positive int, got {bottleneck!r}')

  def init(rng, params):
    adapter = {}
    for path, w, key in targets.keyed(rng, targets.linear_kernels(params, target)):
      *stack, _, d_out = w.shape
      down = 1e-2 * jax.random.truncated_normal(key, -2.0, 2.0, (*stack, d_out, bottleneck))
      adapter.update({f'{path}/adapter_down': down,
                      f'{path}/adapter_down_bias': jnp.zeros((*stack, bottleneck)),
                      f'{path}/adapter_up': jnp.zeros((*stack, bottleneck, d_out)),
                      f'{path}/adapter_up_bias': jnp.zeros((*stack, d_out))})
    return tree.unflatten(adapter)

  def hook(adapter_vars, module, call, x, train):
    del train
    y = call(x)
    y_, down, down_bias, up, up_bias = nn.dtypes.promote_dtype(
        y, *(adapter_vars[k] for k in _LEAVES), dtype=module.dtype)
    return y + (activation(y_ @ down + down_bias) @ up + up_bias).astype(y.dtype)

  return base.weight_space(init, hook, leaves=_LEAVES, merge=None)

