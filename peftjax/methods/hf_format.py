"""Hugging Face PEFT adapter directories <-> peftjax adapters (LoRA, rsLoRA, DoRA, IA3,
AdaLoRA).

A HF PEFT directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<HF module>.<leaf>``: ``lora_A.weight (r, in)``, ``lora_B.weight (out, r)``,
``lora_magnitude_vector (out,)`` (DoRA), ``lora_embedding_A (r, vocab)``/``lora_embedding_B
(dim, r)`` (LoRA on an embedding), ``ia3_l`` (``(out, 1)``, feedforward ``(1, in)``), trained
biases (``bias='all'|'lora_only'``: ``<module>.bias``, ``<module>.base_layer.bias`` under LoRA)
and the full weights of ``modules_to_save`` (e.g. ``classifier.weight``). In peftjax those are
``<flax module>/lora_A (in, r)``, ``lora_B (r, out)``, ``lora_magnitude_vector``,
``lora_embedding_A (vocab, r)``, ``lora_embedding_B (r, dim)``, ``ia3_l`` and adapter leaves at
base-param paths (``classifier/kernel``, ``.../q_proj/bias``); a saved embedding is the leaf
``<module>/input_embedding`` that only the input lookup reads (HF PEFT's tied LM head keeps the
original). AdaLoRA (``ADALORA``) holds ``lora_A``/``lora_B``/``lora_E`` (no ``.weight``; ``E (r,
1)``) truncated to the singular values its ``rank_pattern`` keeps; peftjax holds ``init_r`` of
them everywhere, the dropped ones zero. Scanned layouts are (un)stacked per layer. GPT-2's
Conv1D modules only change ``fan_in_fan_out`` (their LoRA factors are oriented as
``nn.Linear``'s). The bare base model (``task='base'``, e.g. ``BertModel``) has no base-model
prefix (``bert.``) in its names.

Everything written to ``adapter_config.json`` comes from ``method.spec`` and the adapter's shapes:

>>> import jax, jax.numpy as jnp, tempfile
>>> from peftjax import methods
>>> from peftjax.models import registry
>>> config = registry.config_from_hf(dict(
...     model_type='llama', vocab_size=16, hidden_size=8, intermediate_size=8,
...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
>>> ids = jnp.zeros((1, 3), jnp.int32)
>>> module = registry.build(config, 'causal_lm')
>>> params = module.init(jax.random.key(0), ids)['params']
>>> method = methods.get('rslora', rank=2, alpha=4, target='.*/q_proj')
>>> adapter = method.init(jax.random.key(1), params)
>>> directory = save_adapter(tempfile.mkdtemp(), method, adapter, config)
>>> hf = read_config(directory)
>>> hf['r'], hf['lora_alpha'], hf['use_rslora'], hf['target_modules']
(2, 4, True, ['q_proj'])
>>> loaded, again = load_adapter(directory, params, config)
>>> loaded.spec.hparams['rslora'], loaded.spec.hparams['rank']
(True, 2)
"""
from __future__ import annotations

import hashlib
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import traverse_util
from flax.core import meta

from peftjax import errors, quant, tree
from peftjax.methods import base
from peftjax.methods.adalora import adalora
from peftjax.methods.ia3 import ia3
from peftjax.methods.lora import lora, pattern_value
from peftjax.methods.saved import INPUT_EMBEDDING, modules_to_save, saved_leaf
from peftjax.models import auto, convert, families, heads

CONFIG_FILE = 'adapter_config.json'
WEIGHTS_FILE = 'adapter_model.safetensors'
BASE_FILE = 'peftjax_base.json'   # the base an adapter was saved for; HF PEFT ignores the file
PREFIX = 'base_model.model.'
# peftjax leaf -> (HF key suffix, whether the HF tensor is the transpose, base param it adapts)
LEAVES = {'lora_A': ('lora_A.weight', True, 'kernel'),
          'lora_B': ('lora_B.weight', True, 'kernel'),
          'lora_magnitude_vector': ('lora_magnitude_vector', False, 'kernel'),
          'lora_embedding_A': ('lora_embedding_A', True, 'embedding'),
          'lora_embedding_B': ('lora_embedding_B', True, 'embedding'),
          'ia3_l': ('ia3_l', False, 'kernel')}
