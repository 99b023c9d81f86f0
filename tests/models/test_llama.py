"""Llama family (llama GQA/MQA, tied/untied, biases, llama3 rope, qwen2) == transformers."""
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from peftjax import assets
from peftjax.models import auto, layers

LLAMAS = ['llama_gqa', 'llama_tied', 'llama3_rope', 'qwen2', 'mistral_window']
# float32 logits vs transformers: measured max |diff| 1.6e-6 (llama3_rope), 7e-7 (llama_gqa).
TOL = 5e-6


@pytest.mark.parametrize('name', LLAMAS)
def test_causal_lm_matches_transformers_with_left_padding(name, hf_model, flax_model, zoo):
  ids, mask, pos = zoo.left_padded_batch()
  m = flax_model(name)
  got = m.apply({'params': m.params}, ids, attention_mask=mask).logits
  want = zoo.torch_logits(hf_model(name).torch_model, input_ids=ids, attention_mask=mask,
                          position_ids=pos)
  assert zoo.max_diff_at(got, want, mask) < TOL


@pytest.mark.parametrize('name', ['llama_gqa', 'qwen2'])
def test_scanned_equals_unscanned(name, flax_model, zoo):
  ids, mask, _ = zoo.left_padded_batch()
  plain, scanned = flax_model(name), flax_model(name, scan_layers=True)
  assert scanned.params['model']['layers']['self_attn']['q_proj']['kernel'].shape[0] == 2
  a = plain.apply({'params': plain.params}, ids, attention_mask=mask).logits
  b = scanned.apply({'params': scanned.params}, ids, attention_mask=mask).logits
  assert zoo.max_diff_at(a, b, mask) < 1e-6     # measured 0.0


@pytest.mark.parametrize('name,scan', [('llama_gqa', False), ('llama_gqa', True),
                                       ('mistral_window', False)])
def test_kv_cache_decoding_equals_full_forward(name, scan, flax_model, zoo):
  ids, mask, _ = zoo.left_padded_batch()
  m = flax_model(name, scan_layers=scan)
  v = {'params': m.params}
  full = m.apply(v, ids, attention_mask=mask).logits
  out = m.apply(v, ids[:, :4], attention_mask=mask[:, :4], cache=layers.init_cache(m.config, 3, 9))
  steps, cache = [out.logits], out.cache
  for i in range(4, ids.shape[1]):
    out = m.apply(v, ids[:, i:i + 1], attention_mask=mask[:, i:i + 1], cache=cache)
    steps.append(out.logits)
    cache = out.cache
  assert int(cache.index) == ids.shape[1]
  np.testing.assert_array_equal(cache.pos, mask.sum(1))
  assert zoo.max_diff_at(jnp.concatenate(steps, axis=1), full, mask) < 2e-6   # measured 4.8e-7


def test_classification_scores_last_non_pad_token(hf_model, flax_model, zoo):
  ids, mask, pos = zoo.left_padded_batch()
  m = flax_model('llama_gqa', 'classification')
  got = m.apply({'params': m.params}, ids, attention_mask=mask).logits
  want = zoo.torch_logits(hf_model('llama_gqa', 'classification').torch_model, input_ids=ids,
                          attention_mask=mask, position_ids=pos)
  assert got.shape == (3, 3)
  assert np.abs(got - want).max() < TOL


def test_value_head_gives_one_value_per_token(flax_model, zoo):
  ids, mask, _ = zoo.left_padded_batch()
  m = flax_model('llama_gqa', 'value', from_task='causal_lm')   # no 'score' there: fresh init
  assert m.params['score']['kernel'].shape == (32, 1)
  assert m.apply({'params': m.params}, ids, attention_mask=mask).logits.shape == ids.shape


def test_inputs_embeds_equals_input_ids(flax_model, zoo):
  ids, mask, _ = zoo.left_padded_batch()
  m = flax_model('llama_tied')
  embeds = m.params['model']['embed_tokens']['embedding'][ids]
  a = m.apply({'params': m.params}, ids, attention_mask=mask).logits
  b = m.apply({'params': m.params}, inputs_embeds=embeds, attention_mask=mask).logits
  assert zoo.max_diff_at(a, b, mask) < 1e-6     # measured 0.0


def test_masked_prefix_is_a_no_op_and_visible_prefix_is_not(flax_model, zoo):
  ids, mask, _ = zoo.left_padded_batch()
  m = flax_model('llama_gqa')
  cfg = m.config
  shape = (cfg.num_layers, 3, 5, cfg.num_kv_heads, cfg.head_dim)
  rng = np.random.default_rng(0)
  prefix = (jnp.asarray(rng.normal(size=shape), jnp.float32),
            jnp.asarray(rng.normal(size=shape), jnp.float32))
  v = {'params': m.params}
  base = m.apply(v, ids, attention_mask=mask).logits
  hidden = m.apply(v, ids, attention_mask=mask, prefix_kv=prefix,
                   prefix_mask=jnp.zeros((3, 5), jnp.int32)).logits
  seen = m.apply(v, ids, attention_mask=mask, prefix_kv=prefix,
                 prefix_mask=jnp.ones((3, 5), jnp.int32)).logits
  assert zoo.max_diff_at(hidden, base, mask) < 1e-6     # measured 0.0
  assert zoo.max_diff_at(seen, base, mask) > 1e-3


