"""Causal language-modelling loss, chunked so the [B, T, V] float32 logits never exist at once.

`chunked_lm_loss` takes the final hidden states and the output projection (an `lm_head` kernel
[D, V], or with `tied=True` the input embedding [V, D]) and walks over token chunks (and vocabulary
chunks) with `lax.scan`. It is a fused linear cross-entropy: under differentiation the forward pass
forms d loss / d hidden (and d loss / d kernel, only when the kernel is differentiated) block by
block, so no logits are stored and none are recomputed. Peak extra memory: one [chunk,
vocab_chunk] float32 block plus a hidden-sized gradient. Cost: the forward logits matmul plus one
matmul per wanted gradient, as for unchunked autodiff (with `vocab_chunk` the logits are formed
twice: once for the streaming logsumexp, once for the gradient).

`chunked_logprobs` gives the per-token and per-sequence log-probs of the labels (what DPO, reward
modelling and PPO need) from the same passes; `head_logprobs` the same through any head callable
(a model's adapted `lm_head`), one checkpointed token chunk at a time.

>>> hidden = jnp.ones((2, 8, 4)); kernel = jnp.zeros((4, 10))
>>> labels = jnp.zeros((2, 8), jnp.int32); mask = jnp.ones((2, 8))
>>> round(float(chunked_lm_loss(hidden, kernel, labels, mask, chunk=4)), 4)  # log(10)
2.3026
"""
import functools
from typing import Callable, NamedTuple

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
  """(softmax - onehot(y)) * w: d (w * nll) / d logits, or with w = -1 d log p(y) / d logits;
  zero on rows with w = 0."""
  return jnp.where((w != 0)[:, None], (jnp.exp(logits - lse[:, None]) - (ids == y[:, None])) * w[:, None], 0.0)


def _chunk_pass(h, kernel, y, w, tied, need_h, need_kernel, lse=None):
  """(logsumexp, target logit, d h, d kernel) of one token chunk h [n, D]; the gradients (None
  unless needed) are those of sum_n w_n nll_n, formed where the logits are, so the [n, V] block
  never has to be stored for (or recomputed in) the backward pass. (`lse` is recomputed here:
  from the logits it costs no matmul.)"""
  del lse
  logits = _block_logits(h, kernel, tied)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
  dh = dk = None
  if need_h or need_kernel:
    dlogits = _dlogits(logits, lse, jnp.arange(logits.shape[-1]), y, w)
    dh, dk = _logit_grads(dlogits, h, kernel, tied, need_h, need_kernel)
  return lse, target, dh, dk


def _blocked_chunk_pass(h, kernel, blocked, y, w, tied, need_h, need_kernel, lse=None):
  """`_chunk_pass` over vocabulary blocks: a streaming logsumexp (unless `lse` is given), then
  (for gradients) a second pass over the blocks; d kernel comes back blocked, as `blocked`."""
  blocks, offsets = blocked
  vocab = kernel.shape[0] if tied else kernel.shape[1]
  if lse is None:
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
  return lse, target, dh, dk


def _chunk_scan(h, kernel, labels, weights, tied, vocab_chunk, need_h=False, need_kernel=False,
                lse=None):
  """`_chunk_pass` scanned over token chunks h [chunks, chunk, D]: (lse, target) [chunks,
  chunk], d h [chunks, chunk, D] (per token) and d kernel (summed), each None unless needed.
  The vocabulary blocks are built once, outside the loop; a given `lse` skips the streaming
  logsumexp pass of the blocked path."""
  if vocab_chunk is None:
    chunk_fn, dk_like = functools.partial(_chunk_pass, kernel=kernel), kernel
  else:
    blocked = _vocab_blocks(kernel, tied, vocab_chunk)
    chunk_fn = functools.partial(_blocked_chunk_pass, kernel=kernel, blocked=blocked)
    dk_like = blocked[0]

  def body(dk_total, xs):
    h_c, y, w, lse_c = xs
    lse_c, target, dh, dk = chunk_fn(h_c, y=y, w=w, tied=tied, need_h=need_h,
                                     need_kernel=need_kernel, lse=lse_c)
    return None if dk is None else dk_total + dk, (lse_c, target, dh)

  dk0 = jnp.zeros(dk_like.shape, jnp.float32) if need_kernel else None
  dk, (lse, target, dh) = jax.lax.scan(body, dk0, (h, labels, weights, lse))
  if need_kernel and vocab_chunk is not None:
    dk = _unblock(dk, tied, kernel.shape[0] if tied else kernel.shape[1])
  return lse, target, dh, dk


