"""LoRA / rsLoRA / DoRA / IA3 on a quantised base (QLoRA): the same numbers as on the
dequantised float base, HF PEFT export unchanged (HF PEFT on the HF base agrees), merged export,
and the refusals."""
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

from peftjax import errors, methods, quant, sharding, tree
from peftjax.methods import hf_format
from peftjax.models import auto, convert, registry

QC = quant.QuantConfig('nf4', block_size=32, double_quant=True)
METHODS = {
    'lora': dict(rank=4, alpha=8.0, target='.*/(q_proj|v_proj|down_proj)'),
    'rslora': dict(rank=4, alpha=8.0, target='.*/(q_proj|up_proj)'),
    'dora': dict(rank=4, alpha=8.0, target='.*/(q_proj|v_proj|down_proj)'),
    'ia3': dict(target='.*/(k_proj|v_proj|down_proj)', feedforward='.*/down_proj'),
}


@pytest.fixture(scope='module')
def base(zoo, hf_model):
  """(module, quantised params (scanned), their axes, config, HF checkpoint dir)."""
  hf = hf_model('llama_gqa')
  config = registry.config_from_hf(hf.hf_config, scan_layers=True)
  module = registry.build(config, 'causal_lm')
  params = convert.params_from_hf(config, zoo.tensors_of(hf.dir), quantize=QC)
  axes, _ = sharding.model_shardings(module, sharding.make_mesh(devices=jax.devices()[:1]))
  return module, params, axes, config, hf.dir


def _trained(method, params, axes, seed=1):
  """An adapter as after training: every leaf moved off its init."""
  adapter = nn_unbox(method.init(jax.random.key(0), sharding.boxed(params, axes)))
  leaves, treedef = jax.tree.flatten(adapter)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape)
                                      for x, k in zip(leaves, keys)])


def nn_unbox(x):
  import flax.linen as nn
  return nn.meta.unbox(x)


@pytest.mark.parametrize('name', list(METHODS))
def test_init_on_quantised_base_equals_dequantised_base(base, name):
  """Shapes, axes and DoRA's magnitudes (column norms of the dequantised kernel) as on the
  dequantised base."""
  _, params, axes, _, _ = base
  method = methods.get(name, **METHODS[name])
  init_q = method.init(jax.random.key(0), sharding.boxed(params, axes))
  init_f = method.init(jax.random.key(0), sharding.boxed(quant.dequantize_params(params), axes))
  assert sharding.logical_axes(init_q) == sharding.logical_axes(init_f)
  for a, b in zip(jax.tree.leaves(init_q), jax.tree.leaves(init_f)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('name', ['dora', 'ia3'])
def test_forward_and_gradient_on_quantised_base(base, zoo, name):
  """The 4-bit base computes what its dequantised float copy computes (DoRA reads the kernel,
  IA3 scales a quantised layer's input); every adapter leaf gets a gradient."""
  module, params, axes, _, _ = base
  method = methods.get(name, **METHODS[name])
  adapter = _trained(method, params, axes)
  ids, mask, _ = zoo.left_padded_batch()
  apply = method.apply(module.apply)
  logits = lambda a, p: apply(a, p, ids, attention_mask=mask).logits

  @jax.jit
  def run(a, p, d):
    return logits(a, p), logits(a, d), jax.grad(lambda a: jnp.sum(logits(a, p) ** 2))(a)

  got, want, grads = run(adapter, params, quant.dequantize_params(params))
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=2e-6)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def _hf_with(weights_params, config, directory):
  """The HF torch model holding ``weights_params`` (float), as transformers loads it."""
  auto.save_pretrained(directory, config, weights_params, task='causal_lm')
  return transformers.AutoModelForCausalLM.from_pretrained(directory).eval()


def test_hf_peft_export_and_merged_export(base, zoo, tmp_path, name='dora'):
  """The adapter exports as from a float base; HF PEFT on the HF model holding the dequantised
  weights computes what peftjax computes on the 4-bit base; the merged export is that model."""
  module, params, axes, config, _ = base
  method = methods.get(name, **METHODS[name])
  adapter = _trained(method, params, axes)
  ids, mask, _ = zoo.left_padded_batch()
  ours = np.asarray(method.apply(module.apply)(adapter, params, ids, attention_mask=mask).logits)

  directory = hf_format.save_adapter(tmp_path / 'adapter', method, adapter, config,
                                     base_params=params)
  hf_base = _hf_with(quant.dequantize_params(params), config, tmp_path / 'base')
  peft_model = peft.PeftModel.from_pretrained(hf_base, directory).eval()
  theirs = zoo.torch_logits(peft_model, input_ids=ids, attention_mask=mask)
  assert zoo.max_diff_at(ours, theirs, mask) < 1e-5

  with pytest.raises(ValueError, match=r'cannot merge into the nf4 kernel model/layers/'
                                       r'\S+/kernel in place.*re-quantise'):
    method.merge(adapter, params)
  merged_dir = hf_format.save_merged(tmp_path / 'merged', method, adapter, params, config)
  merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir).eval()
  assert merged.model.layers[0].self_attn.v_proj.weight.dtype == torch.float32
  assert zoo.max_diff_at(ours, zoo.torch_logits(merged, input_ids=ids, attention_mask=mask),
                         mask) < 1e-5


def test_adapter_of_another_base_is_refused_on_a_quantised_base(base, hf_model, zoo, tmp_path):
  module, params, axes, config, _ = base
  other_hf = hf_model('llama3_rope')          # 2 layers too, hidden 64
  other_config = registry.config_from_hf(other_hf.hf_config)
  other = convert.params_from_hf(other_config, zoo.tensors_of(other_hf.dir))
  method = methods.get('lora', rank=2, target='.*/q_proj')
  directory = hf_format.save_adapter(tmp_path / 'other', method,
                                     method.init(jax.random.key(0), other), other_config,
                                     base_params=other)
  with pytest.raises(errors.CheckpointError,
                     match=r'the adapter was trained on another base \(2-layer llama with '
                           r'backbone shapes \w{12}\) than this one \(2-layer llama with backbone '
                           r'shapes \w{12}, nf4-quantised\)'):
    hf_format.load_adapter(directory, params, config)
  # an adapter of the same base (saved from the float, unscanned layout) loads
  own = hf_format.save_adapter(tmp_path / 'own', method, _trained(method, params, axes), config,
                               base_params=params)
  loaded_method, loaded = hf_format.load_adapter(own, params, config)
  assert tree.flatten(loaded).keys() == {'model/layers/self_attn/q_proj/lora_A',
                                         'model/layers/self_attn/q_proj/lora_B'}
