"""AdaLoRA (Zhang et al. 2023): an SVD-form low-rank update whose rank budget is reallocated
during training, matching HF PEFT's ``AdaLoraConfig`` / ``SVDLinear`` / ``RankAllocator``.

A targeted Dense with kernel ``W (in, out)`` holds ``lora_A (in, r)`` (right singular vectors,
normal std 0.02), ``lora_E (r,)`` (singular values, zeros) and ``lora_B (r, out)`` (left singular
vectors, normal std 0.02), ``r = init_r``; the layer computes ``x W + s (x (A diag E)) B`` with
``s = alpha / (init_r + 1e-5)`` (HF's ``scaling / ranknum``; ``init_r`` stays the divisor however
many singular values are masked). Forward, dropout and merge are LoRA's (``lora.py``) on
``A diag(E)``: no factor is materialised as ``W + ...`` in training.

Training (``update``, once per optimizer step ``t``, after the optimizer, as HF's
``update_and_allocate(t)`` after ``optimizer.step()``):

* for ``t < total_step - tfinal``: sensitivity ``I = |w * grad|`` of every A, E, B entry, smoothed
  ``I' = beta1 I' + (1 - beta1) I`` and its uncertainty ``U = beta2 U + (1 - beta2) |I - I'|``;
* the triplet score of singular value ``i`` is ``S_E[i] + mean_in S_A[:, i] + mean_out S_B[i, :]``
  with ``S = I' * U``;
* the budget (total kept singular values) is ``init_bgt = init_r * n`` until ``tinit``, then
  falls cubically to ``target_bgt = target_r * n`` at ``total_step - tfinal`` (``n``: adapted
  matrices, each layer of a scanned module counted apart); every ``deltaT`` steps the
  ``init_bgt - budget`` lowest scores (ties at the threshold included, as ``torch.kthvalue``
  + ``<=``) have their ``E`` set to 0;
* at ``t = total_step - tfinal`` the final mask (``target_bgt`` kept) is stored and the averages
  reset; after it every step re-applies that mask.

The state (``init_state``) holds the two averages of each A, E, B leaf and the mask, with the
leaves' shapes, so it is sharded like them and scanned layers keep static shapes.
``regularizer`` is HF's orthogonality penalty ``orth_reg_weight * mean ||P^T P - I||_F`` over
every A and B (and every layer).

>>> import jax, jax.numpy as jnp
>>> params = {'q_proj': {'kernel': jnp.ones((8, 8))}}
>>> method = adalora(init_r=4, target_r=2, total_step=10, target='q_proj')
>>> adapter = method.init(jax.random.key(0), params)
>>> jax.tree.map(jnp.shape, adapter)
{'q_proj': {'lora_A': (8, 4), 'lora_B': (4, 8), 'lora_E': (4,)}}
>>> budget_table(method.spec.hparams, num_matrices=1)[0][[0, 5, 10]].tolist()
[4, 2, 2]
"""
from __future__ import annotations

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from peftjax import tree
from peftjax.methods import base, targets
from peftjax.methods.lora import lora

FACTORS = ('lora_A', 'lora_E', 'lora_B')
RANKNUM_EPS = 1e-5    # HF's ``ranknum + 1e-5``


def _check(init_r, target_r, tinit, tfinal, deltaT, beta1, beta2, orth_reg_weight, total_step,
           dropout):
  if not (isinstance(init_r, int) and init_r > 0):
    raise ValueError(f'AdaLoRA init_r must be a positive int, got {init_r!r}')
  if not (isinstance(target_r, int) and 0 <= target_r <= init_r):
    raise ValueError(f'AdaLoRA target_r={target_r!r} must be an int in [0, init_r={init_r}]'
                     + (' (target_r > init_r)' if isinstance(target_r, int) and target_r > init_r
                        else ''))
  if not (isinstance(total_step, int) and total_step > 0):
    raise ValueError(f'AdaLoRA needs total_step (the number of optimizer steps) > 0, got '
                     f'{total_step!r}')
  if not (isinstance(tinit, int) and isinstance(tfinal, int) and tinit >= 0 and tfinal >= 0):
    raise ValueError(f'AdaLoRA tinit={tinit!r} and tfinal={tfinal!r} must be ints >= 0')
  if tinit + tfinal >= total_step:
    raise ValueError(f'AdaLoRA tinit + tfinal = {tinit} + {tfinal} >= total_step={total_step} '
                     'leaves no budgeting phase; lower tinit/tfinal or raise total_step')
  if not (isinstance(deltaT, int) and deltaT > 0):
    raise ValueError(f'AdaLoRA deltaT must be a positive int, got {deltaT!r}')
  for name, beta in (('beta1', beta1), ('beta2', beta2)):
    if not 0.0 < beta < 1.0:
      raise ValueError(f'AdaLoRA {name}={beta!r} must be in (0, 1)')
  if orth_reg_weight < 0:
    raise ValueError(f'AdaLoRA orth_reg_weight={orth_reg_weight!r} must be >= 0')
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f'AdaLoRA dropout must be in [0, 1), got {dropout!r}')