def _weighted_nll(lse, target, w):
  return jnp.sum(jnp.where(w > 0, (lse - target) * w, 0.0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _nll_sum(h, kernel, labels, weights, tied, vocab_chunk):
  lse, target, _, _ = _chunk_scan(h, kernel, labels, weights, tied, vocab_chunk)
  return _weighted_nll(lse, target, weights)


def _nll_sum_fwd(h, kernel, labels, weights, tied, vocab_chunk):
  # symbolic_zeros: `perturbed` says whether a gradient is wanted at all (a frozen,
  # stop_gradient-ed output embedding under PEFT needs none: no [V, D] matmul then).
  lse, target, dh, dk = _chunk_scan(h.value, kernel.value, labels.value, weights.value, tied,
                                    vocab_chunk, need_h=h.perturbed, need_kernel=kernel.perturbed)
  return _weighted_nll(lse, target, weights.value), (
      None if dh is None else dh.astype(h.value.dtype),
      None if dk is None else dk.astype(kernel.value.dtype))


def _nll_sum_bwd(tied, vocab_chunk, res, g):
  if isinstance(g, custom_derivatives.SymbolicZero):
    return None, None, None, None
  return tuple(None if d is None else (d * g).astype(d.dtype) for d in res) + (None, None)


_nll_sum.defvjp(_nll_sum_fwd, _nll_sum_bwd, symbolic_zeros=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _token_logprobs(h, kernel, labels, valid, tied, vocab_chunk):
  lse, target, _, _ = _chunk_scan(h, kernel, labels, valid, tied, vocab_chunk)
  return jnp.where(valid > 0, target - lse, 0.0)


def _token_logprobs_fwd(h, kernel, labels, valid, tied, vocab_chunk):
  # d log p_t / d h_t depends on token t alone: formed here with weight -1 (no cotangent
  # needed), the backward only scales it. d kernel sums over tokens with their cotangents, so
  # it is formed in the backward from the logits recomputed there (lse kept from here).
  h_, kernel_, labels_, valid_ = h.value, kernel.value, labels.value, valid.value
  lse, target, dh, _ = _chunk_scan(h_, kernel_, labels_, -valid_, tied, vocab_chunk,
                                   need_h=h.perturbed)
  for_kernel = (h_, kernel_, labels_, valid_, lse) if kernel.perturbed else None
  return jnp.where(valid_ > 0, target - lse, 0.0), (
      None if dh is None else dh.astype(h_.dtype), for_kernel)


def _token_logprobs_bwd(tied, vocab_chunk, res, g):
  if isinstance(g, custom_derivatives.SymbolicZero):
    return None, None, None, None
  dh, for_kernel = res
  dh = None if dh is None else (dh * g[..., None]).astype(dh.dtype)
  dk = None
  if for_kernel is not None:
    h, kernel, labels, valid, lse = for_kernel
    dk = _chunk_scan(h, kernel, labels, -g * (valid > 0), tied, vocab_chunk, need_kernel=True,
                     lse=lse)[3].astype(kernel.dtype)
  return dh, dk, None, None


_token_logprobs.defvjp(_token_logprobs_fwd, _token_logprobs_bwd, symbolic_zeros=True)


def _token_chunks(hidden, labels, mask, chunk):
  """hidden [B, T, D] -> h [chunks, chunk, D], labels and weights [chunks, chunk] (float32;
  0 where masked out, on negative labels and on padding)."""
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
  return h, labels, weights


def _vocab_chunk(kernel, tied, vocab_chunk):
  vocab = kernel.shape[0] if tied else kernel.shape[1]
  return None if vocab_chunk is None or vocab_chunk >= vocab else vocab_chunk


def chunked_nll(hidden: jax.Array, kernel: jax.Array, labels: jax.Array, mask: jax.Array | None = None,
                *, chunk: int = 1024, vocab_chunk: int | None = None, tied: bool = False
                ) -> tuple[jax.Array, jax.Array]:
  """Summed negative log-likelihood over masked tokens and the token count (float32).

  hidden [B, T, D]; kernel [D, V] (or [V, D] with `tied`); labels [B, T] int, the target of each
  position (negative labels are ignored); mask [B, T] (response-only loss mask), default all ones.
  Differentiable w.r.t. hidden and kernel (fused: each wanted gradient is formed in the forward pass).
  """
  h, labels, weights = _token_chunks(hidden, labels, mask, chunk)
  total = _nll_sum(h, kernel, labels, weights, tied, _vocab_chunk(kernel, tied, vocab_chunk))
  return total, weights.sum()


class LogProbs(NamedTuple):
  """Log-probs of the labels: `token` [B, T] (0 where masked out), `sequence` [B] (the masked
  sum, sum_t mask_t log p_t) and `count` [B] (sum_t mask_t), all float32."""
  token: jax.Array
  sequence: jax.Array
  count: jax.Array


def _logprobs(token, weights, shape):
  n = shape[0] * shape[1]
  token = token.reshape(-1)[:n].reshape(shape)
  weights = weights.reshape(-1)[:n].reshape(shape)
  return LogProbs(token, (token * weights).sum(-1), weights.sum(-1))


def chunked_logprobs(hidden: jax.Array, kernel: jax.Array, labels: jax.Array,
                     mask: jax.Array | None = None, *, chunk: int = 1024,
                     vocab_chunk: int | None = None, tied: bool = False) -> LogProbs:
  """Per-token and per-sequence log-probs of `labels` under the head `hidden @ kernel` (as
  `chunked_nll`), never forming [B, T, V] logits.

  Differentiable w.r.t. hidden and kernel. d log p_t / d h_t is formed in the forward pass (one
  more matmul, [B, T, D] kept), the backward scales it by the cotangent. The kernel gradient
  (only when the kernel is differentiated, e.g. full fine-tuning) needs the cotangents, so the
  backward recomputes the logits block by block: two matmuls there (logits, d kernel).

  >>> lp = chunked_logprobs(jnp.ones((2, 3, 4)), jnp.zeros((4, 10)), jnp.zeros((2, 3), jnp.int32),
  ...                       jnp.array([[0, 1, 1], [1, 1, 1]]))
  >>> [round(float(x), 4) for x in lp.token[0]], [round(float(x), 4) for x in lp.sequence]
  ([0.0, -2.3026, -2.3026], [-4.6052, -6.9078])
  >>> lp.count.tolist()
  [2.0, 3.0]
  """
  h, labels_, weights = _token_chunks(hidden, labels, mask, chunk)
  token = _token_logprobs(h, kernel, labels_, (weights > 0).astype(jnp.float32), tied,
                          _vocab_chunk(kernel, tied, vocab_chunk))
  return _logprobs(token, weights, labels.shape)


def head_logprobs(hidden: jax.Array, head: Callable[[jax.Array, jax.Array], jax.Array],
                  labels: jax.Array, mask: jax.Array | None = None, *, chunk: int = 1024
                  ) -> LogProbs:
  """`chunked_logprobs` for any head: `head(h, i)` maps a token chunk h [chunk, D] (the i-th)
  to its logits [chunk, V], e.g. a model's adapted `lm_head` (`i` can seed its dropout).

  One chunk's logits exist at a time: the chunk loop is `jax.checkpoint`ed, so the backward
  recomputes each chunk's head (forward cost twice, plus autodiff of the head).

  >>> head = lambda h, i: h @ jnp.zeros((4, 10))
  >>> lp = head_logprobs(jnp.ones((1, 3, 4)), head, jnp.zeros((1, 3), jnp.int32))
  >>> round(float(lp.sequence[0]), 4)   # 3 log(1/10)
  -6.9078
  """
  h, labels_, weights = _token_chunks(hidden, labels, mask, chunk)

  @jax.checkpoint
  def body(_, xs):
    h_c, y, w, i = xs
    logp = jax.nn.log_softmax(head(h_c, i).astype(jnp.float32), axis=-1)
    return None, jnp.where(w > 0, jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0], 0.0)

  _, token = jax.lax.scan(body, None, (h, labels_, weights, jnp.arange(h.shape[0])))
  return _logprobs(token, weights, labels.shape)


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
