"""HF PEFT adapter format, both ways, with equal logits: peftjax -> save_adapter ->
PeftModel.from_pretrained, HF PEFT save_pretrained -> load_adapter, and merged export -> plain
transformers. Every HF load is strict: a tensor HF PEFT does not load, or one it misses, fails."""
import json
import warnings

import jax
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
import transformers

from peftjax import errors, methods, tree
from peftjax.methods import hf_format

ATOL = 1e-5   # float32; measured agreement is about 1e-7 (docs/methods.md)
RANK, ALPHA = 4, 8
FAMILIES = {'llama': ('llama_gqa', 'causal_lm'), 'gpt2': ('gpt2', 'causal_lm'),
            'bert': ('bert', 'classification')}
METHODS = ('lora', 'rslora', 'dora', 'ia3')
AUTO = {'causal_lm': transformers.AutoModelForCausalLM, 'base': transformers.AutoModel,
        'classification': transformers.AutoModelForSequenceClassification}
TASK_TYPES = {'causal_lm': 'CAUSAL_LM', 'classification': 'SEQ_CLS', 'base': 'FEATURE_EXTRACTION'}
IDS = np.random.default_rng(0).integers(2, 97, (2, 7)).astype(np.int32)
MASK = np.ones_like(IDS)


def _fresh_torch(hf, task):
  return AUTO[task].from_pretrained(hf.dir).eval()


def _torch_out(model, task):
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(IDS).long(), attention_mask=torch.as_tensor(MASK).long())
  return (out.last_hidden_state if task == 'base' else out.logits).numpy()


def _jax_out(method, adapter, fm, task):
  out = method.apply(fm.module.apply)(adapter, fm.params, IDS, attention_mask=MASK)
  return np.asarray(out.hidden if task == 'base' else out.logits)


def _max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def _hf_load(model, directory):
  """``PeftModel.from_pretrained`` that fails where HF PEFT misses an adapter tensor (its
  warning) or ignores one of the file's (HF's own state dict must equal the file)."""
  with warnings.catch_warnings():
    warnings.filterwarnings('error', message='.*missing adapter keys')
    loaded = peft.PeftModel.from_pretrained(model, directory).eval()
  ours = safetensors.numpy.load_file(str(directory / hf_format.WEIGHTS_FILE))
  theirs = peft.get_peft_model_state_dict(loaded, save_embedding_layers=False)
  assert sorted(ours) == sorted(theirs)
  for key, value in theirs.items():
    np.testing.assert_array_equal(ours[key], value.numpy(), err_msg=key)
  return loaded


def _perturbed(method, fm, seed=1):
  """``method.init`` on ``fm.params`` plus N(0, 0.1) noise on every leaf."""
  adapter = tree.flatten(method.init(jax.random.key(0), fm.params))
  keys = jax.random.split(jax.random.key(seed), len(adapter))
  return tree.unflatten({p: v + 0.1 * jax.random.normal(k, v.shape)
                         for (p, v), k in zip(adapter.items(), keys)})


def _export_parity(method, name, task, hf_model, flax_model, directory):
  """Saves a perturbed adapter of ``method``; max |logits| difference between peftjax and
  HF PEFT's load of it, and the written ``adapter_config.json``."""
  fm = flax_model(name, task)
  adapter = _perturbed(method, fm)
  hf_format.save_adapter(directory, method, adapter, fm.config, task=task)
  loaded = _hf_load(_fresh_torch(hf_model(name, task), task), directory)
  diff = _max_diff(_torch_out(loaded, task), _jax_out(method, adapter, fm, task))
  return diff, hf_format.read_config(directory)


