"""Causal language-modelling loss, chunked so the [B, T, V] float32 logits never exist at once.

`chunked_lm_loss` takes the final hidden states and the output projection (an `lm_head` kernel
[D, V], or with `tied=True` the input embedding [V, D]) and walks over token chunks (and vocabulary
chunks) with `lax.scan`. It is a fused linear cross-entropy: under differentiation the forward pass
forms d loss / d hidden (and d loss / d kernel, only when the kernel is differentiated) block by
block, so no logits are stored and none are recomputed. Peak extra memory: one [chunk,
vocab_chunk] float32 block plus a hidden-sized gradient. Cost: the forward logits matmul plus one
matmul per wanted gradient, as for unchunked autodiff (with `vocab_chunk` the logits are formed
twice: once for the streaming logsumexp, once for the gradient).

>>> hidden = jnp.ones((2, 8, 4)); kernel = jnp.zeros((4, 10))
>>> labels = jnp.zeros((2, 8), jnp.int32); mask = jnp.ones((2, 8))
>>> round(float(chunked_lm_loss(hidden, kernel, labels, mask, chunk=4)), 4)  # log(10)
2.3026
"""
import functools

import jax
import jax.numpy as jnp
from jax import custom_derivatives


def next_token_targets(input_ids: jax.Array, loss_mask: jax.Array | None = None
                       ) -> tuple[jax.Array, jax.Array]:
  """Labels and mask aligned with the model's positions: position t predicts token t + 1.

  `loss_mask[b, t]` says token t is a response token to learn; the last position has no target.

  >>> labels, mask = next_token_targets(jnp.array([[5, 6, 7]]), jnp.array([[0, 1, 1]]))
  >>> labels.tolist(), mask.tolist()
  ([[6, 7, 0]], [[1.0, 1.0, 0.0]])
  """
  loss_mask = jnp.ones_like(input_ids) if loss_mask is None else loss_mask
  labels = jnp.pad(input_ids[:, 1:], ((0, 0), (0, 1)))
  mask = jnp.pad(loss_mask[:, 1:], ((0, 0), (0, 1))).astype(jnp.float32)
  return labels, mask


def _block_logits(h, kernel, tied):
  spec = 'nd,vd->nv' if tied else 'nd,dv->nv'
  return jnp.einsum(spec, h, kernel, preferred_element_type=jnp.float32)