# AdaLoRA's (HF ``ADALORA``) leaves: ``lora_A (r, in)``, ``lora_B (out, r)``, ``lora_E (r, 1)``,
# keys without ``.weight``; ``rank_pattern`` ({``<module>.lora_E``: [kept] * init_r}) says which
# singular values a module's (truncated) tensors hold.
ADALORA_LEAVES = {'lora_A': ('lora_A', True, 'kernel'), 'lora_B': ('lora_B', True, 'kernel'),
                  'lora_E': ('lora_E', False, 'kernel')}
# The copy of a saved embedding that only the module's input lookup reads.
# Adapter leaves that replace a base param (``input_embedding`` the lookup's ``embedding``).
_PARAM_LEAVES = ('kernel', 'bias', 'scale', 'embedding', INPUT_EMBEDDING)
# peftjax method names whose adapters HF PEFT can load.
EXPORTABLE = ('lora', 'rslora', 'dora', 'ia3', 'adalora')
# Methods that may be composed with one of those: their leaves are modules_to_save or biases.
_EXTRAS = ('modules_to_save', 'bitfit')
TASK_TYPES = {'causal_lm': 'CAUSAL_LM', 'classification': 'SEQ_CLS', 'value': 'SEQ_CLS',
              'base': 'FEATURE_EXTRACTION'}
_LM_HEAD = 'lm_head'   # HF's causal-LM head module, tied to the input embedding or not
# Input embeddings that HF PEFT's ``ensure_weight_tying`` recognises (``EMBEDDING_LAYER_NAMES``);
# it leaves others (GPT-2's ``wte``) untied.
_HF_TIED_NAMES = ('embed_tokens',)
_BIAS_MODES = ('none', 'all', 'lora_only')
# HF PEFT options that change what the tensors mean or compute; peftjax supports their defaults.
_UNSUPPORTED_OPTIONS = {'lora_bias': False, 'layer_replication': None, 'use_qalora': False,
                        'trainable_token_indices': None, 'target_parameters': None,
                        'alora_invocation_tokens': None, 'velora_config': None,
                        'monteclora_config': None, 'use_bdlora': None, 'arrow_config': None,
                        'kasa_config': None}


def _model_name(config, name: str, task: str | None) -> str:
  """A HF param/module name inside the model HF PEFT wraps: the bare base model (``task='base'``,
  e.g. ``BertModel``, ``LlamaModel``) has no base-model prefix."""
  prefix = config.base_prefix + '.'
  return name[len(prefix):] if task == 'base' and name.startswith(prefix) else name


def _hf_params(config, flat, task: str | None = None) -> dict:
  """``{hf_name: (flax path tuple, layer or None, transpose)}`` for a flat tuple-keyed tree."""
  out = {}
  for path, leaf in flat.items():
    layers = range(leaf.shape[0]) if convert.is_scanned(config, path) else [None]
    for layer in layers:
      name, transpose = convert.hf_name(config, path, layer)
      out[_model_name(config, name, task)] = (path, layer, transpose)
  return out


def _hf_module(config, module: str, layer: int | None, task: str | None) -> str:
  name, _ = convert.hf_name(config, tuple(module.split('/')) + ('kernel',), layer)
  return _model_name(config, name.removesuffix('.weight'), task)


def _layers(config, module: str, value) -> list[int | None]:
  """Layer indices of an adapter leaf at Flax ``module`` path (``[None]`` unless scanned)."""
  scanned = convert.is_scanned(config, tuple(module.split('/')) + ('kernel',))
  return list(range(value.shape[0])) if scanned else [None]


def _tied_embedding(config, paths, causal: bool) -> str | None:
  """Flax param path of the input embedding that the LM head reads (``tie_word_embeddings``),
  or None."""
  if not (causal and config.tie_word_embeddings):
    return None
  return heads.output_embedding(config, tree.unflatten({p: p for p in paths}))[0]


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


def _specs(spec: base.Spec | None) -> list[base.Spec]:
  """The specs of the methods a (possibly composed) method is made of."""
  if spec is None:
    raise ValueError('save_adapter needs a method with a spec (method.spec is None)')
  if spec.name != 'compose':
    return [spec]
  return [s for d in spec.hparams['methods'] for s in _specs(base.Spec.from_dict(d))]


