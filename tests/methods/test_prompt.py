"""Prompt tuning and P-tuning v1 == HF PEFT (float32, tiny random llama / gpt2 / bert): logits in
both directions through the HF PEFT format, the unfolded P-tuning encoders, trainable counts,
initialisations, and bad inputs."""
import copy

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

from peftjax import methods, tree
from peftjax.methods import hf_prompt, prompt

TOL = 5e-6   # float32; measured agreement ~1e-6
V = 3
CASES = [('llama_gqa', 'causal_lm', 'CAUSAL_LM'), ('gpt2', 'causal_lm', 'CAUSAL_LM'),
         ('bert', 'classification', 'SEQ_CLS')]


def torch_logits(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=torch.as_tensor(ids).long(),
                 attention_mask=torch.as_tensor(mask)).logits.numpy()


def ours(method, m, adapter, ids, mask, task):
  return method.apply(m.module.apply)(adapter, m.params, ids, attention_mask=mask,
                                      keep_virtual=task == 'causal_lm').logits


def with_head(method, m, task):
  """HF PEFT's SEQ_CLS adapters always hold the classification head (modules_to_save)."""
  if task != 'classification':
    return method
  heads = [p for p in tree.flatten(m.params) if p.startswith('classifier/')]
  return methods.compose(method, methods.modules_to_save(heads))


def compare(got, want, mask, task, zoo):
  if task == 'causal_lm':   # HF PEFT keeps the virtual positions
    return zoo.max_diff_at(got, want, np.concatenate([np.ones((3, V), np.int32), mask], 1))
  return float(np.abs(np.asarray(got) - want).max())


def hf_encoder_adapter(model) -> dict:
  """HF PEFT's trainable PromptEncoder (MLP or LSTM) as a peftjax ``prompt_encoder``."""
  sd = {k.removeprefix('prompt_encoder.default.'): v.detach().numpy()
        for k, v in model.named_parameters() if k.startswith('prompt_encoder.default.')}
  enc = {'embedding': sd.pop('embedding.weight')}
  for k, v in sd.items():
    head, *rest = k.split('.')
    if head == 'mlp_head':
      i, leaf = rest
      enc.setdefault(f'mlp_head_{i}', {})['kernel' if leaf == 'weight' else 'bias'] = (
          v.T if leaf == 'weight' else v)
    else:   # lstm_head.weight_ih_l0[_reverse]
      kind, layer = rest[0].split('_l')
      name = {'weight_ih': 'w_ih', 'weight_hh': 'w_hh', 'bias_ih': 'b_ih', 'bias_hh': 'b_hh'}
      enc.setdefault('lstm_head', {}).setdefault(f'l{layer}', {})[name[kind]] = (
          v.T if kind.startswith('weight') else v)
  return {prompt.ENCODER: jax.tree.map(jnp.asarray, enc)}


@pytest.mark.parametrize('name,task,task_type', CASES)
def test_prompt_tuning_hf_to_peftjax(name, task, task_type, hf_model, flax_model, zoo,
                                     tmp_path):
  m = flax_model(name, task)
  ids, mask = zoo.right_padded_batch(pad_id=m.config.pad_token_id)
  hf = peft.get_peft_model(copy.deepcopy(hf_model(name, task).torch_model),
                           peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=V))
  hf.eval().save_pretrained(tmp_path)
  method, adapter = hf_prompt.load_adapter(tmp_path, m.params, m.config, task)
  got = ours(method, m, adapter, ids, mask, task)
  assert compare(got, torch_logits(hf, ids, mask), mask, task, zoo) < TOL


@pytest.mark.parametrize('name,task,task_type', CASES)
@pytest.mark.parametrize('init', ['random', 'sample_vocab'])
def test_prompt_tuning_peftjax_to_hf(name, task, task_type, init, hf_model, flax_model, zoo,
                                     tmp_path):
  m = flax_model(name, task)
  ids, mask = zoo.right_padded_batch(pad_id=m.config.pad_token_id)
  method = with_head(methods.get('prompt', num_virtual_tokens=V, init=init), m, task)
  adapter = method.init(jax.random.key(0), m.params)
  hf_prompt.save_adapter(tmp_path, method, adapter, m.config, task=task)
  hf = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model(name, task).torch_model), tmp_path)
  assert hf.peft_config['default'].peft_type == peft.PeftType.PROMPT_TUNING
  got = ours(method, m, adapter, ids, mask, task)
  assert compare(got, torch_logits(hf.eval(), ids, mask), mask, task, zoo) < TOL


