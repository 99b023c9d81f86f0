"""Task heads around a family backbone (``config.base_prefix`` names it: model/transformer/bert).

- ``Base``: the backbone output (``hidden``, BERT ``pooled``).
- ``CausalLM``: ``lm_head`` Dense, or the tied input embedding; its ``head`` method maps hidden
  states to logits, so a loss calls the (adapted) head itself, on chunks:
  ``apply(head_adapter(config, adapter, params), params, hidden, method='head')``.
- ``SequenceClassifier``: decoders score the last non-pad token with ``score`` (HF
  ``LlamaForSequenceClassification``); BERT classifies the pooled CLS with ``classifier``;
  RoBERTa uses ``classifier/dense`` + ``classifier/out_proj`` on ``<s>``.
- ``ValueHead``: one scalar per token for decoders (``score`` with one label, so it loads as a
  HF reward model), one per sequence for encoders.

>>> import jax
>>> from peftjax.models import llama
>>> config = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
...                            num_layers=1, num_heads=4, num_kv_heads=2)
>>> module = CausalLM(config, llama.LlamaModel)
>>> ids = jnp.ones((2, 7), jnp.int32)
>>> params = nn.meta.unbox(module.init(jax.random.key(0), ids)['params'])
>>> out = module.apply({'params': params}, ids)
>>> out.logits.shape
(2, 7, 64)
>>> bool(jnp.allclose(module.apply({'params': params}, out.hidden, method='head'), out.logits))
True
>>> kernel, tied = output_embedding(config, params)
>>> kernel.shape, tied
((32, 64), False)
>>> from peftjax import methods
>>> adapter = methods.lora(rank=2, target='lm_head').init(jax.random.key(1), params)
>>> sorted(head_adapter(config, adapter, params)['lm_head'])     # the head is adapted
['lora_A', 'lora_B']
>>> print(head_adapter(config, methods.full().init(jax.random.key(1), params), params))
None
"""
from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from peftjax import tree
from peftjax.models import families, layers


def last_token_index(input_ids, attention_mask, pad_token_id, length: int):
  """Index of the rightmost attended token whose id is not ``pad_token_id``, per row (left or
  right padding). This is transformers' ``*ForSequenceClassification`` rule (the rightmost id
  != pad), kept exact where the pad id also occurs in the text (SmolLM2 pads with its
  ``<|im_end|>``: a row ending in it is scored on the token before, in HF too), and safe for
  padding filled with another id (masked out by ``attention_mask``).

  >>> ids = jnp.array([[5, 6, 2, 7, 0], [5, 2, 2, 0, 0]])
  >>> last_token_index(ids, (ids != 0).astype(jnp.int32), 2, 5).tolist()
  [3, 0]
  """
  valid = None if attention_mask is None else attention_mask != 0
  if input_ids is not None and pad_token_id is not None:
    not_pad = input_ids != pad_token_id
    valid = not_pad if valid is None else valid & not_pad
  if valid is None:
    return jnp.full((), length - 1)
  return jnp.argmax(jnp.arange(length) * valid.astype(jnp.int32), axis=-1)


def output_embedding(config, params):
  """The LM head weight as ``(array, tied)``: ``lm_head/kernel`` [embed, vocab] (``tied=False``)
  or the tied input embedding [vocab, embed] (``tied=True``); what a chunked LM loss needs.

  (Example: the module docstring.)
  """
  tied = bool(config.tie_word_embeddings)
  module = functools.reduce(operator.getitem, families.output_head(config, tied).split('/'),
                            params)
  return module['embedding' if tied else 'kernel'], tied


def head_adapter(config, adapter, params):
  """The part of ``adapter`` that changes how the LM head computes (LoRA, IA3, DoRA... on
  ``lm_head``), for ``apply(..., method='head')``; None when the head is still ``hidden @
  output_embedding(config, substitute(adapter, params))`` (no adapter there, or only replaced
  params: full fine-tuning, ``modules_to_save``).

  Tied models: HF's LM head is the input embedding's ``attend``, which adapters on the embedding
  leave alone (they wrap its token lookup, as HF PEFT's LoRA on ``embed_tokens``): always None.

  (Example: the module docstring.)
  """
  if config.tie_word_embeddings:
    return None
  module = families.output_head(config, tied=False) + '/'
  base = tree.flatten(nn.meta.unbox(params))
  mine = {p: v for p, v in tree.flatten(nn.meta.unbox(adapter)).items() if p.startswith(module)}
  return None if all(p in base for p in mine) else tree.unflatten(mine)


