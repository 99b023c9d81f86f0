"""Llama-family decoders: Llama 2/3, Mistral (sliding window), Qwen2 (q/k/v biases), SmolLM.

GQA, RoPE (default / linear / llama3 scaling), RMSNorm, SwiGLU, tied or untied embeddings.
Parameter paths mirror Hugging Face: ``model/layers_3/self_attn/q_proj/kernel``.

>>> config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
...                      num_heads=4, num_kv_heads=2)
>>> config.head_dim
8
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from peftjax import errors
from peftjax.models import families, hooks, layers

ROPE_TYPES = ('default', 'linear', 'llama3')


def rope_fields(hf: dict) -> dict:
  """Reads transformers-5 ``rope_parameters`` or the older ``rope_theta``/``rope_scaling``."""
  params = dict(hf.get('rope_parameters') or {})
  if 'rope_theta' not in params:
    params.update(hf.get('rope_scaling') or {})
    params['rope_theta'] = hf.get('rope_theta', 10000.0)
  kind = params.get('rope_type', params.get('type', 'default'))
  return dict(
      rope_theta=float(params['rope_theta']), rope_type=kind,
      rope_factor=float(params.get('factor', 1.0)),
      rope_low_freq_factor=float(params.get('low_freq_factor', 1.0)),
      rope_high_freq_factor=float(params.get('high_freq_factor', 4.0)),
      rope_original_max_position=int(params.get('original_max_position_embeddings', 8192)))


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  norm_eps: float = 1e-6
  hidden_act: str = 'silu'
  max_position_embeddings: int = 2048
  rope_theta: float = 10000.0
  rope_type: str = 'default'
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position: int = 8192
  attention_bias: bool = False   # llama: bias on q, k, v and o
  qkv_bias: bool = False         # qwen2: bias on q, k, v only
  mlp_bias: bool = False
  attention_dropout: float = 0.0
  attention_impl: str = 'auto'        # layers.ATTENTION_IMPLS: auto, xla, cudnn, einsum, flash
  sliding_window: int | None = None   # mistral
  tie_word_embeddings: bool = False
  model_type: str = 'llama'
  pad_token_id: int | None = None
  bos_token_id: int | None = None
  eos_token_id: Any = None
  num_labels: int = 2
  initializer_range: float = 0.02
  scan_layers: bool = False
  remat: bool | str = False           # layers.REMAT_POLICIES: none, dots, full
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    layers.check_attention_impl(self.attention_impl)
    layers.remat_policy(self.remat)
    if self.rope_type not in ROPE_TYPES:
      raise errors.UnsupportedModelError(
          f'rope_type {self.rope_type!r} is not supported; supported: {", ".join(ROPE_TYPES)}')
    if self.num_kv_heads is None:
      object.__setattr__(self, 'num_kv_heads', self.num_heads)
    if self.head_dim is None:
      object.__setattr__(self, 'head_dim', self.hidden_size // self.num_heads)

  base_prefix = families.BASE_PREFIX['llama']
  scan_name = families.LAYOUTS['llama'].layers
  is_decoder = True
  conv1d = ()

  @classmethod
  def from_hf(cls, hf: dict, **overrides) -> 'LlamaConfig':
    model_type = hf.get('model_type', 'llama')
    if model_type == 'qwen2' and hf.get('use_sliding_window'):
      raise errors.UnsupportedModelError('qwen2 with use_sliding_window=True is not supported')
    fields = dict(
        vocab_size=hf['vocab_size'], hidden_size=hf['hidden_size'],
        intermediate_size=hf['intermediate_size'], num_layers=hf['num_hidden_layers'],
        num_heads=hf['num_attention_heads'], num_kv_heads=hf.get('num_key_value_heads'),
        head_dim=hf.get('head_dim'), norm_eps=hf.get('rms_norm_eps', 1e-6),
        hidden_act=hf.get('hidden_act', 'silu'),
        max_position_embeddings=hf.get('max_position_embeddings', 2048),
        attention_bias=bool(hf.get('attention_bias', False)),
        qkv_bias=model_type == 'qwen2', mlp_bias=bool(hf.get('mlp_bias', False)),
        attention_dropout=float(hf.get('attention_dropout', 0.0)),
        sliding_window=hf.get('sliding_window') if model_type == 'mistral' else None,
        tie_word_embeddings=bool(hf.get('tie_word_embeddings', False)), model_type=model_type,
        **layers.common_fields(hf), **rope_fields(hf))
    fields.update(overrides)
    return cls(**fields)

  def to_hf(self) -> dict:
    rope = {'rope_type': self.rope_type, 'rope_theta': self.rope_theta}
    if self.rope_type != 'default':
      rope['factor'] = self.rope_factor
    if self.rope_type == 'llama3':
      rope.update(low_freq_factor=self.rope_low_freq_factor,
                  high_freq_factor=self.rope_high_freq_factor,
                  original_max_position_embeddings=self.rope_original_max_position)
    hf = dict(
        model_type=self.model_type, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
        num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
        head_dim=self.head_dim, rms_norm_eps=self.norm_eps, hidden_act=self.hidden_act,
        max_position_embeddings=self.max_position_embeddings,
        rope_theta=self.rope_theta, rope_parameters=rope,
        rope_scaling=None if self.rope_type == 'default' else rope,
        mlp_bias=self.mlp_bias, attention_dropout=self.attention_dropout,
        tie_word_embeddings=self.tie_word_embeddings, **layers.common_to_hf(self))
    if self.model_type == 'mistral':
      hf['sliding_window'] = self.sliding_window
    if self.model_type != 'qwen2':
      hf['attention_bias'] = self.attention_bias
    return hf


class LlamaAttention(nn.Module):
  """``q_proj``/``k_proj``/``v_proj``/``o_proj`` with RoPE, GQA, cache and prefix keys."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, layer_cache, layer_prefix, ctx):
    cfg = self.config
    b, t, _ = x.shape
    nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    bias = cfg.attention_bias or cfg.qkv_bias
    q = layers.dense(nh * hd, ('embed', 'heads'), 'q_proj', cfg, use_bias=bias)(x)
    k = layers.dense(nkv * hd, ('embed', 'kv_heads'), 'k_proj', cfg, use_bias=bias)(x)
    v = layers.dense(nkv * hd, ('embed', 'kv_heads'), 'v_proj', cfg, use_bias=bias)(x)
    q = layers.apply_rope(q.reshape(b, t, nh, hd), ctx.cos, ctx.sin)
    k = layers.apply_rope(k.reshape(b, t, nkv, hd), ctx.cos, ctx.sin)
    v = v.reshape(b, t, nkv, hd)
    rng = None
    if not ctx.deterministic and cfg.attention_dropout > 0:
      rng = self.make_rng('dropout')
    out, layer_cache = layers.attend(q, k, v, ctx, layer_cache, layer_prefix,
                                     dropout_rate=cfg.attention_dropout, dropout_rng=rng)
    out = layers.dense(cfg.hidden_size, ('heads', 'embed'), 'o_proj', cfg,
                       use_bias=cfg.attention_bias)(out.reshape(b, t, nh * hd))
    return out, layer_cache