@pytest.mark.parametrize('name,task,task_type', CASES)
@pytest.mark.parametrize('encoder', ['MLP', 'LSTM'])
def test_ptuning_encoder_equals_hf_peft_and_folds(name, task, task_type, encoder, hf_model,
                                                  flax_model, zoo, tmp_path):
  """The unfolded encoder == HF PEFT's training-mode forward; HF's saved (folded) adapter and
  ours, loaded back, give the same logits; HF loads our export."""
  m = flax_model(name, task)
  ids, mask = zoo.right_padded_batch(pad_id=m.config.pad_token_id)
  torch.manual_seed(0)
  hf = peft.get_peft_model(copy.deepcopy(hf_model(name, task).torch_model), peft.PromptEncoderConfig(
      task_type=task_type, num_virtual_tokens=V, encoder_hidden_size=16,
      encoder_reparameterization_type=encoder)).eval()
  want = torch_logits(hf, ids, mask)
  method = with_head(methods.get('ptuning', num_virtual_tokens=V, encoder=encoder.lower(),
                                 encoder_hidden_size=16), m, task)
  fresh = method.init(jax.random.key(0), m.params)
  adapter = {**fresh, **hf_encoder_adapter(hf)}
  assert jax.tree.map(jnp.shape, adapter) == jax.tree.map(jnp.shape, fresh)
  got = ours(method, m, adapter, ids, mask, task)
  assert compare(got, want, mask, task, zoo) < TOL
  hf.save_pretrained(tmp_path / 'hf')
  plain, folded = hf_prompt.load_adapter(tmp_path / 'hf', m.params, m.config, task)
  assert compare(ours(plain, m, folded, ids, mask, task), want, mask, task, zoo) < TOL
  assert compare(ours(plain, m, prompt.fold(adapter), ids, mask, task), want, mask, task,
                 zoo) < TOL
  hf_prompt.save_adapter(tmp_path / 'ours', method, adapter, m.config, task=task)
  back = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model(name, task).torch_model),
                                        tmp_path / 'ours')
  assert back.peft_config['default'].peft_type == peft.PeftType.P_TUNING
  assert compare(got, torch_logits(back.eval(), ids, mask), mask, task, zoo) < TOL


@pytest.mark.parametrize('name', ['llama_gqa', 'gpt2'])
@pytest.mark.parametrize('kind,kw', [
    ('prompt', {}),
    ('ptuning', dict(encoder='mlp', encoder_hidden_size=16)),
    ('ptuning', dict(encoder='lstm', encoder_hidden_size=16)),
    ('ptuning', dict(encoder='lstm', encoder_hidden_size=8, encoder_num_layers=3))])
def test_trainable_counts_equal_hf_peft(name, kind, kw, hf_model, flax_model):
  m = flax_model(name)
  hf_config = (peft.PromptTuningConfig(task_type='CAUSAL_LM', num_virtual_tokens=V)
               if kind == 'prompt' else peft.PromptEncoderConfig(
                   task_type='CAUSAL_LM', num_virtual_tokens=V,
                   encoder_reparameterization_type=kw['encoder'].upper(),
                   encoder_hidden_size=kw['encoder_hidden_size'],
                   encoder_num_layers=kw.get('encoder_num_layers', 2)))
  hf = peft.get_peft_model(copy.deepcopy(hf_model(name).torch_model), hf_config)
  adapter = methods.get(kind, num_virtual_tokens=V, **kw).init(jax.random.key(0), m.params)
  assert sum(a.size for a in jax.tree.leaves(adapter)) == hf.get_nb_trainable_parameters()[0]


def test_initialisations_and_logical_axes(flax_model, zoo):
  """sample_vocab/text copy rows of the input embedding (text ids cut or repeated, as HF
  PEFT); boxed base params give leaves boxed (None, 'embed')."""
  m = flax_model('llama_gqa')
  table = tree.flatten(m.params)['model/embed_tokens/embedding']
  e = prompt.prompt_tuning(5, init='text', init_token_ids=[7, 9]).init(jax.random.key(0), m.params)
  np.testing.assert_array_equal(e['prompt_encoder']['embedding'], table[jnp.array([7, 9, 7, 9, 7])])
  e = prompt.prompt_tuning(2, init='text', init_token_ids=[7, 9, 11]).init(jax.random.key(0),
                                                                          m.params)
  np.testing.assert_array_equal(e['prompt_encoder']['embedding'], table[jnp.array([7, 9])])
  e = prompt.prompt_tuning(4, init='sample_vocab').init(jax.random.key(0), m.params)
  rows = np.asarray(e['prompt_encoder']['embedding'])
  assert all((np.abs(np.asarray(table) - r).max(1) == 0).any() for r in rows)
  ids = jnp.zeros((1, 4), jnp.int32)
  boxed = m.module.init(jax.random.key(0), ids)['params']
  for method in (prompt.prompt_tuning(V), prompt.ptuning(V, encoder='lstm')):
    adapter = method.init(jax.random.key(1), boxed)
    assert adapter['prompt_encoder']['embedding'].names == (None, 'embed')
    plain = method.init(jax.random.key(1), nn.meta.unbox(boxed))
    assert not any(isinstance(x, nn.Partitioned) for x in jax.tree.leaves(
        plain, is_leaf=lambda x: isinstance(x, nn.Partitioned)))


