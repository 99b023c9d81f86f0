"""QuantizedKernel in the model: quantised while loading, dequantised inside Dense (no float
copy), under jit, nn.scan, sharding and orbax."""
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from peftjax import quant, sharding, tree
from peftjax.models import convert, registry

QC = quant.QuantConfig('nf4', block_size=32, double_quant=True)


def _load(zoo, hf_model, scan_layers=False, quantize=QC, shardings=None):
  hf = hf_model('llama_gqa')
  config = registry.config_from_hf(hf.hf_config, scan_layers=scan_layers)
  module = registry.build(config, 'causal_lm')
  params = convert.params_from_hf(config, zoo.tensors_of(hf.dir), quantize=quantize,
                                  shardings=None if shardings is None else shardings(module))
  return module, params, config


def test_loaded_quantised_and_forward_equals_dequantised_base(zoo, hf_model):
  module, params, _ = _load(zoo, hf_model)
  flat = tree.flatten(params)
  quantised = sorted(p for p, v in flat.items() if quant.is_quantized(v))
  assert len(quantised) == 7 * 2 and all('/layers' in p for p in quantised)   # q k v o gate up down
  assert not quant.is_quantized(flat['lm_head/kernel'])
  q = flat[quantised[0]]
  assert q.codes.dtype == np.uint8 and q.absmax.dtype == np.uint8 and q.double_quant
  ids, mask, _ = zoo.left_padded_batch()
  apply = jax.jit(module.apply)
  got = apply({'params': params}, ids, attention_mask=mask).logits
  want = apply({'params': quant.dequantize_params(params)}, ids, attention_mask=mask).logits
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)


def test_quantised_kernel_is_dequantised_inside_the_scanned_layer(zoo, hf_model):
  """No float copy of a stacked kernel enters the layer scan: only uint8 codes do."""
  module, params, config = _load(zoo, hf_model, scan_layers=True)
  ids = np.ones((1, 4), np.int32)
  jaxpr = jax.make_jaxpr(lambda p: module.apply({'params': p}, ids).logits)(params)
  scans = [e for e in jaxpr.eqns if e.primitive.name == 'scan']
  assert scans
  stacked = {(config.num_layers, 32, 64), (config.num_layers, 64, 32),
             (config.num_layers, 32, 32), (config.num_layers, 32, 16)}
  for eqn in scans:
    for v in eqn.invars:
      aval = v.aval
      assert not (jnp.issubdtype(aval.dtype, jnp.floating) and tuple(aval.shape) in stacked), aval


def test_sharded_quantised_base_equals_unsharded(zoo, hf_model):
  mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
  module, params, _ = _load(zoo, hf_model, scan_layers=True, shardings=lambda m: (
      sharding.model_shardings(m, mesh)[1]))
  q = params['model']['layers']['mlp']['up_proj']['kernel']   # logical (layers, embed, mlp)
  assert q.codes.sharding.spec == jax.sharding.PartitionSpec(None, 'tensor', 'fsdp')
  assert q.absmax2.sharding.spec == jax.sharding.PartitionSpec(None, None)
  _, plain, _ = _load(zoo, hf_model, scan_layers=True)
  ids, mask, _ = zoo.left_padded_batch(batch=4, pads=(0, 1, 2, 3))
  got = jax.jit(module.apply)({'params': params}, ids, attention_mask=mask).logits
  want = module.apply({'params': plain}, ids, attention_mask=mask).logits
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_orbax_roundtrip(zoo, hf_model, tmp_path):
  _, params, _ = _load(zoo, hf_model, scan_layers=True)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / 'base', params)
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(tmp_path / 'base', jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                                            params))
  q = restored['model']['layers']['self_attn']['q_proj']['kernel']
  assert isinstance(q, quant.QuantizedKernel) and q.qtype == 'nf4'
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(a, b)


def test_float_hf_export_of_a_quantised_base_is_refused(zoo, hf_model):
  _, params, config = _load(zoo, hf_model)
  with pytest.raises(ValueError, match=r'model/layers_0/mlp/down_proj/kernel is a nf4 kernel; '
                                       r'.*dequantise first'):
    convert.params_to_hf(config, params)


def test_backward_pass_keeps_no_float_kernel_per_layer():
  """The gradient through a scan of quantised Dense layers recomputes each float kernel rather
  than saving all of them (what a plain dequantise-then-dot would do)."""
  from peftjax.models import layers
  n, d = 8, 512
  w = np.random.default_rng(0).standard_normal((n, d, d)).astype(np.float32) * 0.02
  q = quant.quantize_kernel(w, 'nf4', 64)
  dense = layers.Dense(d, use_bias=False)

  def loss(x, q):
    body = lambda h, k: (jnp.tanh(dense.apply({'params': {'kernel': k}}, h)), None)
    return jax.lax.scan(body, x, q)[0].sum()

  compiled = jax.jit(jax.grad(loss)).lower(jnp.ones((4, d)), q).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < w.nbytes / 4   # measured 1.1 of 8 MiB
