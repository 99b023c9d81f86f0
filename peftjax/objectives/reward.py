"""Reward modelling: the Bradley-Terry pairwise loss and its metrics, as TRL's ``RewardTrainer``
(trl 1.16) defines them, on scalar rewards of chosen and rejected sequences.

``loss = mean(-log sigmoid(r_chosen - r_rejected - margin))
       + center_rewards_coefficient * mean((r_chosen + r_rejected) ** 2)``

Evaluation sums (``pair_sums``) add up over batches; ``summarize`` turns them into TRL's
``accuracy`` (share of pairs with ``r_chosen > r_rejected``, ties count as wrong), ``margin``
(mean ``r_chosen - r_rejected``) and the mean reward.

>>> chosen, rejected = jnp.array([2., 0., 1.]), jnp.array([1., 1., 1.])
>>> round(float(bradley_terry_loss(chosen, rejected)), 4)
0.7732
>>> summarize(pair_sums(chosen, rejected))['accuracy']
0.3333333333333333

``check_tokenizers`` refuses a reward model that would read token ids written by another
tokenizer (a policy's sampled ids scored without decoding them first).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _weights(chosen, weights):
  return jnp.ones(chosen.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)


def _mean(x, w):
  return jnp.sum(x * w) / jnp.maximum(w.sum(), 1.0)


def bradley_terry_loss(chosen: jax.Array, rejected: jax.Array, margin: jax.Array | None = None,
                       center_rewards_coefficient: float | None = None,
                       weights: jax.Array | None = None) -> jax.Array:
  """TRL's reward loss over pairs: rewards ``chosen``, ``rejected`` [N], optional ``margin``
  [N] (the dataset's ``margin`` column) and example ``weights`` [N] (0 on padding rows; the
  means run over the weighted rows)."""
  w = _weights(chosen, weights)
  chosen, rejected = chosen.astype(jnp.float32), rejected.astype(jnp.float32)
  diff = chosen - rejected
  if margin is not None:
    diff = diff - margin.astype(jnp.float32)
  loss = _mean(-jax.nn.log_sigmoid(diff), w)
  if center_rewards_coefficient is not None:
    loss = loss + center_rewards_coefficient * _mean((chosen + rejected) ** 2, w)
  return loss


def pair_sums(chosen: jax.Array, rejected: jax.Array,
              weights: jax.Array | None = None) -> dict[str, jax.Array]:
  """Per-batch sums that add up exactly over evaluation batches: ``count`` (pairs),
  ``correct`` (``chosen > rejected``), ``margin_sum`` and ``reward_sum`` (both rewards)."""
  w = _weights(chosen, weights)
  chosen, rejected = chosen.astype(jnp.float32), rejected.astype(jnp.float32)
  return {'count': w.sum(), 'correct': jnp.sum((chosen > rejected) * w),
          'margin_sum': jnp.sum((chosen - rejected) * w),
          'reward_sum': jnp.sum((chosen + rejected) * w)}


def summarize(sums: dict) -> dict[str, float]:
  """``accuracy``, ``margin`` and ``mean_reward`` (plus ``loss`` when ``loss_sum`` is there)
  from summed ``pair_sums``."""
  n = max(float(sums['count']), 1.0)
  out = {'accuracy': float(sums['correct']) / n, 'margin': float(sums['margin_sum']) / n,
         'mean_reward': float(sums['reward_sum']) / (2 * n)}
  if 'loss_sum' in sums:
    out = {'loss': float(sums['loss_sum']) / n, **out}
  return out


def _name(tokenizer) -> str:
  return getattr(tokenizer, 'name_or_path', None) or type(tokenizer).__name__


def check_tokenizers(reward_tokenizer, policy_tokenizer):
  """Raises ``ValueError`` naming both tokenizers when token ids of ``policy_tokenizer`` mean
  other tokens to ``reward_tokenizer`` (different vocabularies, or another pad token, which
  the reward head uses to find the last token).

  Only needed where the reward model reads the policy's token ids as they are; text decoded
  and re-encoded with the reward model's own tokenizer never needs it.

  >>> class Tok:   # what is read: get_vocab(), pad_token_id, name_or_path
  ...   def __init__(self, name, vocab):
  ...     self.name_or_path, self.vocab, self.pad_token_id = name, vocab, 0
  ...   def get_vocab(self):
  ...     return self.vocab
  >>> check_tokenizers(Tok('rm', {'<pad>': 0, 'a': 1}), Tok('policy', {'<pad>': 0, 'a': 1}))
  >>> check_tokenizers(Tok('rm', {'<pad>': 0, 'a': 1}), Tok('policy', {'<pad>': 0, 'a': 2}))
  Traceback (most recent call last):
  ...
  ValueError: the reward model's tokenizer (rm) and the policy's tokenizer (policy) differ: token 'a' is id 1 vs 2; the reward model cannot score the policy's token ids (decode and re-encode the text with the reward model's tokenizer, or train the reward model on the policy's tokenizer)
  """
  reward_vocab, policy_vocab = reward_tokenizer.get_vocab(), policy_tokenizer.get_vocab()
  problem = None
  if reward_vocab != policy_vocab:
    only = sorted(set(reward_vocab) ^ set(policy_vocab))
    if only:
      token = only[0]
      problem = (f'{len(only)} tokens are in one vocabulary only (e.g. {token!r}: '
                 f'{reward_vocab.get(token, "absent")} vs {policy_vocab.get(token, "absent")})')
    else:
      token = min((t for t in reward_vocab if reward_vocab[t] != policy_vocab[t]),
                  key=reward_vocab.get)
      problem = f'token {token!r} is id {reward_vocab[token]} vs {policy_vocab[token]}'
  elif reward_tokenizer.pad_token_id != policy_tokenizer.pad_token_id:
    problem = (f'pad token id {reward_tokenizer.pad_token_id} vs '
               f'{policy_tokenizer.pad_token_id}')
  if problem:
    raise ValueError(
        f"the reward model's tokenizer ({_name(reward_tokenizer)}) and the policy's tokenizer "
        f"({_name(policy_tokenizer)}) differ: {problem}; the reward model cannot score the "
        f"policy's token ids (decode and re-encode the text with the reward model's tokenizer, "
        f"or train the reward model on the policy's tokenizer)")
