"""GGUF reading: name map, RoPE un-permutation, config; tiny GGUFs written here and real SmolLM2."""
import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')

import gguf
import numpy as np
import pytest
import torch
import transformers

from peftjax import assets
from peftjax.errors import CheckpointError
from peftjax.models.checkpoint import open_checkpoint
from peftjax.models.gguf import hf_name, unpermute_rope


def llama_cpp_permute(w, n_head, n_head_kv):
  """LlamaModel.permute from llama.cpp's convert_hf_to_gguf.py, verbatim but for style."""
  if n_head_kv is not None and n_head != n_head_kv:
    n_head = n_head_kv
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


@pytest.mark.parametrize('heads,shape', [(4, (32, 8)), (2, (16, 8)), (3, (24,))])
def test_unpermute_inverts_llama_cpp_permute(heads, shape):
  w = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  permuted = llama_cpp_permute(w, heads, heads)
  assert not np.array_equal(permuted, w)
  np.testing.assert_array_equal(unpermute_rope(permuted, heads), w)


def test_hf_name_agrees_with_gguf_py_tensor_map():
  tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
  hf = ['model.embed_tokens.weight', 'model.norm.weight', 'lm_head.weight'] + [
      f'model.layers.1.{m}.weight' for m in (
          'self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj', 'self_attn.o_proj',
          'mlp.gate_proj', 'mlp.up_proj', 'mlp.down_proj', 'input_layernorm',
          'post_attention_layernorm')]
  for name in hf:
    assert hf_name(tmap.get_name(name, try_suffixes=('.weight',))) == name
  assert hf_name('blk.0.attn_q.bias') == 'model.layers.0.self_attn.q_proj.bias'
  assert hf_name('rope_freqs.weight') is None


TINY = {
    'llama': (gguf.MODEL_ARCH.LLAMA, lambda tied: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 rope_theta=5e5, rms_norm_eps=1e-5, max_position_embeddings=128,
                                 tie_word_embeddings=tied))),
    'qwen2': (gguf.MODEL_ARCH.QWEN2, lambda tied: transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 rope_theta=5e5, rms_norm_eps=1e-5, max_position_embeddings=128,
                                 tie_word_embeddings=tied))),
}


