"""Hugging Face PEFT adapter directories <-> peftjax adapters (LoRA, rsLoRA, DoRA, IA3).

A HF PEFT directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<HF module>.<leaf>``: ``lora_A.weight (r, in)``, ``lora_B.weight (out, r)``,
``lora_magnitude_vector (out,)`` (DoRA), ``ia3_l`` (``(out, 1)``, feedforward ``(1, in)``), and
the full weights of ``modules_to_save`` (e.g. ``classifier.weight``). In peftjax those are
``<flax module>/lora_A (in, r)``, ``lora_B (r, out)``, ``lora_magnitude_vector``, ``ia3_l`` and
adapter leaves at base-param paths (``classifier/kernel``); scanned layouts are (un)stacked per
layer. GPT-2's Conv1D modules only change ``fan_in_fan_out`` (their LoRA factors are oriented
as ``nn.Linear``'s).

>>> save_adapter('/tmp/a', adapter, config, alpha=16)        # doctest: +SKIP
>>> peft.PeftModel.from_pretrained(hf_model, '/tmp/a')       # doctest: +SKIP
>>> method, adapter = load_adapter('/tmp/a', params, config)  # doctest: +SKIP
>>> logits = method.apply(module.apply)(adapter, params, ids).logits  # doctest: +SKIP
"""
from __future__ import annotations

import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import traverse_util
from flax.core import meta

from peftjax import errors, tree
from peftjax.methods import base
from peftjax.methods.ia3 import ia3
from peftjax.methods.lora import lora
from peftjax.models import auto, convert

CONFIG_FILE = 'adapter_config.json'
WEIGHTS_FILE = 'adapter_model.safetensors'
PREFIX = 'base_model.model.'
# peftjax leaf -> (HF key suffix, whether the HF tensor is the transpose)
LEAVES = {'lora_A': ('lora_A.weight', True), 'lora_B': ('lora_B.weight', True),
          'lora_magnitude_vector': ('lora_magnitude_vector', False), 'ia3_l': ('ia3_l', False)}
# peftjax method names whose adapters HF PEFT can load.
EXPORTABLE = ('lora', 'rslora', 'dora', 'ia3')
TASK_TYPES = {'causal_lm': 'CAUSAL_LM', 'classification': 'SEQ_CLS', 'value': 'SEQ_CLS',
              'base': 'FEATURE_EXTRACTION'}
# HF PEFT options that change what the tensors mean; peftjax supports only their defaults.
_UNSUPPORTED_OPTIONS = {'rank_pattern': {}, 'alpha_pattern': {}, 'lora_bias': False,
                        'bias': 'none', 'use_qalora': False,
                        'trainable_token_indices': None, 'target_parameters': None}


def _hf_params(config, flat):
  """``{hf_name: (flax path tuple, layer or None, transpose)}`` for a flat tuple-keyed tree."""
  out = {}
  for path, leaf in flat.items():
    layers = range(leaf.shape[0]) if convert.is_scanned(config, path) else [None]
    for layer in layers:
      name, transpose = convert.hf_name(config, path, layer)
      out[name] = (path, layer, transpose)
  return out


def _layers(config, module: str, value) -> list[int | None]:
  """Layer indices of an adapter leaf at Flax ``module`` path (``[None]`` unless scanned)."""
  scanned = convert.is_scanned(config, tuple(module.split('/')) + ('kernel',))
  return list(range(value.shape[0])) if scanned else [None]


def _suffixes(selected: set[str], universe: set[str]) -> list[str]:
  """Shortest dotted suffixes naming exactly ``selected`` among ``universe`` (HF PEFT matches
  ``target_modules``/``feedforward_modules`` lists with ``str.endswith``)."""
  out = set()
  for name in selected:
    parts = name.split('.')
    for k in range(1, len(parts) + 1):
      suffix = '.'.join(parts[-k:])
      if all(u in selected for u in universe if u.endswith(suffix)):
        out.add(suffix)
        break
  return sorted(out)


def _infer_task(config, adapter) -> str:
  if any(head in adapter for head in ('score', 'classifier')):
    return 'classification'
  return 'causal_lm' if config.is_decoder else 'base'


