"""Bottleneck adapters: Houlsby et al. 2019 and Pfeiffer et al. 2021.

A targeted Dense output ``y (.., out)`` becomes ``y + up(act(down(y)))`` (before the residual
add); ``down (out, m)`` ~ truncated normal with std 1e-2 as in the paper, ``up (m, out)`` zeros
so the layer is exactly the identity at init. Houlsby adapts the attention output and the FFN
output projections, Pfeiffer only the FFN output (``targets.default_target('houlsby' |
'pfeiffer', model_type)``). Houlsby also trains the layer-normalisation parameters (paper §2.1):
``train_norms`` copies every norm module's params (kernel-less modules with a ``scale``: LayerNorm,
RMSNorm) into the adapter, where they replace the base ones. Not mergeable (``merge`` is None).
With ``gate`` (UniPELT) the bottleneck's output is scaled by a gate of its input ``y``
(``gate.py``: ``adapter_gate``, ``adapter_gate_bias``), as the paper's code.

>>> import jax, jax.numpy as jnp
>>> params = {'o_proj': {'kernel': jnp.ones((4, 6))}}
>>> adapter = bottleneck_adapter(target='o_proj', bottleneck=2).init(jax.random.key(0), params)
>>> {k: v.shape for k, v in adapter['o_proj'].items()}  # doctest: +NORMALIZE_WHITESPACE
{'adapter_down': (6, 2), 'adapter_down_bias': (2,), 'adapter_up': (2, 6),
 'adapter_up_bias': (6,)}
"""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.methods import base, gate as gates, targets


_LEAVES = ('adapter_down', 'adapter_down_bias', 'adapter_up', 'adapter_up_bias')
ACTIVATIONS = {'relu': jax.nn.relu, 'gelu': jax.nn.gelu, 'silu': jax.nn.silu, 'tanh': jnp.tanh}


def _norm_params(params) -> dict:
  """Flat copies of the params of norm modules: kernel-less modules holding a ``scale``."""
  flat = tree.flatten(nn.meta.unbox(params))
  norms = {p[:-len('/scale')] for p in flat
           if p.endswith('/scale') and p[:-len('scale')] + 'kernel' not in flat}
  return {p: jax.tree.map(jnp.copy, v) for p, v in tree.flatten(params).items()
          if p.rpartition('/')[0] in norms}


def bottleneck_adapter(target: str, bottleneck: int = 64, activation: str = 'relu',
                       train_norms: bool = False, gate: Optional[str] = None
                       ) -> base.PeftMethod:
  """Residual bottleneck after each Dense whose module path matches ``target``; ``activation``
  names one of ``ACTIVATIONS``; with ``train_norms`` the norm layers' params are trained too
  (``methods.get('houlsby')``); ``gate`` ('mean' or 'token', ``gate.POOLS``) gates it."""
  if not isinstance(bottleneck, int) or bottleneck <= 0:
    raise ValueError(f'adapter bottleneck must be a positive int, got {bottleneck!r}')
  if activation not in ACTIVATIONS:
    raise ValueError(f'adapter activation {activation!r} unknown; known: {sorted(ACTIVATIONS)}')
  act = ACTIVATIONS[activation]
  gates.check_pool(gate, 'adapter')
  spec = base.Spec('houlsby' if train_norms else 'pfeiffer', dict(
      target=target, bottleneck=bottleneck, activation=activation, train_norms=train_norms,
      **({'gate': gate} if gate else {})))

  def init(rng, params):
    adapter = {}
    for path, w, key in targets.keyed(rng, targets.modules(params, target)):
      d_out = w.value.shape[-1]
      if gate:
        key, gate_key = jax.random.split(key)
        adapter.update({f'{path}/{k}': v
                        for k, v in gates.init(gate_key, w, 'adapter_gate', 'out').items()})
      down = 1e-2 * jax.random.truncated_normal(key, -2.0, 2.0, (*w.stack, d_out, bottleneck))
      adapter.update({
          f'{path}/adapter_down': targets.box(down, w.axes('out', None)),
          f'{path}/adapter_down_bias': targets.box(jnp.zeros((*w.stack, bottleneck)),
                                                   w.axes(None)),
          f'{path}/adapter_up': targets.box(jnp.zeros((*w.stack, bottleneck, d_out)),
                                            w.axes(None, 'out')),
          f'{path}/adapter_up_bias': targets.box(jnp.zeros((*w.stack, d_out)), w.axes('out'))})
    if train_norms:
      adapter.update(_norm_params(params))
    return tree.unflatten(adapter)

  def hook(adapter_vars, module, call, x, train):
    del train
    y = call(x)
    y_, down, down_bias, up, up_bias = nn.dtypes.promote_dtype(
        y, *(adapter_vars[k] for k in _LEAVES), dtype=module.dtype)
    out = act(y_ @ down + down_bias) @ up + up_bias
    if 'adapter_gate' in adapter_vars:
      out = out * gates.value(adapter_vars, 'adapter_gate', y_, gate, out.dtype)
    return y + out.astype(y.dtype)

  return base.weight_space(init, hook, leaves=(*_LEAVES, 'adapter_gate', 'adapter_gate_bias'),
                           merge=None, spec=spec)

