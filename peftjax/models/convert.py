"""Hugging Face tensors <-> Flax params, for scanned and unscanned layouts.

A Flax path is the HF key with ``.`` -> ``/``, ``layers.N`` -> ``layers_N`` and the leaf renamed
(``weight`` -> ``kernel`` transposed, except GPT-2 ``Conv1D``; ``embedding``; ``scale``). With
``scan_layers`` the stack module drops the index and stacks layers on a leading axis.

>>> from peftjax.models import checkpoint
>>> ckpt = checkpoint.open_checkpoint('all-minilm-l6-v2')
>>> config = registry.config_from_hf(ckpt.config, scan_layers=True)
>>> params = params_from_hf(config, ckpt.tensors, jnp.float32, task='base')
>>> params['bert']['encoder']['layer']['attention']['self']['query']['kernel'].shape
(6, 384, 384)
>>> sorted(params_to_hf(config, params))[0]
'bert.embeddings.LayerNorm.bias'

``params_from_hf(..., shardings=tree)`` builds every array shard by shard (see its docstring).
"""
from __future__ import annotations

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import meta

from peftjax import errors, quant
from peftjax.models import families, registry

# Heads Hugging Face also creates fresh when the checkpoint lacks them (fine-tuning a base model).
NEW_HEADS = families.NEW_HEADS


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


def _read(tensors, name: str, index: tuple) -> np.ndarray:
  """``tensors[name][index]``, reading only that slice where the source can (``read``)."""
  read = getattr(tensors, 'read', None)
  return read(name, index) if read is not None else np.asarray(tensors[name])[index]


def _tensor_reader(tensors, keys, config, name, transpose, shape, dtype):
  """``index -> array``: that slice (in the Flax layout) of HF tensor ``name`` or a candidate
  name, cast to ``dtype``; None when the checkpoint has none of them. Checks the shape now."""
  found = next((n for n in _candidates(config, name) if n in keys), None)
  if found is None:
    return None
  want = tuple(shape[::-1]) if transpose else tuple(shape)
  got = tuple(tensors.shape(found))
  if got != want:
    raise errors.CheckpointError(
        f'{tensors.file_of(found)}: tensor {found} has shape {got}, expected {want}')
  if transpose:
    return lambda index: _read(tensors, found, index[::-1]).T.astype(dtype)
  return lambda index: _read(tensors, found, index).astype(dtype)


def _param_readers(config, tensors, dtype, task, seed) -> dict:
  """``{path: (ShapeDtypeStruct, index -> array)}`` for every param of ``task``; checks that
  every tensor exists with the right shape before any is read."""
  keys = set(tensors.keys())
  rng = np.random.default_rng(seed)
  readers, fresh = {}, []
  for path, sds in param_shapes(config, task).items():
    scanned = is_scanned(config, path)
    layer_shape = sds.shape[1:] if scanned else sds.shape
    layers = []
    for layer in range(config.num_layers) if scanned else [None]:
      name, transpose = hf_name(config, path, layer)
      read = _tensor_reader(tensors, keys, config, name, transpose, layer_shape, dtype)
      if read is None and any(m in NEW_HEADS for m in path):
        fresh.append(name)
        value = (np.zeros(layer_shape) if path[-1] == 'bias' else
                 rng.normal(0.0, config.initializer_range, layer_shape)).astype(dtype)
        read = value.__getitem__
      if read is None:
        raise errors.CheckpointError(
            f'{_source(tensors)}: tensor {name} is missing (needed for {"/".join(path)})')
      layers.append(read)
    readers[path] = (jax.ShapeDtypeStruct(sds.shape, dtype),
                     _stacked(layers) if scanned else layers[0])
  if fresh:
    logging.warning('newly initialised (not in %s): %s', _source(tensors), ', '.join(fresh))
  return readers


def _stacked(layers):
  """Reader of a scanned param: its leading axis stacks the per-layer HF tensors."""
  return lambda index: np.stack([layers[i](index[1:]) for i in range(len(layers))[index[0]]])


def _sharded(sds, sharding, read) -> jax.Array:
  """The array built shard by shard on its devices; a slice shared by several devices
  (replication) is read once."""
  cache = {}

  def shard(index):
    key = tuple((s.start, s.stop, s.step) for s in index)
    if key not in cache:
      cache[key] = read(tuple(index))
    return cache[key]

  return jax.make_array_from_callback(sds.shape, sharding, shard, dtype=sds.dtype)


