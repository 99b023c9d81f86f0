"""Direct preference optimisation losses (DPO, IPO, hinge, cDPO, robust DPO), as TRL defines them.

Inputs are per-sequence log-probs of the completions (summed over their tokens) under the
policy and the reference model, ``[B]`` each. With the log-ratios
``h_c = logp_c - ref_logp_c``, ``h_r = logp_r - ref_logp_r`` and ``d = h_c - h_r``:

- ``sigmoid`` (DPO): ``-log sigmoid(beta d)``; with ``label_smoothing = e`` it is cDPO,
  ``-(1 - e) log sigmoid(beta d) - e log sigmoid(-beta d)`` (the labels flipped with
  probability e; TRL < 1 named this ``sigmoid`` with ``label_smoothing``, TRL 1.16 has the
  formula only in ``aot``, equal to it for one pair);
- ``ipo``: ``(d' - 1 / (2 beta))^2`` with the length-averaged ``d' = h_c / n_c - h_r / n_r``
  (``n``: completion tokens, at least 1), TRL's normalisation;
- ``hinge``: ``relu(1 - beta d)``;
- ``robust`` (rDPO): ``((1 - e) (-log sigmoid(beta d)) - e (-log sigmoid(-beta d))) / (1 - 2e)``.

Metrics carry TRL's names: ``rewards/chosen`` (``beta h_c``), ``rewards/rejected``,
``rewards/accuracies`` (chosen reward > rejected reward), ``rewards/margins``,
``logps/chosen``, ``logps/rejected`` (policy), plus ``logps/ref_chosen``, ``logps/ref_rejected``.

>>> import jax.numpy as jnp
>>> out = dpo_losses(jnp.array([-5.]), jnp.array([-9.]), jnp.array([-6.]), jnp.array([-8.]),
...                  beta=0.5)
>>> round(float(out.losses[0]), 4), float(out.chosen_rewards[0]), float(out.rejected_rewards[0])
(0.3133, 0.5, -0.5)
>>> loss, metrics = dpo_loss(jnp.array([-5.]), jnp.array([-9.]), jnp.array([-6.]),
...                          jnp.array([-8.]), beta=0.5)
>>> float(metrics['rewards/margins']), float(metrics['rewards/accuracies'])
(1.0, 1.0)
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

LOSS_TYPES = ('sigmoid', 'ipo', 'hinge', 'robust')
METRICS = ('rewards/chosen', 'rewards/rejected', 'rewards/accuracies', 'rewards/margins',
           'logps/chosen', 'logps/rejected', 'logps/ref_chosen', 'logps/ref_rejected')


class DPOOutput(NamedTuple):
  """Per pair, ``[B]`` float32: the loss and the implicit rewards ``beta * log-ratio``."""
  losses: jax.Array
  chosen_rewards: jax.Array
  rejected_rewards: jax.Array


def check_loss(loss_type: str, beta: float, label_smoothing: float = 0.0) -> None:
  """Raises ``ValueError`` naming the setting that no loss of this module accepts."""
  if loss_type not in LOSS_TYPES:
    raise ValueError(f'unknown DPO loss_type {loss_type!r}; valid: {", ".join(LOSS_TYPES)}')
  if not beta > 0:
    raise ValueError(f'beta={beta} must be > 0')
  if label_smoothing and loss_type not in ('sigmoid', 'robust'):
    raise ValueError(f'label_smoothing={label_smoothing} applies to the sigmoid (cDPO) and '
                     f'robust losses only, not {loss_type!r}')
  if not 0.0 <= label_smoothing < 0.5:
    raise ValueError(f'label_smoothing={label_smoothing} must lie in [0, 0.5)')


def dpo_losses(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
               beta: float = 0.1, loss_type: str = 'sigmoid', label_smoothing: float = 0.0,
               chosen_counts=None, rejected_counts=None) -> DPOOutput:
  """Per-pair losses and rewards; ``*_counts`` (completion token counts) are needed by ``ipo``."""
  check_loss(loss_type, beta, label_smoothing)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  chosen_ratio = f32(chosen_logps) - f32(ref_chosen_logps)
  rejected_ratio = f32(rejected_logps) - f32(ref_rejected_logps)
  d = chosen_ratio - rejected_ratio
  e = label_smoothing
  if loss_type == 'sigmoid':
    losses = -(1 - e) * jax.nn.log_sigmoid(beta * d) - e * jax.nn.log_sigmoid(-beta * d)
  elif loss_type == 'robust':
    losses = (-(1 - e) * jax.nn.log_sigmoid(beta * d)
              + e * jax.nn.log_sigmoid(-beta * d)) / (1 - 2 * e)
  elif loss_type == 'hinge':
    losses = jax.nn.relu(1 - beta * d)
  else:   # ipo
    if chosen_counts is None or rejected_counts is None:
      raise ValueError("loss_type='ipo' averages over completion tokens: pass chosen_counts and "
                       'rejected_counts')
    average = (chosen_ratio / jnp.maximum(f32(chosen_counts), 1.0)
               - rejected_ratio / jnp.maximum(f32(rejected_counts), 1.0))
    losses = (average - 1 / (2 * beta)) ** 2
  return DPOOutput(losses, jax.lax.stop_gradient(beta * chosen_ratio),
                   jax.lax.stop_gradient(beta * rejected_ratio))


def metric_sums(out: DPOOutput, chosen_logps, rejected_logps, ref_chosen_logps,
                ref_rejected_logps, weights=None) -> dict:
  """``{name: sum over pairs of weight * value}`` for :data:`METRICS` (divide by the summed
  weights for TRL's batch means; sums add up across evaluation batches)."""
  w = jnp.ones_like(out.losses) if weights is None else jnp.asarray(weights, jnp.float32)
  sg = lambda x: jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))
  values = (out.chosen_rewards, out.rejected_rewards,
            (out.chosen_rewards > out.rejected_rewards).astype(jnp.float32),
            out.chosen_rewards - out.rejected_rewards, sg(chosen_logps), sg(rejected_logps),
            sg(ref_chosen_logps), sg(ref_rejected_logps))
  return {name: jnp.sum(w * v) for name, v in zip(METRICS, values)}


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
             weights=None, **kwargs) -> tuple[jax.Array, dict]:
  """(weighted mean loss, TRL's batch-mean metrics); ``kwargs`` as :func:`dpo_losses`."""
  logps = (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
  out = dpo_losses(*logps, **kwargs)
  w = jnp.ones_like(out.losses) if weights is None else jnp.asarray(weights, jnp.float32)
  n = jnp.maximum(w.sum(), 1.0)
  return jnp.sum(w * out.losses) / n, {k: v / n for k, v in metric_sums(out, *logps, w).items()}