def _hf_pattern_value(patterns, name: str, default):
  """HF PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key ``k`` for which
  ``(.*\\.)?(k)$`` matches the HF module ``name`` (``peft.utils.other.get_pattern_key``)."""
  return next((v for k, v in (patterns or {}).items() if re.match(rf'(.*\.)?({k})$', name)),
              default)


def _bias_option(replaced: dict, adapted: set, params: dict, is_ia3: bool) -> tuple[str, set]:
  """HF's ``bias`` option and the modules it trains the bias of: those whose only replaced
  param is their bias (other replaced modules are ``modules_to_save``)."""
  biases = {n for n, p in replaced.items() if p == {'bias'} and f'{n}.weight' in params}
  if is_ia3 and biases:
    raise ValueError(f'HF PEFT trains no biases with IA3; this adapter trains those of '
                     f'{sorted(biases)}')
  every = {n.removesuffix('.bias') for n in params if n.endswith('.bias')}
  if not biases:
    return 'none', biases
  if biases == every & adapted:
    return 'lora_only', biases
  if biases == every:
    return 'all', biases
  raise ValueError(f'HF PEFT trains all biases (bias="all") or those of the LoRA modules '
                   f'(bias="lora_only"), not those of {sorted(biases)}')


def base_fingerprint(config, params=None) -> dict:
  """What ``BASE_FILE`` records of a base: model type, layer count and (given ``params``) a
  SHA-256 of its param paths and shapes, one of its backbone's Hugging Face tensor names and
  shapes (``backbone_sha256``: the same scanned or not, quantised or not; heads left out), and
  how a quantised base was quantised (``quantization``)."""
  out = {'model_type': config.model_type, 'num_layers': config.num_layers}
  if params is not None:
    flat = tree.flatten(meta.unbox(params))
    shapes = sorted((p, list(np.shape(x))) for p, x in flat.items())
    out['param_shapes_sha256'] = hashlib.sha256(json.dumps(shapes).encode()).hexdigest()
    out['backbone_sha256'] = hashlib.sha256(json.dumps(_hf_shapes(config, flat)).encode()
                                            ).hexdigest()
    kinds = {(x.qtype, x.block_size, x.double_quant) for x in flat.values()
             if quant.is_quantized(x)}
    if kinds:
      out['quantization'] = [dict(qtype=q, block_size=b, double_quant=d) for q, b, d in
                             sorted(kinds)]
  return out


def _hf_shapes(config, flat) -> list:
  """Sorted (HF tensor name, shape) of the backbone params in ``flat`` (per layer, a quantised
  kernel with its logical shape)."""
  heads = set(families.head_modules(config)) | set(families.NEW_HEADS)   # and BERT's pooler
  out = []
  for p, x in flat.items():
    path = tuple(p.split('/'))
    if heads & set(path):
      continue
    shape = list(np.shape(x))
    scanned = convert.is_scanned(config, path)
    for layer in range(shape[0]) if scanned else [None]:
      name, transpose = convert.hf_name(config, path, layer)
      s = shape[1:] if scanned else shape
      out.append((name.removeprefix(config.base_prefix + '.'), s[::-1] if transpose else s))
  return sorted(out)


def _describe(fingerprint: dict) -> str:
  q = ', '.join(f'{k["qtype"]}-quantised' for k in fingerprint.get('quantization', []))
  return (f'{fingerprint["num_layers"]}-layer {fingerprint["model_type"]} with backbone shapes '
          f'{fingerprint["backbone_sha256"][:12]}' + (f', {q}' if q else ''))


