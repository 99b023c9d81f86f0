"""The Bradley-Terry reward loss and metrics equal TRL's ``RewardTrainer.compute_loss`` (trl's own
code, called on the same rewards), with and without margins and reward centering; the
tokenizer check names both tokenizers."""
import collections
import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from trl.trainer.reward_trainer import RewardTrainer

from peftjax.objectives import reward


def trl_loss_and_metrics(chosen, rejected, margin=None, center=None):
  """TRL's compute_loss on a model whose logits are the given rewards (chosen rows first, as
  TRL's collator stacks them), with a stub trainer holding only what compute_loss reads."""
  logits = torch.tensor(np.concatenate([chosen, rejected]), dtype=torch.float32)[:, None]
  stub = types.SimpleNamespace(
      model=types.SimpleNamespace(training=False),
      args=types.SimpleNamespace(center_rewards_coefficient=center),
      accelerator=types.SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x),
      _metrics={'eval': collections.defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
  inputs = {'input_ids': torch.zeros((2 * len(chosen), 3), dtype=torch.long),
            'attention_mask': torch.ones((2 * len(chosen), 3), dtype=torch.long)}
  if margin is not None:
    inputs['margin'] = torch.tensor(margin, dtype=torch.float32)
  model = lambda **kw: types.SimpleNamespace(logits=logits)
  loss = RewardTrainer.compute_loss(stub, model, inputs)
  return float(loss), {k: v[-1] for k, v in stub._metrics['eval'].items()}


def rewards(seed=0, n=16):
  rng = np.random.default_rng(seed)
  chosen, rejected = rng.normal(size=n) * 2, rng.normal(size=n) * 2
  rejected[:2] = chosen[:2]   # ties count as wrong in TRL's accuracy
  return chosen.astype(np.float32), rejected.astype(np.float32), rng.uniform(0, 1, n).astype(np.float32)


@pytest.mark.parametrize('use_margin,center', [(False, None), (True, None), (False, 0.01),
                                               (True, 0.5)])
def test_loss_and_metrics_equal_trl(use_margin, center):
  chosen, rejected, margin = rewards()
  margin = margin if use_margin else None
  want, metrics = trl_loss_and_metrics(chosen, rejected, margin, center)
  got = reward.bradley_terry_loss(jnp.asarray(chosen), jnp.asarray(rejected),
                                  None if margin is None else jnp.asarray(margin), center)
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  mine = reward.summarize(reward.pair_sums(jnp.asarray(chosen), jnp.asarray(rejected)))
  assert mine['accuracy'] == pytest.approx(metrics['accuracy'], abs=1e-7)
  assert mine['margin'] == pytest.approx(metrics['margin'], rel=1e-6)
  assert mine['mean_reward'] == pytest.approx(metrics['mean_reward'], rel=1e-5, abs=1e-6)


def test_padding_rows_are_left_out():
  chosen, rejected, margin = rewards(1, 6)
  w = jnp.array([1, 1, 1, 1, 0, 0])
  got = reward.bradley_terry_loss(jnp.asarray(chosen), jnp.asarray(rejected), jnp.asarray(margin),
                                  0.1, weights=w)
  want, _ = trl_loss_and_metrics(chosen[:4], rejected[:4], margin[:4], 0.1)
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  sums = reward.pair_sums(jnp.asarray(chosen), jnp.asarray(rejected), w)
  halves = [reward.pair_sums(jnp.asarray(chosen[s]), jnp.asarray(rejected[s]))
            for s in (slice(0, 2), slice(2, 4))]
  assert float(sums['count']) == 4
  for k in sums:   # sums add up over batches exactly as one batch
    np.testing.assert_allclose(float(sums[k]), float(halves[0][k] + halves[1][k]), rtol=1e-6)


class Tok:
  def __init__(self, name, vocab, pad=0):
    self.name_or_path, self.vocab, self.pad_token_id = name, vocab, pad

  def get_vocab(self):
    return dict(self.vocab)


def test_tokenizer_mismatch_names_both():
  vocab = {'<pad>': 0, 'a': 1, 'b': 2}
  reward.check_tokenizers(Tok('rm-dir', vocab), Tok('policy-dir', vocab))
  with pytest.raises(ValueError, match=r"\(rm-dir\) and the policy's tokenizer \(policy-dir\) "
                                       r"differ: 1 tokens are in one vocabulary only \(e.g. 'c'"):
    reward.check_tokenizers(Tok('rm-dir', vocab), Tok('policy-dir', {**vocab, 'c': 3}))
  with pytest.raises(ValueError, match=r"\(rm-dir\).*\(policy-dir\) differ: pad token id 0 vs 2"):
    reward.check_tokenizers(Tok('rm-dir', vocab), Tok('policy-dir', vocab, pad=2))

