"""Weight-space methods on the model zoo's tiny Llama, unscanned and scan_layers=True."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import methods, tree

llama = pytest.importorskip('peftjax.models.llama')
registry = pytest.importorskip('peftjax.models.registry')


def _tiny(scan):
  config = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                             num_heads=4, num_kv_heads=2, scan_layers=scan)
  model = registry.build(config, 'causal_lm')
  ids = jax.random.randint(jax.random.key(0), (2, 7), 0, 64)
  params = nn.meta.unbox(model.init(jax.random.key(1), ids)['params'])
  return model, ids, params


@pytest.mark.parametrize('scan', [False, True], ids=['unscanned', 'scanned'])
@pytest.mark.parametrize('method', [
    methods.get('lora', rank=4, model_type='llama'),
    methods.get('dora', rank=4, target='all-linear'),
    methods.get('ia3', model_type='llama'),
], ids=['lora', 'dora', 'ia3'])
def test_identity_at_init_and_merged_equals_unmerged(method, scan):
  model, ids, params = _tiny(scan)
  logits = lambda out: out.logits
  base = logits(model.apply({'params': params}, ids))
  adapter = method.init(jax.random.key(2), params)
  adapted = jax.jit(lambda a, p, i: logits(method.apply(model.apply)(a, p, i)))
  np.testing.assert_allclose(adapted(adapter, params, ids), base, atol=1e-5)

  leaves, treedef = jax.tree.flatten(adapter)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  tuned = treedef.unflatten([l + 0.1 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])
  y = adapted(tuned, params, ids)
  assert np.abs(y - base).max() > 1e-3
  merged = method.merge(tuned, params)
  np.testing.assert_allclose(logits(model.apply({'params': merged}, ids)), y, atol=1e-5)


def test_lora_paths_follow_hf_names():
  _, _, params = _tiny(scan=False)
  adapter = methods.get('lora', rank=4, model_type='llama').init(jax.random.key(0), params)
  assert 'model/layers_1/self_attn/q_proj/lora_A' in tree.flatten(adapter)
  _, _, params = _tiny(scan=True)
  adapter = methods.get('lora', rank=4, model_type='llama').init(jax.random.key(0), params)
  assert adapter['model']['layers']['self_attn']['v_proj']['lora_B'].shape == (2, 4, 16)
