"""Shared fixtures: eight fake CPU devices (set before JAX is imported, for the sharding tests)
and tiny random Hugging Face models built offline, saved with ``save_pretrained``
(session-scoped).

``hf_model(name, task)`` -> ``HFModel(dir, torch_model, hf_config)``; ``flax_model(name, task)``
-> the same checkpoint converted to peftjax; ``zoo`` bundles batch/parity helpers.
"""
from __future__ import annotations

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()

import json  # noqa: E402  (XLA_FLAGS must be set before JAX starts)
import pathlib
import types
from typing import Any, NamedTuple

import jax
import numpy as np
import pytest
import safetensors
import torch
import transformers

VOCAB = 97

SPECS = {
    # llama with GQA and an untied LM head
    'llama_gqa': (transformers.LlamaConfig, dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False, pad_token_id=0, rms_norm_eps=1e-5)),
    # tied embeddings, llama attention/mlp biases, multi-query attention
    'llama_tied': (transformers.LlamaConfig, dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
        tie_word_embeddings=True, attention_bias=True, mlp_bias=True, pad_token_id=0)),
    # llama 3 rope scaling (original context small so every frequency band is exercised)
    'llama3_rope': (transformers.LlamaConfig, dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        rope_theta=500000.0, pad_token_id=0,
        rope_scaling={'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
                      'high_freq_factor': 4.0, 'original_max_position_embeddings': 16})),
    # qwen2: q/k/v biases only, tied
    'qwen2': (transformers.Qwen2Config, dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True, pad_token_id=0)),
    # mistral: a sliding window shorter than the test sequences
    'mistral_window': (transformers.MistralConfig, dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        sliding_window=3, pad_token_id=0)),
    'gpt2': (transformers.GPT2Config, dict(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0,
        bos_token_id=1, eos_token_id=2)),
    'bert': (transformers.BertConfig, dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, pad_token_id=0)),
    'roberta': (transformers.RobertaConfig, dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=66, pad_token_id=1, type_vocab_size=1)),
}

AUTO = {
    'base': transformers.AutoModel,
    'causal_lm': transformers.AutoModelForCausalLM,
    'classification': transformers.AutoModelForSequenceClassification,
}


class HFModel(NamedTuple):
  dir: pathlib.Path
  torch_model: Any
  hf_config: dict


class SafetensorsTensors:
  """Lazy ``keys()/shape()/file_of()/[name]`` view of one ``model.safetensors``."""

  def __init__(self, file):
    self.origin = pathlib.Path(file)
    with safetensors.safe_open(self.origin, 'np') as f:
      self._shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

  def keys(self):
    return self._shapes.keys()

  def shape(self, name):
    return self._shapes[name]

  def file_of(self, name):
    return str(self.origin)

  def __getitem__(self, name):
    with safetensors.safe_open(self.origin, 'np') as f:
      return f.get_tensor(name)


def tensors_of(directory) -> SafetensorsTensors:
  return SafetensorsTensors(pathlib.Path(directory) / 'model.safetensors')


def perturb(model, seed: int):
  """Adds noise to every parameter so biases/norm scales are non-trivial."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.fixture(scope='session')
def minilm_bert(tmp_path_factory) -> pathlib.Path:
  """A 2-layer, 16-wide random BERT classifier with MiniLM's vocabulary and tokenizer (the
  bundled asset), for runs of the sentiment config."""
  from peftjax import assets
  directory = tmp_path_factory.mktemp('minilm_bert')
  config = transformers.BertConfig(vocab_size=30522, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=2, num_attention_heads=2, num_labels=2,
                                   max_position_embeddings=64)
  transformers.BertForSequenceClassification(config).save_pretrained(directory)
  transformers.AutoTokenizer.from_pretrained(assets.path('all-minilm-l6-v2')).save_pretrained(
      directory)
  return directory


@pytest.fixture(scope='session')
def hf_model(tmp_path_factory):
  cache = {}

  def make(name: str, task: str = 'causal_lm') -> HFModel:
    if (name, task) not in cache:
      cls, kw = SPECS[name]
      torch.manual_seed(0)
      config = cls(**kw, num_labels=3, initializer_range=0.1)
      model = AUTO[task].from_config(config).eval()
      perturb(model, seed=1)
      directory = tmp_path_factory.mktemp(f'{name}_{task}')
      model.save_pretrained(directory)
      hf = json.loads((directory / 'config.json').read_text())
      cache[name, task] = HFModel(directory, model, hf)
    return cache[name, task]

  return make


def left_padded_batch(seed: int = 0, batch: int = 3, length: int = 7, pads=(0, 2, 4)):
  """ids [b, t] (pad id 0), mask [b, t] with ``pads[i]`` left pads in row i, and HF-style
  positions ``cumsum(mask) - 1`` (clipped at 0)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(2, VOCAB, (batch, length)).astype(np.int32)
  mask = np.ones((batch, length), np.int32)
  for i, p in enumerate(pads):
    mask[i, :p] = 0
  ids = np.where(mask == 1, ids, 0).astype(np.int32)
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
  return ids, mask, pos


def right_padded_batch(seed: int = 0, batch: int = 3, length: int = 7, pads=(0, 2, 4), pad_id=0):
  ids, mask, _ = left_padded_batch(seed, batch, length, pads)
  ids, mask = ids[:, ::-1].copy(), mask[:, ::-1].copy()
  rng = np.random.default_rng(seed)
  ids = np.where(mask == 1, rng.integers(3, VOCAB, ids.shape), pad_id).astype(np.int32)
  return ids, mask


def torch_logits(model, **inputs) -> np.ndarray:
  with torch.no_grad():
    out = model(**{k: torch.as_tensor(np.asarray(v)).long() for k, v in inputs.items()})
  return (out.logits if hasattr(out, 'logits') else out.last_hidden_state).numpy()


def max_diff_at(a, b, mask) -> float:
  """Max |a - b| over positions where ``mask`` [b, t] is 1."""
  m = np.asarray(mask, bool)
  return float(np.max(np.abs(np.asarray(a)[m] - np.asarray(b)[m])))


@pytest.fixture(scope='session')
def zoo():
  """The helpers above, for test modules (``from conftest import`` is ambiguous across dirs)."""
  return types.SimpleNamespace(
      AUTO=AUTO, VOCAB=VOCAB, tensors_of=tensors_of, left_padded_batch=left_padded_batch,
      right_padded_batch=right_padded_batch, torch_logits=torch_logits, max_diff_at=max_diff_at)


class FlaxModel(NamedTuple):
  module: Any
  params: dict
  config: Any
  apply: Any      # jitted module.apply


@pytest.fixture(scope='session')
def flax_model(hf_model):
  """``flax_model(name, task, scan_layers=False, from_task=task)``: the HF checkpoint saved for
  ``from_task`` converted for ``task``, with a jitted apply."""
  from peftjax.models import convert, registry
  cache = {}

  def make(name: str, task: str = 'causal_lm', scan_layers: bool = False,
           from_task: str | None = None) -> FlaxModel:
    if (name, task, scan_layers) not in cache:
      hf = hf_model(name, from_task or task)
      config = registry.config_from_hf(hf.hf_config, scan_layers=scan_layers)
      params = convert.params_from_hf(config, tensors_of(hf.dir), task=task)
      module = registry.build(config, task)
      cache[name, task, scan_layers] = FlaxModel(module, params, config, jax.jit(module.apply))
    return cache[name, task, scan_layers]

  return make
