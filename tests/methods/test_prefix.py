"""Prefix tuning (with and without the projection) and P-tuning v2 == HF PEFT (float32, tiny
random llama / gpt2 / bert): logits in both directions through the HF PEFT format, the unfolded
projection, trainable counts, greedy generation, and bad inputs."""
import copy
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

from peftjax import generate, methods
from peftjax.methods import hf_prompt, prefix

TOL = 5e-6   # float32; measured agreement ~1e-6
P = 4


def hf_logits(kit, model, ids, mask):
  """HF PEFT's prefix-tuning forward. For BERT, whose forward in this transformers takes the
  cache as ``cache`` (HF PEFT looks for ``past_key_values`` and refuses), HF PEFT's own prefix
  cache (``get_prompt``) and extended mask are given to the wrapped transformers model."""
  if 'Bert' not in type(model.base_model).__name__:
    return kit.torch_logits(model, ids, mask)
  with torch.no_grad():
    return model.base_model(
        input_ids=torch.as_tensor(ids).long(),
        attention_mask=torch.as_tensor(np.concatenate([np.ones((3, P), np.int32), mask], 1)),
        cache=model.get_prompt(batch_size=3)).logits.numpy()


def ours(method, m, adapter, ids, mask):
  return method.apply(m.module.apply)(adapter, m.params, ids, attention_mask=mask).logits


def transform_name(k: str):
  """HF PEFT's PrefixEncoder ``transform.{i}.weight|bias`` -> (peftjax path, transpose)."""
  _, i, leaf = k.split('.')
  return f'transform_{i}/' + ('kernel' if leaf == 'weight' else 'bias'), leaf == 'weight'


@pytest.mark.parametrize('projection', [False, True])
def test_prefix_tuning_equals_hf_peft_both_ways(prompt_case, projection, prompt_kit, hf_model,
                                                flax_model, zoo, tmp_path):
  """HF PEFT's training-mode forward == ours on its encoder (unfolded); its saved (folded)
  adapter loads here with the same logits; our export loads in HF PEFT with ours."""
  name, task, task_type = prompt_case
  kit = prompt_kit
  m = flax_model(name, task)
  ids, mask = zoo.right_padded_batch(pad_id=m.config.pad_token_id)
  torch.manual_seed(0)
  hf = peft.get_peft_model(copy.deepcopy(hf_model(name, task).torch_model),
                           peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=P,
                                                   prefix_projection=projection,
                                                   encoder_hidden_size=24)).eval()
  want = hf_logits(kit, hf, ids, mask)
  method = kit.with_head(methods.get('prefix', num_virtual_tokens=P, projection=projection,
                                     encoder_hidden_size=24, **prefix.model_dims(m.config)),
                         m, task)
  fresh = method.init(jax.random.key(0), m.params)
  adapter = {**fresh, prefix.ENCODER: kit.hf_encoder(hf, transform_name)}
  assert kit.shapes(adapter) == kit.shapes(fresh)
  assert kit.compare(ours(method, m, adapter, ids, mask), want, mask, task) < TOL
  hf.save_pretrained(tmp_path / 'hf')
  plain, folded = hf_prompt.load_adapter(tmp_path / 'hf', m.params, m.config, task)
  assert kit.compare(ours(plain, m, folded, ids, mask), want, mask, task) < TOL
  assert kit.compare(ours(plain, m, prefix.fold(adapter), ids, mask), want, mask, task) < TOL

  adapter = method.init(jax.random.key(1), m.params)   # ours -> HF
  hf_prompt.save_adapter(tmp_path / 'ours', method, adapter, m.config, task=task)
  back = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model(name, task).torch_model),
                                        tmp_path / 'ours').eval()
  assert back.peft_config['default'].peft_type == peft.PeftType.PREFIX_TUNING
  assert kit.compare(ours(method, m, adapter, ids, mask), hf_logits(kit, back, ids, mask), mask,
                     task) < TOL


@pytest.mark.parametrize('scan', [False, True])
def test_ptuning_v2_is_prefix_without_projection(scan, flax_model, zoo, tmp_path):
  m = flax_model('llama_gqa', scan_layers=scan)
  ids, mask = zoo.right_padded_batch()
  v2 = methods.get('ptuning_v2', num_virtual_tokens=P, **prefix.model_dims(m.config))
  assert methods.from_spec(v2.spec).spec == v2.spec
  adapter = v2.init(jax.random.key(0), m.params)
  plain = methods.get('prefix', num_virtual_tokens=P, **prefix.model_dims(m.config))
  np.testing.assert_array_equal(ours(v2, m, adapter, ids, mask),
                                ours(plain, m, adapter, ids, mask))
  hf_prompt.save_adapter(tmp_path, v2, adapter, m.config)
  assert json.loads((tmp_path / 'adapter_config.json').read_text())['prefix_projection'] is False


@pytest.mark.parametrize('name', ['llama_gqa', 'gpt2', 'bert'])
@pytest.mark.parametrize('projection', [False, True])
def test_trainable_counts_equal_hf_peft(name, projection, hf_model, flax_model):
  task = 'base' if name == 'bert' else 'causal_lm'
  m = flax_model(name, task)
  hf = peft.get_peft_model(copy.deepcopy(hf_model(name, task).torch_model),
                           peft.PrefixTuningConfig(
                               task_type='FEATURE_EXTRACTION' if name == 'bert' else 'CAUSAL_LM',
                               num_virtual_tokens=P, prefix_projection=projection))
  adapter = methods.get('prefix', num_virtual_tokens=P, projection=projection,
                        **prefix.model_dims(m.config)).init(jax.random.key(0), m.params)
  assert sum(a.size for a in jax.tree.leaves(adapter)) == hf.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize('name,scan', [('llama_gqa', True), ('gpt2', False)])
