"""DPO-family losses and metrics == TRL 1.16's ``DPOTrainer._compute_loss`` on the same log-probs.

TRL's loss is called itself (unbound, on a stand-in trainer whose model returns the given
per-token log-probs, reference log-probs precomputed), so the comparison covers its sums,
length normalisation, reductions, metric definitions and gradients.
"""
import collections
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from trl.trainer.dpo_trainer import DPOTrainer

from peftjax.objectives import dpo

B, T = 6, 9


def _batch(seed):
  """TRL's batch layout ([chosen; rejected] rows, unshifted completion mask) with random
  per-token policy log-probs on the shifted completion positions, and reference log-probs."""
  rng = np.random.default_rng(seed)
  mask = np.zeros((2 * B, T), np.int64)
  for i in range(2 * B):
    start = rng.integers(1, 4)
    mask[i, start:rng.integers(start + 1, T + 1)] = 1
  # Multiples of 2^-8: float32 sums are exact in any order, so only the losses' own
  # arithmetic can differ between the two implementations.
  exact = lambda x: (np.round(x * 256) / 256).astype(np.float32)
  token_logps = exact(-3 * rng.random((2 * B, T - 1)) * mask[:, 1:])
  ref = exact(token_logps.sum(1) + rng.normal(0, 2, 2 * B))
  return mask, token_logps, ref


def _trl(mask, token_logps, ref, loss_type, beta, label_smoothing):
  """(loss, metrics, d loss / d sequence log-prob [2B]) from TRL's own code."""
  b = len(mask) // 2
  lp = torch.tensor(token_logps, requires_grad=True)
  ids = torch.ones(mask.shape, dtype=torch.long)
  inputs = {'input_ids': ids, 'attention_mask': torch.ones_like(ids),
            'completion_mask': torch.tensor(mask), 'ref_chosen_logps': torch.tensor(ref[:b]),
            'ref_rejected_logps': torch.tensor(ref[b:])}
  zeros = torch.zeros(lp.shape)
  model = lambda **kw: types.SimpleNamespace(log_probs=lp, entropy=zeros, mean_logits=zeros,
                                             is_top1=zeros.bool())
  trainer = types.SimpleNamespace(
      model=types.SimpleNamespace(training=True), aux_loss_enabled=False, ld_alpha=None,
      accelerator=types.SimpleNamespace(device='cpu', gather=lambda x: x,
                                        gather_for_metrics=lambda x: x),
      precompute_ref_logps=True, f_divergence_type='reverse_kl', loss_types=[loss_type],
      loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing, use_weighting=False,
      _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
      _total_train_tokens=0, _tp_size=1)
  loss = DPOTrainer._compute_loss(trainer, model, inputs, False)
  loss.backward()
  grads = lp.grad.numpy().mean(1)   # TRL sums every position: the same gradient on each
  return float(loss), {k: v[0] for k, v in trainer._metrics['train'].items()}, grads


def _ours(mask, token_logps, ref, **kw):
  b = len(mask) // 2
  seq = jnp.asarray(token_logps.sum(1))
  counts = jnp.asarray(mask.sum(1))   # TRL's IPO divides by the unshifted completion mask

  def loss(chosen, rejected):
    return dpo.dpo_loss(chosen, rejected, ref[:b], ref[b:], chosen_counts=counts[:b],
                        rejected_counts=counts[b:], **kw)
  (value, metrics), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(seq[:b],
                                                                                 seq[b:])
  return float(value), metrics, np.concatenate(grads)


@pytest.mark.parametrize('loss_type, beta, label_smoothing', [
    ('sigmoid', 0.1, 0.0), ('sigmoid', 0.5, 0.0), ('ipo', 0.1, 0.0), ('ipo', 0.5, 0.0),
    ('hinge', 0.1, 0.0), ('hinge', 2.0, 0.0), ('robust', 0.1, 0.2)])
def test_loss_metrics_and_gradients_equal_trl(loss_type, beta, label_smoothing):
  batch = _batch(seed=hash((loss_type, beta)) % 1000)
  loss, metrics, grads = _trl(*batch, loss_type, beta, label_smoothing)
  ours, our_metrics, our_grads = _ours(*batch, beta=beta, loss_type=loss_type,
                                       label_smoothing=label_smoothing)
  # Measured agreement: <= 3e-7 relative (float32 sums in another order).
  assert ours == pytest.approx(loss, rel=1e-6, abs=1e-7)
  for name in ('rewards/chosen', 'rewards/rejected', 'rewards/accuracies', 'rewards/margins',
               'logps/chosen', 'logps/rejected'):
    assert float(our_metrics[name]) == pytest.approx(metrics[name], rel=1e-6, abs=1e-7), name
  np.testing.assert_allclose(our_grads, grads, rtol=1e-5, atol=1e-8)
  assert float(our_metrics['logps/ref_chosen']) == pytest.approx(batch[2][:B].mean(), rel=1e-6)


def test_label_smoothed_sigmoid_is_cdpo_as_trl_aot_on_one_pair():
  """TRL 1.16 keeps cDPO's formula in ``aot``, which on a single pair (nothing to sort) is
  ``-(1 - e) log sigmoid(beta d) - e log sigmoid(-beta d)``: compare pair by pair."""
  mask, token_logps, ref = _batch(seed=3)
  for i in range(3):
    rows = [i, B + i]
    pair = (mask[rows], token_logps[rows], ref[rows])
    loss, metrics, grads = _trl(*pair, 'aot', 0.3, 0.15)
    ours, our_metrics, our_grads = _ours(*pair, beta=0.3, label_smoothing=0.15)
    assert ours == pytest.approx(loss, rel=1e-6)
    assert float(our_metrics['rewards/margins']) == pytest.approx(metrics['rewards/margins'],
                                                                   rel=1e-6, abs=1e-7)
    np.testing.assert_allclose(our_grads, grads, rtol=1e-5)


def test_padded_pairs_are_weighted_out():
  mask, token_logps, ref = _batch(seed=5)
  seq = token_logps.sum(1)
  args = (seq[:B], seq[B:], ref[:B], ref[B:])
  pad = lambda x: np.concatenate([x, np.full(3, -7.0, np.float32)])
  w = np.r_[np.ones(B), np.zeros(3)]
  loss, metrics = dpo.dpo_loss(*args)
  padded, padded_metrics = dpo.dpo_loss(*map(pad, args), weights=w)
  assert float(padded) == pytest.approx(float(loss), rel=1e-6)
  for name in dpo.METRICS:
    assert float(padded_metrics[name]) == pytest.approx(float(metrics[name]), rel=1e-6, abs=1e-7)


def test_bad_settings_are_named():
  x = jnp.zeros(2)
  with pytest.raises(ValueError, match=r"unknown DPO loss_type 'kto'; valid: sigmoid, ipo"):
    dpo.dpo_losses(x, x, x, x, loss_type='kto')
  with pytest.raises(ValueError, match=r"label_smoothing=0.1 applies to the sigmoid \(cDPO\) and "
                                       r"robust losses only, not 'hinge'"):
    dpo.dpo_losses(x, x, x, x, loss_type='hinge', label_smoothing=0.1)
  with pytest.raises(ValueError, match=r'label_smoothing=0.5 must lie in \[0, 0.5\)'):
    dpo.dpo_losses(x, x, x, x, label_smoothing=0.5)
  with pytest.raises(ValueError, match=r'beta=0 must be > 0'):
    dpo.dpo_losses(x, x, x, x, beta=0)
  with pytest.raises(ValueError, match=r"loss_type='ipo' averages over completion tokens"):
    dpo.dpo_losses(x, x, x, x, loss_type='ipo')