@pytest.fixture(scope='session')
def hf_saved(hf_model, tmp_path_factory):
  """``hf_saved(name, task, config)`` -> (dir HF PEFT saved with N(0, 0.1)-perturbed trainable
  weights, that PeftModel's logits)."""
  def make(name, task, config):
    model = peft.get_peft_model(_fresh_torch(hf_model(name, task), task), config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
      for p in model.parameters():
        if p.requires_grad:
          p.add_(0.1 * torch.randn(p.shape, generator=gen))
    directory = tmp_path_factory.mktemp(f'hf_{name}')
    model.save_pretrained(directory)
    return directory, _torch_out(model.eval(), task)

  return make


def _import_parity(hf_saved, flax_model, name, task, config):
  directory, want = hf_saved(name, task, config)
  fm = flax_model(name, task)
  method, adapter = hf_format.load_adapter(directory, fm.params, fm.config)
  return _max_diff(_jax_out(method, adapter, fm, task), want), method


def _hf_config(method, task, **kw):
  if method == 'ia3':
    return peft.IA3Config(task_type=TASK_TYPES[task], **kw)
  return peft.LoraConfig(r=RANK, lora_alpha=ALPHA, use_rslora=method == 'rslora',
                         use_dora=method == 'dora', task_type=TASK_TYPES[task],
                         **{'target_modules': 'all-linear', **kw})


# --- the methods on each family ------------------------------------------------------------------


@pytest.mark.parametrize('family', FAMILIES)
@pytest.mark.parametrize('method', METHODS)
def test_export_loads_in_hf_peft_and_merged_in_transformers(method, family, hf_model, flax_model,
                                                            tmp_path):
  name, task = FAMILIES[family]
  fm = flax_model(name, task)
  if method == 'ia3':
    peft_method = methods.get('ia3', model_type=fm.config.model_type)
  else:
    peft_method = methods.get(method, rank=RANK, alpha=ALPHA)   # all-linear, as HF PEFT's
  if task == 'classification':   # a trained head, saved as HF PEFT's modules_to_save
    peft_method = methods.compose(
        peft_method, methods.modules_to_save(['classifier/kernel', 'classifier/bias']))
  diff, config = _export_parity(peft_method, name, task, hf_model, flax_model,
                                tmp_path / 'adapter')
  assert diff < ATOL
  if method != 'ia3':   # everything comes from the method's spec: nothing passed again
    assert (config['lora_alpha'], config['use_rslora'], config['use_dora']) == (
        ALPHA, method == 'rslora', method == 'dora')

  adapter = _perturbed(peft_method, fm)
  hf_format.save_merged(tmp_path / 'merged', peft_method, adapter, fm.params, fm.config)
  merged = _fresh_torch(hf_model(name, task)._replace(dir=tmp_path / 'merged'), task)
  assert _max_diff(_torch_out(merged, task), _jax_out(peft_method, adapter, fm, task)) < ATOL


@pytest.mark.parametrize('family', FAMILIES)
@pytest.mark.parametrize('method', METHODS)
def test_hf_peft_adapter_loads_in_peftjax(method, family, hf_saved, flax_model):
  name, task = FAMILIES[family]
  diff, loaded = _import_parity(hf_saved, flax_model, name, task, _hf_config(method, task))
  assert diff < ATOL
  core = loaded.spec.asdict()
  core = core['methods'][0] if core['name'] == 'compose' else core   # + the classifier
  assert core['name'] == ('ia3' if method == 'ia3' else 'lora')
  if method != 'ia3':
    assert (core['rslora'], core['dora']) == (method == 'rslora', method == 'dora')


def test_loaded_spec_rebuilds_the_method(hf_saved, flax_model):
  directory, want = hf_saved('llama_gqa', 'causal_lm', _hf_config('rslora', 'causal_lm'))
  fm = flax_model('llama_gqa', 'causal_lm')
  loaded, adapter = hf_format.load_adapter(directory, fm.params, fm.config)
  rebuilt = methods.from_spec(loaded.spec.asdict())
  assert _max_diff(_jax_out(rebuilt, adapter, fm, 'causal_lm'), want) < ATOL


def test_scanned_layout_round_trip(hf_saved, flax_model, tmp_path):
  directory, want = hf_saved('llama_gqa', 'causal_lm', _hf_config('dora', 'causal_lm'))
  fm = flax_model('llama_gqa', 'causal_lm', scan_layers=True)
  peft_method, adapter = hf_format.load_adapter(directory, fm.params, fm.config)
  assert adapter['model']['layers']['self_attn']['q_proj']['lora_A'].shape == (2, 32, RANK)
  assert _max_diff(_jax_out(peft_method, adapter, fm, 'causal_lm'), want) < ATOL
  hf_format.save_adapter(tmp_path, peft_method, adapter, fm.config)
  ours = safetensors.numpy.load_file(str(tmp_path / hf_format.WEIGHTS_FILE))
  theirs = safetensors.numpy.load_file(str(directory / hf_format.WEIGHTS_FILE))
  assert sorted(ours) == sorted(theirs)
  assert max(_max_diff(ours[k], theirs[k]) for k in ours) == 0.0


def test_adapter_config_names_gpt2_modules(flax_model, tmp_path):
  fm = flax_model('gpt2', 'causal_lm')
  method = methods.get('ia3', model_type='gpt2')
  hf_format.save_adapter(tmp_path, method, method.init(jax.random.key(0), fm.params), fm.config)
  config = json.loads((tmp_path / hf_format.CONFIG_FILE).read_text())
  assert (config['peft_type'], config['task_type'], config['fan_in_fan_out']) == (
      'IA3', 'CAUSAL_LM', True)
  assert config['target_modules'] == ['c_attn', 'mlp.c_proj']
  assert config['feedforward_modules'] == ['mlp.c_proj']


# --- tied embeddings in modules_to_save ----------------------------------------------------------

TIED = {'llama': ('llama_tied', 'model/embed_tokens/embedding', 'embed_tokens', 'q_proj'),
        'gpt2': ('gpt2', 'transformer/wte/embedding', 'wte', 'c_attn')}
# HF PEFT's ensure_weight_tying ties only an embedding named embed_tokens (GPT-2's wte stays
# untied there, with a warning); a peftjax head tied to GPT-2's copy exports lm_head's copy.
HF_TIES = {'llama': True, 'gpt2': False}


@pytest.mark.parametrize('tie', [False, True], ids=['head_keeps_original', 'ensure_weight_tying'])
@pytest.mark.parametrize('family', TIED)
def test_saved_tied_embedding_exports(family, tie, hf_model, flax_model, tmp_path):
  name, path, _, proj = TIED[family]
  method = methods.compose(methods.lora(rank=RANK, alpha=ALPHA, target=f'.*/{proj}'),
                           methods.modules_to_save([path], ensure_weight_tying=tie))
  diff, config = _export_parity(method, name, 'causal_lm', hf_model, flax_model, tmp_path)
  assert diff < ATOL
  assert config['ensure_weight_tying'] == (tie and HF_TIES[family])
  assert config['modules_to_save'] == sorted([path.rsplit('/', 1)[0].replace('/', '.')] + (
      ['lm_head'] if tie and not HF_TIES[family] else []))


@pytest.mark.parametrize('tie', [False, True], ids=['head_keeps_original', 'ensure_weight_tying'])
@pytest.mark.parametrize('family', TIED)
def test_hf_saved_tied_embedding_loads(family, tie, hf_saved, flax_model):
  name, path, module, proj = TIED[family]
  config = _hf_config('lora', 'causal_lm', target_modules=[proj], modules_to_save=[module],
                      ensure_weight_tying=tie)
  diff, loaded = _import_parity(hf_saved, flax_model, name, 'causal_lm', config)
  assert diff < ATOL
  assert loaded.spec.hparams['methods'][1] == {
      'name': 'modules_to_save', 'paths': [path], 'ensure_weight_tying': tie and HF_TIES[family]}


def test_hf_tied_embedding_without_task_type_loads(hf_saved, flax_model):
  """A LoraConfig without task_type (HF's plain PeftModel) still ties the causal LM's head."""
  config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=['q_proj'],
                           modules_to_save=['embed_tokens'], ensure_weight_tying=True)
  diff, loaded = _import_parity(hf_saved, flax_model, 'llama_tied', 'causal_lm', config)
  assert diff < ATOL
  assert loaded.spec.hparams['methods'][1]['ensure_weight_tying']


