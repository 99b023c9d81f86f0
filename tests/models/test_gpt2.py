"""GPT-2 == transformers: Conv1D layout, fused c_attn, tied head, cache, scan, classifier."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from peftjax.models import auto, layers, registry

# float32 logits vs transformers: measured max |diff| 7.7e-7.
TOL = 3e-6


@pytest.mark.parametrize('scan', [False, True])
def test_lm_matches_transformers_with_left_padding(scan, hf_model, flax_model, zoo):
  ids, mask, pos = zoo.left_padded_batch()
  m = flax_model('gpt2', scan_layers=scan)
  got = m.apply({'params': m.params}, ids, attention_mask=mask).logits
  want = zoo.torch_logits(hf_model('gpt2').torch_model, input_ids=ids, attention_mask=mask,
                          position_ids=pos)
  assert zoo.max_diff_at(got, want, mask) < TOL


def test_kv_cache_decoding_equals_full_forward(flax_model, zoo):
  ids, mask, _ = zoo.left_padded_batch()
  m = flax_model('gpt2')
  v = {'params': m.params}
  full = m.apply(v, ids, attention_mask=mask).logits
  out = m.apply(v, ids[:, :5], attention_mask=mask[:, :5], cache=layers.init_cache(m.config, 3, 8))
  steps, cache = [out.logits], out.cache
  for i in range(5, ids.shape[1]):
    out = m.apply(v, ids[:, i:i + 1], attention_mask=mask[:, i:i + 1], cache=cache)
    steps.append(out.logits)
    cache = out.cache
  assert zoo.max_diff_at(jnp.concatenate(steps, axis=1), full, mask) < 3e-6   # measured 7.2e-7


def test_classification_matches_transformers(hf_model, flax_model, zoo):
  ids, mask, pos = zoo.left_padded_batch()
  m = flax_model('gpt2', 'classification')
  got = m.apply({'params': m.params}, ids, attention_mask=mask).logits
  want = zoo.torch_logits(hf_model('gpt2', 'classification').torch_model, input_ids=ids,
                          attention_mask=mask, position_ids=pos)
  assert abs(got - want).max() < TOL


def test_save_pretrained_loads_in_transformers(flax_model, zoo, tmp_path):
  ids, mask, pos = zoo.left_padded_batch()
  m = flax_model('gpt2', scan_layers=True)
  auto.save_pretrained(tmp_path, m.config, m.params)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
  got = m.apply({'params': m.params}, ids, attention_mask=mask).logits
  want = zoo.torch_logits(reloaded.eval(), input_ids=ids, attention_mask=mask, position_ids=pos)
  assert zoo.max_diff_at(got, want, mask) < TOL


def test_dropout_with_scan_and_remat_trains(hf_model, flax_model, zoo):
  ids, mask, _ = zoo.left_padded_batch()
  ref = flax_model('gpt2', scan_layers=True)
  config = registry.config_from_hf(hf_model('gpt2').hf_config, scan_layers=True, remat=True)
  module = registry.build(config, 'causal_lm')

  @functools.partial(jax.jit, static_argnums=(0, 3))
  def loss_and_grad(module, params, key, deterministic):
    def loss(p):
      out = module.apply({'params': p}, ids, attention_mask=mask, rngs={'dropout': key},
                         deterministic=deterministic)
      return (out.logits * mask[..., None]).sum()
    return jax.value_and_grad(loss)(params)

  k1, k2 = jax.random.split(jax.random.key(0))
  (l1, grads), (l2, _) = (loss_and_grad(module, ref.params, k1, False),
                          loss_and_grad(module, ref.params, k2, False))
  assert abs(l1 - l2) > 1e-2 * abs(l1)      # the dropout masks act
  # remat recomputes the forward with the same masks: loss and gradients of the model without it
  want_loss, want_grads = loss_and_grad(ref.module, ref.params, k1, False)
  np.testing.assert_allclose(l1, want_loss, rtol=1e-6)                 # measured: equal
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-6, rtol=0), grads, want_grads)
  plain = ref.apply({'params': ref.params}, ids, attention_mask=mask).logits
  # deterministic=True is the plain forward: measured equal to the bit
  np.testing.assert_allclose(loss_and_grad(module, ref.params, k1, True)[0],
                             (plain * mask[..., None]).sum(), rtol=1e-6)