def test_composes_with_lora_and_keeps_outputs_aligned(flax_model, zoo):
  """prompt + LoRA through ``compose``: the spec round-trips and the outputs stay aligned with
  the tokens (virtual positions dropped) == the prompt alone at LoRA's init (B = 0)."""
  m = flax_model('llama_gqa', scan_layers=True)
  ids, mask = zoo.right_padded_batch()
  both = methods.compose(methods.get('lora', rank=2, model_type='llama'),
                         methods.get('prompt', num_virtual_tokens=V))
  assert methods.from_spec(both.spec).spec == both.spec
  adapter = both.init(jax.random.key(0), m.params)
  got = both.apply(m.module.apply)(adapter, m.params, ids, attention_mask=mask).logits
  alone = methods.get('prompt', num_virtual_tokens=V).apply(m.module.apply)(
      {'prompt_encoder': adapter['prompt_encoder']}, m.params, ids, attention_mask=mask).logits
  assert got.shape == (3, ids.shape[1], zoo.VOCAB)
  assert zoo.max_diff_at(got, alone, mask) < 1e-6


# ----------------------------------------------------------------------------- bad inputs

def test_bad_prompt_inputs_are_named(flax_model, hf_model, zoo, tmp_path):
  for n in (0, -2):
    with pytest.raises(ValueError, match=f'num_virtual_tokens must be a positive int, got {n}'):
      methods.get('prompt', num_virtual_tokens=n)
    with pytest.raises(ValueError, match=f'num_virtual_tokens must be a positive int, got {n}'):
      methods.get('ptuning', num_virtual_tokens=n)
  with pytest.raises(ValueError, match="init must be one of .* got 'vocab'"):
    methods.get('prompt', init='vocab')
  with pytest.raises(ValueError, match="P-tuning encoder must be one of .* got 'gru'"):
    methods.get('ptuning', encoder='gru')
  with pytest.raises(ValueError, match="init_token_ids are given exactly when init='text'"):
    methods.get('prompt', init='text')
  # prompt length + sequence length beyond the learned positions (GPT-2: 64)
  m = flax_model('gpt2')
  ids, mask = zoo.right_padded_batch()
  method = methods.get('prompt', num_virtual_tokens=60)
  with pytest.raises(ValueError, match=r'prompt virtual tokens \(60\) plus sequence length \(7\) '
                                       r"= 67 exceeds the model's 64 positions \(transformer/wpe"):
    method.apply(m.module.apply)(method.init(jax.random.key(0), m.params), m.params, ids)
  # a model without the hook
  dense = nn.Dense(4)
  params = {'embed_tokens': {'embedding': jnp.ones((9, 4))},
            **dense.init(jax.random.key(0), jnp.ones((1, 4)))['params']}
  method = methods.get('prompt', num_virtual_tokens=2)
  with pytest.raises(ValueError, match=r"prompt virtual tokens: the model does not take "
                                       r"\['prompt_embeds'\]"):
    method.apply(dense.apply)(method.init(jax.random.key(0), params), params, jnp.ones((1, 4)))
  # an HF PEFT prompt whose token dimension does not fit the base (hidden 32 vs 64)
  small = flax_model('llama_gqa')
  method = methods.get('prompt', num_virtual_tokens=V)
  hf_prompt.save_adapter(tmp_path, method, method.init(jax.random.key(0), small.params),
                         small.config)
  big = flax_model('llama3_rope')
  with pytest.raises(ValueError, match=r'prompt_embeddings of shape \(3, 32\); the base model '
                                       r'needs \(3, 64\) .*token dimension = hidden size 64'):
    hf_prompt.load_adapter(tmp_path, big.params, big.config)
