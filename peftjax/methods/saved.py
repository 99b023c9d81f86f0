"""HF PEFT's ``modules_to_save``: trainable copies of chosen base params (fresh task heads,
embeddings), with HF PEFT's tied-embedding semantics.

>>> import jax, jax.numpy as jnp
>>> from peftjax import tree
>>> params = {'score': {'kernel': jnp.ones((4, 2))}, 'wte': {'embedding': jnp.ones((9, 4))}}
>>> heads = modules_to_save(['score/kernel', 'wte/embedding'])
>>> sorted(tree.flatten(heads.init(jax.random.key(0), params)))
['score/kernel', 'wte/input_embedding']
>>> heads.spec.asdict()
{'name': 'modules_to_save', 'paths': ['score/kernel', 'wte/embedding'], 'ensure_weight_tying': False}
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.methods import base

INPUT_EMBEDDING = 'input_embedding'   # the saved copy of an embedding, read by its lookup only


def saved_leaf(path: str, ensure_weight_tying: bool) -> str:
  """The adapter leaf holding the saved copy of base param ``path``."""
  module, _, leaf = path.rpartition('/')
  return f'{module}/{INPUT_EMBEDDING}' if leaf == 'embedding' and not ensure_weight_tying else path


def _input_lookup(adapter_vars, module, call, ids, train):
  """An ``nn.Embed`` lookup in the saved copy (what ``nn.Embed.__call__`` does)."""
  del call, train
  embedding, = nn.dtypes.promote_dtype(adapter_vars[INPUT_EMBEDDING], dtype=module.dtype,
                                       inexact=False)
  return jnp.take(embedding, ids, axis=0)


def modules_to_save(paths, ensure_weight_tying: bool = False) -> base.PeftMethod:
  """HF PEFT's ``modules_to_save``: trainable copies of the base params at ``paths``.

  A copied param replaces the original wherever the model reads it, except an ``embedding``:
  its copy (leaf ``<module>/input_embedding``) feeds only the module's input lookup, so a tied
  LM head keeps reading the original embedding, as HF PEFT's ``ModulesToSaveWrapper`` does.
  With ``ensure_weight_tying`` (HF PEFT's LoRA option) the copy replaces the embedding itself
  and the tied head reads it too. Such an untied embedding copy cannot be merged (``merge`` is
  None). Raises ValueError naming a path the base params lack.

  """
  paths = sorted(paths)

  def init(rng, params):
    del rng
    flat = tree.flatten(params)
    missing = [p for p in paths if p not in flat]
    if missing:
      raise ValueError(f'modules_to_save: no base params at {missing}')
    return tree.unflatten({saved_leaf(p, ensure_weight_tying): jax.tree.map(jnp.copy, flat[p])
                           for p in paths})

  untied = any(saved_leaf(p, ensure_weight_tying) != p for p in paths)
  spec = base.Spec('modules_to_save', {'paths': paths, 'ensure_weight_tying': ensure_weight_tying})
  method = base.weight_space(init, _input_lookup, leaves=(INPUT_EMBEDDING,), spec=spec)
  return method._replace(merge=None) if untied else method
