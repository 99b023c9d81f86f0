"""Hugging Face tensors <-> Flax params, for scanned and unscanned layouts.

A Flax path is the HF key with ``.`` -> ``/``, ``layers.N`` -> ``layers_N`` and the leaf renamed
(``weight`` -> ``kernel`` transposed, except GPT-2 ``Conv1D``; ``embedding``; ``scale``). With
``scan_layers`` the stack module drops the index and stacks layers on a leading axis.

>>> params = params_from_hf(config, checkpoint.tensors, jnp.float32)     # doctest: +SKIP
>>> params['model']['layers_0']['self_attn']['q_proj']['kernel'].shape    # doctest: +SKIP
(32, 32)
>>> sorted(params_to_hf(config, params))[0]     # doctest: +SKIP
'model.embed_tokens.weight'
"""
from __future__ import annotations

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import meta

from peftjax import errors
from peftjax.models import registry

# Heads Hugging Face also creates fresh when the checkpoint lacks them (fine-tuning a base model).
NEW_HEADS = ('score', 'classifier', 'pooler')


def param_shapes(config, task: str = 'causal_lm') -> dict:
  """Flat ``{path tuple: ShapeDtypeStruct}`` of the plain (unboxed) params of ``task``."""
  module = registry.build(config, task)
  ids = jnp.zeros((1, 1), jnp.int32)
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), ids))
  return traverse_util.flatten_dict(meta.unbox(shapes['params']))


def is_scanned(config, path) -> bool:
  return config.scan_layers and config.scan_name in path[:-1]


def hf_name(config, path, layer: int | None = None) -> tuple[str, bool]:
  """(HF key, whether the HF tensor is the transpose) of a Flax param path (``layer`` for scan)."""
  *mods, leaf = path
  parts = []
  for m in mods:
    if layer is not None and m == config.scan_name:
      parts.append(f'{m}.{layer}')
    else:
      parts.append(re.sub(rf'^{config.scan_name}_(\d+)$', rf'{config.scan_name}.\1', m))
  parts.append('bias' if leaf == 'bias' else 'weight')
  transpose = leaf == 'kernel' and not any(m in config.conv1d for m in mods)
  return '.'.join(parts), transpose


def _candidates(config, name: str) -> list[str]:
  """HF keys that may hold ``name``: with or without the base-model prefix, legacy LayerNorm."""
  names = [name]
  prefix = config.base_prefix + '.'
  if name.startswith(prefix):
    names.append(name[len(prefix):])
  for old, legacy in (('LayerNorm.weight', 'LayerNorm.gamma'),
                      ('LayerNorm.bias', 'LayerNorm.beta')):
    names += [n[:-len(old)] + legacy for n in list(names) if n.endswith(old)]
  return names


def _source(tensors) -> str:
  return str(getattr(tensors, 'origin', None) or 'checkpoint')


def _read(tensors, keys, config, name, transpose, shape, dtype):
  found = next((n for n in _candidates(config, name) if n in keys), None)
  if found is None:
    return None
  want = tuple(shape[::-1]) if transpose else tuple(shape)
  got = tuple(tensors.shape(found))
  if got != want:
    raise errors.CheckpointError(
        f'{tensors.file_of(found)}: tensor {found} has shape {got}, expected {want}')
  arr = np.asarray(tensors[found])
  return (arr.T if transpose else arr).astype(dtype)


def params_from_hf(config, tensors, dtype=jnp.float32, task: str = 'causal_lm', *,
                   seed: int = 0) -> dict:
  """Params for ``registry.build(config, task)`` read one tensor at a time from ``tensors``.

  ``tensors`` is a lazy mapping (``keys()``, ``shape(name)``, ``file_of(name)``, ``[name]`` ->
  np.ndarray). Missing classification/value heads and poolers are initialised as Hugging Face
  does (normal(initializer_range) kernels, zero biases, seeded by ``seed``) with a warning; any
  other missing or mis-shaped tensor raises ``CheckpointError`` naming file and tensor.
  """
  dtype = jnp.dtype(dtype)
  keys = set(tensors.keys())
  rng = np.random.default_rng(seed)
  flat, fresh = {}, []
  for path, sds in param_shapes(config, task).items():
    scanned = is_scanned(config, path)
    layer_shape = sds.shape[1:] if scanned else sds.shape
    arrays = []
    for layer in range(config.num_layers) if scanned else [None]:
      name, transpose = hf_name(config, path, layer)
      arr = _read(tensors, keys, config, name, transpose, layer_shape, dtype)
      if arr is None and any(m in NEW_HEADS for m in path):
        fresh.append(name)
        arr = (np.zeros(layer_shape) if path[-1] == 'bias' else
               rng.normal(0.0, config.initializer_range, layer_shape)).astype(dtype)
      if arr is None:
        raise errors.CheckpointError(
            f'{_source(tensors)}: tensor {name} is missing (needed for {"/".join(path)})')
      arrays.append(arr)
    flat[path] = jnp.asarray(np.stack(arrays) if scanned else arrays[0])
  if fresh:
    logging.warning('newly initialised (not in %s): %s', _source(tensors), ', '.join(fresh))
  return traverse_util.unflatten_dict(flat)


def params_to_hf(config, params) -> dict[str, np.ndarray]:
  """Hugging Face state dict (numpy, HF layouts) of plain or boxed ``params``."""
  out = {}
  for path, arr in traverse_util.flatten_dict(meta.unbox(params)).items():
    arr = np.asarray(arr)
    layers = range(arr.shape[0]) if is_scanned(config, path) else [None]
    for layer in layers:
      name, transpose = hf_name(config, path, layer)
      a = arr if layer is None else arr[layer]
      out[name] = np.ascontiguousarray(a.T if transpose else a)
  return out
