"""Prompt tuning and P-tuning v1 == HF PEFT (float32, tiny random llama / gpt2 / bert): logits in
both directions through the HF PEFT format, the unfolded P-tuning encoders, trainable counts,
initialisations, and bad inputs."""
import copy
import json

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


def ours(method, m, adapter, ids, mask, task, **kw):
  return method.apply(m.module.apply)(adapter, m.params, ids, attention_mask=mask,
                                      keep_virtual=task == 'causal_lm', **kw).logits


def compare(kit, got, want, mask, task):   # HF PEFT's causal-LM logits keep the V prompts
  return kit.compare(got, want, mask, task, virtual=V)


def ptuning_name(k: str):
  """HF PEFT's PromptEncoder names -> (peftjax path, transpose): ``mlp_head.{i}.weight``,
  ``lstm_head.weight_ih_l{k}[_reverse]``."""
  head, *rest = k.split('.')
  if head == 'mlp_head':
    i, leaf = rest
    return f'mlp_head_{i}/' + ('kernel' if leaf == 'weight' else 'bias'), leaf == 'weight'
  kind, layer = rest[0].split('_l')
  name = {'weight_ih': 'w_ih', 'weight_hh': 'w_hh', 'bias_ih': 'b_ih', 'bias_hh': 'b_hh'}[kind]
  return f'lstm_head/l{layer}/{name}', kind.startswith('weight')


def hf_encoder_adapter(kit, model) -> dict:
  """HF PEFT's trainable PromptEncoder (MLP or LSTM) as a peftjax ``prompt_encoder``."""
  return {prompt.ENCODER: kit.hf_encoder(model, ptuning_name)}


def test_prompt_tuning_hf_to_peftjax(prompt_case, prompt_kit, hf_model, flax_model, zoo,
                                     tmp_path):
  name, task, task_type = prompt_case
  m = flax_model(name, task)
  ids, mask = zoo.right_padded_batch(pad_id=m.config.pad_token_id)
  hf = peft.get_peft_model(copy.deepcopy(hf_model(name, task).torch_model),
                           peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=V))
  hf.eval().save_pretrained(tmp_path)
  method, adapter = hf_prompt.load_adapter(tmp_path, m.params, m.config, task)
  got = ours(method, m, adapter, ids, mask, task)
  assert compare(prompt_kit, got, prompt_kit.torch_logits(hf, ids, mask), mask, task) < TOL


@pytest.mark.parametrize('init', ['random', 'sample_vocab'])
def test_prompt_tuning_peftjax_to_hf(prompt_case, init, prompt_kit, hf_model, flax_model, zoo,
                                     tmp_path):
  name, task, _ = prompt_case
  m = flax_model(name, task)
  ids, mask = zoo.right_padded_batch(pad_id=m.config.pad_token_id)
  method = prompt_kit.with_head(methods.get('prompt', num_virtual_tokens=V, init=init), m, task)
  adapter = method.init(jax.random.key(0), m.params)
  hf_prompt.save_adapter(tmp_path, method, adapter, m.config, task=task)
  hf = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model(name, task).torch_model), tmp_path)
  assert hf.peft_config['default'].peft_type == peft.PeftType.PROMPT_TUNING
  assert hf.peft_config['default'].prompt_tuning_init == init.upper()
  got = ours(method, m, adapter, ids, mask, task)
  assert compare(prompt_kit, got, prompt_kit.torch_logits(hf.eval(), ids, mask), mask,
                 task) < TOL


def word_tokenizer(directory, words) -> str:
  """A fast word-level tokenizer over ``words`` (ids 3...; 0-2 special), saved offline."""
  import tokenizers
  import transformers
  vocab = {'[PAD]': 0, '[UNK]': 1, '[CLS]': 2, **{w: i + 3 for i, w in enumerate(words)}}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token='[UNK]'))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.post_processor = tokenizers.processors.TemplateProcessing(
      single='[CLS] $A', special_tokens=[('[CLS]', 2)])
  transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token='[UNK]',
                                      pad_token='[PAD]').save_pretrained(directory)
  return str(directory)


