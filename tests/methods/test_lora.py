"""LoRA-family specifics: exact trainable counts at RoBERTa-base scale, FLOPs, LoRA+ groups."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax.train import optim
from peftjax import methods, tree


class Dense(nn.Module):
  """HF's ``<name>.dense`` wrapper (``attention.output.dense``, ``intermediate.dense``)."""
  features: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.features, name='dense')(x)


class SelfAttention(nn.Module):
  hidden: int

  @nn.compact
  def __call__(self, x):
    return sum(nn.Dense(self.hidden, name=n)(x) for n in ('query', 'key', 'value'))


class Attention(nn.Module):
  hidden: int

  @nn.compact
  def __call__(self, x):
    return Dense(self.hidden, name='output')(SelfAttention(self.hidden, name='self')(x))


class Layer(nn.Module):
  hidden: int = 768
  intermediate: int = 3072

  @nn.compact
  def __call__(self, x, _=None):
    x = Dense(self.hidden, name='output')(
        Dense(self.intermediate, name='intermediate')(Attention(self.hidden, name='attention')(x)))
    return x, None


class Encoder(nn.Module):
  """RoBERTa-base-shaped stack (12 scanned layers, hidden 768), HF module names."""

  @nn.compact
  def __call__(self, x):
    layers = nn.scan(Layer, variable_axes={True: 0}, split_rngs={'params': True}, length=12)
    x, _ = layers(name='layer')(x, None)
    return nn.Dense(2, name='classifier')(x)


def _shapes(method):
  params = jax.eval_shape(Encoder().init, jax.random.key(0), jnp.ones((1, 768)))['params']
  return params, jax.eval_shape(method.init, jax.random.key(0), params)


@pytest.mark.parametrize('name, kwargs, expected', [
    ('lora', dict(rank=8, model_type='roberta'), 12 * 2 * (768 * 8 + 8 * 768)),  # 294,912
    # all-linear: q, k, v, attention.output (768 -> 768), intermediate (768 -> 3072), output
    # (3072 -> 768); r * (d_in + d_out) each: 1,327,104
    ('lora', dict(rank=8, target='all-linear'), 12 * 8 * (4 * (768 + 768) + 2 * (768 + 3072))),
    ('dora', dict(rank=8, model_type='roberta'), 294_912 + 12 * 2 * 768),
    ('ia3', dict(model_type='roberta'), 12 * (768 + 768 + 768 + 3072)),  # 64,512
    ('bitfit', {}, 12 * (4 * 768 + 3072 + 768) + 2),
])
def test_exact_trainable_counts_roberta_base_shapes(name, kwargs, expected):
  _, adapter = _shapes(methods.get(name, **kwargs))
  assert tree.count(adapter) == expected


def test_roberta_lora_paths_map_to_hf_peft_names():
  _, adapter = _shapes(methods.get('lora', rank=8, model_type='roberta'))
  assert sorted(tree.flatten(adapter)) == [
      'layer/attention/self/query/lora_A', 'layer/attention/self/query/lora_B',
      'layer/attention/self/value/lora_A', 'layer/attention/self/value/lora_B']
  assert adapter['layer']['attention']['self']['query']['lora_A'].shape == (12, 768, 8)


D, T, R, N_LAYERS = 1024, 256, 8, 3


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    for i in range(N_LAYERS):
      x = nn.relu(nn.Dense(D, use_bias=False, name=f'layers_{i}')(x))
    return x


def _step_flops(method):
  model = MLP()
  x = jax.ShapeDtypeStruct((T, D), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), x)['params']
  adapter = jax.eval_shape(method.init, jax.random.key(0), params)
  loss = lambda a, p, x: jnp.mean(method.apply(model.apply)(a, p, x) ** 2)
  step = jax.jit(jax.grad(loss))  # gradient w.r.t. the adapter only
  cost = step.lower(adapter, params, x).compile().cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)['flops']


def test_lora_step_drops_the_weight_gradient_matmuls():
  full = _step_flops(methods.full())
  lora = _step_flops(methods.lora(rank=R))
  # Full: forward + input grads (not for layer 0) + weight grads; LoRA: no weight grads.
  full_analytic = 2 * T * D * D * (N_LAYERS + (N_LAYERS - 1) + N_LAYERS)
  lora_analytic = (2 * T * D * D * (N_LAYERS + N_LAYERS - 1)
                   + 2 * T * D * R * (2 * N_LAYERS + 3 * N_LAYERS + N_LAYERS - 1))
  assert full == pytest.approx(full_analytic, rel=0.02)
  assert lora == pytest.approx(lora_analytic, rel=0.02)
  assert lora / full < 0.7
  print(f'full {full:.4g} ({full_analytic:.4g}) lora {lora:.4g} ({lora_analytic:.4g}) '
        f'ratio {lora / full:.3f}')


def test_lora_plus_gives_b_a_ratio_times_learning_rate():
  params = {'q_proj': {'kernel': jnp.ones((4, 4))}}
  adapter = methods.lora(rank=2, target='q_proj').init(jax.random.key(0), params)
  assert methods.lora_plus_labels(adapter) == {'q_proj': {'lora_A': 'default', 'lora_B': 'lora_B'}}
  tx = optim.make_optimizer({'name': 'sgd', 'learning_rate': 0.1, 'total_steps': 10,
                             'schedule': 'constant', 'lr_multipliers': {'lora_B': 16.0}},
                            label_fn=methods.lora_plus_labels)
  grads = jax.tree.map(jnp.ones_like, adapter)
  updates, _ = tx.update(grads, tx.init(adapter), adapter)
  np.testing.assert_allclose(updates['q_proj']['lora_A'], -0.1)
  np.testing.assert_allclose(updates['q_proj']['lora_B'], -1.6)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_low_rank_custom_vjp_matches_autodiff(dtype):
  from peftjax.methods.lora import low_rank
  kx, ka, kb, kg = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(kx, (2, 5, 6), dtype)
  a = jax.random.normal(ka, (6, 3), dtype)
  b = jax.random.normal(kb, (3, 7), dtype)
  g = jax.random.normal(kg, (2, 5, 7), dtype)
  plain = lambda x, a, b: jnp.sum((2.5 * ((x @ a) @ b) * g).astype(jnp.float32))
  custom = lambda x, a, b: jnp.sum((low_rank(x, a, b, 2.5) * g).astype(jnp.float32))
  # float32: measured max relative diff 1.5e-6 (values up to ~80); bfloat16 rounding: 5e-2
  tol = 5e-6 if dtype == jnp.float32 else 5e-2
  np.testing.assert_allclose(custom(x, a, b), plain(x, a, b), rtol=tol)
  for want, got in zip(jax.grad(plain, (0, 1, 2))(x, a, b), jax.grad(custom, (0, 1, 2))(x, a, b)):
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(np.float32(got), np.float32(want), rtol=tol, atol=tol)
