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
>>> list(linear_kernels(params, default_target('lora', 'llama')))
['attn/q_proj']
"""
import re

import flax.linen as nn
import jax

from peftjax import tree

ALL_LINEAR = 'all-linear'
OUTPUT_HEADS = ('lm_head', 'score', 'classifier')


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


def linear_kernels(params, target: str) -> dict:
  """``{module_path: kernel}`` for modules with a ``kernel`` param whose path matches ``target``.

  Params may be boxed (``nn.Partitioned``). A kernel is ``(*stack, in, out)``: leading axes
  (e.g. ``nn.scan``'s layer axis) are stacked.
  Raises ValueError naming the near-miss module paths if nothing matches.
  """
  kernels = {p[:-len('/kernel')]: v for p, v in tree.flatten(nn.meta.unbox(params)).items()
             if p.endswith('/kernel') and v.ndim >= 2}
  if target == ALL_LINEAR:
    return {p: v for p, v in kernels.items() if p.rsplit('/', 1)[-1] not in OUTPUT_HEADS}
  return {p: kernels[p] for p in tree.match(kernels, target, what='linear module path')}


def keyed(rng, kernels: dict):
  """``(module_path, kernel, rng)`` for each of ``linear_kernels``' results, one key each."""
  keys = jax.random.split(rng, max(len(kernels), 1))
  return [(path, w, key) for (path, w), key in zip(kernels.items(), keys)]