def save_adapter(directory, method: base.PeftMethod, adapter, base_config, *,
                 task: str | None = None,
                 base_model_name_or_path: str | None = None, base_params=None) -> pathlib.Path:
  """Writes ``adapter`` of ``method`` (LoRA/rsLoRA/DoRA or IA3, composed with
  ``modules_to_save`` or ``bitfit``) as a HF PEFT directory that ``peft.PeftModel.
  from_pretrained`` loads.

  The hyper-parameters (alpha, rsLoRA, DoRA, dropout, alpha patterns, weight tying) come from
  ``method.spec``; ranks, IA3's feedforward modules, trained biases (HF's ``bias``) and
  ``modules_to_save`` from the adapter. Per-module ranks and alphas are written as
  ``rank_pattern``/``alpha_pattern`` keyed by escaped full module names. ``task`` ('causal_lm',
  'classification', 'value', 'base') sets ``task_type`` and the module names (no base-model
  prefix for 'base'); it defaults from the adapter's heads. Raises ValueError naming what HF
  PEFT cannot represent. ``BASE_FILE`` records the base (:func:`base_fingerprint`; its param
  shapes given ``base_params``) so that loading onto another base is refused.
  """
  config, directory = base_config, pathlib.Path(directory)
  specs = _specs(method.spec)
  cores = [s for s in specs if s.name in EXPORTABLE]
  if len(cores) != 1 or any(s.name not in EXPORTABLE + _EXTRAS for s in specs):
    raise ValueError(f'HF PEFT holds one LoRA or IA3 adapter (with modules_to_save or biases); '
                     f'got methods {[s.name for s in specs]}')
  core = cores[0]
  is_ia3 = core.name == 'ia3'
  leaf_table = ADALORA_LEAVES if core.name == 'adalora' else LEAVES
  tie = any(s.hparams.get('ensure_weight_tying') for s in specs if s.name == 'modules_to_save')
  adapter = meta.unbox(adapter)
  task = task or _infer_task(config, adapter)
  shapes = convert.param_shapes(config, task)
  params = _hf_params(config, shapes, task)
  universe = {n.rsplit('.', 1)[0] for n in params}
  universe |= {'.'.join(n.split('.')[:k]) for n in universe for k in range(1, n.count('.') + 1)}
  tensors, adapted, ranks, feedforward, replaced, conv1d = {}, {}, {}, set(), {}, False
  for module, leaves in base.by_module(adapter).items():
    mods = tuple(module.split('/'))
    for leaf, value in leaves.items():
      value = np.asarray(jax.device_get(value), np.float32)
      for layer in _layers(config, module, value):
        v = value if layer is None else value[layer]
        name = _hf_module(config, module, layer, task)
        if name not in universe:
          raise ValueError(f'adapter module {module} ({name}) is not a module of '
                           f'{config.model_type} ({task})')
        if leaf in leaf_table:
          suffix, transpose, _ = leaf_table[leaf]
          key = f'{name}.{suffix}'
          adapted[name] = module
          conv1d |= any(m in config.conv1d for m in mods)
          if leaf == 'ia3_l' and v.shape[0] == 1:
            feedforward.add(name)
          if leaf in ('lora_A', 'lora_embedding_A'):
            ranks[name] = v.shape[-1]
        elif leaf in _PARAM_LEAVES:
          param = 'embedding' if leaf == INPUT_EMBEDDING else leaf
          key, transpose = convert.hf_name(config, mods + (param,), layer)
          key = _model_name(config, key, task)
          replaced.setdefault(name, set()).add(param)
        else:
          raise ValueError(f'adapter leaf {module}/{leaf} has no Hugging Face PEFT equivalent')
        tensors[key] = np.ascontiguousarray(v.T if transpose else v)
  bias, biases = _bias_option(replaced, set(adapted), params, is_ia3)
  saved = set(replaced) - biases
  if saved & set(adapted):
    raise ValueError(f'HF PEFT cannot both adapt and save (modules_to_save) the modules '
                     f'{sorted(saved & set(adapted))}')
  for name in biases & set(adapted):   # a LoRA module's own params live under base_layer
    tensors[f'{name}.base_layer.bias'] = tensors.pop(f'{name}.bias')
  tied = _tied_embedding(config, ('/'.join(p) for p in shapes), task == 'causal_lm')
  head_reads_copy = tie and tied in tree.flatten(adapter)
  hf_ties = head_reads_copy and _ties_in_hf(config, tied)
  if head_reads_copy:   # HF holds the head's copy as lm_head.weight (saved, if HF won't tie)
    tensors[f'{_LM_HEAD}.weight'] = tensors[_param_key(config, tied, task)]
    saved |= set() if hf_ties else {_LM_HEAD}
  hf = {'peft_type': 'IA3' if is_ia3 else 'LORA', 'task_type': TASK_TYPES[task],
        'base_model_name_or_path': base_model_name_or_path, 'inference_mode': True,
        'target_modules': sorted(set(_suffixes(set(adapted) - feedforward, universe))
                                 | set(_suffixes(feedforward, universe))),
        'fan_in_fan_out': conv1d, 'modules_to_save': sorted(saved) or None}
  if is_ia3:
    if tie:
      raise ValueError('ensure_weight_tying is a LoRA option of HF PEFT, not an IA3 one')
    hf.update(feedforward_modules=_suffixes(feedforward, universe), init_ia3_weights=True)
  elif core.name == 'adalora':
    h = core.hparams
    hf.update(peft_type='ADALORA', lora_alpha=h['alpha'], lora_dropout=h['dropout'], bias=bias,
              ensure_weight_tying=hf_ties, init_lora_weights=True,
              rank_pattern=_truncate_adalora(tensors, adapted),
              **{k: h[k] for k in ('init_r', 'target_r', 'tinit', 'tfinal', 'deltaT', 'beta1',
                                   'beta2', 'orth_reg_weight', 'total_step')})
  else:
    h = core.hparams
    alphas = {n: pattern_value(h['alpha_pattern'], adapted[n], h['alpha']) for n in ranks}
    hf.update(r=h['rank'], lora_alpha=h['alpha'],
              use_rslora=h['rslora'], use_dora=h['dora'], lora_dropout=h['dropout'],
              rank_pattern={re.escape(n): r for n, r in sorted(ranks.items()) if r != h['rank']},
              alpha_pattern={re.escape(n): a for n, a in sorted(alphas.items())
                             if a != h['alpha']},
              bias=bias, ensure_weight_tying=hf_ties, init_lora_weights=True)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / CONFIG_FILE).write_text(json.dumps(hf, indent=2))
  (directory / BASE_FILE).write_text(json.dumps(base_fingerprint(config, base_params), indent=2))
  safetensors.numpy.save_file({PREFIX + k: v for k, v in tensors.items()},
                              str(directory / WEIGHTS_FILE), metadata={'format': 'pt'})
  return directory