def scale(hparams) -> float:
  """``s = alpha / (init_r + 1e-5)`` (HF: ``lora_alpha`` or, when 0, ``r``, over ``ranknum``)."""
  alpha = hparams['alpha'] if hparams['alpha'] > 0 else hparams['init_r']
  return alpha / (hparams['init_r'] + RANKNUM_EPS)


def budget_table(hparams, num_matrices: int) -> tuple[np.ndarray, np.ndarray]:
  """HF's ``RankAllocator.budget_schedule(t)`` for ``t = 0..total_step``: (budget, mask now).

  Computed on the host in float64 as HF does, so ``int()`` truncates the same way."""
  h = hparams
  init_bgt, target_bgt = h['init_r'] * num_matrices, h['target_r'] * num_matrices
  tinit, tfinal, total = h['tinit'], h['tfinal'], h['total_step']
  budgets, masks = [], []
  for t in range(total + 1):
    if t <= tinit:
      budget, mask = init_bgt, False
    elif t > total - tfinal:
      budget, mask = target_bgt, True
    else:
      mul = 1 - (t - tinit) / (total - tfinal - tinit)
      budget, mask = int((init_bgt - target_bgt) * (mul ** 3) + target_bgt), t % h['deltaT'] == 0
    budgets.append(budget)
    masks.append(mask)
  return np.asarray(budgets, np.int32), np.asarray(masks, bool)


def _modules(flat) -> list[str]:
  """Module paths holding AdaLoRA factors in a flat adapter (or state) dict."""
  return sorted({p.rpartition('/')[0] for p in flat if p.endswith('/lora_E')})


def num_matrices(adapter) -> int:
  """Adapted matrices (each layer of a scanned module counts): HF's ``len(name_set)``."""
  flat = tree.flatten(nn.meta.unbox(adapter))
  return sum(math.prod(flat[f'{m}/lora_E'].shape[:-1]) for m in _modules(flat))


def triplet_scores(state) -> dict[str, jax.Array]:
  """``{module: (*stack, r)}`` scores ``S_E + mean_in S_A + mean_out S_B`` (``S = I' * U``) of the
  averages in ``state`` (HF's ``mask_to_budget``)."""
  ipt, unc = tree.flatten(state['ipt']), tree.flatten(state['unc'])
  s = lambda p: ipt[p] * unc[p]
  return {m: s(f'{m}/lora_E') + (jnp.mean(s(f'{m}/lora_A'), axis=-2)
                                  + jnp.mean(s(f'{m}/lora_B'), axis=-1))
          for m in _modules(ipt)}


def kept(adapter) -> dict[str, np.ndarray]:
  """``{module: (*stack, r) bool}``: the singular values in use (``E != 0``), on the host."""
  flat = tree.flatten(nn.meta.unbox(adapter))
  return {m: np.asarray(jax.device_get(flat[f'{m}/lora_E'])) != 0 for m in _modules(flat)}