def test_tied_copy_round_trips_where_hf_does_not_tie(flax_model, tmp_path):
  """GPT-2's head tied to the saved copy goes out as lm_head's copy and comes back tied; a head
  copy that differs from the embedding's cannot be held by a tied model."""
  fm = flax_model('gpt2', 'causal_lm')
  method = methods.compose(methods.lora(rank=RANK, alpha=ALPHA, target='.*/c_attn'),
                           methods.modules_to_save(['transformer/wte/embedding'],
                                                     ensure_weight_tying=True))
  adapter = _perturbed(method, fm)
  hf_format.save_adapter(tmp_path / 'a', method, adapter, fm.config)
  loaded, again = hf_format.load_adapter(tmp_path / 'a', fm.params, fm.config)
  assert loaded.spec.hparams['methods'][1]['ensure_weight_tying']
  assert _max_diff(_jax_out(loaded, again, fm, 'causal_lm'),
                   _jax_out(method, adapter, fm, 'causal_lm')) == 0.0
  key = 'base_model.model.lm_head.weight'
  bad = _edited_copy(tmp_path / 'a', tmp_path, lambda t: {**t, key: t[key] + 1.0})
  with pytest.raises(errors.CheckpointError, match=rf'tensor {key} differs from the saved copy '
                     'of transformer/wte/embedding'):
    hf_format.load_adapter(bad, fm.params, fm.config)