def _vocab_blocks(kernel, tied, vocab_chunk):
  """(the kernel as [blocks, ...] slices of `vocab_chunk` vocabulary entries, zero-padded; the
  first vocabulary id of each block)."""
  axis = 0 if tied else 1
  vocab = kernel.shape[axis]
  n = -(-vocab // vocab_chunk)
  kernel = jnp.pad(kernel, [(0, n * vocab_chunk - vocab) if a == axis else (0, 0) for a in range(2)])
  shape = kernel.shape[:axis] + (n, vocab_chunk) + kernel.shape[axis + 1:]
  return jnp.moveaxis(kernel.reshape(shape), axis, 0), jnp.arange(n) * vocab_chunk


def _unblock(blocked, tied, vocab):
  """Inverse of `_vocab_blocks` (for a gradient of the blocks)."""
  if tied:  # [blocks, vocab_chunk, D]
    return blocked.reshape(-1, blocked.shape[-1])[:vocab]
  return jnp.moveaxis(blocked, 0, 1).reshape(blocked.shape[1], -1)[:, :vocab]  # [blocks, D, chunk]


def _chunk_logsumexp(h, blocks, offsets, vocab, tied):
  """logsumexp over the vocabulary of h @ kernel, streaming over its vocabulary blocks."""
  vocab_chunk = blocks.shape[1] if tied else blocks.shape[2]

  def body(carry, xs):
    running_max, running_sum = carry
    block, offset = xs
    ids = offset + jnp.arange(vocab_chunk)
    logits = jnp.where(ids < vocab, _block_logits(h, block, tied), -jnp.inf)
    new_max = jnp.maximum(running_max, logits.max(-1))
    running_sum = running_sum * jnp.exp(running_max - new_max) + jnp.exp(logits - new_max[:, None]).sum(-1)
    return (new_max, running_sum), None

  init = (jnp.full(h.shape[:1], -jnp.inf, jnp.float32), jnp.zeros(h.shape[:1], jnp.float32))
  (running_max, running_sum), _ = jax.lax.scan(body, init, (blocks, offsets))
  return running_max + jnp.log(running_sum)


def _logit_grads(dlogits, h, kernel, tied, need_h, need_kernel):
  """(d h, d kernel), each None unless needed, from d logits [n, v] of one block."""
  dh = dk = None
  if need_h:
    dh = jnp.einsum('nv,vd->nd' if tied else 'nv,dv->nd', dlogits.astype(kernel.dtype), kernel,
                    preferred_element_type=jnp.float32)
  if need_kernel:
    dk = jnp.einsum('nv,nd->vd' if tied else 'nv,nd->dv', dlogits.astype(h.dtype), h,
                    preferred_element_type=jnp.float32)
  return dh, dk


def _dlogits(logits, lse, ids, y, w):
  """d nll / d logits = (softmax - onehot(y)) * w, zero on rows with w = 0."""
  return jnp.where((w > 0)[:, None], (jnp.exp(logits - lse[:, None]) - (ids == y[:, None])) * w[:, None], 0.0)


def _weighted_nll(lse, target, w):
  return jnp.sum(jnp.where(w > 0, (lse - target) * w, 0.0))


def _chunk_nll_and_grads(h, kernel, y, w, tied, need_h, need_kernel):
  """Summed weighted NLL of one token chunk and its gradients w.r.t. h (with `need_h`) and the
  kernel (with `need_kernel`), else None: formed where the logits are, so the [n, V] block never
  has to be stored for (or recomputed in) the backward pass."""
  logits = _block_logits(h, kernel, tied)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
  dh = dk = None
  if need_h or need_kernel:
    dlogits = _dlogits(logits, lse, jnp.arange(logits.shape[-1]), y, w)
    dh, dk = _logit_grads(dlogits, h, kernel, tied, need_h, need_kernel)
  return _weighted_nll(lse, target, w), dh, dk


def _blocked_chunk_nll_and_grads(h, kernel, blocked, y, w, tied, need_h, need_kernel):
  """`_chunk_nll_and_grads` over vocabulary blocks: a streaming logsumexp, then (for gradients)
  a second pass over the blocks; d kernel comes back blocked, as `blocked`."""
  blocks, offsets = blocked
  vocab = kernel.shape[0] if tied else kernel.shape[1]
  lse = _chunk_logsumexp(h, blocks, offsets, vocab, tied)
  rows = jnp.take(kernel, y, axis=0) if tied else jnp.take(kernel, y, axis=1).T
  target = jnp.einsum('nd,nd->n', h, rows, preferred_element_type=jnp.float32)
  dh = dk = None
  if need_h or need_kernel:
    vocab_chunk = blocks.shape[1] if tied else blocks.shape[2]

    def body(dh, xs):
      block, offset = xs
      ids = offset + jnp.arange(vocab_chunk)
      dlogits = jnp.where(ids < vocab, _dlogits(_block_logits(h, block, tied), lse, ids, y, w), 0.0)
      dh_block, dk_block = _logit_grads(dlogits, h, block, tied, need_h, need_kernel)
      return None if dh is None else dh + dh_block, dk_block

    dh0 = jnp.zeros(h.shape, jnp.float32) if need_h else None
    dh, dk = jax.lax.scan(body, dh0, (blocks, offsets))
  return _weighted_nll(lse, target, w), dh, dk


def _nll_scan(h, kernel, labels, weights, tied, vocab_chunk, need_h=False, need_kernel=False):
  """Scan the per-chunk NLL (and gradients) over token chunks h [chunks, chunk, D]; the
  vocabulary blocks are built once, outside the loop."""
  if vocab_chunk is None:
    chunk_fn, dk_like = functools.partial(_chunk_nll_and_grads, kernel=kernel), kernel
  else:
    blocked = _vocab_blocks(kernel, tied, vocab_chunk)
    chunk_fn = functools.partial(_blocked_chunk_nll_and_grads, kernel=kernel, blocked=blocked)
    dk_like = blocked[0]

  def body(carry, xs):
    total, dk_total = carry
    h_c, y, w = xs
    nll, dh, dk = chunk_fn(h_c, y=y, w=w, tied=tied, need_h=need_h, need_kernel=need_kernel)
    return (total + nll, None if dk is None else dk_total + dk), dh

  dk0 = jnp.zeros(dk_like.shape, jnp.float32) if need_kernel else None
  (total, dk), dh = jax.lax.scan(body, (jnp.zeros([], jnp.float32), dk0), (h, labels, weights))
  if need_kernel and vocab_chunk is not None:
    dk = _unblock(dk, tied, kernel.shape[0] if tied else kernel.shape[1])
  return total, dh, dk


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _nll_sum(h, kernel, labels, weights, tied, vocab_chunk):
  return _nll_scan(h, kernel, labels, weights, tied, vocab_chunk)[0]


def _nll_sum_fwd(h, kernel, labels, weights, tied, vocab_chunk):
  # symbolic_zeros: `perturbed` says whether a gradient is wanted at all (a frozen,
  # stop_gradient-ed output embedding under PEFT needs none: no [V, D] matmul then).
  total, dh, dk = _nll_scan(h.value, kernel.value, labels.value, weights.value, tied, vocab_chunk,
                            need_h=h.perturbed, need_kernel=kernel.perturbed)
  return total, (None if dh is None else dh.astype(h.value.dtype),
                 None if dk is None else dk.astype(kernel.value.dtype))


def _nll_sum_bwd(tied, vocab_chunk, res, g):
  if isinstance(g, custom_derivatives.SymbolicZero):
    return None, None, None, None
  return tuple(None if d is None else (d * g).astype(d.dtype) for d in res) + (None, None)


_nll_sum.defvjp(_nll_sum_fwd, _nll_sum_bwd, symbolic_zeros=True)


def chunked_nll(hidden: jax.Array, kernel: jax.Array, labels: jax.Array, mask: jax.Array | None = None,
                *, chunk: int = 1024, vocab_chunk: int | None = None, tied: bool = False
                ) -> tuple[jax.Array, jax.Array]:
  """Summed negative log-likelihood over masked tokens and the token count (float32).

  hidden [B, T, D]; kernel [D, V] (or [V, D] with `tied`); labels [B, T] int, the target of each
  position (negative labels are ignored); mask [B, T] (response-only loss mask), default all ones.
  Differentiable w.r.t. hidden and kernel (fused: each wanted gradient is formed in the forward pass).
  """
  d = hidden.shape[-1]
  h = hidden.reshape(-1, d)
  labels = labels.reshape(-1)
  weights = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.reshape(-1).astype(jnp.float32)
  weights = jnp.where(labels >= 0, weights, 0.0)
  labels = jnp.maximum(labels, 0)
  n = h.shape[0]
  chunk = min(chunk, n)
  pad = -n % chunk
  h = jnp.pad(h, ((0, pad), (0, 0))).reshape(-1, chunk, d)
  labels = jnp.pad(labels, (0, pad)).reshape(-1, chunk)
  weights = jnp.pad(weights, (0, pad)).reshape(-1, chunk)
  vocab = kernel.shape[0] if tied else kernel.shape[1]
  vocab_chunk = None if vocab_chunk is None or vocab_chunk >= vocab else vocab_chunk
  total = _nll_sum(h, kernel, labels, weights, tied, vocab_chunk)
  return total, weights.sum()


def chunked_lm_loss(hidden, kernel, labels, mask=None, *, chunk: int = 1024, vocab_chunk: int | None = None,
                    tied: bool = False) -> jax.Array:
  """Mean token cross-entropy over masked tokens (see `chunked_nll`); 0 when nothing is masked in."""
  total, count = chunked_nll(hidden, kernel, labels, mask, chunk=chunk, vocab_chunk=vocab_chunk, tied=tied)
  return total / jnp.maximum(count, 1.0)


def lm_loss_from_logits(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean token cross-entropy from full logits [B, T, V] (models that return logits).

  >>> round(float(lm_loss_from_logits(jnp.zeros((1, 2, 10)), jnp.zeros((1, 2), jnp.int32))), 4)
  2.3026
  """
  logits = logits.astype(jnp.float32)
  weights = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
  weights = jnp.where(labels >= 0, weights, 0.0)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * weights) / jnp.maximum(weights.sum(), 1.0)


def perplexity(mean_nll: jax.Array) -> jax.Array:
  """exp of the mean token negative log-likelihood (aggregate sums/counts over batches first)."""
  return jnp.exp(mean_nll)
