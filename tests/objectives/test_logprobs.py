"""Per-token / per-sequence log-probs (fused and through a head callable) equal log_softmax
gathered from full logits, in value and gradient; their matmul counts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax.objectives import lm

B, T, D, V = 2, 12, 16, 50


def naive(hidden, kernel, labels, mask, tied=False):
  logp = jax.nn.log_softmax(hidden @ (kernel.T if tied else kernel), axis=-1)
  valid = (labels >= 0) & (mask > 0)
  token = jnp.where(valid, jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], -1)[..., 0], 0.0)
  weights = jnp.where(labels >= 0, mask, 0.0)
  return lm.LogProbs(token, (token * weights).sum(-1), weights.sum(-1))


def inputs(tied, seed=0):
  kh, kk, kl, km = jax.random.split(jax.random.key(seed), 4)
  hidden = jax.random.normal(kh, (B, T, D))
  kernel = jax.random.normal(kk, (V, D) if tied else (D, V)) * 0.5
  labels = jax.random.randint(kl, (B, T), 0, V).at[0, 3].set(-100)
  mask = (jax.random.uniform(km, (B, T)) > 0.3).astype(jnp.float32)
  return hidden, kernel, labels, mask


def scalar(lp, seed=1):
  """A scalar mixing every output with random weights, so its gradient is a generic VJP."""
  ct, cs = jax.random.normal(jax.random.key(seed), (B, T)), jax.random.normal(jax.random.key(seed + 1), (B,))
  return jnp.sum(ct * lp.token) + jnp.sum(cs * lp.sequence)


def assert_matches_naive(f, hidden, kernel, labels, mask, tied):
  got, want = f(hidden, kernel), naive(hidden, kernel, labels, mask, tied)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=2e-6, rtol=1e-6)
  ref = jax.grad(lambda h, k: scalar(naive(h, k, labels, mask, tied)), (0, 1))(hidden, kernel)
  for argnums in ((0, 1), 0, 1):
    grads = jax.grad(lambda h, k: scalar(f(h, k)), argnums)(hidden, kernel)
    for g, w in zip(grads if argnums == (0, 1) else (grads,),
                    ref if argnums == (0, 1) else (ref[argnums],)):
      np.testing.assert_allclose(g, w, atol=2e-6, rtol=1e-6)


@pytest.mark.parametrize('tied,chunk,vocab_chunk', [(False, 8, None), (False, 5, 7), (True, 16, 13),
                                                    (True, 64, None)])
def test_chunked_logprobs_and_grads_match_log_softmax(tied, chunk, vocab_chunk):
  hidden, kernel, labels, mask = inputs(tied)
  f = lambda h, k: lm.chunked_logprobs(h, k, labels, mask, chunk=chunk, vocab_chunk=vocab_chunk,
                                       tied=tied)
  assert_matches_naive(f, hidden, kernel, labels, mask, tied)


@pytest.mark.parametrize('tied,chunk', [(False, 5), (True, 24)])
def test_head_logprobs_and_grads_match_log_softmax(tied, chunk):
  hidden, kernel, labels, mask = inputs(tied, seed=3)
  f = lambda h, k: lm.head_logprobs(h, lambda x, i: x @ (k.T if tied else k), labels, mask,
                                    chunk=chunk)
  assert_matches_naive(f, hidden, kernel, labels, mask, tied)


def test_logprobs_sum_to_the_nll():
  hidden, kernel, labels, mask = inputs(False)
  lp = lm.chunked_logprobs(hidden, kernel, labels, mask, chunk=7)
  nll, count = lm.chunked_nll(hidden, kernel, labels, mask, chunk=7)
  np.testing.assert_allclose(-lp.sequence.sum(), nll, rtol=1e-6)
  assert float(lp.count.sum()) == float(count) == float(jnp.sum((labels >= 0) * mask))


def test_logprobs_keep_no_full_logits():
  """No top-level value of forward+backward is near [B, T, V] in size (as for the loss)."""
  b, t, d, v = 2, 64, 8, 512
  hidden, kernel = jnp.ones((b, t, d)), jnp.ones((d, v))
  labels, mask = jnp.zeros((b, t), jnp.int32), jnp.ones((b, t))
  for f in (lambda h, k: lm.chunked_logprobs(h, k, labels, mask, chunk=16, vocab_chunk=128),
            lambda h, k: lm.head_logprobs(h, lambda x, i: x @ k, labels, mask, chunk=16)):
    jaxpr = jax.make_jaxpr(jax.grad(lambda h, k: f(h, k).sequence.sum(), (0, 1)))(hidden, kernel)
    biggest = max(int(np.prod(x.aval.shape)) for e in jaxpr.jaxpr.eqns for x in e.outvars)
    assert biggest < b * t * v // 4


@pytest.mark.parametrize('vocab_chunk,want', [(None, (1, 2, 4, 2)), (64, (1, 3, 5, 3))])
def test_logprobs_matmul_counts(vocab_chunk, want, matmul_counts):
  """Log-probs: 1 logits matmul. + d hidden: 2, formed in the forward (the backward only scales
  it). + d kernel: 2 more in the backward (logits recomputed, d kernel), as the kernel gradient
  needs the cotangent: 4. d kernel alone: the forward's logits are dead under `jax.grad`, 2.
  With `vocab_chunk` a streaming-logsumexp pass comes first in the forward (+1; the backward
  reuses its logsumexp, so d kernel alone is 3). Two token chunks: with one, XLA drops the
  loops and merges the backward's logits with the forward's. D = 128 keeps the elementwise
  FLOPs (exp, masks) under 0.15 of a matmul."""
  N, D_, V_, C = 64, 128, 256, 32
  hidden, kernel = jnp.ones((1, N, D_)), jnp.ones((D_, V_))
  labels, mask = jnp.zeros((1, N), jnp.int32), jnp.ones((1, N))
  seq = lambda h, k: lm.chunked_logprobs(h, k, labels, mask, chunk=C, vocab_chunk=vocab_chunk).sequence.sum()
  got = matmul_counts(seq, (hidden, kernel), 2 * C * D_ * (vocab_chunk or V_))
  assert got == pytest.approx(want, abs=0.3)
