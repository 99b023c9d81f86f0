"""Attention through ``jax.nn.dot_product_attention`` == the einsum reference (values and
gradients, float32): GQA, padding, causal and sliding-window masks, prefixes, segments, cache;
attention dropout falls back to the einsum path."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import errors
from peftjax.models import flash, layers, llama, registry

TOL = 5e-6


def random_qkv(seed=0, b=2, t=5, s=7, heads=4, kv_heads=2, d=8):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(b, t, heads, d)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, s, kv_heads, d)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, s, kv_heads, d)), jnp.float32)
  mask = rng.random((b, t, s)) < 0.6
  mask[0, 1] = False   # a fully masked query row (a left pad): uniform weights in both paths
  return q, k, v, jnp.asarray(mask)


@pytest.mark.parametrize('kv_heads', [4, 2, 1])
def test_xla_path_equals_einsum_values_and_gradients(kv_heads):
  q, k, v, mask = random_qkv(kv_heads=kv_heads)
  w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)

  def loss(impl, q, k, v):
    return jnp.sum(w * layers.dot_product_attention(q, k, v, mask, impl=impl))

  for argnums in (0, 1, 2):
    ref = jax.value_and_grad(lambda *a: loss('einsum', *a), argnums)(q, k, v)
    got = jax.value_and_grad(lambda *a: loss('xla', *a), argnums)(q, k, v)
    assert abs(float(got[0] - ref[0])) < TOL
    np.testing.assert_allclose(got[1], ref[1], atol=TOL)
  out = layers.dot_product_attention(q, k, v, mask, impl='xla')
  np.testing.assert_allclose(out, layers.einsum_attention(q, k, v, mask), atol=TOL)


def test_auto_is_xla_on_cpu():
  q, k, v, mask = random_qkv()
  assert jax.default_backend() == 'cpu'
  np.testing.assert_array_equal(layers.dot_product_attention(q, k, v, mask, impl='auto'),
                                layers.dot_product_attention(q, k, v, mask, impl='xla'))


def test_dropout_falls_back_to_einsum():
  """``jax.nn.dot_product_attention`` has no dropout: with an rng and a rate, every impl takes
  the einsum path (same mask from the same key)."""
  q, k, v, mask = random_qkv()
  key = jax.random.key(0)
  ref = layers.einsum_attention(q, k, v, mask, dropout_rate=0.5, dropout_rng=key)
  got = layers.dot_product_attention(q, k, v, mask, impl='xla', dropout_rate=0.5,
                                     dropout_rng=key)
  np.testing.assert_array_equal(got, ref)
  assert np.abs(ref - layers.einsum_attention(q, k, v, mask)).max() > 0.1


def with_impl(m, impl):
  config = dataclasses.replace(m.config, attention_impl=impl)
  return registry.build(config, 'causal_lm' if config.is_decoder else 'base'), config


@pytest.mark.parametrize('impl,tol', [('xla', TOL), ('flash', 1e-5)])
@pytest.mark.parametrize('name,scan', [('llama_gqa', False), ('llama_gqa', True),
                                       ('mistral_window', False), ('gpt2', True),
                                       ('bert', False)])
def test_models_agree_across_impls_with_prefix(impl, tol, name, scan, flax_model, zoo,
                                               monkeypatch):
  """Left-padded batch with a partly masked prefix: logits and parameter gradients. Flash
  attention runs with blocks of 3 queries and 4 keys, so the sequences span several (padded)
  ones."""
  monkeypatch.setattr(flash, 'BLOCK_Q', 3)
  monkeypatch.setattr(flash, 'BLOCK_K', 4)
  task = 'causal_lm' if name != 'bert' else 'base'
  m = flax_model(name, task, scan_layers=scan)
  ids, mask, _ = zoo.left_padded_batch()
  cfg = m.config
  rng = np.random.default_rng(0)
  shape = (cfg.num_layers, 3, 4, cfg.num_kv_heads, cfg.head_dim)
  kv = tuple(jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in 'kv')
  pmask = jnp.asarray([[1, 1, 1, 1], [0, 1, 1, 1], [1, 0, 1, 0]])

  def run(impl):
    module, _ = with_impl(m, impl)

    def loss(params):
      out = module.apply({'params': params}, ids, attention_mask=mask, prefix_kv=kv,
                         prefix_mask=pmask)
      y = out.logits if out.logits is not None else out.hidden
      return jnp.sum(jnp.where(mask[..., None] == 1, y, 0) ** 2) / y.size, y
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(m.params)

  (l_ref, y_ref), g_ref = run('einsum')
  (l_got, y_got), g_got = run(impl)
  assert zoo.max_diff_at(y_got, y_ref, mask) < tol
  assert abs(float(l_got - l_ref)) < tol
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), g_got, g_ref))
  assert max(diffs) < tol


def test_cache_decoding_agrees_across_impls(flax_model, zoo):
  ids, mask, _ = zoo.left_padded_batch()
  m = flax_model('llama_gqa')
  outs = []
  for impl in ('einsum', 'xla'):
    module, config = with_impl(m, impl)
    v = {'params': m.params}
    out = module.apply(v, ids[:, :4], attention_mask=mask[:, :4],
                       cache=layers.init_cache(config, 3, 9))
    steps, cache = [out.logits], out.cache
    for i in range(4, ids.shape[1]):
      out = module.apply(v, ids[:, i:i + 1], attention_mask=mask[:, i:i + 1], cache=cache)
      steps.append(out.logits)
      cache = out.cache
    outs.append(jnp.concatenate(steps, axis=1))
  assert zoo.max_diff_at(outs[1], outs[0], mask) < TOL


def test_unknown_attention_impl_is_refused():
  with pytest.raises(errors.UnsupportedModelError,
                     match="attention_impl 'sdpa' is not supported; supported: auto, xla, "
                           "cudnn, einsum, flash"):
    llama.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                      num_heads=2, attention_impl='sdpa')


def test_cudnn_is_chosen_only_for_shapes_it_accepts(monkeypatch):
  q = jnp.zeros((1, 4, 2, 16), jnp.bfloat16)
  assert not layers.cudnn_accepts(q, q)               # this CPU
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert layers.cudnn_accepts(q, q)
  assert not layers.cudnn_accepts(q.astype(jnp.float32), q)             # 32-bit
  assert not layers.cudnn_accepts(q[:, :3], q)                          # odd query length
  assert not layers.cudnn_accepts(jnp.zeros((1, 4, 2, 12), jnp.bfloat16), q)   # head_dim % 8
  assert not layers.cudnn_accepts(jnp.zeros((1, 4, 2, 256), jnp.bfloat16), q)  # head_dim > 128