def adalora(init_r: int = 12, target_r: int = 8, tinit: int = 0, tfinal: int = 0,
            deltaT: int = 1, beta1: float = 0.85, beta2: float = 0.85,
            orth_reg_weight: float = 0.5, total_step: int | None = None, alpha: float = 8.0,
            dropout: float = 0.0, target: str = targets.ALL_LINEAR) -> base.PeftMethod:
  """AdaLoRA on the Dense layers whose module path matches ``target``; the arguments are HF
  PEFT's ``AdaLoraConfig`` fields (``alpha``/``dropout``: ``lora_alpha``/``lora_dropout``).
  ``total_step`` counts optimizer steps (the ``step`` that ``update`` receives: 1 after the
  first one)."""
  _check(init_r, target_r, tinit, tfinal, deltaT, beta1, beta2, orth_reg_weight, total_step,
         dropout)
  spec = base.Spec('adalora', dict(init_r=init_r, target_r=target_r, tinit=tinit, tfinal=tfinal,
                                   deltaT=deltaT, beta1=beta1, beta2=beta2,
                                   orth_reg_weight=orth_reg_weight, total_step=total_step,
                                   alpha=alpha, dropout=dropout, target=target))
  # LoRA with A diag(E) as its A computes (and merges) x W + s (x A diag E) B.
  inner = lora(rank=init_r, alpha=scale(spec.hparams) * init_r, target=target, dropout=dropout)
  final = total_step - tfinal

  def init(rng, params):
    adapter = {}
    for path, w, key in targets.keyed(rng, targets.modules(params, target)):
      d_in, d_out = w.value.shape[-2:]
      ka, kb = jax.random.split(key)
      adapter[f'{path}/lora_A'] = targets.box(
          0.02 * jax.random.normal(ka, (*w.stack, d_in, init_r), jnp.float32), w.axes('in', None))
      adapter[f'{path}/lora_E'] = targets.box(jnp.zeros((*w.stack, init_r), jnp.float32),
                                              w.axes(None))
      adapter[f'{path}/lora_B'] = targets.box(
          0.02 * jax.random.normal(kb, (*w.stack, init_r, d_out), jnp.float32),
          w.axes(None, 'out'))
    return tree.unflatten(adapter)

  def as_lora(adapter):
    """The adapter with each AdaLoRA module's factors as LoRA's ``(A diag E, B)``."""
    flat = tree.flatten(nn.meta.unbox(adapter))
    for m in _modules(flat):
      flat[f'{m}/lora_A'] = flat[f'{m}/lora_A'] * flat.pop(f'{m}/lora_E')[..., None, :]
    return tree.unflatten(flat)

  def apply(apply_fn):
    adapted = inner.apply(apply_fn)
    return lambda adapter, params, *a, **kw: adapted(as_lora(adapter), params, *a, **kw)

  def merge(adapter, params):
    return inner.merge(as_lora(adapter), params)

  def regularizer(adapter):
    flat = tree.flatten(nn.meta.unbox(adapter))
    norms = []
    for m in _modules(flat):
      a, b = flat[f'{m}/lora_A'], flat[f'{m}/lora_B']
      eye = jnp.eye(a.shape[-1], dtype=a.dtype)
      for cov in (jnp.einsum('...ir,...is->...rs', a, a), jnp.einsum('...ro,...so->...rs', b, b)):
        norms.append(jnp.sqrt(jnp.sum(jnp.square(cov - eye), axis=(-2, -1))).reshape(-1))
    return orth_reg_weight * jnp.mean(jnp.concatenate(norms))

  def init_state(adapter):
    flat = tree.flatten(nn.meta.unbox(adapter))
    mods = _modules(flat)
    zeros = tree.unflatten({f'{m}/{f}': jnp.zeros_like(flat[f'{m}/{f}'], jnp.float32)
                            for m in mods for f in FACTORS})
    return {'ipt': zeros, 'unc': jax.tree.map(jnp.zeros_like, zeros),
            'mask': tree.unflatten({f'{m}/lora_E': jnp.ones(flat[f'{m}/lora_E'].shape, bool)
                                    for m in mods})}

  def update(state, adapter, grads, step):
    flat, gflat = tree.flatten(adapter), tree.flatten(grads)
    ipt, unc = tree.flatten(state['ipt']), tree.flatten(state['unc'])
    old_mask = tree.flatten(state['mask'])
    budgets, mask_steps = budget_table(spec.hparams, num_matrices(adapter))
    t = jnp.clip(step, 0, total_step)
    updating, at_final, after = step < final, step == final, step > final
    new_ipt, new_unc = {}, {}
    for p in ipt:   # HF's update_ipt, on the updated weights and this step's gradients
      sens = jnp.abs(flat[p] * gflat[p])
      avg = beta1 * ipt[p] + (1 - beta1) * sens
      new_ipt[p] = jnp.where(updating, avg, ipt[p])
      new_unc[p] = jnp.where(updating, beta2 * unc[p] + (1 - beta2) * jnp.abs(sens - avg), unc[p])
    scores = triplet_scores({'ipt': tree.unflatten(new_ipt), 'unc': tree.unflatten(new_unc)})
    ranked = jnp.sort(jnp.concatenate([s.reshape(-1) for s in scores.values()]))
    k = ranked.shape[0] - jnp.asarray(budgets)[t]      # how many to mask: init_bgt - budget
    threshold = jnp.where(k > 0, ranked[jnp.maximum(k - 1, 0)], -jnp.inf)
    masking = (updating & jnp.asarray(mask_steps)[t]) | at_final
    new_mask = {}
    for m, s in scores.items():
      p = f'{m}/lora_E'
      new_mask[p] = jnp.where(masking, s > threshold, old_mask[p])
      flat[p] = jnp.where((masking | after) & ~new_mask[p], 0.0, flat[p]).astype(flat[p].dtype)
    reset = lambda x: jnp.where(at_final, jnp.zeros_like(x), x)   # HF's reset_ipt
    state = {'ipt': jax.tree.map(reset, tree.unflatten(new_ipt)),
             'unc': jax.tree.map(reset, tree.unflatten(new_unc)),
             'mask': tree.unflatten(new_mask)}
    return state, tree.unflatten(flat)

  return base.PeftMethod(init, apply, merge, spec,
                         regularizer if orth_reg_weight > 0 else None, init_state, update)


