"""Where each model family keeps its parts, named once: the backbone prefix, the input
embedding, the layer stack and the task heads (plain data; no model code is imported here).

Paths are '/'-joined module paths in the params tree. The layer stack is one module with a
leading layer axis when ``scan_layers=True``, else ``<stack>_0``, ``<stack>_1``, ...

>>> embedding_path('llama')
'model/embed_tokens'
>>> layers_regex('gpt2')
'transformer/h(_\\\\d+)?'
>>> output_head('gpt2', tied=True)
'transformer/wte'
>>> head_modules('roberta', 'classification')
('classifier',)
>>> HEAD_MODULES
('classifier', 'lm_head', 'score')
>>> NEW_HEADS
('classifier', 'pooler', 'score')
"""
from __future__ import annotations

from typing import NamedTuple

from peftjax import errors


class Layout(NamedTuple):
  embedding: str    # the input ``nn.Embed``, under the backbone
  layers: str       # the layer stack, under the backbone
  heads: dict       # task -> head modules at the top level (beside the backbone)
  pooler: str | None = None   # BERT's pooler, under the backbone (a head HF may create fresh)


LAYOUTS = {
    'llama': Layout('embed_tokens', 'layers',
                    {'causal_lm': ('lm_head',), 'classification': ('score',),
                     'value': ('score',)}),
    'gpt2': Layout('wte', 'h',
                   {'causal_lm': ('lm_head',), 'classification': ('score',),
                    'value': ('score',)}),
    'bert': Layout('embeddings/word_embeddings', 'encoder/layer',
                   {'classification': ('classifier',), 'value': ('classifier',)},
                   pooler='pooler'),
}

# Hugging Face ``model_type`` -> family, and -> the backbone's name (HF ``base_model_prefix``).
MODEL_TYPES = {
    'llama': 'llama', 'mistral': 'llama', 'qwen2': 'llama',
    'gpt2': 'gpt2',
    'bert': 'bert', 'roberta': 'bert',
}
BASE_PREFIX = {'llama': 'model', 'mistral': 'model', 'qwen2': 'model', 'gpt2': 'transformer',
               'bert': 'bert', 'roberta': 'roberta'}

# Every top-level head module name of any family (HF PEFT's ``all-linear`` leaves them out).
HEAD_MODULES = tuple(sorted({h for lay in LAYOUTS.values() for hs in lay.heads.values()
                             for h in hs}))
# Heads HF creates fresh when a checkpoint lacks them (a base model loaded for a task): the
# sequence-level heads and BERT's pooler; a missing LM head is an error.
NEW_HEADS = tuple(sorted({h for lay in LAYOUTS.values() for task, hs in lay.heads.items()
                          if task != 'causal_lm' for h in hs} |
                         {lay.pooler for lay in LAYOUTS.values() if lay.pooler}))


def model_type_of(config_or_type) -> str:
  return config_or_type if isinstance(config_or_type, str) else config_or_type.model_type


def layout(config_or_type) -> Layout:
  """The ``Layout`` of a config (or an HF ``model_type``); raises ``UnsupportedModelError``."""
  model_type = model_type_of(config_or_type)
  if model_type not in MODEL_TYPES:
    raise errors.UnsupportedModelError(
        f'model_type {model_type!r} is not supported; supported model types: '
        f'{", ".join(sorted(MODEL_TYPES))}')
  return LAYOUTS[MODEL_TYPES[model_type]]


def embedding_path(config_or_type) -> str:
  """The input embedding module, e.g. ``'bert/embeddings/word_embeddings'``."""
  model_type = model_type_of(config_or_type)
  return f'{BASE_PREFIX[model_type]}/{layout(model_type).embedding}'


def layers_regex(config_or_type) -> str:
  """A regex matching the layer-stack module path, scanned or not (``model/layers(_\\d+)?``)."""
  model_type = model_type_of(config_or_type)
  return f'{BASE_PREFIX[model_type]}/{layout(model_type).layers}' + r'(_\d+)?'


def head_modules(config_or_type, task: str | None = None) -> tuple[str, ...]:
  """The top-level head modules of ``task`` (every task's when None); ``()`` for 'base'."""
  heads = layout(config_or_type).heads
  if task is not None:
    return heads.get(task, ())
  return tuple(sorted({h for hs in heads.values() for h in hs}))


def output_head(config_or_type, tied: bool) -> str:
  """The LM head's module: ``lm_head``, or the input embedding when ``tied``."""
  return embedding_path(config_or_type) if tied else layout(config_or_type).heads['causal_lm'][0]