class Base(nn.Module):
  """The bare backbone under its Hugging Face prefix."""
  config: Any
  backbone: Any

  @nn.compact
  def __call__(self, input_ids=None, **kw):
    return self.backbone(self.config, name=self.config.base_prefix)(input_ids, **kw)


class CausalLM(nn.Module):
  """Next-token logits [batch, seq, vocab]; ``head`` alone maps hidden states to logits."""
  config: Any
  backbone: Any

  def setup(self):
    cfg = self.config
    setattr(self, cfg.base_prefix, self.backbone(cfg))   # named as HF's base_model_prefix
    if not cfg.tie_word_embeddings:
      self.lm_head = layers.dense(cfg.vocab_size, ('embed', 'vocab'), None, cfg)

  def __call__(self, input_ids=None, **kw):
    out = getattr(self, self.config.base_prefix)(input_ids, **kw)
    return out.replace(logits=self.head(out.hidden))

  def head(self, hidden):
    """Logits [..., vocab] of final hidden states [..., embed]: ``lm_head``, or the tied
    input embedding's ``attend``."""
    if self.config.tie_word_embeddings:
      return getattr(self, self.config.base_prefix).attend(hidden)
    return self.lm_head(hidden)


class RobertaClassificationHead(nn.Module):
  """RoBERTa's head on the ``<s>`` hidden state: dropout, ``dense`` + tanh, dropout,
  ``out_proj``."""
  config: Any
  num_labels: int

  @nn.compact
  def __call__(self, h, deterministic=True):
    cfg = self.config
    drop = nn.Dropout(cfg.classifier_dropout)
    h = drop(h, deterministic=deterministic)
    h = jnp.tanh(layers.dense(cfg.hidden_size, ('embed', None), 'dense', cfg, use_bias=True)(h))
    h = drop(h, deterministic=deterministic)
    return layers.dense(self.num_labels, (None, None), 'out_proj', cfg, use_bias=True)(h)


def classifier_backbone_config(cfg):
  """RoBERTa's classifier reads ``<s>`` directly: its backbone has no pooler (as in HF)."""
  return dataclasses.replace(cfg, use_pooler=False) if cfg.model_type == 'roberta' else cfg


def classify(cfg, out, input_ids, attention_mask, deterministic, num_labels):
  """Sequence logits [batch, num_labels] from a backbone output (called inside a head)."""
  if cfg.is_decoder:
    b, t = out.hidden.shape[:2]
    idx = jnp.broadcast_to(last_token_index(input_ids, attention_mask, cfg.pad_token_id, t), (b,))
    last = jnp.take_along_axis(out.hidden, idx[:, None, None], axis=1)[:, 0]
    return layers.dense(num_labels, ('embed', None), 'score', cfg)(last)
  if cfg.model_type == 'roberta':
    return RobertaClassificationHead(cfg, num_labels, name='classifier')(
        out.hidden[:, 0], deterministic)
  h = nn.Dropout(cfg.classifier_dropout)(out.pooled, deterministic=deterministic)
  return layers.dense(num_labels, ('embed', None), 'classifier', cfg, use_bias=True)(h)


class SequenceClassifier(nn.Module):
  """Sequence logits [batch, num_labels]."""
  config: Any
  backbone: Any

  @nn.compact
  def __call__(self, input_ids=None, *, attention_mask=None, deterministic=True, **kw):
    cfg = self.config
    out = self.backbone(classifier_backbone_config(cfg), name=cfg.base_prefix)(
        input_ids, attention_mask=attention_mask, deterministic=deterministic, **kw)
    return out.replace(logits=classify(cfg, out, input_ids, attention_mask, deterministic,
                                       cfg.num_labels))


class ValueHead(nn.Module):
  """Scalar values: [batch, seq] per token for decoders (``score``), [batch] for encoders."""
  config: Any
  backbone: Any

  @nn.compact
  def __call__(self, input_ids=None, *, attention_mask=None, deterministic=True, **kw):
    cfg = self.config
    out = self.backbone(classifier_backbone_config(cfg), name=cfg.base_prefix)(
        input_ids, attention_mask=attention_mask, deterministic=deterministic, **kw)
    if cfg.is_decoder:
      values = layers.dense(1, ('embed', None), 'score', cfg)(out.hidden)[..., 0]
    else:
      values = classify(cfg, out, input_ids, attention_mask, deterministic, 1)[..., 0]
    return out.replace(logits=values)