def to_lora(method: base.PeftMethod, adapter) -> tuple[base.PeftMethod, dict]:
  """A plain LoRA (method, adapter) computing what the AdaLoRA ``adapter`` computes, with each
  module's rank the number of its kept singular values (``E != 0``; a scanned module takes its
  layers' largest, padding the others with zero factors). ``s E`` is folded into ``B`` and each
  module's ``alpha`` equals its rank (LoRA scale 1); modules with nothing kept are dropped.
  Other methods composed with AdaLoRA (e.g. ``modules_to_save``) are kept as they are.
  Export it with ``hf_format.save_adapter`` for servers that read only LoRA.
  """
  from peftjax import methods   # the registry imports this module
  specs = [method.spec] if method.spec.name != 'compose' else [
      base.Spec.from_dict(d) for d in method.spec.hparams['methods']]
  ada = [s for s in specs if s.name == 'adalora']
  if len(ada) != 1:
    raise ValueError(f'to_lora needs one AdaLoRA method, got {[s.name for s in specs]}')
  s = scale(ada[0].hparams)
  flat = {p: np.asarray(jax.device_get(v)) for p, v in tree.flatten(nn.meta.unbox(adapter)).items()}
  ranks = {}
  for m, keep in kept(adapter).items():
    a, e, b = (flat.pop(f'{m}/{f}') for f in FACTORS)
    r = int(keep.sum(-1).max(initial=0))
    if r == 0:
      continue
    a2 = np.zeros(a.shape[:-1] + (r,), np.float32)
    b2 = np.zeros(b.shape[:-2] + (r, b.shape[-1]), np.float32)
    for layer in np.ndindex(keep.shape[:-1]):
      idx = np.flatnonzero(keep[layer])
      a2[layer][:, :idx.size] = a[layer][:, idx]
      b2[layer][:idx.size] = (s * e[layer][idx])[:, None] * b[layer][idx]
    flat[f'{m}/lora_A'], flat[f'{m}/lora_B'] = a2, b2
    ranks[re.escape(m)] = r
  if not ranks:
    raise ValueError('to_lora: every singular value of this AdaLoRA adapter is zero')
  top = max(ranks.values())
  plain = lora(rank=top, alpha=float(top), target='|'.join(ranks),
               rank_pattern={m: r for m, r in ranks.items() if r != top},
               alpha_pattern={m: float(r) for m, r in ranks.items() if r != top})
  others = [methods.from_spec(x) for x in specs if x.name != 'adalora']
  return (base.compose(plain, *others) if others else plain), tree.unflatten(flat)
