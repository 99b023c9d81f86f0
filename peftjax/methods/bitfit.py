"""BitFit (Ben Zaken et al. 2021): train only bias terms.

The adapter holds copies of the selected ``bias`` params at their own paths; they replace the
base biases in ``apply`` and ``merge``.

>>> import jax, jax.numpy as jnp
>>> params = {'dense': {'kernel': jnp.ones((2, 3)), 'bias': jnp.zeros(3)},
...           'norm': {'scale': jnp.ones(3), 'bias': jnp.zeros(3)}}
>>> list(bitfit().init(jax.random.key(0), params))
['dense']
>>> sorted(bitfit(include_norm=True).init(jax.random.key(0), params))
['dense', 'norm']
"""
import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.methods import base


def bitfit(target: str = '.*', include_norm: bool = False) -> base.PeftMethod:
  """Biases of linear modules (those with a ``kernel``) whose path matches ``target``; with
  ``include_norm`` also the biases (betas) of kernel-less modules such as LayerNorm."""
  def init(rng, params):
    del rng
    flat = tree.flatten(params)
    biases = {p[:-len('/bias')]: v for p, v in flat.items() if p.endswith('/bias')
              and (include_norm or p[:-len('bias')] + 'kernel' in flat)}
    paths = tree.match(biases, target, what='module path with a trainable bias')
    return tree.unflatten({f'{p}/bias': jax.tree.map(jnp.copy, biases[p]) for p in paths})

  return base.weight_space(init, spec=base.Spec('bitfit', dict(target=target,
                                                               include_norm=include_norm)))