def _truncate_adalora(tensors: dict, adapted) -> dict | None:
  """HF PEFT's AdaLoRA save: each module keeps the singular values in use (``E != 0``) and
  ``rank_pattern`` records which; ``E`` becomes ``(r, 1)``. An adapter with no zero ``E`` (never
  masked), or only zeros (untrained), is written whole with no ``rank_pattern``, as HF saves
  before its first masking step."""
  kept = {n: tensors[f'{n}.lora_E'] != 0 for n in adapted}
  masked = any(k.any() for k in kept.values()) and not all(k.all() for k in kept.values())
  for n, keep in kept.items():
    if masked:
      tensors[f'{n}.lora_A'] = np.ascontiguousarray(tensors[f'{n}.lora_A'][keep])
      tensors[f'{n}.lora_B'] = np.ascontiguousarray(tensors[f'{n}.lora_B'][:, keep])
    e = tensors[f'{n}.lora_E']
    tensors[f'{n}.lora_E'] = np.ascontiguousarray((e[keep] if masked else e)[:, None])
  return {f'{n}.lora_E': k.tolist() for n, k in sorted(kept.items())} if masked else None


def _expand_adalora(file, hf: dict, tensors: dict, names: dict) -> dict:
  """HF ``ADALORA`` tensors back to ``init_r`` singular values per module: a module in
  ``rank_pattern`` gets its saved ones at the kept positions and zeros elsewhere (``E = 0``:
  masked), ``lora_E (r, 1)`` becomes ``(r,)``. Raises ``CheckpointError`` naming a
  ``rank_pattern`` module that the base lacks or whose tensors do not fit the pattern."""
  init_r, out = hf['init_r'], dict(tensors)
  for key, keep in (hf.get('rank_pattern') or {}).items():
    module = re.sub(r'\.lora_E(\.[^.]+)?$', '', key)
    if f'{module}.weight' not in names:
      raise errors.CheckpointError(f'{file}: rank_pattern names module {module} ({key}), which '
                                   'the base model lacks')
    keep = np.asarray(keep, bool)
    if keep.shape != (init_r,):
      raise errors.CheckpointError(f'{file}: rank_pattern[{key!r}] has {keep.size} entries, '
                                   f'expected init_r={init_r}')
    for leaf, axis in (('lora_A', 0), ('lora_B', 1), ('lora_E', 0)):
      name = f'{PREFIX}{module}.{leaf}'
      value = out.get(name)
      if value is None or value.shape[axis] != keep.sum():
        raise errors.CheckpointError(
            f'{file}: rank_pattern[{key!r}] keeps {keep.sum()} singular values but tensor {name} '
            f'is {"missing" if value is None else f"of shape {tuple(value.shape)}"}')
      full = np.zeros(value.shape[:axis] + (init_r,) + value.shape[axis + 1:], value.dtype)
      full[(slice(None),) * axis + (keep,)] = value
      out[name] = full
  return {k: v.reshape(-1) if k.endswith('.lora_E') else v for k, v in out.items()}


