"""Chunked LM loss equals the naive loss (value and gradient); classification metrics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax.objectives import classification, lm


def naive_loss(hidden, kernel, labels, mask, tied=False):
  logits = hidden @ (kernel.T if tied else kernel)
  return lm.lm_loss_from_logits(logits, labels, mask)


@pytest.mark.parametrize('tied,chunk,vocab_chunk', [(False, 8, None), (False, 5, 7), (True, 16, 13),
                                                    (True, 64, None)])
def test_chunked_loss_and_grad_match_naive(tied, chunk, vocab_chunk):
  kh, kk, kl, km = jax.random.split(jax.random.key(0), 4)
  B, T, D, V = 2, 12, 16, 50
  hidden = jax.random.normal(kh, (B, T, D))
  kernel = jax.random.normal(kk, (V, D) if tied else (D, V)) * 0.5
  labels = jax.random.randint(kl, (B, T), 0, V)
  mask = (jax.random.uniform(km, (B, T)) > 0.3).astype(jnp.float32)
  f = lambda h, k: lm.chunked_lm_loss(h, k, labels, mask, chunk=chunk, vocab_chunk=vocab_chunk, tied=tied)
  g = lambda h, k: naive_loss(h, k, labels, mask, tied)
  value, grads = jax.value_and_grad(f, argnums=(0, 1))(hidden, kernel)
  ref_value, ref_grads = jax.value_and_grad(g, argnums=(0, 1))(hidden, kernel)
  np.testing.assert_allclose(value, ref_value, atol=2e-6, rtol=1e-6)
  for got, want in zip(grads, ref_grads):
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-6)
  np.testing.assert_allclose(jax.grad(f, 1)(hidden, kernel), ref_grads[1], atol=2e-6, rtol=1e-6)
  np.testing.assert_allclose(jax.grad(f)(hidden, kernel), ref_grads[0], atol=2e-6, rtol=1e-6)


def test_ignored_labels_and_empty_mask():
  hidden = jnp.ones((1, 4, 3))
  kernel = jnp.arange(12.0).reshape(3, 4) / 10
  labels = jnp.array([[1, -100, 2, -100]])
  want = naive_loss(hidden, kernel, jnp.array([[1, 0, 2, 0]]), jnp.array([[1., 0., 1., 0.]]))
  np.testing.assert_allclose(lm.chunked_lm_loss(hidden, kernel, labels, chunk=3), want, rtol=1e-6)
  assert float(lm.chunked_lm_loss(hidden, kernel, labels, jnp.zeros((1, 4)))) == 0.0


def test_chunked_loss_keeps_no_full_logits():
  """No top-level value of forward+backward (scan residuals included) is near [B, T, V] in size."""
  B, T, D, V = 2, 64, 8, 512
  hidden, kernel = jnp.ones((B, T, D)), jnp.ones((D, V))
  labels, mask = jnp.zeros((B, T), jnp.int32), jnp.ones((B, T))
  grad = jax.grad(lambda h, k: lm.chunked_lm_loss(h, k, labels, mask, chunk=16, vocab_chunk=128), (0, 1))
  jaxpr = jax.make_jaxpr(grad)(hidden, kernel)
  biggest = max(int(np.prod(v.aval.shape)) for e in jaxpr.jaxpr.eqns for v in e.outvars)
  assert biggest < B * T * V // 4


def test_next_token_targets_and_perplexity():
  labels, mask = lm.next_token_targets(jnp.array([[1, 2, 3, 4]]), jnp.array([[0, 0, 1, 1]]))
  assert labels.tolist() == [[2, 3, 4, 0]] and mask.tolist() == [[0, 1, 1, 0]]
  np.testing.assert_allclose(lm.perplexity(jnp.log(7.0)), 7.0, rtol=1e-6)


def test_classification_metrics_match_sklearn_definitions():
  labels = jnp.array([0, 1, 2, 2, 1, 0, 2])
  preds = jnp.array([0, 2, 2, 2, 1, 1, 0])
  logits = jax.nn.one_hot(preds, 3) * 5.0
  np.testing.assert_allclose(classification.accuracy(logits, labels), 4 / 7, rtol=1e-6)
  cm = classification.confusion_matrix(preds, labels, 3)
  # per-class F1: class0 tp=1 fp=1 fn=1 -> .5; class1 tp=1 fp=1 fn=1 -> .5; class2 tp=2 fp=1 fn=1 -> 2/3
  np.testing.assert_allclose(classification.f1_score(cm, 'macro'), (0.5 + 0.5 + 2 / 3) / 3, rtol=1e-6)
  bl, bp = jnp.array([1, 1, 0, 0, 1]), jnp.array([1, 0, 0, 1, 1])
  np.testing.assert_allclose(classification.f1_score(classification.confusion_matrix(bp, bl, 2), 'binary'),
                             2 * 2 / (2 * 2 + 1 + 1), rtol=1e-6)
  ce = classification.cross_entropy(logits, labels)
  want = -np.mean(np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), np.asarray(labels)[:, None], 1))
  np.testing.assert_allclose(ce, want, rtol=1e-6)
  with pytest.raises(ValueError, match="'micro'"):
    classification.f1_score(cm, 'micro')


@pytest.mark.parametrize('vocab_chunk,want', [(None, (1, 2, 3, 2)), (64, (1, 3, 4, 3))])
def test_fused_loss_does_one_matmul_per_wanted_gradient(vocab_chunk, want, matmul_counts):
  """Loss: 1 logits matmul; + d hidden: 2 (no recomputation); + d kernel: 3; d kernel alone
  (a probe on frozen features): 2. With `vocab_chunk` a streaming-logsumexp pass comes first,
  then one pass forms the logits and the gradients."""
  N, D, V = 64, 32, 256
  hidden, kernel = jnp.ones((1, N, D)), jnp.ones((D, V))
  labels, mask = jnp.zeros((1, N), jnp.int32), jnp.ones((1, N))
  loss = lambda h, k: lm.chunked_lm_loss(h, k, labels, mask, chunk=N, vocab_chunk=vocab_chunk)
  got = matmul_counts(loss, (hidden, kernel), 2 * N * D * (vocab_chunk or V))
  assert got == pytest.approx(want, abs=0.3)
