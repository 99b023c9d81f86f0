"""Hugging Face PEFT prompt-learning directories (``PROMPT_TUNING``, ``P_TUNING``,
``PREFIX_TUNING``) <-> peftjax prompt-family adapters.

HF PEFT saves one tensor, ``prompt_embeddings``: the virtual-token embeddings ``(V,
token_dim)`` (prompt tuning; P-tuning saves its encoder's *output*), or the prefix ``(P,
num_layers * 2 * token_dim)`` (prefix tuning, the projection's output when
``prefix_projection``), with ``token_dim = num_kv_heads * head_dim`` for prefixes (HF PEFT's
grouped-query rule) and the hidden size for prompts. So ``save_adapter`` writes the folded
adapter (``prompt.fold``, ``prefix.fold``) with ``inference_mode: true``, and ``load_adapter``
gives the plain method: ``prompt`` for ``PROMPT_TUNING`` and ``P_TUNING``, ``prefix`` for
``PREFIX_TUNING``. Trained heads (``modules_to_save``, e.g. a classifier) are saved as
``base_model.<HF name>`` (HF PEFT's key for prompt learning) and load as ``modules_to_save``.
Prompt tuning's init is ``prompt_tuning_init`` both ways (``TEXT`` with its text and tokenizer
when the spec has both; HF PEFT's TEXT cannot hold bare token ids, written as ``RANDOM``).

>>> import jax, jax.numpy as jnp, tempfile
>>> from peftjax.methods import prefix
>>> from peftjax.models import registry
>>> config = registry.config_from_hf(dict(
...     model_type='llama', vocab_size=16, hidden_size=8, intermediate_size=8,
...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
>>> params = registry.build(config, 'causal_lm').init(
...     jax.random.key(0), jnp.zeros((1, 3), jnp.int32))['params']
>>> method = prefix.prefix_tuning(num_virtual_tokens=5, projection=True,
...                               **prefix.model_dims(config))
>>> adapter = method.init(jax.random.key(1), params)
>>> directory = save_adapter(tempfile.mkdtemp(), method, adapter, config)
>>> loaded, again = load_adapter(directory, params, config)
>>> loaded.spec.name, again['prefix_encoder']['embedding'].shape   # 2 layers x (k, v) x 4
('prefix', (5, 16))
"""
from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import safetensors.numpy
from flax.core import meta

from peftjax import tree
from peftjax.methods import base, prefix, prompt
from peftjax.methods.hf_format import CONFIG_FILE, TASK_TYPES, WEIGHTS_FILE
from peftjax.methods.saved import modules_to_save
from peftjax.models import convert, families

KEY = 'prompt_embeddings'
SAVED_PREFIX = 'base_model.'   # HF PEFT's key prefix of a prompt-learning model's saved modules
# peftjax method -> HF PEFT peft_type
PEFT_TYPES = {'prompt': 'PROMPT_TUNING', 'ptuning': 'P_TUNING', 'prefix': 'PREFIX_TUNING',
              'ptuning_v2': 'PREFIX_TUNING'}
METHODS = tuple(PEFT_TYPES)
_INITS = {'random': 'RANDOM', 'sample_vocab': 'SAMPLE_VOCAB', 'text': 'TEXT'}


def _specs(spec: base.Spec | None) -> list[base.Spec]:
  if spec is None:
    return []
  return ([base.Spec.from_dict(s) for s in spec.hparams['methods']] if spec.name == 'compose'
          else [spec])


def _hf_names(config, task: str) -> dict:
  """``{HF param name: flax path}`` of the (unscanned) params of ``task``."""
  return {convert.hf_name(config, path)[0]: '/'.join(path)
          for path in convert.param_shapes(config, task) if not convert.is_scanned(config, path)}