def test_saved_embedding_feeds_only_the_input_lookup(flax_model):
  """Without ensure_weight_tying the tied head reads the original embedding (HF PEFT's
  ModulesToSaveWrapper), so the copy cannot be merged; with it, the copy is the embedding."""
  fm = flax_model('llama_tied', 'causal_lm')
  path = 'model/embed_tokens/embedding'
  untied, tied = (methods.modules_to_save([path], ensure_weight_tying=t) for t in (False, True))
  original = fm.params['model']['embed_tokens']['embedding']
  copy = original + 0.1 * jax.random.normal(jax.random.key(0), original.shape)
  a = _jax_out(untied, {'model': {'embed_tokens': {'input_embedding': copy}}}, fm, 'causal_lm')
  b = _jax_out(tied, {'model': {'embed_tokens': {'embedding': copy}}}, fm, 'causal_lm')
  hidden = np.asarray(fm.module.apply({'params': fm.params}, IDS, attention_mask=MASK,
                                      inputs_embeds=np.asarray(copy)[IDS]).hidden)
  want_a = hidden @ np.asarray(original).T
  assert _max_diff(a, want_a) < ATOL and _max_diff(b, hidden @ np.asarray(copy).T) < ATOL
  assert untied.merge is None and tied.merge is not None


# --- a bare encoder (no head): HF names without the base-model prefix ----------------------------


@pytest.mark.parametrize('method', ['lora', 'ia3'])
def test_bare_bert_exports_without_prefix(method, hf_model, flax_model, tmp_path):
  peft_method = (methods.get('ia3', model_type='bert') if method == 'ia3'
                 else methods.get('lora', rank=RANK, alpha=ALPHA, model_type='bert'))
  diff, config = _export_parity(peft_method, 'bert', 'base', hf_model, flax_model, tmp_path)
  assert diff < ATOL
  keys = safetensors.numpy.load_file(str(tmp_path / hf_format.WEIGHTS_FILE))
  assert all(k.startswith('base_model.model.encoder.') for k in keys)
  assert config['task_type'] == 'FEATURE_EXTRACTION'


def test_hf_bare_bert_adapter_loads(hf_saved, flax_model):
  diff, _ = _import_parity(hf_saved, flax_model, 'bert', 'base',
                           _hf_config('lora', 'base', target_modules=['query', 'value']))
  assert diff < ATOL


