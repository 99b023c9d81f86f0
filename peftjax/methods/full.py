"""Full fine-tuning as a PeftMethod: the adapter is a copy of the base params (all of them, or
those whose path matches ``target``: HF PEFT's ``modules_to_save``).

>>> import jax, jax.numpy as jnp
>>> params = {'dense': {'kernel': jnp.ones((2, 3)), 'bias': jnp.zeros(3)}}
>>> adapter = full().init(jax.random.key(0), params)
>>> adapter['dense']['kernel'].shape
(2, 3)
>>> list(full(target='dense/bias').init(jax.random.key(0), params)['dense'])
['bias']
"""
from typing import Optional

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.methods import base


def full(target: Optional[str] = None) -> base.PeftMethod:
  """Params whose path ``re.fullmatch``-es ``target`` (every param when None) trainable; a copy
  (boxes kept), so donating the adapter never invalidates the base."""
  def init(rng, params):
    del rng
    if target is not None:
      params = tree.unflatten({p: tree.flatten(params)[p] for p in tree.select(params, target)})
    return jax.tree.map(jnp.copy, params)

  return base.weight_space(init, spec=base.Spec('full', dict(target=target)))
