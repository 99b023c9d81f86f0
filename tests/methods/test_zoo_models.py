"""Weight-space methods on the model zoo's tiny Llama, unscanned and scan_layers=True."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from peftjax import methods, tree

from peftjax.models import llama, registry


def _tiny(scan):
  config = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                             num_heads=4, num_kv_heads=2, scan_layers=scan)
  model = registry.build(config, 'causal_lm')
  ids = jax.random.randint(jax.random.key(0), (2, 7), 0, 64)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), ids)['params'])
  return model, ids, params


@pytest.mark.parametrize('scan', [False, True], ids=['unscanned', 'scanned'])
@pytest.mark.parametrize('method', [
    methods.get('lora', rank=4, model_type='llama'),
    methods.get('dora', rank=4, target='all-linear'),
    methods.get('ia3', model_type='llama'),
], ids=['lora', 'dora', 'ia3'])
def test_identity_at_init_and_merged_equals_unmerged(method, scan):
  model, ids, params = _tiny(scan)
  apply = jax.jit(lambda p, i: model.apply({'params': p}, i).logits)
  base = apply(params, ids)
  adapter = method.init(jax.random.key(2), params)
  adapted = jax.jit(lambda a, p, i: method.apply(model.apply)(a, p, i).logits)
  np.testing.assert_allclose(adapted(adapter, params, ids), base, atol=5e-7, rtol=0)  # measured 9e-8

  rng = np.random.default_rng(3)
  tuned = jax.tree.map(lambda l: l + 0.1 * rng.normal(size=l.shape).astype(np.float32), adapter)
  y = adapted(tuned, params, ids)
  assert np.abs(y - base).max() > 1e-3
  np.testing.assert_allclose(apply(method.merge(tuned, params), ids), y, atol=5e-7,
                             rtol=0)   # measured 1.2e-7


def test_lora_paths_follow_hf_names():
  _, _, params = _tiny(scan=False)
  adapter = methods.get('lora', rank=4, model_type='llama').init(jax.random.key(0), params)
  assert 'model/layers_1/self_attn/q_proj/lora_A' in tree.flatten(adapter)
  _, _, params = _tiny(scan=True)
  adapter = methods.get('lora', rank=4, model_type='llama').init(jax.random.key(0), params)
  assert adapter['model']['layers']['self_attn']['v_proj']['lora_B'].shape == (2, 4, 16)


def test_boxed_params_are_accepted():
  model, ids, params = _tiny(scan=True)
  boxed = jax.jit(model.init)(jax.random.key(1), ids)['params']
  method = methods.get('dora', rank=4, model_type='llama')
  adapter = method.init(jax.random.key(2), boxed)
  assert jax.tree.map(np.shape, nn.meta.unbox(adapter)) == jax.tree.map(
      np.shape, method.init(jax.random.key(2), params))
  adapted = jax.jit(lambda a, p: method.apply(model.apply)(a, p, ids).logits)
  np.testing.assert_allclose(adapted(adapter, boxed), adapted(adapter, params), atol=1e-6,
                             rtol=0)   # measured 0.0
  merged = method.merge(adapter, boxed)
  np.testing.assert_allclose(merged['model']['layers']['self_attn']['q_proj']['kernel'],
                             params['model']['layers']['self_attn']['q_proj']['kernel'], atol=1e-6,
                             rtol=0)   # measured 0.0
