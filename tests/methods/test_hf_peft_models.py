"""HF PEFT on tiny transformers models vs peftjax on the same checkpoint loaded into the zoo:
equal trainable counts, and (llama) equal logits with the same perturbed adapter weights."""
import re

import jax
import numpy as np
import peft
import pytest
import torch
import transformers

from peftjax import methods, tree
from peftjax.models import auto

SPECS = {
    'llama': (transformers.LlamaConfig, dict(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
        transformers.AutoModelForCausalLM, 'causal_lm'),
    'gpt2': (transformers.GPT2Config, dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4),
             transformers.AutoModelForCausalLM, 'causal_lm'),
    'bert': (transformers.BertConfig, dict(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4), transformers.AutoModel, 'base'),
}

CASES = {  # name -> (HF PEFT config, our method for model_type)
    'lora_default': (lambda: peft.LoraConfig(r=8),
                     lambda mt: methods.get('lora', rank=8, model_type=mt)),
    'lora_all_linear': (lambda: peft.LoraConfig(r=8, target_modules='all-linear'),
                        lambda mt: methods.get('lora', rank=8, target='all-linear')),
    'dora': (lambda: peft.LoraConfig(r=8, use_dora=True),
             lambda mt: methods.get('dora', rank=8, model_type=mt)),
    'ia3': (lambda: peft.IA3Config(), lambda mt: methods.get('ia3', model_type=mt)),
}


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
  out = {}
  for name, (config_cls, kwargs, auto_cls, task) in SPECS.items():
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp(name)
    auto_cls.from_config(config_cls(**kwargs)).save_pretrained(directory)
    out[name] = directory
  return out


def _peft_model(checkpoints, name, case):
  return peft.get_peft_model(SPECS[name][2].from_pretrained(checkpoints[name]), CASES[case][0]())


def _from_hf_name(name):
  """``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight`` ->
  ``model/layers_0/self_attn/q_proj/lora_A`` (the inverse is the adapter-export mapping)."""
  name = name.removeprefix('base_model.model.').replace('.default', '').removesuffix('.weight')
  return re.sub(r'\.(\d+)(?=\.)', r'_\1', name).replace('.', '/')


@pytest.mark.parametrize('case', list(CASES))
@pytest.mark.parametrize('name', list(SPECS))
def test_trainable_counts_equal_hf_peft(checkpoints, name, case):
  pre = auto.load_pretrained(checkpoints[name], task=SPECS[name][3])
  adapter = jax.eval_shape(CASES[case][1](name).init, jax.random.key(0), pre.params)
  peft_model = _peft_model(checkpoints, name, case)
  hf_paths = {_from_hf_name(n) for n, p in peft_model.named_parameters() if p.requires_grad}
  ours = tree.flatten(adapter)
  if name == 'bert':  # HF's bare BertModel has no 'bert.' prefix; the zoo's params always do
    ours = {p.removeprefix('bert/'): v for p, v in ours.items()}
  assert sorted(ours) == sorted(hf_paths)
  assert tree.count(adapter) == peft_model.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize('case', ['lora_all_linear', 'dora', 'ia3'])
def test_llama_logits_match_hf_peft_with_same_adapter(checkpoints, case):
  pre = auto.load_pretrained(checkpoints['llama'], task='causal_lm')
  peft_model = _peft_model(checkpoints, 'llama', case).eval()
  gen = torch.Generator().manual_seed(0)
  adapter = {}
  with torch.no_grad():
    for n, p in peft_model.named_parameters():
      if p.requires_grad:
        p.add_(0.1 * torch.randn(p.shape, generator=gen))
        value = p.numpy().copy()
        adapter[_from_hf_name(n)] = value.T if '.lora_A.' in n or '.lora_B.' in n else value
    ids = np.random.default_rng(0).integers(0, 64, (2, 9))
    expected = peft_model(torch.from_numpy(ids)).logits.numpy()
  method = CASES[case][1]('llama')
  got = method.apply(pre.module.apply)(tree.unflatten(adapter), pre.params, ids).logits
  base = pre.module.apply({'params': pre.params}, ids).logits
  assert np.abs(np.asarray(base) - expected).max() > 1e-3  # the adapter acts
  np.testing.assert_allclose(got, expected, atol=1e-5)
