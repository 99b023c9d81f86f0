"""Parameter counts without weights: a model's params as shapes (``jax.eval_shape`` of its init)
and what a PEFT method would train on them.

Papers quote trainable parameters for their own model sizes; building those models from
their published configs costs no memory here (nothing is materialised). LoRA r=8 on the
query and value projections of RoBERTa-base (LoRA paper, Table 2: 0.3M):

>>> import transformers
>>> from peftjax import methods
>>> from peftjax.models import registry
>>> roberta = registry.config_from_hf(transformers.RobertaConfig(
...     vocab_size=50265, max_position_embeddings=514, type_vocab_size=1).to_dict())
>>> params = abstract_params(roberta)
>>> counts(methods.get('lora', rank=8, model_type='roberta'), params)
Counts(trainable=294912, total=124645632, percent=0.23660...)
"""
from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import numpy as np

from peftjax import tree
from peftjax.methods.base import PeftMethod
from peftjax.models import registry


class Counts(NamedTuple):
  trainable: int   # scalars in the adapter tree
  total: int       # scalars in the base model
  percent: float   # 100 * trainable / total (the papers' convention: relative to the base)


def abstract_params(config, task: str = 'base') -> dict:
  """The params of the zoo model for ``config`` (a family config, e.g. from
  ``registry.config_from_hf``) and ``task``, as ``jax.ShapeDtypeStruct`` leaves."""
  module = registry.build(config, task)
  boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), np.ones((1, 2), np.int32)))
  return nn.meta.unbox(boxed['params'])


def trainable(method: PeftMethod, params) -> int:
  """Scalars in the adapter ``method.init`` would create on ``params`` (arrays or shapes)."""
  return tree.count(jax.eval_shape(method.init, jax.random.key(0), params))


def counts(method: PeftMethod, params) -> Counts:
  """Trainable and total parameter counts of ``method`` on ``params``."""
  n, total = trainable(method, params), tree.count(params)
  return Counts(n, total, 100.0 * n / total)