@pytest.mark.parametrize('v', [2, 5])
def test_text_init_equals_hf_peft_and_round_trips(v, prompt_kit, hf_model, flax_model, zoo,
                                                  tmp_path):
  """init='text' from a text and tokenizer == HF PEFT's TEXT init (the text's token ids, with
  the tokenizer's special tokens, cut or repeated to V); HF's TEXT config loads here as
  init='text' with its text and tokenizer, and ours is written as TEXT (HF loads it)."""
  m = flax_model('llama_gqa')
  ids, mask = zoo.right_padded_batch()
  tok = word_tokenizer(tmp_path / 'tok', ['good', 'movie', 'bad'])
  torch.manual_seed(0)
  hf = peft.get_peft_model(copy.deepcopy(hf_model('llama_gqa').torch_model),
                           peft.PromptTuningConfig(
                               task_type='CAUSAL_LM', num_virtual_tokens=v,
                               prompt_tuning_init='TEXT', prompt_tuning_init_text='bad movie',
                               tokenizer_name_or_path=tok))
  method = methods.get('prompt', num_virtual_tokens=v, init='text', init_text='bad movie',
                       tokenizer_name_or_path=tok)
  adapter = method.init(jax.random.key(0), m.params)
  want = hf.prompt_encoder['default'].embedding.weight.detach().numpy()   # ids 2, 5, 4, 2, 5
  np.testing.assert_array_equal(adapter['prompt_encoder']['embedding'], want)
  table = tree.flatten(m.params)['model/embed_tokens/embedding']
  np.testing.assert_array_equal(want, table[np.array([2, 5, 4, 2, 5][:v])])
  hf.eval().save_pretrained(tmp_path / 'hf')   # HF -> peftjax
  loaded, again = hf_prompt.load_adapter(tmp_path / 'hf', m.params, m.config)
  assert loaded.spec.hparams == dict(num_virtual_tokens=v, init='text', init_token_ids=None,
                                     init_text='bad movie', tokenizer_name_or_path=tok)
  np.testing.assert_array_equal(again['prompt_encoder']['embedding'], want)
  hf_prompt.save_adapter(tmp_path / 'ours', method, adapter, m.config)   # peftjax -> HF
  back = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model('llama_gqa').torch_model),
                                        tmp_path / 'ours').eval()
  cfg = back.peft_config['default']
  assert (cfg.prompt_tuning_init, cfg.prompt_tuning_init_text, cfg.tokenizer_name_or_path) == (
      'TEXT', 'bad movie', tok)
  assert prompt_kit.compare(ours(method, m, adapter, ids, mask, 'causal_lm'),
                            prompt_kit.torch_logits(back, ids, mask), mask, 'causal_lm',
                            virtual=v) < TOL
  # token ids without their text cannot be HF PEFT's TEXT (it needs text and tokenizer): RANDOM
  ids_only = methods.get('prompt', num_virtual_tokens=v, init='text', init_token_ids=[2, 5, 4])
  hf_prompt.save_adapter(tmp_path / 'ids', ids_only, adapter, m.config)
  cfg = json.loads((tmp_path / 'ids' / 'adapter_config.json').read_text())
  assert (cfg['prompt_tuning_init'], cfg['prompt_tuning_init_text']) == ('RANDOM', None)


@pytest.mark.parametrize('encoder', ['MLP', 'LSTM'])
def test_ptuning_encoder_equals_hf_peft_and_folds(prompt_case, encoder, prompt_kit, hf_model,
                                                  flax_model, zoo, tmp_path):
  """The unfolded encoder == HF PEFT's training-mode forward; HF's saved (folded) adapter and
  ours, loaded back, give the same logits; HF loads our export."""
  name, task, task_type = prompt_case
  m = flax_model(name, task)
  ids, mask = zoo.right_padded_batch(pad_id=m.config.pad_token_id)
  torch.manual_seed(0)
  hf = peft.get_peft_model(copy.deepcopy(hf_model(name, task).torch_model),
                           peft.PromptEncoderConfig(task_type=task_type, num_virtual_tokens=V,
                                                    encoder_hidden_size=16,
                                                    encoder_reparameterization_type=encoder)
                           ).eval()
  want = prompt_kit.torch_logits(hf, ids, mask)
  method = prompt_kit.with_head(methods.get('ptuning', num_virtual_tokens=V,
                                            encoder=encoder.lower(), encoder_hidden_size=16),
                                m, task)
  fresh = method.init(jax.random.key(0), m.params)
  adapter = {**fresh, **hf_encoder_adapter(prompt_kit, hf)}
  assert prompt_kit.shapes(adapter) == prompt_kit.shapes(fresh)
  got = ours(method, m, adapter, ids, mask, task)
  assert compare(prompt_kit, got, want, mask, task) < TOL
  hf.save_pretrained(tmp_path / 'hf')
  plain, folded = hf_prompt.load_adapter(tmp_path / 'hf', m.params, m.config, task)
  assert compare(prompt_kit, ours(plain, m, folded, ids, mask, task), want, mask, task) < TOL
  assert compare(prompt_kit, ours(plain, m, prompt.fold(adapter), ids, mask, task), want, mask,
                 task) < TOL
  hf_prompt.save_adapter(tmp_path / 'ours', method, adapter, m.config, task=task)
  back = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model(name, task).torch_model),
                                        tmp_path / 'ours')
  assert back.peft_config['default'].peft_type == peft.PeftType.P_TUNING
  assert compare(prompt_kit, got, prompt_kit.torch_logits(back.eval(), ids, mask), mask,
                 task) < TOL