def _ties_in_hf(config, embedding: str) -> bool:
  """Whether HF PEFT's ``ensure_weight_tying`` ties the head to the embedding param path."""
  return _param_key(config, embedding, None).split('.')[-2] in _HF_TIED_NAMES


def _param_key(config, path: str, task: str | None) -> str:
  """The HF key (inside the model HF PEFT wraps) of the unscanned Flax param ``path``."""
  return _model_name(config, convert.hf_name(config, tuple(path.split('/')))[0], task)


def read_config(directory) -> dict:
  """The ``adapter_config.json`` of a HF PEFT directory, checked for what peftjax supports."""
  directory = pathlib.Path(directory)
  file = directory / CONFIG_FILE
  if not file.is_file():
    raise errors.CheckpointError(f'{directory}: no {CONFIG_FILE}; not a Hugging Face PEFT '
                                 'adapter directory')
  hf = json.loads(file.read_text())
  if hf.get('peft_type') not in ('LORA', 'IA3', 'ADALORA'):
    raise errors.CheckpointError(f'{file}: unsupported peft_type {hf.get("peft_type")!r}; '
                                 'supported: LORA, IA3, ADALORA')
  for key, default in _UNSUPPORTED_OPTIONS.items():
    if hf.get(key, default) not in (default, None):
      raise errors.CheckpointError(f'{file}: {key}={hf[key]!r} is not supported by peftjax '
                                   f'(only {default!r})')
  if hf.get('bias', 'none') not in _BIAS_MODES:
    raise errors.CheckpointError(f'{file}: bias={hf["bias"]!r} is not supported by peftjax '
                                 f'(one of {_BIAS_MODES})')
  return hf


def _expected(leaf: str, weight_shape, r) -> set[tuple]:
  """Shapes (HF orientation) that ``leaf`` may have for a weight ``(in, out)`` (a kernel) or
  ``(vocab, dim)`` (an embedding)."""
  d_in, d_out = weight_shape[-2:]
  return {'lora_A': {(r, d_in)}, 'lora_B': {(d_out, r)}, 'lora_magnitude_vector': {(d_out,)},
          'lora_embedding_A': {(r, d_in)}, 'lora_embedding_B': {(d_out, r)},
          'ia3_l': {(d_out, 1), (1, d_in)}, 'lora_E': {(r,)}}[leaf]


def _set_layers(value, by_layer: dict):
  """``value`` (an array or an ``nn.Partitioned`` box) with ``by_layer`` ({layer or None:
  array}) written in."""
  if isinstance(value, meta.AxisMetadata):
    return value.replace_boxed(_set_layers(value.unbox(), by_layer))
  for layer, arr in by_layer.items():
    value = jnp.asarray(arr, value.dtype) if layer is None else value.at[layer].set(arr)
  return value


