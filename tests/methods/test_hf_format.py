"""HF PEFT adapter format: peftjax -> PeftModel.from_pretrained, HF PEFT save_pretrained ->
load_adapter, and merged export -> plain transformers, all with equal logits."""
import json
import pathlib

import jax
import numpy as np
import pytest
import safetensors.numpy
import transformers

from peftjax import errors, methods, tree
from peftjax.methods import hf_format

peft = pytest.importorskip('peft')
torch = pytest.importorskip('torch')

ATOL = 1e-4
RANK, ALPHA = 4, 8
FAMILIES = {'llama': ('llama_gqa', 'causal_lm'), 'gpt2': ('gpt2', 'causal_lm'),
            'bert': ('bert', 'classification')}
METHODS = ('lora', 'rslora', 'dora', 'ia3')
TASK_TYPES = {'causal_lm': 'CAUSAL_LM', 'classification': 'SEQ_CLS'}
IDS = np.random.default_rng(0).integers(2, 97, (2, 7)).astype(np.int32)
MASK = np.ones_like(IDS)


def _peft_config(method, task):
  if method == 'ia3':
    return peft.IA3Config(task_type=TASK_TYPES[task])
  return peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules='all-linear',
                         use_rslora=method == 'rslora', use_dora=method == 'dora',
                         task_type=TASK_TYPES[task])


def _peftjax_method(method, model_type):
  if method == 'ia3':
    return methods.get('ia3', model_type=model_type)
  return methods.get(method, rank=RANK, alpha=ALPHA)   # all-linear, as HF PEFT's above


def _fresh_torch(hf, task):
  auto = {'causal_lm': transformers.AutoModelForCausalLM,
          'classification': transformers.AutoModelForSequenceClassification}[task]
  return auto.from_pretrained(hf.dir).eval()


def _torch_logits(model):
  with torch.no_grad():
    return model(input_ids=torch.as_tensor(IDS).long(),
                 attention_mask=torch.as_tensor(MASK).long()).logits.numpy()


def _jax_logits(method, adapter, fm):
  return np.asarray(method.apply(fm.module.apply)(
      adapter, fm.params, IDS, attention_mask=MASK).logits)


def _max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


@pytest.fixture(scope='session')
def hf_adapter(hf_model, tmp_path_factory):
  """``hf_adapter(method, family)`` -> (dir saved by HF PEFT with random weights, its logits)."""
  cache = {}

  def make(method, family):
    if (method, family) not in cache:
      name, task = FAMILIES[family]
      model = peft.get_peft_model(_fresh_torch(hf_model(name, task), task),
                                  _peft_config(method, task))
      gen = torch.Generator().manual_seed(0)
      with torch.no_grad():
        for p in model.parameters():
          if p.requires_grad:
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
      directory = tmp_path_factory.mktemp(f'hf_{method}_{family}')
      model.save_pretrained(directory)
      cache[method, family] = directory, _torch_logits(model)
    return cache[method, family]

  return make


@pytest.mark.parametrize('family', FAMILIES)
@pytest.mark.parametrize('method', METHODS)
def test_export_loads_in_hf_peft_and_merged_in_transformers(method, family, hf_model, flax_model,
                                                            tmp_path):
  name, task = FAMILIES[family]
  fm = flax_model(name, task)
  peft_method = _peftjax_method(method, fm.config.model_type)
  if task == 'classification':   # a trained head, saved as HF PEFT's modules_to_save
    peft_method = methods.compose(
        peft_method, hf_format.modules_to_save(['classifier/kernel', 'classifier/bias']))
  adapter = peft_method.init(jax.random.key(0), fm.params)
  adapter = jax.tree.map(lambda x, k: x + 0.1 * jax.random.normal(k, x.shape), adapter,
                         tree.unflatten(dict(zip(tree.flatten(adapter), jax.random.split(
                             jax.random.key(1), len(tree.flatten(adapter)))))))
  want = _jax_logits(peft_method, adapter, fm)

  hf_format.save_adapter(tmp_path / 'adapter', adapter, fm.config, alpha=ALPHA,
                         rslora=method == 'rslora')
  hf = hf_model(name, task)
  loaded = peft.PeftModel.from_pretrained(_fresh_torch(hf, task), tmp_path / 'adapter').eval()
  assert _max_diff(_torch_logits(loaded), want) < ATOL

  hf_format.save_merged(tmp_path / 'merged', peft_method, adapter, fm.params, fm.config)
  assert _max_diff(_torch_logits(_fresh_torch(hf._replace(dir=tmp_path / 'merged'), task)),
                   want) < ATOL