@pytest.mark.parametrize('layers', [2, 3])
def test_lstm_dropout_equals_hf_peft_in_training(layers, prompt_kit, hf_model, flax_model, zoo,
                                                tmp_path):
  """HF PEFT's LSTM encoder with encoder_dropout, in train mode, == ours given torch's dropout
  multipliers (regenerated from the same seed: torch's LSTM draws them as ``F.dropout`` on each
  non-last layer's output, one sample per batch as HF PEFT runs it); our training calls draw
  their own (from rngs['dropout']), shared by the batch; eval calls have none; the export
  records encoder_dropout."""
  m = flax_model('gpt2')
  ids, mask = zoo.right_padded_batch()
  rate, h = 0.4, 8
  hf = peft.get_peft_model(copy.deepcopy(hf_model('gpt2').torch_model), peft.PromptEncoderConfig(
      task_type='CAUSAL_LM', num_virtual_tokens=V, encoder_hidden_size=h,
      encoder_reparameterization_type='LSTM', encoder_num_layers=layers,
      encoder_dropout=rate)).eval()
  hf.prompt_encoder.train()   # dropout in the prompt encoder only
  torch.manual_seed(3)
  want = prompt_kit.torch_logits(hf, ids, mask)
  torch.manual_seed(3)
  masks = [jnp.asarray(torch.nn.functional.dropout(torch.ones(1, V, 2 * h), rate).numpy()[0])
           for _ in range(layers - 1)]
  assert all(0 < float((x == 0).mean()) < 1 for x in masks)
  method = methods.get('ptuning', num_virtual_tokens=V, encoder='lstm', encoder_hidden_size=h,
                       encoder_num_layers=layers, encoder_dropout=rate)
  adapter = hf_encoder_adapter(prompt_kit, hf)
  prompts = prompt.encode(adapter['prompt_encoder'], masks)[None]
  got = m.module.apply({'params': m.params}, ids, attention_mask=mask, prompt_embeds=prompts,
                       keep_virtual=True).logits
  assert compare(prompt_kit, got, want, mask, 'causal_lm') < TOL
  # ours: a training call draws the multipliers from its dropout rng, batch-shared
  rngs = {'dropout': jax.random.key(7)}
  train = ours(method, m, adapter, ids, mask, 'causal_lm', deterministic=False, rngs=rngs)
  again = ours(method, m, adapter, ids, mask, 'causal_lm', deterministic=False, rngs=rngs)
  other = ours(method, m, adapter, ids, mask, 'causal_lm', deterministic=False,
               rngs={'dropout': jax.random.key(8)})
  evaluated = ours(method, m, adapter, ids, mask, 'causal_lm')
  hf.eval()
  assert compare(prompt_kit, evaluated, prompt_kit.torch_logits(hf, ids, mask), mask,
                 'causal_lm') < TOL
  np.testing.assert_array_equal(train, again)
  assert float(jnp.abs(train - other).max()) > 1e-3
  assert float(jnp.abs(train - evaluated).max()) > 1e-3
  drawn = prompt.lstm_dropout(adapter['prompt_encoder'], rate, jax.random.key(0))
  assert [x.shape for x in drawn] == [(V, 2 * h)] * (layers - 1)
  assert {float(x) for d in drawn for x in np.unique(d)} <= {0.0, float(np.float32(1 / (1 - rate)))}
  hf_prompt.save_adapter(tmp_path, method, adapter, m.config)
  assert json.loads((tmp_path / 'adapter_config.json').read_text())['encoder_dropout'] == rate


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
  with pytest.raises(ValueError, match=r"init='text' needs init_token_ids, or init_text and "
                                       r"tokenizer_name_or_path \(got \['init_text'\]\)"):
    methods.get('prompt', init='text', init_text='good movie')
  with pytest.raises(ValueError, match=r"\['init_text', 'tokenizer_name_or_path'\] are for "
                                       r"init='text', not init='random'"):
    methods.get('prompt', init_text='good movie', tokenizer_name_or_path='tok')
  with pytest.raises(ValueError, match=r'encoder_dropout must be in \[0, 1\), got 1.0'):
    methods.get('ptuning', encoder='lstm', encoder_dropout=1.0)
  with pytest.raises(ValueError, match=r"encoder_dropout \(0.1\) acts between LSTM layers; the "
                                       r"'mlp' encoder has none"):
    methods.get('ptuning', encoder_dropout=0.1)
  lstm = methods.get('ptuning', num_virtual_tokens=V, encoder='lstm', encoder_hidden_size=4,
                     encoder_dropout=0.1)
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
  # HF PEFT's TEXT init without its text (HF PEFT itself refuses such a config)
  cfg = json.loads((tmp_path / 'adapter_config.json').read_text())
  (tmp_path / 'adapter_config.json').write_text(json.dumps({**cfg, 'prompt_tuning_init': 'TEXT'}))
  with pytest.raises(ValueError, match=r"prompt_tuning_init 'TEXT' needs prompt_tuning_init_text "
                                       r'and tokenizer_name_or_path \(got None, None\)'):
    hf_prompt.load_adapter(tmp_path, small.params, small.config)
  # a training call of a P-tuning LSTM with dropout and no dropout rng
  ids = jnp.ones((1, 4), jnp.int32)
  with pytest.raises(ValueError, match=r"ptuning encoder_dropout=0.1 in a training call needs "
                                       r"rngs=\{'dropout': key\}"):
    lstm.apply(small.module.apply)(lstm.init(jax.random.key(0), small.params), small.params,
                                   ids, deterministic=False)