# --- rank_pattern / alpha_pattern ----------------------------------------------------------------


def test_rank_and_alpha_patterns_export(hf_model, flax_model, tmp_path):
  method = methods.lora(rank=RANK, alpha=ALPHA, target='all-linear',
                        rank_pattern={'model/layers_0/self_attn/q_proj': 2, '.*/v_proj': 3},
                        alpha_pattern={'.*/o_proj': 32, '.*/v_proj': 2})
  diff, config = _export_parity(method, 'llama_gqa', 'causal_lm', hf_model, flax_model, tmp_path)
  assert diff < ATOL
  assert config['rank_pattern'] == {r'model\.layers\.0\.self_attn\.q_proj': 2,
                                    r'model\.layers\.0\.self_attn\.v_proj': 3,
                                    r'model\.layers\.1\.self_attn\.v_proj': 3}
  assert config['alpha_pattern'] == {r'model\.layers\.0\.self_attn\.o_proj': 32,
                                     r'model\.layers\.0\.self_attn\.v_proj': 2,
                                     r'model\.layers\.1\.self_attn\.o_proj': 32,
                                     r'model\.layers\.1\.self_attn\.v_proj': 2}


def test_hf_rank_and_alpha_patterns_load(hf_saved, flax_model):
  config = _hf_config('lora', 'causal_lm', rank_pattern={'q_proj': 2, 'layers.1.mlp.down_proj': 3},
                      alpha_pattern={'v_proj': 32})
  diff, loaded = _import_parity(hf_saved, flax_model, 'llama_gqa', 'causal_lm', config)
  assert diff < ATOL
  h = loaded.spec.hparams
  assert h['rank_pattern'] == {'model/layers_0/self_attn/q_proj': 2,
                               'model/layers_1/mlp/down_proj': 3,
                               'model/layers_1/self_attn/q_proj': 2}
  assert h['alpha_pattern'] == {'model/layers_0/self_attn/v_proj': 32,
                                'model/layers_1/self_attn/v_proj': 32}


def test_per_layer_ranks_need_unscanned_layers(hf_saved, flax_model):
  directory, _ = hf_saved('llama_gqa', 'causal_lm', _hf_config(
      'lora', 'causal_lm', rank_pattern={'layers.1.self_attn.q_proj': 2}))
  fm = flax_model('llama_gqa', 'causal_lm', scan_layers=True)
  with pytest.raises(errors.CheckpointError,
                     match='other layers of the scanned module model/layers/self_attn/q_proj'):
    hf_format.load_adapter(directory, fm.params, fm.config)


# --- LoRA on embeddings and on lm_head -----------------------------------------------------------

LORA_TARGETS = {  # case -> (zoo model, peftjax target regex, HF target_modules)
    'embed_untied': ('llama_gqa', '.*/(q_proj|embed_tokens)', ['q_proj', 'embed_tokens']),
    'embed_tied': ('llama_tied', '.*/(q_proj|embed_tokens)', ['q_proj', 'embed_tokens']),
    'gpt2_wte': ('gpt2', '.*/(c_attn|wte)', ['c_attn', 'wte']),
    'lm_head': ('llama_gqa', '.*/q_proj|lm_head', ['q_proj', 'lm_head']),
}


@pytest.mark.parametrize('case', LORA_TARGETS)
def test_lora_on_embeddings_and_head_exports(case, hf_model, flax_model, tmp_path):
  name, target, _ = LORA_TARGETS[case]
  method = methods.lora(rank=RANK, alpha=ALPHA, target=target)
  diff, _ = _export_parity(method, name, 'causal_lm', hf_model, flax_model, tmp_path)
  assert diff < ATOL


