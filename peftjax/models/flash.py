"""Memory-efficient attention: blockwise over queries and keys with an online softmax (the
flash-attention recurrence) in pure JAX, with a custom VJP that recomputes each block's scores
from the saved per-row log-sum-exp, so neither pass holds more than one
``[batch, kv_heads, block_q, groups, block_k]`` block of scores: memory is linear in the
sequence length.

The mask never exists as a ``[batch, q_len, kv_len]`` array either: a `MaskSpec` holds its
compact pieces (query slots, valid keys, segment ids, causality, window) and each block builds
its own tile. Keys are cache slots ``0..kv_len-1`` in order, so causal and sliding-window masks
let a query block skip the key blocks it cannot see (about half the work for a causal mask).

A query row that sees no key (a pad row) gets uniform weights over all keys, as the einsum
reference's softmax over a row of ``finfo.min`` does, so values and gradients match it
everywhere.

>>> import jax.numpy as jnp
>>> q = k = v = jnp.ones((1, 5, 2, 4))                     # [batch, seq, heads, head_dim]
>>> spec = MaskSpec(q_slot=jnp.arange(5), kv_valid=jnp.ones((1, 5), bool), causal=True)
>>> spec.dense().shape                                     # [batch, q_len, kv_len]
(1, 5, 5)
>>> flash_attention(q, k, v, spec, block_q=2, block_k=2).shape
(1, 5, 2, 4)
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array

BLOCK_Q = 512   # query rows per block
BLOCK_K = 512   # keys per block
CHAINS = 2      # backward chains of query blocks, each with its own float32 dk and dv sums
NEG = float(jnp.finfo(jnp.float32).min)   # the einsum reference's masked score


@struct.dataclass
class MaskSpec:
  """An attention mask in compact form (what ``layers.attention_context`` knows).

  ``q_slot`` [q_len]: each query's key slot (ascending); key ``j`` is slot ``j``.
  ``kv_valid`` [batch, kv_len]: keys that exist (padding and cache slots not yet written are
  False). ``q_seg`` [batch, q_len] / ``k_seg`` [batch, kv_len]: segment ids of packed rows (a
  query sees keys of its own segment; ``k_seg < 0`` is visible to every segment: prefix
  key/values and virtual tokens), or None. ``causal``: a query sees slots up to its own;
  ``window``: only the last ``window`` slots, its own included."""
  q_slot: Array
  kv_valid: Array
  q_seg: Array | None = None
  k_seg: Array | None = None
  causal: bool = struct.field(pytree_node=False, default=False)
  window: int | None = struct.field(pytree_node=False, default=None)

  def tile(self, q_slot, k_slot, kv_valid, q_seg=None, k_seg=None, keys_first=False) -> Array:
    """The mask [batch, len(q_slot), len(k_slot)] of these queries and keys (``keys_first``:
    [batch, len(k_slot), len(q_slot)], built so, not transposed)."""
    qa = (lambda a: a[..., None, :]) if keys_first else (lambda a: a[..., :, None])
    ka = (lambda a: a[..., :, None]) if keys_first else (lambda a: a[..., None, :])
    mask = ka(kv_valid)
    if self.causal:
      mask = mask & (ka(k_slot) <= qa(q_slot))
    if self.window:
      mask = mask & (ka(k_slot) > qa(q_slot) - self.window)
    if q_seg is not None:
      mask = mask & ((qa(q_seg) == ka(k_seg)) | (ka(k_seg) < 0))
    return jnp.broadcast_to(mask, mask.shape[:1] + (
        (k_slot.shape[0], q_slot.shape[0]) if keys_first else (q_slot.shape[0], k_slot.shape[0])))

  def dense(self) -> Array:
    """The whole mask, bool [batch, q_len, kv_len] (for the non-blockwise implementations)."""
    return self.tile(self.q_slot, jnp.arange(self.kv_valid.shape[1]), self.kv_valid,
                     self.q_seg, self.k_seg)


def flash_attention(q, k, v, spec: MaskSpec, *, block_q: int | None = None,
                    block_k: int | None = None):
  """Softmax attention in float32 with grouped KV heads, blockwise (no dropout); blocks of
  ``block_q`` queries and ``block_k`` keys (default ``BLOCK_Q``, ``BLOCK_K``; lengths that are
  not multiples are padded).

  q [b, t, heads, d]; k, v [b, s, kv_heads, d]; ``spec`` the mask -> [b, t, heads, d]."""
  bq, bk = block_q or BLOCK_Q, block_k or BLOCK_K
  return _flash(q, k, v, spec, min(bq, q.shape[1]), min(bk, k.shape[1]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q, k, v, spec, bq, bk):
  return _forward(q, k, v, spec, bq, bk)[0]


def _blocks(q, k, v, spec, bq, bk):
  """Pads to whole blocks and splits: q [nq, b, kvh, bq, g, d], k/v [nk, b, kvh, bk, d], the
  mask pieces per block, and each query block's visible key blocks [lo, hi)."""
  b, t, h, d = q.shape
  s, kvh = k.shape[1], k.shape[2]
  nq, nk = -(-t // bq), -(-s // bk)
  pad = lambda a, n, axis, **kw: jnp.pad(
      a, [(0, n if i == axis else 0) for i in range(a.ndim)], **kw)
  qb = pad(q, nq * bq - t, 1).reshape(b, nq, bq, kvh, h // kvh, d).transpose(1, 0, 3, 2, 4, 5)
  split_k = lambda a: pad(a, nk * bk - s, 1).reshape(b, nk, bk, kvh, d).transpose(1, 0, 3, 2, 4)
  q_slot = pad(spec.q_slot, nq * bq - t, 0, mode='edge').reshape(nq, bq)
  kv_valid = pad(spec.kv_valid, nk * bk - s, 1).reshape(b, nk, bk).transpose(1, 0, 2)
  q_seg = k_seg = None
  if spec.q_seg is not None:
    q_seg = pad(spec.q_seg, nq * bq - t, 1).reshape(b, nq, bq).transpose(1, 0, 2)
    k_seg = pad(spec.k_seg, nk * bk - s, 1).reshape(b, nk, bk).transpose(1, 0, 2)
  hi = jnp.full((nq,), nk)
  if spec.causal:
    hi = jnp.minimum(nk, q_slot[:, -1] // bk + 1)
  lo = jnp.zeros((nq,), hi.dtype)
  if spec.window:
    lo = jnp.maximum(0, (q_slot[:, 0] - spec.window + 1) // bk)
  return qb, split_k(k), split_k(v), (q_slot, q_seg), (kv_valid, k_seg), lo, hi


def _block(tree, i):
  """Block ``i`` of every (leading-axis blocked) array in ``tree``."""
  return jax.tree.map(lambda a: a[i], tree)


def _scores(spec, qi, kj, q_piece, k_pieces, j, bk, keys_first=False):
  """Masked scores [b, kvh, bq, g, bk] of query block ``qi`` [b, kvh, bq, g, d] and key block
  ``j`` (``keys_first``: [b, kvh, bk, g, bq] of ``qi`` [b, kvh, g, bq, d])."""
  q_slot, q_seg = q_piece
  kv_valid, k_seg = k_pieces
  if keys_first:
    s = jnp.einsum('bksd,bkgqd->bksgq', kj, qi, preferred_element_type=jnp.float32)
  else:
    s = jnp.einsum('bkqgd,bksd->bkqgs', qi, kj, preferred_element_type=jnp.float32)
  s = s.astype(jnp.float32) / math.sqrt(qi.shape[-1])
  mask = spec.tile(q_slot, j * bk + jnp.arange(bk), kv_valid[j], q_seg,
                   None if k_seg is None else k_seg[j], keys_first)[:, None, :, None]
  return jnp.where(mask, s, NEG)


def _forward(q, k, v, spec, bq, bk):
  b, t, h, d = q.shape
  qb, kb, vb, q_pieces, k_pieces, lo, hi = _blocks(q, k, v, spec, bq, bk)
  nq, _, kvh, _, g, _ = qb.shape
  vmean = jnp.mean(v.astype(jnp.float32), axis=1).reshape(b, kvh, 1, 1, d)

  def q_block(xs):
    qi, q_piece, lo_i, hi_i = xs

    def k_block(j, carry):
      m, l, acc = carry
      s = _scores(spec, qi, kb[j], q_piece, k_pieces, j, bk)
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.exp(s - m_new[..., None])
      alpha = jnp.exp(m - m_new)
      pv = jnp.einsum('bkqgs,bksd->bkqgd', p.astype(v.dtype), vb[j],
                      preferred_element_type=jnp.float32)
      return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

    shape = (b, kvh, bq, g)
    m, l, acc = jax.lax.fori_loop(
        lo_i, hi_i, k_block, (jnp.full(shape, NEG), jnp.zeros(shape), jnp.zeros(shape + (d,))))
    dead = m == NEG   # sees no key: uniform weights over all keys, as the reference
    out = jnp.where(dead[..., None], vmean, acc / jnp.where(dead, 1.0, l)[..., None])
    return out.astype(q.dtype), jnp.where(dead, jnp.inf, m + jnp.log(l))

  # Query blocks unrolled, not a lax.map: independent loops that XLA:CPU runs concurrently.
  blocks = [q_block(_block((qb, q_pieces, lo, hi), i)) for i in range(nq)]
  ob, lse = (jnp.stack(a) for a in zip(*blocks))
  out = ob.transpose(1, 0, 3, 2, 4, 5).reshape(b, nq * bq, h, d)[:, :t]
  return out, (q, k, v, spec, ob, lse)


def _fwd(q, k, v, spec, bq, bk):
  return _forward(q, k, v, spec, bq, bk)


def _bwd(bq, bk, res, do):
  q, k, v, spec, ob, lse = res
  b, t, h, d = q.shape
  s_len = k.shape[1]
  qb, kb, vb, q_pieces, k_pieces, lo, hi = _blocks(q, k, v, spec, bq, bk)
  dob = _blocks(do, k, v, spec, bq, bk)[0]
  delta = jnp.sum(dob.astype(jnp.float32) * ob.astype(jnp.float32), axis=-1)
  scale = 1.0 / math.sqrt(d)

  nq, _, kvh, _, g, _ = qb.shape
  k_t = jnp.swapaxes(kb, -1, -2)     # [nk, b, kvh, d, bk]: dq's product then reads no transpose

  # Keys first: p and ds are [b, kvh, bk, m] blocks, m = (group, query) pairs, so each product
  # reads them in the layout they were computed in, and elementwise work runs along the queries.
  # Query-first, XLA:CPU copied p and ds transposed for dv and dk (a whole block each, 60% of
  # the backward at T = 2,048); this layout took one layer's attention gradient from 300 to 170
  # ms there (docs/benchmarks.md, "Sequence length").
  def q_block(carry, xs):
    qi, doi, lse_i, delta_i, q_piece, lo_i, hi_i = xs
    qi, doi = jnp.swapaxes(qi, 2, 3), jnp.swapaxes(doi, 2, 3)          # [b, kvh, g, bq, d]
    q_m, do_m = qi.reshape(b, kvh, g * bq, d), doi.reshape(b, kvh, g * bq, d)
    lse_t = jnp.swapaxes(lse_i, 2, 3)[:, :, None]                       # [b, kvh, 1, g, bq]
    delta_m = jnp.swapaxes(delta_i, 2, 3).reshape(b, kvh, 1, g * bq)

    def k_block(j, inner):
      dq_t, dk, dv = inner
      s = _scores(spec, qi, kb[j], q_piece, k_pieces, j, bk, keys_first=True)
      p = jnp.exp(s - lse_t).reshape(b, kvh, bk, g * bq)   # reshaped first, the exp ran 6x slower
      dv_j = jnp.einsum('bksm,bkmd->bksd', p.astype(doi.dtype), do_m,
                        preferred_element_type=jnp.float32)
      dp = jnp.einsum('bksd,bkmd->bksm', vb[j], do_m, preferred_element_type=jnp.float32)
      ds = (p * (dp - delta_m) * scale).astype(qi.dtype)
      dq_t = dq_t + jnp.einsum('bkds,bksm->bkdm', k_t[j], ds, preferred_element_type=jnp.float32)
      dk_j = jnp.einsum('bksm,bkmd->bksd', ds, q_m, preferred_element_type=jnp.float32)
      add = lambda a, x: jax.lax.dynamic_update_index_in_dim(a, a[j] + x, j, 0)
      return dq_t, add(dk, dk_j), add(dv, dv_j)

    dq_t, dk, dv = jax.lax.fori_loop(
        lo_i, hi_i, k_block, (jnp.zeros((b, kvh, d, g * bq), jnp.float32),) + carry)
    return (dk, dv), dq_t.reshape(b, kvh, d, g, bq).transpose(0, 1, 4, 3, 2)

  # Query blocks unrolled into CHAINS interleaved chains, each with its own dk, dv sums:
  # independent key loops that XLA:CPU runs concurrently (one chain ran them in sequence).
  zeros = jnp.zeros(kb.shape, jnp.float32)
  sums, dq = [(zeros, zeros)] * min(CHAINS, nq), []
  for i in range(nq):
    c = i % len(sums)
    sums[c], dq_i = q_block(sums[c], _block((qb, dob, lse, delta, q_pieces, lo, hi), i))
    dq.append(dq_i)
  dk, dv = (sum(a) for a in zip(*sums))
  dq = jnp.stack(dq)
  unblock_k = lambda a: a.transpose(1, 0, 3, 2, 4).reshape(b, -1, kvh, d)[:, :s_len]
  # Rows that see no key average v uniformly: each key's dv gets their summed do / s_len.
  dead_do = jnp.where(jnp.isinf(lse)[..., None], dob.astype(jnp.float32), 0.0)
  dv = unblock_k(dv) + (dead_do.sum(axis=(0, 3, 4)) / s_len)[:, None]
  dq = dq.transpose(1, 0, 3, 2, 4, 5).reshape(b, nq * bq, h, d)[:, :t]
  return dq.astype(q.dtype), unblock_k(dk).astype(k.dtype), dv.astype(v.dtype), None


_flash.defvjp(_fwd, _bwd)
