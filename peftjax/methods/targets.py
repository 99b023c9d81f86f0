"""Which linear modules a method adapts: regex targets and per-family defaults.

A target is a regex ``re.fullmatch``-ed against module paths ('/'-joined, the parent path of a
``kernel`` param), or ``'all-linear'``: every such module except an output head named
``lm_head``, ``score`` or ``classifier`` (as HF PEFT's ``all-linear``). The default tables copy
HF PEFT's ``TRANSFORMERS_MODELS_TO_*_TARGET_MODULES_MAPPING`` (module-name suffixes).

>>> default_target('lora', 'llama')
'(.*/)?(q_proj|v_proj)'
>>> import jax.numpy as jnp
>>> params = {'attn': {'q_proj': {'kernel': jnp.ones((4, 4))},
...                   'o_proj': {'kernel': jnp.ones((4, 4))}}}
>>> list(modules(params, default_target('lora', 'llama')))
['attn/q_proj']
"""
import re
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import numpy as np

from peftjax import tree

ALL_LINEAR = 'all-linear'
OUTPUT_HEADS = ('lm_head', 'score', 'classifier')
STACK_AXIS = 'layers'   # the logical name nn.scan gives the stacked layer axis


def suffix_regex(names) -> str:
  """HF PEFT ``target_modules`` names (module-name suffixes) -> a module-path regex."""
  return '(.*/)?(' + '|'.join(re.escape(n).replace(r'\.', '/') for n in names) + ')'


_LLAMA = {'lora': ('q_proj', 'v_proj'), 'ia3': ('k_proj', 'v_proj', 'down_proj'),
          'ia3_feedforward': ('down_proj',),
          'houlsby': ('o_proj', 'down_proj'), 'pfeiffer': ('down_proj',)}
_BERT = {'lora': ('query', 'value'), 'ia3': ('key', 'value', 'output.dense'),
         'ia3_feedforward': ('output.dense',)}
_BERT_FFN_OUT = r'.*/layer(_\d+)?/output/dense'

# model_type -> method -> regex over module paths.
DEFAULT_TARGETS = {
    'llama': {k: suffix_regex(v) for k, v in _LLAMA.items()},
    'mistral': {k: suffix_regex(v) for k, v in _LLAMA.items()},
    'qwen2': {k: suffix_regex(v)
              for k, v in {**_LLAMA, 'ia3': ('q_proj', 'v_proj', 'down_proj')}.items()},
    'gpt2': {k: suffix_regex(v) for k, v in {
        'lora': ('c_attn',), 'ia3': ('c_attn', 'mlp.c_proj'), 'ia3_feedforward': ('mlp.c_proj',),
        'houlsby': ('attn.c_proj', 'mlp.c_proj'), 'pfeiffer': ('mlp.c_proj',)}.items()},
    'bert': {**{k: suffix_regex(v) for k, v in _BERT.items()},
             'houlsby': rf'.*/attention/output/dense|{_BERT_FFN_OUT}', 'pfeiffer': _BERT_FFN_OUT},
}
DEFAULT_TARGETS['roberta'] = DEFAULT_TARGETS['bert']


def default_target(method: str, model_type: str) -> str:
  """The default target regex of ``method`` ('lora', 'ia3', 'ia3_feedforward', 'houlsby',
  'pfeiffer') for an HF ``model_type``."""
  if model_type not in DEFAULT_TARGETS:
    raise ValueError(f'no default targets for model_type {model_type!r}; '
                     f'known: {sorted(DEFAULT_TARGETS)}; pass target= explicitly')
  table = DEFAULT_TARGETS[model_type]
  if method not in table:
    raise ValueError(f'no default {method!r} target for {model_type!r}; known: {sorted(table)}')
  return table[method]


class Weight(NamedTuple):
  """A targeted module's weight: ``value`` ``(*stack, in, out)`` for a kernel, ``(*stack, vocab,
  dim)`` for an embedding; ``names`` its logical axes (None for plain params); ``kind``
  ``'kernel'`` or ``'embedding'``."""
  value: jax.Array
  names: Optional[tuple]
  kind: str = 'kernel'

  @property
  def stack(self) -> tuple:
    return self.value.shape[:-2]

  def axes(self, *dims) -> Optional[tuple]:
    """Logical axes of an adapter leaf of shape ``(*stack, *dims)``: each dim is ``'in'``,
    ``'out'`` (the weight's axis) or None (a rank or broadcast axis, never sharded)."""
    if self.names is None:
      return None
    where = {'in': self.names[-2], 'out': self.names[-1], None: None}
    return tuple(self.names[:-2]) + tuple(where[d] for d in dims)


def box(value, axes: Optional[tuple]):
  """``value`` boxed as ``nn.Partitioned`` with logical ``axes`` (unboxed when axes is None)."""
  return value if axes is None else nn.Partitioned(value, axes)


def _weight(path: str, leaf, kind: str) -> Weight:
  value, names = nn.meta.unbox(leaf), None
  if isinstance(leaf, nn.Partitioned):
    names = tuple(leaf.names)
    stacked = sum(1 for n in names if n == STACK_AXIS)
    if value.ndim - stacked != 2:
      raise ValueError(f'{path}: adapters support weights with one input and one output axis '
                       f'(a Dense or Embed), got {kind} of shape {tuple(value.shape)} with axes '
                       f'{names}')
  return Weight(value, names, kind)


def modules(params, target: str, kinds=('kernel',)) -> dict[str, Weight]:
  """``{module_path: Weight}`` for modules holding a param of one of ``kinds`` (``'kernel'``,
  ``'embedding'``) whose path matches ``target``.

  Boxed params (``nn.Partitioned``) give weights with logical names: leading ``'layers'`` axes
  (``nn.scan``) are stacked, and any other weight with more than two axes (a multi-axis
  ``DenseGeneral``) is refused. Plain params treat every leading axis as stacked.
  Raises ValueError naming the near-miss module paths if nothing matches.
  """
  found = {}
  for p, v in tree.flatten(params).items():
    module, _, leaf = p.rpartition('/')
    if leaf in kinds and np.ndim(nn.meta.unbox(v)) >= 2:
      found[module] = (leaf, v)
  if target == ALL_LINEAR:
    paths = [p for p, (kind, _) in found.items()
             if kind == 'kernel' and p.rsplit('/', 1)[-1] not in OUTPUT_HEADS]
  else:
    what = {'kernel': 'linear', 'embedding': 'embedding'}
    paths = tree.match(found, target, what=' or '.join(what[k] for k in kinds) + ' module path')
  return {p: _weight(p, found[p][1], found[p][0]) for p in paths}


def keyed(rng, items: dict):
  """``(path, item, rng)`` for each entry of ``items`` (e.g. ``modules``'), one key each."""
  keys = jax.random.split(rng, max(len(items), 1))
  return [(path, w, key) for (path, w), key in zip(items.items(), keys)]