def save_adapter(directory, adapter, config, *, alpha: float | None = None,
                 rslora: bool = False, dropout: float = 0.0, task: str | None = None,
                 base_model_name_or_path: str | None = None) -> pathlib.Path:
  """Writes ``adapter`` (LoRA/rsLoRA/DoRA or IA3, plus replaced base params as
  ``modules_to_save``) as a HF PEFT directory that ``peft.PeftModel.from_pretrained`` loads.

  ``alpha``/``rslora``/``dropout`` are the ``lora(...)`` hyper-parameters (rank, DoRA and IA3's
  feedforward modules are read off the adapter's shapes); ``task`` ('causal_lm',
  'classification', 'value', 'base') sets ``task_type`` and defaults from the adapter's heads.

  >>> save_adapter('/tmp/a', adapter, pre.config, alpha=16, rslora=True)  # doctest: +SKIP
  """
  directory = pathlib.Path(directory)
  task = task or _infer_task(config, adapter)
  universe = {n.rsplit('.', 1)[0] for n in _hf_params(config, convert.param_shapes(config, task))}
  universe |= {'.'.join(n.split('.')[:k]) for n in universe for k in range(1, n.count('.') + 1)}
  tensors, kinds, conv1d = {}, set(), False
  targeted, feedforward, saved_modules, ranks = set(), set(), set(), set()
  for module, leaves in base.by_module(adapter).items():
    mods = tuple(module.split('/'))
    for leaf, value in leaves.items():
      value = np.asarray(value, np.float32)
      for layer in _layers(config, module, value):
        v = value if layer is None else value[layer]
        name, transpose = convert.hf_name(config, mods + ('kernel',), layer)
        name = name.removesuffix('.weight')
        if name not in universe:
          raise ValueError(f'adapter module {module} ({name}) is not a module of '
                           f'{config.model_type} ({task})')
        if leaf in LEAVES:
          suffix, transpose = LEAVES[leaf]
          key = f'{name}.{suffix}'
          kinds.add('ia3' if leaf == 'ia3_l' else 'lora')
          targeted.add(name)
          conv1d |= any(m in config.conv1d for m in mods)
          if leaf == 'ia3_l' and v.shape[0] == 1:
            feedforward.add(name)
          if leaf == 'lora_A':
            ranks.add(v.shape[-1])
        elif leaf in ('kernel', 'bias', 'scale', 'embedding'):
          key, transpose = convert.hf_name(config, mods + (leaf,), layer)
          saved_modules.add(name)
        else:
          raise ValueError(f'adapter leaf {module}/{leaf} has no Hugging Face PEFT equivalent')
        tensors[PREFIX + key] = np.ascontiguousarray(v.T if transpose else v)
  if len(kinds) != 1 or len(ranks) > 1:
    raise ValueError(f'expected LoRA or IA3 leaves of one rank, got {sorted(kinds)} '
                     f'ranks {sorted(ranks)}')
  hf = {'peft_type': 'IA3' if kinds == {'ia3'} else 'LORA', 'task_type': TASK_TYPES[task],
        'base_model_name_or_path': base_model_name_or_path, 'inference_mode': True,
        'target_modules': sorted(set(_suffixes(targeted - feedforward, universe))
                                 | set(_suffixes(feedforward, universe))),
        'fan_in_fan_out': conv1d,
        'modules_to_save': sorted(saved_modules) or None}
  if kinds == {'ia3'}:
    hf.update(feedforward_modules=_suffixes(feedforward, universe), init_ia3_weights=True)
  else:
    if alpha is None:
      raise ValueError('save_adapter needs the LoRA alpha of the adapter (alpha=...)')
    hf.update(r=ranks.pop(), lora_alpha=alpha, use_rslora=rslora, lora_dropout=dropout,
              use_dora=any('lora_magnitude_vector' in l for l in base.by_module(adapter).values()),
              bias='none', init_lora_weights=True)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / CONFIG_FILE).write_text(json.dumps(hf, indent=2))
  safetensors.numpy.save_file(tensors, str(directory / WEIGHTS_FILE), metadata={'format': 'pt'})
  return directory


def read_config(directory) -> dict:
  """The ``adapter_config.json`` of a HF PEFT directory, checked for what peftjax supports."""
  directory = pathlib.Path(directory)
  if not (directory / CONFIG_FILE).is_file():
    raise errors.CheckpointError(f'{directory}: no {CONFIG_FILE}; not a Hugging Face PEFT '
                                 'adapter directory')
  hf = json.loads((directory / CONFIG_FILE).read_text())
  if hf.get('peft_type') not in ('LORA', 'IA3'):
    raise errors.CheckpointError(f'{directory / CONFIG_FILE}: unsupported peft_type '
                                 f'{hf.get("peft_type")!r}; supported: LORA, IA3')
  for key, default in _UNSUPPORTED_OPTIONS.items():
    if hf.get(key, default) not in (default, None):
      raise errors.CheckpointError(f'{directory / CONFIG_FILE}: {key}={hf[key]!r} is not '
                                   f'supported (only {default!r})')
  return hf


def modules_to_save(paths) -> base.PeftMethod:
  """HF PEFT's ``modules_to_save``: trainable copies of the base params at ``paths``.

  >>> heads = modules_to_save(['score/kernel'])
  >>> method = methods.compose(methods.lora(rank=8), heads)  # doctest: +SKIP
  """
  return base.weight_space(lambda rng, params: tree.unflatten(
      {p: jnp.copy(v) for p, v in tree.flatten(params).items() if p in paths}))


def _expected(leaf: str, kernel_shape, r) -> set[tuple]:
  """Shapes (HF orientation) that ``leaf`` may have for a kernel ``(in, out)``."""
  d_in, d_out = kernel_shape[-2:]
  return {'lora_A': {(r, d_in)}, 'lora_B': {(d_out, r)}, 'lora_magnitude_vector': {(d_out,)},
          'ia3_l': {(d_out, 1), (1, d_in)}}[leaf]


