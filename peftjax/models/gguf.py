"""GGUF (llama.cpp) files as Hugging Face-named float32 tensors plus an HF-style config dict.

Tensors are memory-mapped by ``gguf.GGUFReader`` and dequantized one at a time on access.
llama.cpp's converter permutes the rows of the q/k projections of llama models (for its interleaved
RoPE); they are un-permuted here, so the result matches the original Hugging Face checkpoint.

>>> from peftjax import assets
>>> config, tensors = open_gguf(assets.path('smollm2-135m-instruct'))
>>> config['num_key_value_heads'], tensors['model.layers.0.self_attn.k_proj.weight'].shape
(3, (192, 576))
"""
from __future__ import annotations

import pathlib
import re

import gguf
import numpy as np

from peftjax.errors import CheckpointError
from peftjax.models.checkpoint import TensorSource

# general.architecture -> (HF model_type, HF class, q/k rows permuted by convert_hf_to_gguf.py)
ARCHITECTURES = {
    'llama': ('llama', 'LlamaForCausalLM', True),
    'qwen2': ('qwen2', 'Qwen2ForCausalLM', False),
}
_GLOBAL = {'token_embd': 'model.embed_tokens', 'output_norm': 'model.norm', 'output': 'lm_head'}
_LAYER = {
    'attn_q': 'self_attn.q_proj', 'attn_k': 'self_attn.k_proj', 'attn_v': 'self_attn.v_proj',
    'attn_output': 'self_attn.o_proj', 'ffn_gate': 'mlp.gate_proj', 'ffn_up': 'mlp.up_proj',
    'ffn_down': 'mlp.down_proj', 'attn_norm': 'input_layernorm',
    'ffn_norm': 'post_attention_layernorm',
}
_TOKEN_IDS = {'bos_token_id': 'bos_token_id', 'eos_token_id': 'eos_token_id',
              'pad_token_id': 'padding_token_id'}
_NAME = re.compile(r'(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)')


def hf_name(name: str) -> str | None:
  """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; None if unknown."""
  m = _NAME.fullmatch(name)
  if not m:
    return None
  layer, base, leaf = m.groups()
  if layer is None:
    return f'{_GLOBAL[base]}.{leaf}' if base in _GLOBAL else None
  return f'model.layers.{layer}.{_LAYER[base]}.{leaf}' if base in _LAYER else None


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverts convert_hf_to_gguf.py's q/k row permutation (rows are ``n_heads`` x head_dim).

  llama.cpp stores ``w.reshape(n_heads, 2, d // 2, ...).swapaxes(1, 2)``: per head, it interleaves
  the two rotary halves; this swaps them back. Use ``n_kv_heads`` for k.
  """
  return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


class GGUFSource(TensorSource):
  """HF-named tensors of a GGUF file, dequantized to float32 and un-permuted on access."""

  def __init__(self, path: pathlib.Path, reader: gguf.GGUFReader, config: dict, permuted: bool):
    self._tensors = {}
    for t in reader.tensors:
      name = hf_name(t.name)
      if name is None:
        raise CheckpointError(f'{path}: GGUF tensor {t.name!r} has no Hugging Face counterpart '
                              '(unsupported feature, e.g. rope_freqs of Llama 3.1 rope scaling)')
      self._tensors[name] = t
    heads = {'q_proj': config['num_attention_heads'], 'k_proj': config['num_key_value_heads']}
    self._heads = heads if permuted else {}
    shapes = {k: tuple(int(d) for d in reversed(t.shape)) for k, t in self._tensors.items()}
    super().__init__(path, shapes, dict.fromkeys(shapes, path))

  def _load(self, name: str) -> np.ndarray:
    t = self._tensors[name]
    w = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
    w = w.reshape(self._shapes[name])
    proj = name.split('.')[-2]
    return unpermute_rope(w, self._heads[proj]) if proj in self._heads else w


def open_gguf(path: pathlib.Path) -> tuple[dict, GGUFSource]:
  """Reads metadata and the tensor index of ``path``; returns ``(hf_config, tensors)``."""
  try:
    reader = gguf.GGUFReader(path, 'r')
  except (ValueError, OSError) as err:
    raise CheckpointError(f'{path}: not a readable GGUF file ({err})') from err
  arch = _field(reader, 'general.architecture')
  if arch not in ARCHITECTURES:
    raise CheckpointError(f'{path}: GGUF architecture {arch!r} is not supported '
                          f'(supported: {", ".join(ARCHITECTURES)})')
  scaling = _field(reader, f'{arch}.rope.scaling.type', 'none')
  if scaling != 'none':
    raise CheckpointError(f'{path}: rope scaling {scaling!r} is not supported')
  tensors = {t.name: t for t in reader.tensors}
  if 'token_embd.weight' not in tensors:
    raise CheckpointError(f'{path}: no token_embd.weight tensor (not a language model?)')
  config = hf_config(reader, tensors)
  return config, GGUFSource(path, reader, config, ARCHITECTURES[arch][2])


def hf_config(reader: gguf.GGUFReader, tensors: dict) -> dict:
  """Builds the Hugging Face config dict of a llama-family GGUF from its metadata.

  ``tensors`` maps GGUF tensor names to reader tensors (for vocab size and tying).
  """
  arch = _field(reader, 'general.architecture')
  model_type, cls, _ = ARCHITECTURES[arch]
  key = lambda k, default=None: _field(reader, f'{arch}.{k}', default)
  heads = key('attention.head_count')
  theta = float(key('rope.freq_base', 10000.0))
  config = {
      'model_type': model_type,
      'architectures': [cls],
      'vocab_size': int(tensors['token_embd.weight'].shape[1]),
      'hidden_size': key('embedding_length'),
      'intermediate_size': key('feed_forward_length'),
      'num_hidden_layers': key('block_count'),
      'num_attention_heads': heads,
      'num_key_value_heads': key('attention.head_count_kv', heads),
      'head_dim': key('attention.key_length', key('embedding_length') // heads),
      'max_position_embeddings': key('context_length'),
      'rms_norm_eps': float(key('attention.layer_norm_rms_epsilon')),
      # transformers 5 reads rope_parameters, config.json files written before it rope_theta.
      'rope_theta': theta,
      'rope_parameters': {'rope_type': 'default', 'rope_theta': theta},
      'hidden_act': 'silu',
      'tie_word_embeddings': 'output.weight' not in tensors,
  }
  if model_type == 'llama':
    config.update(attention_bias='blk.0.attn_q.bias' in tensors, mlp_bias=False)
  for hf_key, gguf_key in _TOKEN_IDS.items():
    token_id = _field(reader, f'tokenizer.ggml.{gguf_key}')
    if token_id is not None:
      config[hf_key] = token_id
  return config


def _field(reader: gguf.GGUFReader, key: str, default=None):
  field = reader.get_field(key)
  return default if field is None else field.contents()