def save_adapter(directory, method: base.PeftMethod, adapter, base_config, *,
                 task: str = 'causal_lm',
                 base_model_name_or_path: str | None = None) -> pathlib.Path:
  """Writes a prompt-family ``adapter`` of ``method`` (optionally composed with
  ``modules_to_save``) as a HF PEFT directory that ``peft.PeftModel.from_pretrained`` loads;
  ``task`` ('causal_lm', 'classification', 'value', 'base') sets ``task_type``."""
  config, directory = base_config, pathlib.Path(directory)
  specs = _specs(method.spec)
  cores = [s for s in specs if s.name in PEFT_TYPES]
  if len(cores) != 1 or any(s.name not in METHODS + ('modules_to_save',) for s in specs):
    raise ValueError('HF PEFT holds one prompt-learning adapter (with modules_to_save); got '
                     f'methods {[s.name for s in specs]}')
  core = cores[0]
  is_prefix = PEFT_TYPES[core.name] == 'PREFIX_TUNING'
  adapter = (prefix.fold if is_prefix else prompt.fold)(meta.unbox(adapter))
  encoder = prefix.ENCODER if is_prefix else prompt.ENCODER
  tensors = {KEY: np.asarray(jax.device_get(adapter[encoder]['embedding']), np.float32)}
  names = {p: n for n, p in _hf_names(config, task).items()}
  saved = set()
  for path, value in tree.flatten({k: v for k, v in adapter.items() if k != encoder}).items():
    if path not in names:
      raise ValueError(f'adapter leaf {path} is neither the prompt nor a saved (unscanned) '
                       f'module of {config.model_type} ({task})')
    transpose = convert.hf_name(config, tuple(path.split('/')))[1]
    value = np.asarray(jax.device_get(value), np.float32)
    tensors[SAVED_PREFIX + names[path]] = np.ascontiguousarray(value.T if transpose else value)
    saved.add(names[path].rsplit('.', 1)[0])
  heads = families.head_modules(config, task)
  if TASK_TYPES[task] == 'SEQ_CLS' and not saved & set(heads):
    raise ValueError(f'HF PEFT SEQ_CLS adapters hold the trained head {list(heads)}; compose '
                     'the method with modules_to_save of its params')
  h = core.hparams
  hf = {'peft_type': PEFT_TYPES[core.name], 'task_type': TASK_TYPES[task],
        'base_model_name_or_path': base_model_name_or_path, 'inference_mode': True,
        'num_virtual_tokens': h['num_virtual_tokens'], 'num_transformer_submodules': 1,
        'num_layers': config.num_layers, 'modules_to_save': sorted(saved) or None}
  if is_prefix:
    hf.update(token_dim=config.num_kv_heads * config.head_dim,
              num_attention_heads=config.num_kv_heads,
              prefix_projection=bool(h.get('projection')),
              encoder_hidden_size=h.get('encoder_hidden_size')
              or config.num_kv_heads * config.head_dim)
  else:
    hf.update(token_dim=config.hidden_size, num_attention_heads=config.num_heads)
  if core.name == 'prompt':
    text, tokenizer = h.get('init_text'), h.get('tokenizer_name_or_path')
    # HF PEFT's TEXT needs both (token ids alone are no text): without them, RANDOM
    init = 'RANDOM' if h['init'] == 'text' and not (text and tokenizer) else _INITS[h['init']]
    hf.update(prompt_tuning_init=init, prompt_tuning_init_text=text if init == 'TEXT' else None,
              tokenizer_name_or_path=tokenizer if init == 'TEXT' else None)
  elif core.name == 'ptuning':
    hf.update(encoder_reparameterization_type=h['encoder'].upper(),
              encoder_hidden_size=h['encoder_hidden_size'] or config.hidden_size,
              encoder_num_layers=h['encoder_num_layers'],
              encoder_dropout=h.get('encoder_dropout', 0.0))
  directory.mkdir(parents=True, exist_ok=True)
  (directory / CONFIG_FILE).write_text(json.dumps(hf, indent=2))
  safetensors.numpy.save_file(tensors, str(directory / WEIGHTS_FILE))
  return directory


def _prompt_init(hf: dict, directory) -> dict:
  """``prompt_tuning`` kwargs for the init an HF PEFT ``PROMPT_TUNING`` config records (the
  spec says how the loaded prompt began; P-tuning's is random)."""
  init = hf.get('prompt_tuning_init', 'RANDOM') if hf['peft_type'] == 'PROMPT_TUNING' else 'RANDOM'
  inits = {k: i for i, k in _INITS.items()}
  if init not in inits:
    raise ValueError(f'{directory / CONFIG_FILE}: prompt_tuning_init {init!r} is not one of '
                     f'{sorted(inits)}')
  if init != 'TEXT':
    return dict(init=inits[init])
  text, tokenizer = hf.get('prompt_tuning_init_text'), hf.get('tokenizer_name_or_path')
  if not (text and tokenizer):
    raise ValueError(f"{directory / CONFIG_FILE}: prompt_tuning_init 'TEXT' needs "
                     f'prompt_tuning_init_text and tokenizer_name_or_path (got {text!r}, '
                     f'{tokenizer!r})')
  return dict(init='text', init_text=text, tokenizer_name_or_path=tokenizer)