class LlamaMLP(nn.Module):
  """SwiGLU: ``down_proj(act(gate_proj(x)) * up_proj(x))``."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    gate = layers.dense(cfg.intermediate_size, ('embed', 'mlp'), 'gate_proj', cfg,
                        use_bias=cfg.mlp_bias)(x)
    up = layers.dense(cfg.intermediate_size, ('embed', 'mlp'), 'up_proj', cfg,
                      use_bias=cfg.mlp_bias)(x)
    h = layers.activation(cfg.hidden_act)(gate) * up
    return layers.dense(cfg.hidden_size, ('mlp', 'embed'), 'down_proj', cfg,
                        use_bias=cfg.mlp_bias)(h)


class LlamaBlock(nn.Module):
  """One pre-norm decoder layer: ``self_attn`` and SwiGLU ``mlp``."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, layer_cache, layer_prefix, ctx):
    cfg = self.config
    norm = lambda name: layers.RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name=name)
    h, layer_cache = LlamaAttention(cfg, name='self_attn')(
        norm('input_layernorm')(x), layer_cache, layer_prefix, ctx)
    x = x + h
    x = x + LlamaMLP(cfg, name='mlp')(norm('post_attention_layernorm')(x))
    return x, layer_cache


class LlamaModel(nn.Module):
  """The decoder stack (``embed_tokens``, ``layers``, ``norm``); ``attend`` ties the LM head.

  >>> import jax
  >>> config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
  ...                      num_heads=4, num_kv_heads=2)
  >>> ids = jnp.ones((2, 7), jnp.int32)
  >>> variables = LlamaModel(config).init(jax.random.key(0), ids)
  >>> LlamaModel(config).apply(variables, ids).hidden.shape       # [batch, seq, hidden]
  (2, 7, 32)

  Hooks (``hooks.py``): ``prompt_embeds``, ``keep_virtual``, ``prefix_kv``, ``prefix_mask``.
  """
  config: LlamaConfig

  def setup(self):
    cfg = self.config
    self.embed_tokens = layers.embed(cfg.vocab_size, cfg.hidden_size, ('vocab', 'embed'), None,
                                     cfg)
    self.layers = layers.stack_layers(LlamaBlock, cfg)
    self.norm = layers.RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype)
    self.inv_freq = layers.rope_inv_freq(cfg)

  def __call__(self, input_ids=None, *, attention_mask=None, position_ids=None,
               inputs_embeds=None, prompt_embeds=None, prefix_kv=None, prefix_mask=None,
               cache=None, deterministic=True, keep_virtual=False):
    cfg = self.config
    x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds.astype(cfg.dtype)
    inp = hooks.prepare(
        cfg, x, attention_mask=attention_mask, position_ids=position_ids,
        prompt_embeds=prompt_embeds, prefix_kv=prefix_kv, prefix_mask=prefix_mask, cache=cache,
        positions=lambda valid, offset, c: layers.default_positions(valid, *valid.shape, c, offset))
    b, t = inp.x.shape[:2]
    cos, sin = layers.rope_cos_sin(inp.position_ids, self.inv_freq, cfg.dtype)
    ctx, cache = layers.attention_context(
        b, t, attention_mask=inp.attention_mask, prefix_mask=inp.prefix_mask,
        prefix_len=inp.prefix_len, num_virtual=inp.num_virtual, cache=inp.cache, causal=True,
        window=cfg.sliding_window, cos=cos, sin=sin, deterministic=deterministic,
        impl=cfg.attention_impl)
    kv = None if cache is None else (cache.k, cache.v)
    x, kv = layers.run_layers(self.layers, inp.x, kv, inp.prefix_kv, ctx)
    if cache is not None:
      cache = cache.replace(k=kv[0], v=kv[1])
    out = layers.ModelOutput(hidden=self.norm(x), cache=cache)
    return hooks.drop_virtual(out, inp.num_virtual, keep_virtual)

  def attend(self, hidden):
    return self.embed_tokens.attend(hidden)