@pytest.mark.parametrize('name', ['llama_tied', 'llama3_rope'])
def test_save_pretrained_loads_in_transformers(name, flax_model, zoo, tmp_path):
  ids, mask, pos = zoo.left_padded_batch()
  m = flax_model(name)
  auto.save_pretrained(tmp_path, m.config, m.params)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
  got = m.apply({'params': m.params}, ids, attention_mask=mask).logits
  want = zoo.torch_logits(reloaded.eval(), input_ids=ids, attention_mask=mask, position_ids=pos)
  assert zoo.max_diff_at(got, want, mask) < TOL


def test_every_projection_is_an_interceptable_dense_at_its_hf_path(flax_model, zoo):
  ids, mask, _ = zoo.left_padded_batch()
  m = flax_model('llama_gqa')
  seen = set()

  def spy(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dense) and context.method_name == '__call__':
      seen.add('/'.join(context.module.path))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(spy):
    m.module.apply({'params': m.params}, ids, attention_mask=mask)
  layer0 = {p for p in seen if p.startswith('model/layers_0/')}
  assert layer0 == {f'model/layers_0/{p}' for p in (
      'self_attn/q_proj', 'self_attn/k_proj', 'self_attn/v_proj', 'self_attn/o_proj',
      'mlp/gate_proj', 'mlp/up_proj', 'mlp/down_proj')}
  assert 'lm_head' in seen and len(seen) == 2 * 7 + 1


@pytest.fixture(scope='module')
def smollm2():
  """The bundled asset (a missing one fails: ``python -m peftjax.assets install``)."""
  path = assets.path('smollm2-135m-instruct')
  return path, auto.load_pretrained('smollm2-135m-instruct', scan_layers=True)


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(smollm2):
  """Real SmolLM2-135M (Q4_1 GGUF, dequantised by both sides) through load_pretrained."""
  path, pre = smollm2
  pre.tokenizer.padding_side = 'left'
  batch = pre.tokenizer(['Hello, my name is', 'The capital of France is the city of'],
                        padding=True, return_tensors='np')
  ids, mask = batch['input_ids'], batch['attention_mask']
  got = pre.module.apply({'params': pre.params}, ids, attention_mask=mask).logits
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      path.parent, gguf_file=path.name, dtype=torch.float32).eval()
  with torch.no_grad():
    want = hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
              position_ids=torch.as_tensor(np.maximum(mask.cumsum(1) - 1, 0))).logits.numpy()
  # 30 layers in float32, logits of magnitude ~30: measured max |diff| 1.44e-4 (~5e-6 relative)
  assert np.abs(np.asarray(got)[mask == 1] - want[mask == 1]).max() < 5e-4


@pytest.mark.slow
def test_smollm2_answers_capital_of_france(smollm2):
  """Greedy chat decoding with the KV cache on the real weights."""
  from peftjax import generate
  _, pre = smollm2
  prompt = pre.tokenizer.apply_chat_template(
      [{'role': 'user', 'content': 'What is the capital of France?'}],
      add_generation_prompt=True, tokenize=False)
  ids = np.asarray([pre.tokenizer(prompt)['input_ids']], np.int32)
  out = generate.generate(pre.module, {'params': pre.params}, ids, max_new_tokens=24,
                          eos_token_id=pre.tokenizer.eos_token_id)
  answer = pre.tokenizer.decode(np.asarray(out.tokens[0, :int(out.lengths[0])]),
                                skip_special_tokens=True)
  assert 'Paris' in answer, answer


def test_packed_segments_equal_separate_sequences(flax_model):
  """Segment ids in ``attention_mask`` (1..k, 0 = pad) with restarting positions: each packed
  example gives the logits it gives alone."""
  fm = flax_model('llama_gqa')
  rng = np.random.default_rng(3)
  a, b = rng.integers(2, 97, 4), rng.integers(2, 97, 3)
  packed = np.concatenate([a, b, [0]])[None].astype(np.int32)
  seg = np.array([[1, 1, 1, 1, 2, 2, 2, 0]], np.int32)
  pos = np.array([[0, 1, 2, 3, 0, 1, 2, 0]], np.int32)
  out = fm.apply({'params': fm.params}, packed, attention_mask=seg, position_ids=pos).logits
  for ids, at in ((a, slice(0, 4)), (b, slice(4, 7))):
    alone = fm.apply({'params': fm.params}, ids[None].astype(np.int32)).logits
    np.testing.assert_allclose(out[0, at], alone[0], atol=2e-6, rtol=0)   # measured 3.9e-7
