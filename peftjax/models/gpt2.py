"""GPT-2: learned positions, pre-LayerNorm blocks, fused ``c_attn``, GELU MLP, tied LM head.

Paths mirror Hugging Face: ``transformer/h_0/attn/c_attn/kernel``. GPT-2's ``Conv1D`` already
stores weights as (in, out), so its kernels are the checkpoint tensors untransposed.

>>> config = GPT2Config(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4)
>>> config.intermediate_size
128
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from peftjax import errors
from peftjax.models import families, hooks, layers


@dataclasses.dataclass(frozen=True)
class GPT2Config(layers.MultiHeadConfig):
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int | None = None
  max_position_embeddings: int = 1024
  norm_eps: float = 1e-5
  hidden_act: str = 'gelu_new'
  resid_dropout: float = 0.1
  embd_dropout: float = 0.1
  attention_dropout: float = 0.1
  attention_impl: str = 'auto'        # layers.ATTENTION_IMPLS: auto, xla, cudnn, einsum, flash
  model_type: str = 'gpt2'
  pad_token_id: int | None = None
  bos_token_id: int | None = 50256
  eos_token_id: Any = 50256
  num_labels: int = 2
  initializer_range: float = 0.02
  scan_layers: bool = False
  remat: bool | str = False           # layers.REMAT_POLICIES: none, dots, full
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  base_prefix = families.BASE_PREFIX['gpt2']
  scan_name = families.LAYOUTS['gpt2'].layers
  is_decoder = True
  tie_word_embeddings = True
  conv1d = ('c_attn', 'c_proj', 'c_fc')   # HF Conv1D modules: kernels stored (in, out)

  def __post_init__(self):
    layers.check_attention_impl(self.attention_impl)
    layers.remat_policy(self.remat)
    if self.intermediate_size is None:
      object.__setattr__(self, 'intermediate_size', 4 * self.hidden_size)

  @classmethod
  def from_hf(cls, hf: dict, **overrides) -> 'GPT2Config':
    fields = dict(
        vocab_size=hf['vocab_size'], hidden_size=hf['n_embd'], num_layers=hf['n_layer'],
        num_heads=hf['n_head'], intermediate_size=hf.get('n_inner'),
        max_position_embeddings=hf.get('n_positions', 1024),
        norm_eps=hf.get('layer_norm_epsilon', 1e-5),
        hidden_act=hf.get('activation_function', 'gelu_new'),
        resid_dropout=hf.get('resid_pdrop', 0.1), embd_dropout=hf.get('embd_pdrop', 0.1),
        attention_dropout=hf.get('attn_pdrop', 0.1), **layers.common_fields(hf))
    for flag in ('scale_attn_by_inverse_layer_idx', 'reorder_and_upcast_attn'):
      if hf.get(flag):
        raise errors.UnsupportedModelError(f'gpt2 option {flag}=True is not supported')
    fields.update(overrides)
    return cls(**fields)

  def to_hf(self) -> dict:
    return dict(
        model_type='gpt2', vocab_size=self.vocab_size, n_embd=self.hidden_size,
        n_layer=self.num_layers, n_head=self.num_heads, n_inner=self.intermediate_size,
        n_positions=self.max_position_embeddings, layer_norm_epsilon=self.norm_eps,
        activation_function=self.hidden_act, resid_pdrop=self.resid_dropout,
        embd_pdrop=self.embd_dropout, attn_pdrop=self.attention_dropout,
        tie_word_embeddings=True,
        **layers.common_to_hf(self))


class GPT2Attention(nn.Module):
  config: GPT2Config

  @nn.compact
  def __call__(self, x, layer_cache, layer_prefix, ctx):
    cfg = self.config
    b, t, d = x.shape
    qkv = layers.dense(3 * d, ('embed', 'qkv'), 'c_attn', cfg, use_bias=True)(x)
    q, k, v = (a.reshape(b, t, cfg.num_heads, cfg.head_dim) for a in jnp.split(qkv, 3, axis=-1))
    rng = None
    if not ctx.deterministic and cfg.attention_dropout > 0:
      rng = self.make_rng('dropout')
    out, layer_cache = layers.attend(q, k, v, ctx, layer_cache, layer_prefix,
                                     dropout_rate=cfg.attention_dropout, dropout_rng=rng)
    out = layers.dense(d, ('heads', 'embed'), 'c_proj', cfg, use_bias=True)(out.reshape(b, t, d))
    return nn.Dropout(cfg.resid_dropout)(out, deterministic=ctx.deterministic), layer_cache


class GPT2MLP(nn.Module):
  config: GPT2Config

  @nn.compact
  def __call__(self, x, deterministic):
    cfg = self.config
    h = layers.dense(cfg.intermediate_size, ('embed', 'mlp'), 'c_fc', cfg, use_bias=True)(x)
    h = layers.dense(cfg.hidden_size, ('mlp', 'embed'), 'c_proj', cfg, use_bias=True)(
        layers.activation(cfg.hidden_act)(h))
    return nn.Dropout(cfg.resid_dropout)(h, deterministic=deterministic)


class GPT2Block(nn.Module):
  config: GPT2Config

  @nn.compact
  def __call__(self, x, layer_cache, layer_prefix, ctx):
    cfg = self.config
    h, layer_cache = GPT2Attention(cfg, name='attn')(
        layers.layer_norm(cfg, 'ln_1')(x), layer_cache, layer_prefix, ctx)
    x = x + h
    x = x + GPT2MLP(cfg, name='mlp')(layers.layer_norm(cfg, 'ln_2')(x), ctx.deterministic)
    return x, layer_cache


class GPT2Model(nn.Module):
  """``wte``, ``wpe``, blocks ``h``, ``ln_f``; ``attend`` is the tied LM head."""
  config: GPT2Config

  def setup(self):
    cfg = self.config
    self.wte = layers.embed(cfg.vocab_size, cfg.hidden_size, ('vocab', 'embed'), None, cfg)
    self.wpe = layers.embed(cfg.max_position_embeddings, cfg.hidden_size, (None, 'embed'), None,
                            cfg)
    self.drop = nn.Dropout(cfg.embd_dropout)
    self.h = layers.stack_layers(GPT2Block, cfg)
    self.ln_f = layers.layer_norm(cfg)

  def __call__(self, input_ids=None, *, attention_mask=None, position_ids=None,
               inputs_embeds=None, prompt_embeds=None, prefix_kv=None, prefix_mask=None,
               cache=None, deterministic=True, keep_virtual=False):
    cfg = self.config
    x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds.astype(cfg.dtype)
    inp = hooks.prepare(
        cfg, x, attention_mask=attention_mask, position_ids=position_ids,
        prompt_embeds=prompt_embeds, prefix_kv=prefix_kv, prefix_mask=prefix_mask, cache=cache,
        positions=lambda valid, offset, c: layers.default_positions(valid, *valid.shape, c, offset))
    b, t = inp.x.shape[:2]
    x = self.drop(inp.x + self.wpe(inp.position_ids), deterministic=deterministic)
    ctx, cache = layers.attention_context(
        b, t, attention_mask=inp.attention_mask, prefix_mask=inp.prefix_mask,
        prefix_len=inp.prefix_len, num_virtual=inp.num_virtual, cache=inp.cache, causal=True,
        deterministic=deterministic, impl=cfg.attention_impl)
    kv = None if cache is None else (cache.k, cache.v)
    x, kv = layers.run_layers(self.h, x, kv, inp.prefix_kv, ctx)
    if cache is not None:
      cache = cache.replace(k=kv[0], v=kv[1])
    out = layers.ModelOutput(hidden=self.ln_f(x), cache=cache)
    return hooks.drop_virtual(out, inp.num_virtual, keep_virtual)

  def attend(self, hidden):
    return self.wte.attend(hidden)