@pytest.mark.parametrize('case', LORA_TARGETS)
def test_hf_lora_on_embeddings_and_head_loads(case, hf_saved, flax_model):
  name, _, hf_targets = LORA_TARGETS[case]
  diff, _ = _import_parity(hf_saved, flax_model, name, 'causal_lm',
                           _hf_config('lora', 'causal_lm', target_modules=hf_targets))
  assert diff < ATOL


def test_lora_on_a_tied_lm_head_is_refused(hf_saved, flax_model):
  directory, _ = hf_saved('llama_tied', 'causal_lm',
                          _hf_config('lora', 'causal_lm', target_modules=['q_proj', 'lm_head']))
  fm = flax_model('llama_tied', 'causal_lm')
  with pytest.raises(errors.CheckpointError, match=r'lm_head\.(base_layer|lora_A|lora_B)\.weight: '
                     'this model ties lm_head to its input embedding'):
    hf_format.load_adapter(directory, fm.params, fm.config)


def test_tied_lora_embedding_with_ensure_weight_tying_is_refused(hf_saved, flax_model):
  directory, _ = hf_saved('llama_tied', 'causal_lm', _hf_config(
      'lora', 'causal_lm', target_modules=['q_proj', 'embed_tokens'], ensure_weight_tying=True))
  fm = flax_model('llama_tied', 'causal_lm')
  with pytest.raises(errors.CheckpointError, match='ensure_weight_tying=True with LoRA on the '
                     'tied embedding is not supported'):
    hf_format.load_adapter(directory, fm.params, fm.config)


def test_saved_base_embedding_must_match_the_base(hf_saved, flax_model, tmp_path):
  directory, _ = hf_saved('llama_gqa', 'causal_lm', _hf_config(
      'lora', 'causal_lm', target_modules=['q_proj', 'embed_tokens']))
  key = 'base_model.model.model.embed_tokens.base_layer.weight'
  bad = _edited_copy(directory, tmp_path, lambda t: {**t, key: t[key] + 1.0})
  fm = flax_model('llama_gqa', 'causal_lm')
  with pytest.raises(errors.CheckpointError, match=rf"{key} \(the base weight .*\) differs from "
                     "the base model's model/embed_tokens/embedding"):
    hf_format.load_adapter(bad, fm.params, fm.config)


# --- biases --------------------------------------------------------------------------------------

BIAS = {  # HF bias -> (zoo model, peftjax method, HF LoRA targets)
    'all': ('gpt2', lambda: methods.compose(
        methods.lora(rank=RANK, alpha=ALPHA, target='.*/c_attn'),
        methods.bitfit(include_norm=True)), ['c_attn']),
    'lora_only': ('llama_tied', lambda: methods.compose(
        methods.lora(rank=RANK, alpha=ALPHA, target='.*/(q_proj|up_proj)'),
        methods.bitfit(target='.*/(q_proj|up_proj)')), ['q_proj', 'up_proj']),
}


@pytest.mark.parametrize('bias', BIAS)
def test_trained_biases_export(bias, hf_model, flax_model, tmp_path):
  name, method, _ = BIAS[bias]
  diff, config = _export_parity(method(), name, 'causal_lm', hf_model, flax_model, tmp_path)
  assert diff < ATOL
  assert config['bias'] == bias


@pytest.mark.parametrize('bias', BIAS)
def test_hf_trained_biases_load(bias, hf_saved, flax_model):
  name, _, hf_targets = BIAS[bias]
  diff, _ = _import_parity(hf_saved, flax_model, name, 'causal_lm',
                           _hf_config('lora', 'causal_lm', target_modules=hf_targets, bias=bias))
  assert diff < ATOL


def test_biases_hf_cannot_name_are_refused(flax_model, tmp_path):
  fm = flax_model('llama_tied', 'causal_lm')
  method = methods.compose(methods.lora(rank=RANK, target='.*/q_proj'),
                           methods.bitfit(target='.*/k_proj'))
  with pytest.raises(ValueError, match=r"not those of \['model.layers.0.self_attn.k_proj'"):
    hf_format.save_adapter(tmp_path, method, method.init(jax.random.key(0), fm.params), fm.config)


