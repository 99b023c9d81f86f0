"""HF <-> Flax conversion: round trips in both layouts, logical axes, configs, and bad inputs."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import transformers

from peftjax import errors
from peftjax.models import auto, convert, registry


@pytest.mark.parametrize('name', ['llama_gqa', 'gpt2'])
@pytest.mark.parametrize('scan', [False, True])
def test_params_round_trip_to_the_same_tensors(name, scan, hf_model, zoo):
  hf = hf_model(name)
  config = registry.config_from_hf(hf.hf_config, scan_layers=scan)
  tensors = zoo.tensors_of(hf.dir)
  back = convert.params_to_hf(config, convert.params_from_hf(config, tensors))
  assert set(back) <= set(tensors.keys())
  for key, value in back.items():
    np.testing.assert_array_equal(value, tensors[key], err_msg=key)


def test_checkpoint_without_base_prefix_loads(hf_model, flax_model):
  hf = hf_model('bert', 'base')          # BertModel saves 'embeddings...', not 'bert.embeddings...'
  keys = safetensors.numpy.load_file(hf.dir / 'model.safetensors').keys()
  assert not any(k.startswith('bert.') for k in keys)
  params = flax_model('bert', 'base').params
  assert params['bert']['encoder']['layer_0']['attention']['self']['query']['kernel'].shape == (
      32, 32)


def test_init_carries_logical_axes_and_unboxes_to_arrays():
  config = registry.config_from_hf(dict(
      model_type='llama', vocab_size=64, hidden_size=32, intermediate_size=64,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2), scan_layers=True)
  module = registry.build(config, 'causal_lm')
  variables = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 2), int))
  layer = variables['params']['model']['layers']
  assert layer['self_attn']['k_proj']['kernel'].names == ('layers', 'embed', 'kv_heads')
  assert layer['mlp']['down_proj']['kernel'].names == ('layers', 'mlp', 'embed')
  assert variables['params']['model']['embed_tokens']['embedding'].names == ('vocab', 'embed')
  spec = nn.get_partition_spec(variables)['params']['lm_head']['kernel']
  assert tuple(spec) == ('embed', 'vocab')
  plain = nn.unbox(variables)
  assert isinstance(plain['params']['lm_head']['kernel'], jax.ShapeDtypeStruct)
  assert plain['params']['model']['layers']['self_attn']['q_proj']['kernel'].shape == (2, 32, 32)


def test_legacy_rope_fields_read_like_rope_parameters_and_round_trip():
  common = dict(model_type='llama', vocab_size=64, hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4)
  scaling = {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
             'high_freq_factor': 4.0, 'original_max_position_embeddings': 16}
  old = registry.config_from_hf({**common, 'rope_theta': 5e5, 'rope_scaling': scaling})
  new = registry.config_from_hf({**common, 'rope_parameters': {**scaling, 'rope_theta': 5e5}})
  assert old == new and old.rope_type == 'llama3' and old.rope_theta == 5e5
  hf = transformers.LlamaConfig(**{k: v for k, v in old.to_hf().items() if k != 'model_type'})
  assert registry.config_from_hf(hf.to_dict()) == old


def test_unsupported_model_type_names_it_and_lists_supported():
  with pytest.raises(errors.UnsupportedModelError, match=r"'t5'.*bert, gpt2, llama"):
    registry.config_from_hf({'model_type': 't5'})


def test_unsupported_rope_scaling_names_it():
  with pytest.raises(errors.UnsupportedModelError, match=r"'yarn'.*default, linear, llama3"):
    registry.config_from_hf(dict(
        model_type='llama', vocab_size=64, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, rope_theta=1e4,
        rope_scaling={'rope_type': 'yarn', 'factor': 4.0}))


def broken_checkpoint(hf, tmp_path, edit):
  tensors = dict(safetensors.numpy.load_file(hf.dir / 'model.safetensors'))
  edit(tensors)
  safetensors.numpy.save_file(tensors, tmp_path / 'model.safetensors', metadata={'format': 'pt'})
  return tmp_path / 'model.safetensors'


def test_missing_tensor_names_file_and_tensor(hf_model, zoo, tmp_path):
  hf = hf_model('llama_gqa')
  path = broken_checkpoint(hf, tmp_path, lambda t: t.pop('model.layers.1.mlp.up_proj.weight'))
  config = registry.config_from_hf(hf.hf_config, scan_layers=True)
  with pytest.raises(errors.CheckpointError,
                     match=rf'{path}: tensor model\.layers\.1\.mlp\.up_proj\.weight is missing'):
    convert.params_from_hf(config, zoo.tensors_of(tmp_path))


def test_wrong_shape_names_file_tensor_and_shapes(hf_model, zoo, tmp_path):
  hf = hf_model('gpt2')

  def shrink(t):
    t['transformer.h.0.attn.c_attn.weight'] = t['transformer.h.0.attn.c_attn.weight'][:, :64]
  path = broken_checkpoint(hf, tmp_path, shrink)
  config = registry.config_from_hf(hf.hf_config)
  with pytest.raises(errors.CheckpointError,
                     match=rf'{path}: tensor transformer\.h\.0\.attn\.c_attn\.weight has shape '
                           r'\(32, 64\), expected \(32, 96\)'):
    convert.params_from_hf(config, zoo.tensors_of(tmp_path))


def test_load_pretrained_from_a_directory(hf_model, flax_model, zoo):
  ids, mask, _ = zoo.left_padded_batch()
  pre = auto.load_pretrained(hf_model('qwen2').dir, scan_layers=True)
  want = flax_model('qwen2')
  assert pre.config.scan_layers and pre.task == 'causal_lm'
  got = pre.module.apply({'params': pre.params}, ids, attention_mask=mask).logits
  ref = want.apply({'params': want.params}, ids, attention_mask=mask).logits
  assert zoo.max_diff_at(got, ref, mask) < 2e-6   # measured 4.8e-7