def load_adapter(directory, params, config, task: str = 'causal_lm'
                 ) -> tuple[base.PeftMethod, dict]:
  """``(method, adapter)`` from a HF PEFT prompt-learning directory, for a base model of
  ``config``: ``prompt_tuning`` or ``prefix_tuning`` (plain), composed with
  ``modules_to_save`` for the saved heads. Raises ValueError naming a peft type, a token
  dimension or a layer count that does not fit the base."""
  directory = pathlib.Path(directory)
  hf = json.loads((directory / CONFIG_FILE).read_text())
  kind = hf.get('peft_type')
  if kind not in set(PEFT_TYPES.values()):
    raise ValueError(f'{directory / CONFIG_FILE}: peft_type {kind!r} is not a prompt-learning '
                     f'type ({sorted(set(PEFT_TYPES.values()))})')
  if hf.get('num_transformer_submodules', 1) != 1:
    raise ValueError(f'{directory / CONFIG_FILE}: num_transformer_submodules '
                     f'{hf["num_transformer_submodules"]} (encoder-decoder) is not supported')
  tensors = safetensors.numpy.load_file(str(directory / WEIGHTS_FILE))
  if KEY not in tensors:
    raise ValueError(f'{directory / WEIGHTS_FILE}: no {KEY!r} tensor (keys: {sorted(tensors)})')
  e = tensors.pop(KEY)
  v = hf['num_virtual_tokens']
  where = f'{directory / WEIGHTS_FILE}: {KEY} of shape {tuple(e.shape)}'
  if kind == 'PREFIX_TUNING':
    kv_dim = config.num_kv_heads * config.head_dim
    if hf.get('num_layers', config.num_layers) != config.num_layers:
      raise ValueError(f'{directory / CONFIG_FILE}: num_layers {hf["num_layers"]} does not '
                       f'match the base model\'s {config.num_layers} layers')
    want = (v, config.num_layers * 2 * kv_dim)
    if tuple(e.shape) != want:
      raise ValueError(f'{where}; the base model needs {want} (num_virtual_tokens, '
                       f'{config.num_layers} layers x 2 x kv_dim {kv_dim})')
    core = prefix.prefix_tuning(num_virtual_tokens=v, **prefix.model_dims(config))
    adapter = {prefix.ENCODER: {'embedding': e}}
  else:
    if tuple(e.shape) != (v, config.hidden_size):
      raise ValueError(f'{where}; the base model needs {(v, config.hidden_size)} '
                       f'(num_virtual_tokens, token dimension = hidden size '
                       f'{config.hidden_size})')
    core = prompt.prompt_tuning(num_virtual_tokens=v, **_prompt_init(hf, directory))
    adapter = {prompt.ENCODER: {'embedding': e}}
  if not tensors:
    return core, adapter
  names, saved, flat = _hf_names(config, task), {}, tree.flatten(meta.unbox(params))
  for key, value in tensors.items():
    name = key.removeprefix(SAVED_PREFIX)
    if not key.startswith(SAVED_PREFIX) or name not in names:
      raise ValueError(f'{directory / WEIGHTS_FILE}: tensor {key!r} is not a param of '
                       f'{config.model_type} ({task})')
    path = names[name]
    transpose = convert.hf_name(config, tuple(path.split('/')))[1]
    saved[path] = value.T if transpose else value
    if path in flat and saved[path].shape != flat[path].shape:
      raise ValueError(f'{directory / WEIGHTS_FILE}: tensor {key!r} of shape {value.shape} '
                       f'does not fit the base param {path} {tuple(flat[path].shape)}')
  return base.compose(core, modules_to_save(sorted(saved))), {**adapter, **tree.unflatten(saved)}