# --- refusals ------------------------------------------------------------------------------------


def _edited_copy(directory, tmp_path, edit=lambda t: t, config_edit=lambda c: c):
  """A copy of the adapter dir whose tensors pass through ``edit`` and config ``config_edit``."""
  tensors = edit(safetensors.numpy.load_file(str(directory / hf_format.WEIGHTS_FILE)))
  config = config_edit(json.loads((directory / hf_format.CONFIG_FILE).read_text()))
  (tmp_path / hf_format.CONFIG_FILE).write_text(json.dumps(config))
  safetensors.numpy.save_file(tensors, str(tmp_path / hf_format.WEIGHTS_FILE))
  return tmp_path


Q_A = 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'


@pytest.mark.parametrize('option,value', [('lora_bias', True), ('layer_replication', [[0, 2]]),
                                          ('use_qalora', True), ('bias', 'ia3_only')])
def test_unsupported_options_are_named(option, value, hf_saved, flax_model, tmp_path):
  directory, _ = hf_saved('llama_gqa', 'causal_lm', _hf_config('lora', 'causal_lm'))
  bad = _edited_copy(directory, tmp_path, config_edit=lambda c: {**c, option: value})
  fm = flax_model('llama_gqa', 'causal_lm')
  with pytest.raises(errors.CheckpointError, match=rf'{option}={value!r} is not supported'
                     .replace('[', r'\[')):
    hf_format.load_adapter(bad, fm.params, fm.config)


def test_hf_lora_bias_adapter_is_refused(hf_saved, flax_model):
  directory, _ = hf_saved('llama_tied', 'causal_lm', _hf_config(
      'lora', 'causal_lm', target_modules=['q_proj'], lora_bias=True))
  fm = flax_model('llama_tied', 'causal_lm')
  with pytest.raises(errors.CheckpointError, match='lora_bias=True is not supported'):
    hf_format.load_adapter(directory, fm.params, fm.config)


def test_methods_hf_cannot_hold_are_refused(flax_model, tmp_path):
  fm = flax_model('llama_gqa', 'causal_lm')
  method = methods.compose(methods.lora(rank=RANK, target='.*/q_proj'),
                           methods.get('houlsby', model_type='llama'))
  with pytest.raises(ValueError, match=r"got methods \['lora', '"):
    hf_format.save_adapter(tmp_path, method, method.init(jax.random.key(0), fm.params), fm.config)
  plain = methods.lora(rank=RANK, target='.*/q_proj')._replace(spec=None)
  with pytest.raises(ValueError, match='needs a method with a spec'):
    hf_format.save_adapter(tmp_path, plain, plain.init(jax.random.key(0), fm.params), fm.config)


def test_modules_to_save_names_missing_paths(flax_model):
  fm = flax_model('llama_gqa', 'causal_lm')
  with pytest.raises(ValueError, match=r"no base params at \['score/kernel'\]"):
    methods.modules_to_save(['score/kernel']).init(jax.random.key(0), fm.params)


def test_shape_mismatch_names_tensor_and_shapes(hf_saved, flax_model, tmp_path):
  fm = flax_model('llama_gqa', 'causal_lm')
  directory, _ = hf_saved('llama_gqa', 'causal_lm', _hf_config('lora', 'causal_lm'))
  bad = _edited_copy(directory, tmp_path, lambda t: {**t, Q_A: np.zeros((RANK, 31), np.float32)})
  with pytest.raises(errors.CheckpointError,
                     match=rf'tensor {Q_A} has shape \(4, 31\), expected \(4, 32\)'):
    hf_format.load_adapter(bad, fm.params, fm.config)


def test_unknown_module_is_named(hf_saved, flax_model, tmp_path):
  fm = flax_model('llama_gqa', 'causal_lm')
  directory, _ = hf_saved('llama_gqa', 'causal_lm', _hf_config('lora', 'causal_lm'))
  bad = _edited_copy(directory, tmp_path,
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
