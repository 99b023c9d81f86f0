"""Load a pretrained checkpoint into a Flax module and params; save back in Hugging Face format.

>>> import numpy as np
>>> pre = load_pretrained('all-minilm-l6-v2', task='base')
>>> ids, mask = np.array([[101, 7592, 102]]), np.ones((1, 3), np.int32)
>>> pre.module.apply({'params': pre.params}, ids, attention_mask=mask).hidden.shape
(1, 3, 384)
>>> import tempfile
>>> out = save_pretrained(tempfile.mkdtemp(), pre.config, pre.params, pre.tokenizer)
>>> sorted(p.name for p in out.iterdir())[:2]
['config.json', 'model.safetensors']

Loaded straight into shards (each device's slice read from the file, nothing whole on one device):

>>> from peftjax import sharding
>>> mesh = sharding.make_mesh()
>>> pre = load_pretrained('all-minilm-l6-v2', task='base', scan_layers=True,
...                       shardings=lambda module: sharding.model_shardings(module, mesh)[1])
>>> kernel = pre.params['bert']['encoder']['layer']['attention']['self']['query']['kernel']
>>> kernel.shape, kernel.sharding.spec
((6, 384, 384), P(None, 'fsdp', 'tensor'))

``save_pretrained`` writes ``config.json`` + ``model.safetensors`` that
``transformers.AutoModelFor*.from_pretrained`` loads.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from typing import Any

import jax.numpy as jnp
import safetensors.numpy

from peftjax import errors, quant
from peftjax.models import convert, registry


@dataclasses.dataclass(frozen=True)
class Pretrained:
  module: Any        # flax.linen.Module: module.apply({'params': params}, ids, ...)
  params: dict       # plain arrays
  config: Any        # the family config dataclass
  tokenizer: Any     # transformers tokenizer, or None when the checkpoint has none
  task: str


def load_pretrained(source, task: str = 'causal_lm', dtype=jnp.float32,
                    num_labels: int | None = None, shardings=None, quantize=None,
                    **config_overrides) -> Pretrained:
  """Opens ``source`` (HF dir, sharded dir, ``.gguf``, hub id, asset alias) for ``task``.

  ``dtype`` is the parameter and compute dtype unless ``param_dtype``/``dtype`` overrides say
  otherwise; any config field can be overridden (``scan_layers=True``, ``remat=True``, ...).
  Missing classification/value heads are initialised fresh (with a warning), as in HF.

  ``shardings(module)`` -> a tree of shardings like the params (e.g.
  ``lambda module: sharding.model_shardings(module, mesh, rules)[1]``) loads every tensor
  straight into its shards, one shard at a time (``convert.params_from_hf``); without it the
  params land on the default device.

  ``quantize`` (a ``quant.QuantConfig``, or a type name such as ``'nf4'``) quantises the layer
  stack's Dense kernels while loading, one tensor at a time (QLoRA's frozen base); its
  ``compute_dtype``, if set, is the model's compute dtype.
  """
  from peftjax.models import checkpoint, tokenizer as tokenizers   # lazy: heavy optional deps
  ckpt = checkpoint.open_checkpoint(source)
  overrides = dict(dtype=dtype, param_dtype=dtype)
  if num_labels is not None:
    overrides['num_labels'] = num_labels
  if isinstance(quantize, str):
    quantize = quant.QuantConfig(quant.check_type(quantize))
  if quantize is not None and quantize.compute_dtype is not None:
    overrides['dtype'] = quantize.compute_dtype
  overrides.update(config_overrides)
  config = registry.config_from_hf(ckpt.config, **overrides)
  module = registry.build(config, task)
  params = convert.params_from_hf(config, ckpt.tensors, config.param_dtype, task,
                                  shardings=None if shardings is None else shardings(module),
                                  quantize=quantize)
  try:
    tok = tokenizers.load_tokenizer(ckpt.tokenizer_source)
  except errors.CheckpointError as err:
    logging.info('no tokenizer: %s', err)
    tok = None
  return Pretrained(module, params, config, tok, task)


def infer_task(config, params) -> str:
  """The task whose head ``params`` hold (``lm_head``/``score``/``classifier``)."""
  if 'lm_head' in params:
    return 'causal_lm'
  if 'score' in params or 'classifier' in params:
    return 'classification'
  return 'causal_lm' if config.is_decoder else 'base'


def save_pretrained(directory, config, params, tokenizer=None, task: str | None = None):
  """Writes ``config.json``, ``model.safetensors`` (and the tokenizer) into ``directory``."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  task = task or infer_task(config, params)
  hf = config.to_hf()
  hf['architectures'] = [registry.hf_architecture(config.model_type, task)]
  if task == 'value':
    hf['id2label'] = {0: 'LABEL_0'}
  (directory / 'config.json').write_text(json.dumps(hf, indent=2, default=str))
  safetensors.numpy.save_file(convert.params_to_hf(config, params),
                              str(directory / 'model.safetensors'), metadata={'format': 'pt'})
  if tokenizer is not None:
    tokenizer.save_pretrained(directory)
  return directory
