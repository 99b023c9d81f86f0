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


# ---- sharded loading: every tensor straight into its shards (convert.params_from_hf) ----

MESHES = {'fsdp8': dict(data=1, fsdp=8, tensor=1), 'd2f2t2': dict(data=2, fsdp=2, tensor=2)}


class RecordingSource:
  """A checkpoint's tensors that records every ``read(name, index)`` and refuses whole-tensor
  ``[name]`` access, so a test sees exactly what the loader asked for."""

  def __init__(self, tensors):
    self.inner, self.origin, self.reads = tensors, tensors.origin, []

  def keys(self):
    return self.inner.keys()

  def shape(self, name):
    return self.inner.shape(name)

  def file_of(self, name):
    return self.inner.file_of(name)

  def read(self, name, index):
    out = self.inner.read(name, index)
    self.reads.append((name, out.size))
    return out

  def __getitem__(self, name):
    raise AssertionError(f'whole tensor {name} read')


def _load_both(config, tensors, task, mesh):
  from peftjax import sharding
  from peftjax.models import convert, registry
  _, shardings = sharding.model_shardings(registry.build(config, task), mesh)
  sharded = convert.params_from_hf(config, tensors, config.param_dtype, task, shardings=shardings)
  return sharded, shardings


def _assert_equal_and_placed(sharded, unsharded, shardings):
  import jax
  from flax import traverse_util
  flat = traverse_util.flatten_dict(sharded)
  want = traverse_util.flatten_dict(unsharded)
  assert set(flat) == set(want)
  for path, arr in flat.items():
    s = traverse_util.flatten_dict(shardings)[path]
    assert arr.sharding == s and arr.dtype == want[path].dtype, path
    assert all(shard.data.shape == s.shard_shape(arr.shape) for shard in arr.addressable_shards)
    np.testing.assert_array_equal(np.asarray(arr), np.asarray(want[path]), err_msg=str(path))
  return flat


@pytest.mark.parametrize('mesh_name', sorted(MESHES))
@pytest.mark.parametrize('scan', [False, True])
@pytest.mark.parametrize('name', ['llama_gqa', 'gpt2'])
def test_sharded_load_equals_unsharded_and_reads_only_shards(hf_model, name, scan, mesh_name):
  """Bit-exact against the unsharded load; each array has its sharding; every read of a
  sharded param's tensor is one shard (never the whole tensor), each distinct shard read once."""
  import math
  from flax import traverse_util
  from peftjax import sharding
  from peftjax.models import convert, registry
  hf = hf_model(name)
  config = registry.config_from_hf(hf.hf_config, scan_layers=scan)
  mesh = sharding.make_mesh(**MESHES[mesh_name])
  tensors = RecordingSource(open_checkpoint(hf.dir).tensors)
  sharded, shardings = _load_both(config, tensors, 'causal_lm', mesh)
  unsharded = convert.params_from_hf(config, open_checkpoint(hf.dir).tensors)
  flat = _assert_equal_and_placed(sharded, unsharded, shardings)

  split = 0
  for path, arr in flat.items():
    s = traverse_util.flatten_dict(shardings)[path]
    layers = config.num_layers if convert.is_scanned(config, path) else 1
    names = {convert.hf_name(config, path, i if layers > 1 else None)[0] for i in range(layers)}
    reads = [(n, size) for n, size in tensors.reads if n in names]
    shard_size = math.prod(s.shard_shape(arr.shape)) // layers
    distinct = len({tuple((i.start, i.stop) for i in idx)
                    for idx in s.addressable_devices_indices_map(arr.shape).values()})
    assert reads and all(size == shard_size for _, size in reads), (path, reads, shard_size)
    assert len(reads) == distinct * layers, (path, len(reads), distinct)
    split += shard_size * layers < arr.size
  assert split >= 5, split          # the attention and MLP kernels (at least) really are split


def test_sharded_bfloat16_load_equals_unsharded(tmp_path):
  import jax.numpy as jnp
  from peftjax import sharding
  from peftjax.models import auto, registry
  save(tmp_path, dtype=torch.bfloat16)
  mesh = sharding.make_mesh(**MESHES['d2f2t2'])
  place = lambda module: sharding.model_shardings(module, mesh)[1]
  sharded = auto.load_pretrained(tmp_path, dtype=jnp.bfloat16, scan_layers=True, shardings=place)
  unsharded = auto.load_pretrained(tmp_path, dtype=jnp.bfloat16, scan_layers=True)
  _assert_equal_and_placed(sharded.params, unsharded.params,
                           place(registry.build(sharded.config, 'causal_lm')))


def test_sharded_load_initialises_missing_heads_like_unsharded(hf_model):
  """A base BERT loaded for classification: the fresh classifier/pooler draw the same numbers."""
  from peftjax import sharding
  from peftjax.models import auto
  hf = hf_model('bert', 'base')
  mesh = sharding.make_mesh(**MESHES['fsdp8'])
  place = lambda module: sharding.model_shardings(module, mesh)[1]
  sharded = auto.load_pretrained(hf.dir, task='classification', num_labels=2, shardings=place)
  unsharded = auto.load_pretrained(hf.dir, task='classification', num_labels=2)
  assert 'classifier' in sharded.params
  _assert_equal_and_placed(sharded.params, unsharded.params, place(sharded.module))


def test_sharded_gguf_dequantises_each_tensor_once(monkeypatch):
  """GGUF cannot read a slice: each tensor is dequantised once and sliced for every shard."""
  from peftjax.models import gguf as gguf_lib, registry
  from peftjax import sharding
  from peftjax.models import convert
  ckpt = open_checkpoint('smollm2-135m-instruct')
  config = registry.config_from_hf(ckpt.config)
  unsharded = convert.params_from_hf(config, ckpt.tensors)
  loads = []
  real = gguf_lib.GGUFSource._load
  monkeypatch.setattr(gguf_lib.GGUFSource, '_load',
                      lambda self, name: loads.append(name) or real(self, name))
  sharded, shardings = _load_both(config, ckpt.tensors, 'causal_lm',
                                  sharding.make_mesh(**MESHES['fsdp8']))
  _assert_equal_and_placed(sharded, unsharded, shardings)
  assert sorted(loads) == sorted(ckpt.tensors)     # 272 tensors, each dequantised once


def test_shardings_for_other_params_name_the_path(hf_model):
  from peftjax import sharding
  from peftjax.models import convert, registry
  hf = hf_model('llama_gqa')
  config = registry.config_from_hf(hf.hf_config)
  mesh = sharding.make_mesh(**MESHES['fsdp8'])
  _, shardings = sharding.model_shardings(registry.build(config, 'causal_lm'), mesh)
  del shardings['lm_head']
  with pytest.raises(ValueError, match='shardings do not match the params of llama/causal_lm: '
                                       'lm_head/kernel in only one of them'):
    convert.params_from_hf(config, open_checkpoint(hf.dir).tensors, shardings=shardings)


def test_read_slice_equals_slice_of_tensor(tmp_path):
  sd = save(tmp_path, dtype=torch.bfloat16)
  tensors = open_checkpoint(tmp_path).tensors
  name = 'model.layers.1.mlp.down_proj.weight'
  got = tensors.read(name, np.s_[8:40, 16:48])
  assert got.shape == (32, 32) and got.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(got.astype(np.float32), sd[name].float().numpy()[8:40, 16:48])
  with pytest.raises(CheckpointError, match="tensor 'model.norm.kernel' not found"):
    tensors.read('model.norm.kernel', np.s_[:])
