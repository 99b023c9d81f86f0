"""``matmul_counts``: XLA's FLOP count of a loss and its gradients, in units of one logits matmul."""
import jax
import pytest


def _matmul_counts(f, args, matmul_flops):
  """XLA FLOPs / ``matmul_flops`` of ``f(h, k)`` (value), d h with k frozen, d (h, k), d k.
  XLA counts a scan body once, so ``matmul_flops`` is one chunk's logits matmul."""
  def count(fn, *argnums):
    cost = jax.jit(jax.grad(fn, argnums) if argnums else fn).lower(*args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)['flops'] / matmul_flops
  frozen = lambda h, k: f(h, jax.lax.stop_gradient(k))
  return count(f), count(frozen, 0), count(f, 0, 1), count(f, 1)


@pytest.fixture
def matmul_counts():
  return _matmul_counts