def write_gguf(path, family, qtype, tied, edit=lambda writer: None):
  """Writes a tiny random HF model as llama.cpp's converter does; returns its state dict."""
  arch, build = TINY[family]
  torch.manual_seed(0)
  model = build(tied)
  with torch.no_grad():                      # biases are zero at init; make them count
    for name, p in model.named_parameters():
      if name.endswith('bias'):
        p.normal_()
  c = model.config
  w = gguf.GGUFWriter(path, family)
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_rope_freq_base(c.rope_parameters['rope_theta'])
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_eos_token_id(2)
  tmap = gguf.get_tensor_name_map(arch, c.num_hidden_layers)
  sd = model.state_dict()
  tensors = {k: v for k, v in sd.items() if not (tied and k == 'lm_head.weight')}
  for name, t in tensors.items():
    x = t.numpy()
    if family == 'llama' and name.endswith(('q_proj.weight', 'k_proj.weight')):
      kv = c.num_key_value_heads if 'k_proj' in name else c.num_attention_heads
      x = llama_cpp_permute(x, c.num_attention_heads, kv)
    gname = tmap.get_name(name, try_suffixes=('.weight', '.bias'))
    if qtype == gguf.GGMLQuantizationType.F32 or x.ndim == 1:
      w.add_tensor(gname, x)
    else:
      w.add_tensor(gname, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
  edit(w)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return c, tensors


@pytest.mark.parametrize('family', sorted(TINY))
@pytest.mark.parametrize('qtype', [gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.Q8_0])
@pytest.mark.parametrize('tied', [False, True])
def test_tiny_gguf_roundtrips_to_hf_tensors_and_config(tmp_path, family, qtype, tied):
  file = tmp_path / 'tiny.gguf'
  hf_config, want = write_gguf(file, family, qtype, tied)
  ckpt = open_checkpoint(file)
  assert ckpt.path == ckpt.tokenizer_source == file
  assert set(ckpt.tensors) == set(want)
  for name, t in want.items():
    x = t.numpy()
    got = ckpt.tensors[name]
    assert got.dtype == np.float32 and got.shape == x.shape == ckpt.tensors.shape(name)
    if qtype == gguf.GGMLQuantizationType.F32:
      np.testing.assert_array_equal(got, x, err_msg=name)
    else:   # Q8_0: 32-value blocks, one fp16 scale: error <= max|block| (1/254 + 1/2048)
      np.testing.assert_allclose(got, x, rtol=0, atol=np.abs(x).max() / 200, err_msg=name)
  expect = hf_config.to_dict()
  expect.setdefault('head_dim', hf_config.hidden_size // hf_config.num_attention_heads)   # qwen2
  for key in ('model_type', 'vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
              'num_attention_heads', 'num_key_value_heads', 'head_dim', 'max_position_embeddings',
              'rope_parameters', 'tie_word_embeddings'):
    assert ckpt.config[key] == expect[key], key
  assert ckpt.config['rms_norm_eps'] == pytest.approx(1e-5)
  assert ckpt.config['rope_theta'] == 5e5 and ckpt.config['eos_token_id'] == 2


@pytest.mark.parametrize('edit,message', [
    (lambda w: w.add_tensor('rope_freqs.weight', np.ones(8, np.float32)),
     "GGUF tensor 'rope_freqs.weight' has no Hugging Face counterpart"),
    (lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.YARN),
     "rope scaling 'yarn' is not supported"),
])
def test_unsupported_gguf_content_is_named(tmp_path, edit, message):
  file = tmp_path / 'x.gguf'
  write_gguf(file, 'llama', gguf.GGMLQuantizationType.F32, True, edit)
  with pytest.raises(CheckpointError, match=f'{file}: {message}'):
    open_checkpoint(file)


def test_unsupported_architecture_is_named(tmp_path):
  file = tmp_path / 'x.gguf'
  w = gguf.GGUFWriter(file, 'mamba')
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(CheckpointError, match=f"{file}: GGUF architecture 'mamba' is not supported"):
    open_checkpoint(file)


def test_not_a_gguf_file_is_named(tmp_path):
  file = tmp_path / 'broken.gguf'
  file.write_bytes(b'GGML' + bytes(64))
  with pytest.raises(CheckpointError, match=f'{file}: not a readable GGUF file'):
    open_checkpoint(file)


@pytest.fixture(scope='module')
def smollm2():
  path = assets.path('smollm2-135m-instruct')
  model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
  return open_checkpoint('smollm2-135m-instruct'), model.config, model.state_dict()


@pytest.mark.slow
def test_smollm2_tensors_equal_transformers_gguf_loader(smollm2):
  ckpt, _, state_dict = smollm2
  tensors = ckpt.tensors
  assert set(state_dict) - set(tensors) == {'lm_head.weight'}      # tied to the embedding
  assert len(tensors) == 30 * 9 + 2    # 9 per layer (7 projections, 2 norms), embedding, norm
  worst = 0.0
  for name in tensors:
    got, want = tensors[name], state_dict[name].numpy()
    assert got.shape == want.shape, name
    worst = max(worst, float(np.abs(got - want).max()))
  assert worst <= 1e-6, worst
  # un-permuting matters: the raw (permuted) rows differ from transformers' q_proj
  q = tensors['model.layers.0.self_attn.q_proj.weight']
  assert np.abs(llama_cpp_permute(q, 9, 9) - q).max() > 0.1


@pytest.mark.slow
def test_smollm2_config_matches_transformers(smollm2):
  ckpt, hf_config, _ = smollm2
  config = ckpt.config
  assert (config['hidden_size'], config['num_hidden_layers'], config['num_attention_heads'],
          config['num_key_value_heads'], config['tie_word_embeddings']) == (576, 30, 9, 3, True)
  expect = hf_config.to_dict()
  for key, value in config.items():
    if key in expect and key != 'architectures':
      assert value == expect[key], key
  assert config['rope_theta'] == expect['rope_parameters']['rope_theta'] == 1e5
