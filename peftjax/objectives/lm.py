"""Causal language-modelling loss, chunked so the [B, T, V] float32 logits never exist at once.

`chunked_lm_loss` takes the final hidden states and the output projection (an `lm_head` kernel
[D, V], or with `tied=True` the input embedding [V, D]) and walks over token chunks (and vocabulary
chunks) with `lax.scan`, each chunk under `jax.checkpoint` so the backward pass recomputes its
logits instead of storing them. Peak extra memory: one [chunk, vocab_chunk] float32 block.
Cost: the logits matmul runs twice (three times with `vocab_chunk`, whose blocks are also
recomputed), the usual price of not storing them.

>>> hidden = jnp.ones((2, 8, 4)); kernel = jnp.zeros((4, 10))
>>> labels = jnp.zeros((2, 8), jnp.int32); mask = jnp.ones((2, 8))
>>> round(float(chunked_lm_loss(hidden, kernel, labels, mask, chunk=4)), 4)  # log(10)
2.3026
"""
import jax
import jax.numpy as jnp


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


def _chunk_logsumexp(h, kernel, tied, vocab_chunk):
  """logsumexp over the vocabulary of h @ kernel, streaming over vocabulary blocks."""
  vocab = kernel.shape[0] if tied else kernel.shape[1]
  if vocab_chunk is None or vocab_chunk >= vocab:
    return jax.nn.logsumexp(_block_logits(h, kernel, tied), axis=-1)
  blocks = -(-vocab // vocab_chunk)
  pad = blocks * vocab_chunk - vocab
  axis = 0 if tied else 1
  kernel = jnp.pad(kernel, [(0, pad) if a == axis else (0, 0) for a in range(2)])
  kernel = jnp.moveaxis(kernel.reshape(kernel.shape[:axis] + (blocks, vocab_chunk) + kernel.shape[axis + 1:]),
                        axis, 0)
  valid = (jnp.arange(blocks * vocab_chunk) < vocab).reshape(blocks, vocab_chunk)

  @jax.checkpoint
  def body(carry, xs):
    running_max, running_sum = carry
    block, ok = xs
    logits = jnp.where(ok, _block_logits(h, block, tied), -jnp.inf)
    new_max = jnp.maximum(running_max, jax.lax.stop_gradient(logits.max(-1)))
    running_sum = running_sum * jnp.exp(running_max - new_max) + jnp.exp(logits - new_max[:, None]).sum(-1)
    return (new_max, running_sum), None

  init = (jnp.full(h.shape[:1], -jnp.inf, jnp.float32), jnp.zeros(h.shape[:1], jnp.float32))
  (running_max, running_sum), _ = jax.lax.scan(body, init, (kernel, valid))
  return running_max + jnp.log(running_sum)


def chunked_nll(hidden: jax.Array, kernel: jax.Array, labels: jax.Array, mask: jax.Array | None = None,
                *, chunk: int = 1024, vocab_chunk: int | None = None, tied: bool = False
                ) -> tuple[jax.Array, jax.Array]:
  """Summed negative log-likelihood over masked tokens and the token count (float32).

  hidden [B, T, D]; kernel [D, V] (or [V, D] with `tied`); labels [B, T] int, the target of each
  position (negative labels are ignored); mask [B, T] (response-only loss mask), default all ones.
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

  @jax.checkpoint
  def body(total, xs):
    h_c, y_c, w_c = xs
    target = jnp.take(kernel, y_c, axis=0) if tied else jnp.take(kernel, y_c, axis=1).T
    target_logit = jnp.einsum('nd,nd->n', h_c, target, preferred_element_type=jnp.float32)
    nll = _chunk_logsumexp(h_c, kernel, tied, vocab_chunk) - target_logit
    return total + jnp.sum(jnp.where(w_c > 0, nll * w_c, 0.0)), None

  total, _ = jax.lax.scan(body, jnp.zeros([], jnp.float32), (h, labels, weights))
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
