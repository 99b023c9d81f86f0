"""open_checkpoint on tiny random transformers models saved offline, and its error messages."""
import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')

import json
import pathlib

import huggingface_hub
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

from peftjax.errors import CheckpointError
from peftjax.models.checkpoint import open_checkpoint

TINY = {
    'llama': lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2)),
    'gpt2': lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    'bert': lambda: transformers.BertModel(transformers.BertConfig(
        vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=64)),
}


def save(tmp_path, family='llama', dtype=torch.float32, **kwargs):
  torch.manual_seed(0)
  model = TINY[family]().to(dtype)
  model.save_pretrained(tmp_path, **kwargs)
  return model.state_dict()


def assert_matches_state_dict(ckpt, state_dict):
  assert set(ckpt.tensors) <= set(state_dict)
  assert set(state_dict) - set(ckpt.tensors) <= {'lm_head.weight'}   # tied, not saved
  for name in ckpt.tensors:
    want = state_dict[name]
    got = ckpt.tensors[name]
    assert ckpt.tensors.shape(name) == tuple(want.shape) == got.shape, name
    if want.dtype == torch.bfloat16:
      assert got.dtype == ml_dtypes.bfloat16
      want, got = want.float(), got.astype(np.float32)
    np.testing.assert_array_equal(got, want.numpy(), err_msg=name)


@pytest.mark.parametrize('family', sorted(TINY))
def test_single_file_equals_state_dict(tmp_path, family):
  sd = save(tmp_path, family)
  ckpt = open_checkpoint(tmp_path)
  assert ckpt.config == json.loads((tmp_path / 'config.json').read_text())
  assert ckpt.path == ckpt.tokenizer_source == tmp_path
  assert all(ckpt.tensors.file_of(k) == tmp_path / 'model.safetensors' for k in ckpt.tensors)
  assert_matches_state_dict(ckpt, sd)


def test_bfloat16_kept_as_ml_dtypes_bfloat16(tmp_path):
  sd = save(tmp_path, dtype=torch.bfloat16)
  assert_matches_state_dict(open_checkpoint(tmp_path), sd)


def test_sharded_equals_state_dict(tmp_path):
  sd = save(tmp_path, max_shard_size='40KB')
  shards = {p.name for p in tmp_path.glob('model-*.safetensors')}
  assert len(shards) > 2 and (tmp_path / 'model.safetensors.index.json').exists()
  ckpt = open_checkpoint(str(tmp_path))
  assert {ckpt.tensors.file_of(k).name for k in ckpt.tensors} == shards
  assert_matches_state_dict(ckpt, sd)


def test_missing_tensor_names_file_tensor_and_nearest(tmp_path):
  save(tmp_path)
  tensors = open_checkpoint(tmp_path).tensors
  assert 'model.layers.0.self_attn.q_proj.kernel' not in tensors
  with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\."
                     r"self_attn\.q_proj\.kernel' not found .*nearest: model\.layers\.0\."
                     r"self_attn\.q_proj\.weight"):
    tensors['model.layers.0.self_attn.q_proj.kernel']
  with pytest.raises(CheckpointError, match='lm_head.bias'):
    tensors.shape('lm_head.bias')


def test_directory_without_config(tmp_path):
  (tmp_path / 'model.safetensors').write_bytes(b'')
  with pytest.raises(CheckpointError, match=f'{tmp_path}: no config.json'):
    open_checkpoint(tmp_path)


def test_config_not_json_names_file_and_line(tmp_path):
  save(tmp_path)
  (tmp_path / 'config.json').write_text('{\n  "model_type": "llama",\n  hidden_size: 64\n}\n')
  with pytest.raises(CheckpointError, match=r'config\.json: line 3 column 3'):
    open_checkpoint(tmp_path)


@pytest.mark.parametrize('corrupt', [
    lambda b: b[:len(b) // 2],                       # truncated data
    lambda b: b[:5],                                 # truncated length prefix
    lambda b: b[:8] + b'\xff' * 40 + b[48:],         # garbage header
])
def test_corrupt_safetensors_names_file(tmp_path, corrupt):
  save(tmp_path)
  file = tmp_path / 'model.safetensors'
  file.write_bytes(corrupt(file.read_bytes()))
  with pytest.raises(CheckpointError, match=f'{file}: .*(truncated|corrupt)'):
    open_checkpoint(tmp_path)


def test_index_pointing_to_missing_shard(tmp_path):
  save(tmp_path, max_shard_size='40KB')
  shard = sorted(tmp_path.glob('model-*.safetensors'))[1]
  shard.unlink()
  with pytest.raises(CheckpointError,
                     match=rf'model\.safetensors\.index\.json: shard {shard.name} .* is missing'):
    open_checkpoint(tmp_path)


def test_pytorch_bin_only_is_a_clear_error(tmp_path):
  save(tmp_path)
  (tmp_path / 'model.safetensors').rename(tmp_path / 'pytorch_model.bin')
  with pytest.raises(CheckpointError, match='only pytorch_model.bin weights.*save_pretrained'):
    open_checkpoint(tmp_path)


@pytest.mark.parametrize('source', ['/no/such/model', 'smollm3-135m', './missing.gguf'])
def test_unknown_source_lists_aliases_and_install_command(source):
  with pytest.raises(CheckpointError, match=rf'{source}: no such file.*all-minilm-l6-v2, .*'
                     r'smollm2-135m-instruct.*python -m peftjax\.assets install'):
    open_checkpoint(source)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
  monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
  monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'hub'))
  return tmp_path / 'hub'


def test_hub_id_offline_not_cached_names_id(offline_cache):
  with pytest.raises(CheckpointError, match="hub id 'peftjax-test/not-cached'.*HF_HUB_OFFLINE"):
    open_checkpoint('peftjax-test/not-cached')


def test_hub_id_offline_resolves_from_cache(offline_cache):
  commit = '0123456789abcdef0123456789abcdef01234567'
  repo = offline_cache / 'models--peftjax-test--tiny-llama'
  (repo / 'refs').mkdir(parents=True)
  (repo / 'refs' / 'main').write_text(commit)
  sd = save(repo / 'snapshots' / commit)
  ckpt = open_checkpoint('peftjax-test/tiny-llama')
  assert ckpt.path == pathlib.Path(repo / 'snapshots' / commit).resolve()
  assert_matches_state_dict(ckpt, sd)