def quantized_paths(config, paths) -> list:
  """The Dense kernels a quantised base stores quantised: every ``kernel`` in the layer stack
  (heads, poolers and embeddings stay in ``param_dtype``, as transformers' bitsandbytes
  integration keeps its output head)."""
  stack = re.compile(families.layers_regex(config) + '/.*')
  return [p for p in paths if p[-1] == 'kernel' and stack.fullmatch('/'.join(p[:-1]))]


def _quantize(sds, read, scanned: bool, quantize, name: str):
  """A ``quant.QuantizedKernel`` read and quantised one HF tensor (one layer) at a time."""
  full = lambda *lead: (*lead, *(slice(None),) * (len(sds.shape) - len(lead)))
  if not scanned:
    return quantize.kernel(read(full()), name)
  return quant.stack([quantize.kernel(read(full(slice(i, i + 1)))[0], f'{name}[{i}]')
                      for i in range(sds.shape[0])])


def params_from_hf(config, tensors, dtype=jnp.float32, task: str = 'causal_lm', *,
                   seed: int = 0, shardings=None, quantize=None) -> dict:
  """Params for ``registry.build(config, task)`` read one tensor at a time from ``tensors``.

  ``tensors`` is a lazy mapping (``keys()``, ``shape(name)``, ``file_of(name)``, ``[name]`` ->
  np.ndarray, and optionally ``read(name, index)`` -> one slice). Missing classification/value
  heads and poolers are initialised as Hugging Face does (normal(initializer_range) kernels, zero
  biases, seeded by ``seed``) with a warning; any other missing or mis-shaped tensor raises
  ``CheckpointError`` naming file and tensor, before anything is read.

  With ``shardings`` (a tree of ``jax.sharding.Sharding`` like the params), every array is
  built shard by shard with ``jax.make_array_from_callback``: each process reads only the slices
  its devices hold, and no whole tensor is placed on one device. Without, arrays are placed on
  the default device.

  With ``quantize`` (a ``quant.QuantConfig``) the layer stack's Dense kernels
  (``quantized_paths``) become ``quant.QuantizedKernel``s, each quantised on the host as it is
  read (per layer when scanned) and placed in the shardings of its logical axes: peak host
  memory is the quantised model plus one tensor.
  """
  dtype = jnp.dtype(dtype)
  readers = _param_readers(config, tensors, dtype, task, seed)
  flat_shardings = None if shardings is None else traverse_util.flatten_dict(shardings)
  if flat_shardings is not None and set(flat_shardings) != set(readers):
    odd = sorted(set(flat_shardings) ^ set(readers))
    raise ValueError(f'shardings do not match the params of {config.model_type}/{task}: '
                     f'{", ".join("/".join(p) for p in odd[:5])} in only one of them')
  flat = {}
  quantized = set(quantized_paths(config, readers) if quantize is not None else ())
  for path, (sds, read) in readers.items():
    if path in quantized:
      q = _quantize(sds, read, is_scanned(config, path), quantize, '/'.join(path))
      flat[path] = jax.device_put(q, None if flat_shardings is None else
                                  quant.kernel_shardings(q, flat_shardings[path]))
    elif flat_shardings is None:
      flat[path] = jnp.asarray(read((slice(None),) * len(sds.shape)))
    else:
      flat[path] = _sharded(sds, flat_shardings[path], read)
  return traverse_util.unflatten_dict(flat)


def params_to_hf(config, params) -> dict[str, np.ndarray]:
  """Hugging Face state dict (numpy, HF layouts) of plain or boxed ``params``."""
  out = {}
  for path, arr in traverse_util.flatten_dict(meta.unbox(params)).items():
    if quant.is_quantized(arr):
      raise ValueError(f'{"/".join(path)} is a {arr.qtype} kernel; a Hugging Face checkpoint '
                       'holds float weights: dequantise first (quant.dequantize_params)')
    arr = np.asarray(arr)
    layers = range(arr.shape[0]) if is_scanned(config, path) else [None]
    for layer in layers:
      name, transpose = hf_name(config, path, layer)
      a = arr if layer is None else arr[layer]
      out[name] = np.ascontiguousarray(a.T if transpose else a)
  return out
