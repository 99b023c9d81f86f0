"""Full fine-tuning as a PeftMethod: the adapter is a copy of every base param.

>>> import jax, jax.numpy as jnp
>>> params = {'dense': {'kernel': jnp.ones((2, 3))}}
>>> adapter = full().init(jax.random.key(0), params)
>>> adapter['dense']['kernel'].shape
(2, 3)
"""
import jax
import jax.numpy as jnp

from peftjax.methods import base


def full() -> base.PeftMethod:
  """Every param trainable; a copy, so donating the adapter never invalidates the base."""
  return base.weight_space(lambda rng, params: jax.tree.map(jnp.copy, params))