def test_greedy_generation_with_a_prefix_equals_argmax_of_full_forwards(name, scan,
                                                                          flax_model, zoo):
  m = flax_model(name, scan_layers=scan)
  ids, mask, _ = zoo.left_padded_batch()
  method = methods.get('prefix', num_virtual_tokens=P, projection=True,
                       **prefix.model_dims(m.config))
  adapter = method.init(jax.random.key(0), m.params)
  apply = method.apply(m.module.apply)
  out = generate.sampler(apply, m.config, max_new_tokens=4, eos_token_id=-1,
                         extra_cache_slots=P)(adapter, m.params, ids, mask)
  seq, seq_mask = ids, mask
  for step in range(4):
    logits = apply(adapter, m.params, seq, attention_mask=seq_mask).logits[:, -1]
    token = jnp.argmax(logits, -1).astype(jnp.int32)
    np.testing.assert_array_equal(out.tokens[:, step], token)
    seq = jnp.concatenate([seq, token[:, None]], 1)
    seq_mask = np.concatenate([seq_mask, np.ones((3, 1), np.int32)], 1)


def test_logical_axes_and_plain_params(flax_model):
  m = flax_model('llama_gqa')
  boxed = m.module.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params']
  method = methods.get('prefix', num_virtual_tokens=P, projection=True,
                       **prefix.model_dims(m.config))
  adapter = method.init(jax.random.key(1), boxed)
  assert adapter['prefix_encoder']['embedding'].names == (None, None)
  assert adapter['prefix_encoder']['transform_2']['bias'].names == (None,)
  plain = method.init(jax.random.key(1), m.params)
  assert not any(isinstance(x, nn.Partitioned) for x in jax.tree.leaves(
      plain, is_leaf=lambda x: isinstance(x, nn.Partitioned)))


# ----------------------------------------------------------------------------- bad inputs

def test_bad_prefix_inputs_are_named(flax_model, zoo, tmp_path):
  m = flax_model('gpt2')
  dims = prefix.model_dims(m.config)
  for n in (0, -1):
    for name in ('prefix', 'ptuning_v2'):
      with pytest.raises(ValueError, match=f'num_virtual_tokens must be a positive int, got {n}'):
        methods.get(name, num_virtual_tokens=n, **dims)
  with pytest.raises(ValueError, match='prefix tuning num_kv_heads must be a positive int, got 0'):
    methods.get('prefix', **{**dims, 'num_kv_heads': 0})
  ids, _ = zoo.right_padded_batch()
  method = methods.get('prefix', num_virtual_tokens=60, **dims)
  with pytest.raises(ValueError, match=r'prefix tokens \(60\) plus sequence length \(7\) = 67 '
                                       r"exceeds the model's 64 positions"):
    method.apply(m.module.apply)(method.init(jax.random.key(0), m.params), m.params, ids)
  # a model without the attention hook
  dense = nn.Dense(4)
  params = dense.init(jax.random.key(0), jnp.ones((1, 4)))['params']
  method = methods.get('prefix', num_virtual_tokens=2, num_layers=1, num_kv_heads=1, head_dim=4)
  with pytest.raises(ValueError, match=r"prefix tokens: the model does not take \['prefix_kv'\]"):
    method.apply(dense.apply)(method.init(jax.random.key(0), params), params, jnp.ones((1, 4)))
  # an HF PEFT prefix whose layer count does not fit the base
  method = methods.get('prefix', num_virtual_tokens=P, **dims)
  hf_prompt.save_adapter(tmp_path, method, method.init(jax.random.key(0), m.params), m.config)
  cfg = json.loads((tmp_path / 'adapter_config.json').read_text())
  (tmp_path / 'adapter_config.json').write_text(json.dumps({**cfg, 'num_layers': 3}))
  with pytest.raises(ValueError, match="num_layers 3 does not match the base model's 2 layers"):
    hf_prompt.load_adapter(tmp_path, m.params, m.config)
  other = flax_model('llama_gqa')   # kv_dim 16, not GPT-2's 32
  (tmp_path / 'adapter_config.json').write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=r'prompt_embeddings of shape \(4, 128\); the base model '
                                       r'needs \(4, 64\) \(num_virtual_tokens, 2 layers x 2 x '
                                       r'kv_dim 16\)'):
    hf_prompt.load_adapter(tmp_path, other.params, other.config)
  cfg['peft_type'] = 'LORA'
  (tmp_path / 'adapter_config.json').write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="peft_type 'LORA' is not a prompt-learning type"):
    hf_prompt.load_adapter(tmp_path, m.params, m.config)
  # HF PEFT's SEQ_CLS adapters must hold the head
  with pytest.raises(ValueError, match=r"SEQ_CLS adapters hold the trained head \['score'\]"):
    hf_prompt.save_adapter(tmp_path / 'cls', method, method.init(jax.random.key(0), m.params),
                           m.config, task='classification')