def load_adapter(directory, params, config, rng=None) -> tuple[base.PeftMethod, dict]:
  """(method, adapter) from a HF PEFT directory, for the base ``params`` of ``config``.

  The method adapts exactly the modules the file holds, with ``r``/``lora_alpha``/
  ``use_rslora``/``use_dora``/``lora_dropout`` from ``adapter_config.json``; ``modules_to_save``
  become adapter leaves replacing those params. Scanned layers missing from the file keep the
  method's identity init (drawn from ``rng``). Raises ``CheckpointError`` naming the tensor for a
  module the base lacks or a shape that does not fit it.

  >>> method, adapter = load_adapter('/tmp/a', pre.params, pre.config)  # doctest: +SKIP
  """
  directory = pathlib.Path(directory)
  hf = read_config(directory)
  file = directory / WEIGHTS_FILE
  if not file.is_file():
    raise errors.CheckpointError(f'{directory}: no {WEIGHTS_FILE}')
  flat_params = traverse_util.flatten_dict(meta.unbox(params))
  names = _hf_params(config, flat_params)
  prefix = config.base_prefix + '.'
  names.update({n[len(prefix):]: v for n, v in list(names.items()) if n.startswith(prefix)})
  found, saved = {}, {}   # (flax module, leaf) / flax param path -> {layer: array}
  for key, value in safetensors.numpy.load_file(str(file)).items():
    name = key.removeprefix(PREFIX)
    leaf = next((l for l, (s, _) in LEAVES.items() if name.endswith('.' + s)), None)
    target = name[:-len(LEAVES[leaf][0])] + 'weight' if leaf else name
    if target not in names or (leaf and names[target][0][-1] != 'kernel'):
      raise errors.CheckpointError(f'{file}: tensor {key} names module '
                                   f'{target.rsplit(".", 1)[0]}, which the base model lacks')
    if leaf and (leaf == 'ia3_l') != (hf['peft_type'] == 'IA3'):
      raise errors.CheckpointError(f'{file}: tensor {key} in a {hf["peft_type"]} adapter')
    path, layer, transpose = names[target]
    shape = flat_params[path].shape[1:] if layer is not None else flat_params[path].shape
    if leaf:
      want, transpose = _expected(leaf, shape, hf.get('r')), LEAVES[leaf][1]
    else:
      want = {tuple(shape[::-1]) if transpose else tuple(shape)}
    if tuple(value.shape) not in want:
      raise errors.CheckpointError(
          f'{file}: tensor {key} has shape {tuple(value.shape)}, expected '
          f'{" or ".join(map(str, sorted(want)))} for the base model')
    value = value.T if transpose else value
    if leaf:
      found.setdefault(('/'.join(path[:-1]), leaf), {})[layer] = value
    else:
      saved.setdefault('/'.join(path), {})[layer] = value
  modules = sorted({m for m, _ in found})
  target = '|'.join(re.escape(m) for m in modules)
  if hf['peft_type'] == 'IA3':
    ff = [m for m in modules if next(iter(found[m, 'ia3_l'].values())).shape[0] == 1]
    method = ia3(target, '|'.join(re.escape(m) for m in ff) or None)
  else:
    method = lora(rank=hf['r'], alpha=hf['lora_alpha'], target=target,
                  dropout=hf.get('lora_dropout', 0.0), rslora=hf.get('use_rslora', False),
                  dora=hf.get('use_dora', False))
  if saved:
    method = base.compose(method, modules_to_save(sorted(saved)))
  adapter = tree.flatten(method.init(jax.random.key(0) if rng is None else rng, params))
  loaded = {f'{m}/{l}': v for (m, l), v in found.items()} | saved
  for path, by_layer in loaded.items():
    if path not in adapter:
      raise errors.CheckpointError(f'{file}: {path} is not part of a {hf["peft_type"]} adapter '
                                   f'with use_dora={hf.get("use_dora", False)}')
    value = adapter[path]
    for layer, arr in by_layer.items():
      value = jnp.asarray(arr, value.dtype) if layer is None else value.at[layer].set(arr)
    adapter[path] = value
  missing = sorted(set(adapter) - set(loaded))
  if missing:
    raise errors.CheckpointError(f'{file}: missing adapter tensors for {missing}')
  return method, tree.unflatten(adapter)


def save_merged(directory, method: base.PeftMethod, adapter, params, config, tokenizer=None,
                task: str | None = None) -> pathlib.Path:
  """Merges ``adapter`` into ``params`` and writes a plain transformers checkpoint.

  >>> save_merged('/tmp/m', method, adapter, pre.params, pre.config)  # doctest: +SKIP
  """
  if method.merge is None:
    raise ValueError('this method cannot be merged into the base weights')
  return auto.save_pretrained(directory, config, method.merge(adapter, params), tokenizer, task)
