"""The model zoo's table: Hugging Face ``model_type`` -> family (config class, backbone, tasks,
and its ``families.Layout``: embedding, layer stack, heads), and task -> head module.

>>> config = config_from_hf({'model_type': 'gpt2', 'vocab_size': 64, 'n_embd': 32,
...                          'n_layer': 2, 'n_head': 4})
>>> type(build(config, 'causal_lm')).__name__
'CausalLM'
"""
from __future__ import annotations

from typing import NamedTuple

from peftjax import errors
from peftjax.models import bert, families, gpt2, heads, llama


class Family(NamedTuple):
  name: str
  config_cls: type
  backbone: type
  tasks: tuple[str, ...]
  layout: families.Layout


_DECODER_TASKS = ('base', 'causal_lm', 'classification', 'value')
_ENCODER_TASKS = ('base', 'classification', 'value')

FAMILIES = {
    'llama': Family('llama', llama.LlamaConfig, llama.LlamaModel, _DECODER_TASKS,
                    families.LAYOUTS['llama']),
    'gpt2': Family('gpt2', gpt2.GPT2Config, gpt2.GPT2Model, _DECODER_TASKS,
                   families.LAYOUTS['gpt2']),
    'bert': Family('bert', bert.BertConfig, bert.BertModel, _ENCODER_TASKS,
                   families.LAYOUTS['bert']),
}

HEADS = {
    'base': heads.Base,
    'causal_lm': heads.CausalLM,
    'classification': heads.SequenceClassifier,
    'value': heads.ValueHead,
}


# Hugging Face class names: model_type -> prefix, task -> suffix (GPT-2's LM is GPT2LMHeadModel).
HF_CLASS_PREFIX = {'llama': 'Llama', 'mistral': 'Mistral', 'qwen2': 'Qwen2', 'gpt2': 'GPT2',
                   'bert': 'Bert', 'roberta': 'Roberta'}
HF_CLASS_SUFFIX = {'base': 'Model', 'causal_lm': 'ForCausalLM',
                   'classification': 'ForSequenceClassification',
                   'value': 'ForSequenceClassification'}


def hf_architecture(model_type: str, task: str) -> str:
  if model_type == 'gpt2' and task == 'causal_lm':
    return 'GPT2LMHeadModel'
  return HF_CLASS_PREFIX[model_type] + HF_CLASS_SUFFIX[task]


def family(model_type: str) -> Family:
  """The family serving ``model_type``; raises ``UnsupportedModelError`` listing the supported."""
  families.layout(model_type)   # raises for unsupported types
  return FAMILIES[families.MODEL_TYPES[model_type]]


def family_of(config) -> Family:
  return family(config.model_type)


def config_from_hf(hf: dict, **overrides):
  """A peftjax config from a Hugging Face ``config.json`` dict (``overrides`` win)."""
  return family(hf.get('model_type')).config_cls.from_hf(hf, **overrides)


def build(config, task: str = 'causal_lm'):
  """The Flax module for ``config`` and ``task`` (base, causal_lm, classification, value)."""
  fam = family_of(config)
  if task not in fam.tasks:
    raise errors.UnsupportedModelError(
        f'task {task!r} is not supported for {config.model_type}; supported: '
        f'{", ".join(fam.tasks)}')
  return HEADS[task](config, fam.backbone)
