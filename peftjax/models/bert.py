"""BERT-family encoders: BERT, RoBERTa, MiniLM (post-LayerNorm, GELU, optional pooler).

Paths mirror Hugging Face: ``bert/encoder/layer_0/attention/self/query/kernel``; RoBERTa uses
the ``roberta`` prefix and position ids offset by ``padding_idx`` (= ``pad_token_id``).

>>> config = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
...                     num_heads=4)
>>> config.base_prefix
'bert'
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from peftjax.models import families, hooks, layers


@dataclasses.dataclass(frozen=True)
class BertConfig(layers.MultiHeadConfig):
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  norm_eps: float = 1e-12
  hidden_act: str = 'gelu'
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  attention_impl: str = 'auto'        # layers.ATTENTION_IMPLS: auto, xla, cudnn, einsum, flash
  classifier_dropout: float = 0.1
  use_pooler: bool = True
  model_type: str = 'bert'
  pad_token_id: int | None = 0
  bos_token_id: int | None = None
  eos_token_id: Any = None
  num_labels: int = 2
  initializer_range: float = 0.02
  scan_layers: bool = False
  remat: bool | str = False           # layers.REMAT_POLICIES: none, dots, full
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  scan_name = families.LAYOUTS['bert'].layers.rsplit('/', 1)[-1]   # 'encoder/layer'
  is_decoder = False
  tie_word_embeddings = False
  conv1d = ()

  def __post_init__(self):
    layers.check_attention_impl(self.attention_impl)
    layers.remat_policy(self.remat)

  @property
  def base_prefix(self):
    return families.BASE_PREFIX[self.model_type]

  @classmethod
  def from_hf(cls, hf: dict, **overrides) -> 'BertConfig':
    hidden_dropout = hf.get('hidden_dropout_prob', 0.1)
    classifier_dropout = hf.get('classifier_dropout')
    fields = dict(
        vocab_size=hf['vocab_size'], hidden_size=hf['hidden_size'],
        intermediate_size=hf['intermediate_size'], num_layers=hf['num_hidden_layers'],
        num_heads=hf['num_attention_heads'],
        max_position_embeddings=hf.get('max_position_embeddings', 512),
        type_vocab_size=hf.get('type_vocab_size', 2), norm_eps=hf.get('layer_norm_eps', 1e-12),
        hidden_act=hf.get('hidden_act', 'gelu'), hidden_dropout=hidden_dropout,
        attention_dropout=hf.get('attention_probs_dropout_prob', 0.1),
        classifier_dropout=hidden_dropout if classifier_dropout is None else classifier_dropout,
        model_type=hf.get('model_type', 'bert'), **layers.common_fields(hf))
    fields.update(overrides)
    return cls(**fields)

  def to_hf(self) -> dict:
    return dict(
        model_type=self.model_type, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
        num_attention_heads=self.num_heads, max_position_embeddings=self.max_position_embeddings,
        type_vocab_size=self.type_vocab_size, layer_norm_eps=self.norm_eps,
        hidden_act=self.hidden_act, hidden_dropout_prob=self.hidden_dropout,
        attention_probs_dropout_prob=self.attention_dropout,
        classifier_dropout=self.classifier_dropout, **layers.common_to_hf(self))


class BertSelfAttention(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, layer_prefix, ctx):
    cfg = self.config
    b, t, d = x.shape
    proj = lambda name: layers.dense(d, ('embed', 'heads'), name, cfg, use_bias=True)(x).reshape(
        b, t, cfg.num_heads, cfg.head_dim)
    rng = None
    if not ctx.deterministic and cfg.attention_dropout > 0:
      rng = self.make_rng('dropout')
    out, _ = layers.attend(proj('query'), proj('key'), proj('value'), ctx, None, layer_prefix,
                           dropout_rate=cfg.attention_dropout, dropout_rng=rng)
    return out.reshape(b, t, d)


class BertOutput(nn.Module):
  """``dense`` -> dropout -> residual -> ``LayerNorm`` (HF BertSelfOutput / BertOutput)."""
  config: BertConfig
  in_axis: str = 'heads'

  @nn.compact
  def __call__(self, h, residual, deterministic):
    cfg = self.config
    h = layers.dense(cfg.hidden_size, (self.in_axis, 'embed'), 'dense', cfg, use_bias=True)(h)
    h = nn.Dropout(cfg.hidden_dropout)(h, deterministic=deterministic)
    return layers.layer_norm(cfg, 'LayerNorm')(h + residual)


class BertAttention(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, layer_prefix, ctx):
    h = BertSelfAttention(self.config, name='self')(x, layer_prefix, ctx)
    return BertOutput(self.config, name='output')(h, x, ctx.deterministic)


class BertIntermediate(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    h = layers.dense(cfg.intermediate_size, ('embed', 'mlp'), 'dense', cfg, use_bias=True)(x)
    return layers.activation(cfg.hidden_act)(h)


class BertLayer(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, layer_cache, layer_prefix, ctx):
    cfg = self.config
    x = BertAttention(cfg, name='attention')(x, layer_prefix, ctx)
    h = BertIntermediate(cfg, name='intermediate')(x)
    return BertOutput(cfg, 'mlp', name='output')(h, x, ctx.deterministic), layer_cache


class BertEncoder(nn.Module):
  config: BertConfig

  def setup(self):
    self.layer = layers.stack_layers(BertLayer, self.config)

  def __call__(self, x, prefix_kv, ctx):
    return layers.run_layers(self.layer, x, None, prefix_kv, ctx)[0]


class BertEmbeddings(nn.Module):
  """``word_embeddings`` (``embed``), then position and token-type embeddings, ``LayerNorm`` and
  dropout (``__call__``); split so that virtual tokens can go between the two."""
  config: BertConfig

  def setup(self):
    cfg = self.config
    self.word_embeddings = layers.embed(cfg.vocab_size, cfg.hidden_size, ('vocab', 'embed'),
                                        None, cfg)
    self.position_embeddings = layers.embed(cfg.max_position_embeddings, cfg.hidden_size,
                                            (None, 'embed'), None, cfg)
    self.token_type_embeddings = layers.embed(cfg.type_vocab_size, cfg.hidden_size,
                                              (None, 'embed'), None, cfg)
    self.LayerNorm = layers.layer_norm(cfg)
    self.dropout = nn.Dropout(cfg.hidden_dropout)

  def embed(self, input_ids):
    return self.word_embeddings(input_ids)

  def __call__(self, inputs_embeds, token_type_ids, position_ids, deterministic):
    x = (inputs_embeds.astype(self.config.dtype) + self.position_embeddings(position_ids) +
         self.token_type_embeddings(token_type_ids))
    return self.dropout(self.LayerNorm(x), deterministic=deterministic)


def bert_positions(config: BertConfig, valid, offset):
  """Default positions of n tokens after ``offset`` [batch] prefix positions. BERT:
  ``offset + 0..n-1``. RoBERTa: counts the ``valid`` [batch, n] tokens from ``padding_idx + 1``
  (pads get ``padding_idx``), as HF ``create_position_ids_from_input_ids`` with a past of
  length ``offset``."""
  if config.model_type != 'roberta':
    return jnp.arange(valid.shape[1])[None, :] + offset[:, None]
  v = valid.astype(jnp.int32)
  return (jnp.cumsum(v, axis=1) + offset[:, None]) * v + config.pad_token_id


class BertPooler(nn.Module):
  """``dense`` + tanh on the first token."""
  config: BertConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    return jnp.tanh(layers.dense(cfg.hidden_size, ('embed', None), 'dense', cfg,
                                 use_bias=True)(x[:, 0]))


class BertModel(nn.Module):
  """``embeddings``, ``encoder``, and ``pooler`` (dense + tanh on the first token).

  Extra keyword: ``token_type_ids`` [batch, seq] (zeros by default). No KV cache (encoder)."""
  config: BertConfig

  @nn.compact
  def __call__(self, input_ids=None, *, attention_mask=None, position_ids=None,
               inputs_embeds=None, prompt_embeds=None, prefix_kv=None, prefix_mask=None,
               cache=None, deterministic=True, keep_virtual=False, token_type_ids=None):
    cfg = self.config
    if cache is not None:
      raise ValueError(f'{cfg.model_type} is an encoder: it has no KV cache')
    embeddings = BertEmbeddings(cfg, name='embeddings')
    x = embeddings.embed(input_ids) if inputs_embeds is None else inputs_embeds
    b, t = x.shape[:2]
    valid = None   # RoBERTa counts non-pad ids for positions (HF), else the attention mask
    if cfg.model_type == 'roberta' and input_ids is not None:
      valid = input_ids != cfg.pad_token_id
    if token_type_ids is None:
      token_type_ids = jnp.zeros((b, t), jnp.int32)
    inp = hooks.prepare(
        cfg, x, attention_mask=attention_mask, position_ids=position_ids,
        prompt_embeds=prompt_embeds, prefix_kv=prefix_kv, prefix_mask=prefix_mask,
        token_type_ids=token_type_ids, valid=valid,
        positions=lambda valid, offset, _: bert_positions(cfg, valid, offset))
    x = embeddings(inp.x, inp.token_type_ids, inp.position_ids, deterministic)
    ctx, _ = layers.attention_context(
        b, x.shape[1], attention_mask=inp.attention_mask, prefix_mask=inp.prefix_mask,
        prefix_len=inp.prefix_len, num_virtual=inp.num_virtual, causal=False,
        deterministic=deterministic, impl=cfg.attention_impl)
    x = BertEncoder(cfg, name='encoder')(x, inp.prefix_kv, ctx)
    pooled = BertPooler(cfg, name='pooler')(x) if cfg.use_pooler else None
    out = layers.ModelOutput(hidden=x, pooled=pooled)
    return hooks.drop_virtual(out, inp.num_virtual, keep_virtual)