def load_adapter(directory, params, config, rng=None) -> tuple[base.PeftMethod, dict]:
  """(method, adapter) from a HF PEFT directory, for the base ``params`` of ``config``.

  The method (its ``spec`` rebuilds it with ``methods.get``) adapts exactly the modules the
  file holds, with ``r``/``lora_alpha``/``use_rslora``/``use_dora``/``lora_dropout`` from
  ``adapter_config.json`` and ``rank_pattern``/``alpha_pattern`` expanded to explicit module
  paths; ``modules_to_save`` and trained biases become adapter leaves replacing those params
  (``ensure_weight_tying`` honoured); embedding/``lm_head`` base weights that HF PEFT saves
  beside their LoRA factors must equal the base's. Scanned layers missing from the file keep the
  method's identity init (drawn from ``rng``). Raises ``CheckpointError`` naming the tensor for a
  module the base lacks, a shape that does not fit it, an unsupported option, or (from
  ``BASE_FILE``) a base with another layer count.
  """
  directory = pathlib.Path(directory)
  hf = read_config(directory)
  if (directory / BASE_FILE).is_file():
    saved_for = json.loads((directory / BASE_FILE).read_text())
    if saved_for['num_layers'] != config.num_layers:
      raise errors.CheckpointError(
          f'{directory}: the adapter was saved for a {saved_for["num_layers"]}-layer '
          f'{saved_for["model_type"]}; this base is a {config.num_layers}-layer {config.model_type}')
    here = base_fingerprint(config, params)
    if saved_for.get('backbone_sha256', here['backbone_sha256']) != here['backbone_sha256']:
      raise errors.CheckpointError(
          f'{directory}: the adapter was trained on another base ({_describe(saved_for)}) than '
          f'this one ({_describe(here)}); load it onto the base it was trained from')
  file = directory / WEIGHTS_FILE
  if not file.is_file():
    raise errors.CheckpointError(f'{directory}: no {WEIGHTS_FILE}')
  flat_params = traverse_util.flatten_dict(meta.unbox(params))
  names = _hf_params(config, flat_params)
  prefix = config.base_prefix + '.'
  names.update({n[len(prefix):]: v for n, v in list(names.items()) if n.startswith(prefix)})
  tied = _tied_embedding(config, ('/'.join(p) for p in flat_params),
                         hf.get('task_type') in (None, 'CAUSAL_LM'))
  tie = bool(hf.get('ensure_weight_tying')) and tied is not None and _ties_in_hf(config, tied)
  r_default, alpha_default = hf.get('r'), hf.get('lora_alpha')
  found, saved, ranks, alphas = {}, {}, {}, {}   # keyed by (flax module, leaf) / param path
  head_copy = None
  tensors = safetensors.numpy.load_file(str(file))
  leaf_table = LEAVES
  if hf['peft_type'] == 'ADALORA':   # init_r singular values everywhere, masked ones zero
    tensors, leaf_table = _expand_adalora(file, hf, tensors, names), ADALORA_LEAVES
    r_default = hf['init_r']
  for key, value in tensors.items():
    name = key.removeprefix(PREFIX)
    leaf = next((l for l, (s, _, _) in leaf_table.items() if name.endswith('.' + s)), None)
    module = name[:-len(leaf_table[leaf][0]) - 1] if leaf else name.rpartition('.')[0]
    base_layer = module.endswith('.base_layer')
    module = module.removesuffix('.base_layer')
    target = f'{module}.weight' if leaf else f'{module}.{name.rpartition(".")[2]}'
    if tied and module == _LM_HEAD:
      if not leaf and not base_layer:
        head_copy = value   # the head's copy of the embedding (ensure_weight_tying) or its own
        continue
      raise errors.CheckpointError(
          f'{file}: tensor {key}: this model ties lm_head to its input embedding '
          f'({tied}, tie_word_embeddings=True), so peftjax has no separate lm_head to adapt or '
          'save' + (' (ensure_weight_tying=True with LoRA on the tied embedding is not '
                    'supported)' if hf.get('ensure_weight_tying') else ''))
    if target not in names or (leaf and names[target][0][-1] != leaf_table[leaf][2]):
      raise errors.CheckpointError(f'{file}: tensor {key} names module {module}, which the '
                                   'base model lacks' + (f' as a {leaf_table[leaf][2]}' if leaf
                                                         and target in names else ''))
    if leaf and (leaf == 'ia3_l') != (hf['peft_type'] == 'IA3'):
      raise errors.CheckpointError(f'{file}: tensor {key} in a {hf["peft_type"]} adapter')
    path, layer, transpose = names[target]
    shape = flat_params[path].shape[1:] if layer is not None else flat_params[path].shape
    r = r_default if leaf_table is ADALORA_LEAVES else _hf_pattern_value(
        hf.get('rank_pattern'), module, r_default)
    if leaf:
      want, transpose = _expected(leaf, shape, r), leaf_table[leaf][1]
    else:
      want = {tuple(shape[::-1]) if transpose else tuple(shape)}
    if tuple(value.shape) not in want:
      raise errors.CheckpointError(
          f'{file}: tensor {key} has shape {tuple(value.shape)}, expected '
          f'{" or ".join(map(str, sorted(want)))} for the base model')
    value = value.T if transpose else value
    flax_module = '/'.join(path[:-1])
    if leaf:
      if ranks.setdefault(flax_module, r) != r:
        raise errors.CheckpointError(
            f'{file}: {module} has LoRA rank {r} but other layers of the scanned module '
            f'{flax_module} have rank {ranks[flax_module]}; per-layer ranks need '
            'scan_layers=False')
      alphas[flax_module] = _hf_pattern_value(hf.get('alpha_pattern'), module, alpha_default)
      found.setdefault((flax_module, leaf), {})[layer] = value
    elif base_layer and path[-1] != 'bias':   # HF's save_embedding_layers: the base weight
      base_value = flat_params[path] if layer is None else flat_params[path][layer]
      if not np.array_equal(np.asarray(jnp.asarray(value, base_value.dtype)), base_value):
        raise errors.CheckpointError(
            f'{file}: tensor {key} (the base weight HF PEFT saves with an adapted embedding or '
            f'lm_head) differs from the base model\'s {"/".join(path)}; load the adapter on the '
            'base model it was trained from')
    else:
      saved.setdefault('/'.join(path), {})[layer] = value
  modules = sorted({m for m, _ in found})
  target = '|'.join(re.escape(m) for m in modules)
  if hf['peft_type'] == 'IA3':
    ff = [m for m in modules if next(iter(found[m, 'ia3_l'].values())).shape[0] == 1]
    method = ia3(target, '|'.join(re.escape(m) for m in ff) or None)
  elif hf['peft_type'] == 'ADALORA':
    method = adalora(alpha=alpha_default, dropout=hf.get('lora_dropout', 0.0), target=target,
                     **{k: hf[k] for k in ('init_r', 'target_r', 'tinit', 'tfinal', 'deltaT',
                                           'beta1', 'beta2', 'orth_reg_weight', 'total_step')})
  else:
    patterns = {k: {re.escape(m): v for m, v in sorted(values.items()) if v != default}
                for k, values, default in (('rank_pattern', ranks, r_default),
                                           ('alpha_pattern', alphas, alpha_default))}
    method = lora(rank=r_default, alpha=alpha_default, target=target,
                  dropout=hf.get('lora_dropout', 0.0), rslora=hf.get('use_rslora', False),
                  dora=hf.get('use_dora', False), **{k: v for k, v in patterns.items() if v})
  if head_copy is not None:   # the head reads the saved embedding copy, tied or not in HF
    copy = saved.get(tied, {}).get(None)
    if copy is None or not np.array_equal(copy, head_copy):
      raise errors.CheckpointError(
          f'{file}: tensor {PREFIX}{_LM_HEAD}.weight differs from the saved copy of {tied}; '
          'this model ties lm_head to its input embedding (tie_word_embeddings=True), so '
          'peftjax holds one copy for both')
    tie = True
  if saved:
    method = base.compose(method, modules_to_save(sorted(saved), ensure_weight_tying=tie))
  adapter = tree.flatten(method.init(jax.random.key(0) if rng is None else rng, params))
  loaded = {f'{m}/{l}': v for (m, l), v in found.items()}
  loaded |= {saved_leaf(p, tie): v for p, v in saved.items()}
  for path, by_layer in loaded.items():
    if path not in adapter:
      raise errors.CheckpointError(f'{file}: {path} is not part of a {hf["peft_type"]} adapter '
                                   f'with use_dora={hf.get("use_dora", False)}')
    adapter[path] = _set_layers(adapter[path], by_layer)
  missing = sorted(set(adapter) - set(loaded))
  if missing:
    raise errors.CheckpointError(f'{file}: missing adapter tensors for {missing}')
  return method, tree.unflatten(adapter)


def save_merged(directory, method: base.PeftMethod, adapter, params, config, tokenizer=None,
                task: str | None = None) -> pathlib.Path:
  """Merges ``adapter`` into ``params`` and writes a plain transformers checkpoint (e.g.
  ``save_merged(directory, method, adapter, pre.params, pre.config, pre.tokenizer)``).
  A quantised base is dequantised first (float32): the checkpoint holds float weights, never
  re-quantised ones."""
  if method.merge is None:
    raise ValueError('this method cannot be merged into the base weights')
  params = quant.dequantize_params(params)
  return auto.save_pretrained(directory, config, method.merge(adapter, params), tokenizer, task)