@pytest.mark.parametrize('family', FAMILIES)
@pytest.mark.parametrize('method', METHODS)
def test_hf_peft_adapter_loads_in_peftjax(method, family, hf_adapter, flax_model):
  directory, want = hf_adapter(method, family)
  fm = flax_model(*FAMILIES[family])
  peft_method, adapter = hf_format.load_adapter(directory, fm.params, fm.config)
  assert _max_diff(_jax_logits(peft_method, adapter, fm), want) < ATOL


def test_scanned_layout_round_trip(hf_adapter, flax_model, tmp_path):
  directory, want = hf_adapter('dora', 'llama')
  fm = flax_model('llama_gqa', 'causal_lm', scan_layers=True)
  peft_method, adapter = hf_format.load_adapter(directory, fm.params, fm.config)
  assert adapter['model']['layers']['self_attn']['q_proj']['lora_A'].shape == (2, 32, RANK)
  assert _max_diff(_jax_logits(peft_method, adapter, fm), want) < ATOL
  hf_format.save_adapter(tmp_path, adapter, fm.config, alpha=ALPHA)
  ours = safetensors.numpy.load_file(str(tmp_path / hf_format.WEIGHTS_FILE))
  theirs = safetensors.numpy.load_file(str(directory / hf_format.WEIGHTS_FILE))
  assert sorted(ours) == sorted(theirs)
  assert max(_max_diff(ours[k], theirs[k]) for k in ours) == 0.0


def test_adapter_config_names_gpt2_modules(flax_model, tmp_path):
  fm = flax_model('gpt2', 'causal_lm')
  adapter = methods.get('ia3', model_type='gpt2').init(jax.random.key(0), fm.params)
  hf_format.save_adapter(tmp_path, adapter, fm.config)
  config = json.loads((tmp_path / hf_format.CONFIG_FILE).read_text())
  assert (config['peft_type'], config['task_type'], config['fan_in_fan_out']) == (
      'IA3', 'CAUSAL_LM', True)
  assert config['target_modules'] == ['c_attn', 'mlp.c_proj']
  assert config['feedforward_modules'] == ['mlp.c_proj']


def _edited_copy(directory, tmp_path, edit):
  """A copy of the adapter dir whose tensors pass through ``edit(dict)``."""
  tensors = edit(safetensors.numpy.load_file(str(directory / hf_format.WEIGHTS_FILE)))
  (tmp_path / hf_format.CONFIG_FILE).write_text((directory / hf_format.CONFIG_FILE).read_text())
  safetensors.numpy.save_file(tensors, str(tmp_path / hf_format.WEIGHTS_FILE))
  return tmp_path


Q_A = 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'


def test_shape_mismatch_names_tensor_and_shapes(hf_adapter, flax_model, tmp_path):
  fm = flax_model('llama_gqa', 'causal_lm')
  bad = _edited_copy(hf_adapter('lora', 'llama')[0], tmp_path,
                     lambda t: {**t, Q_A: np.zeros((RANK, 31), np.float32)})
  with pytest.raises(errors.CheckpointError,
                     match=rf'tensor {Q_A} has shape \(4, 31\), expected \(4, 32\)'):
    hf_format.load_adapter(bad, fm.params, fm.config)


def test_unknown_module_is_named(hf_adapter, flax_model, tmp_path):
  fm = flax_model('llama_gqa', 'causal_lm')
  bad = _edited_copy(hf_adapter('lora', 'llama')[0], tmp_path,
                     lambda t: {**t, Q_A.replace('q_proj', 'qq_proj'): t[Q_A]})
  with pytest.raises(errors.CheckpointError, match='module model.layers.0.self_attn.qq_proj'):
    hf_format.load_adapter(bad, fm.params, fm.config)


def test_unsupported_peft_type(flax_model, tmp_path):
  fm = flax_model('llama_gqa', 'causal_lm')
  (tmp_path / hf_format.CONFIG_FILE).write_text(json.dumps({'peft_type': 'LOHA'}))
  with pytest.raises(errors.CheckpointError, match="unsupported peft_type 'LOHA'"):
    hf_format.load_adapter(tmp_path, fm.params, fm.config)


def test_missing_adapter_config_names_directory(flax_model, tmp_path):
  fm = flax_model('llama_gqa', 'causal_lm')
  with pytest.raises(errors.CheckpointError, match=f'{tmp_path}: no adapter_config.json'):
    hf_format.load_adapter(tmp_path, fm.params, fm.config)
