"""Generation with the KV cache: greedy == transformers (plain and + HF PEFT LoRA), log-probs ==
a teacher-forced forward, one compilation for any adapter value, eos stopping, top-k/top-p."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

from peftjax import generate as gen
from peftjax import methods, tree
from peftjax.models import auto, registry

PROMPTS = np.array([[0, 0, 0, 5, 6, 7], [0, 9, 10, 11, 12, 13], [14, 15, 16, 17, 18, 19]],
                   np.int32)
MASK = (PROMPTS != 0).astype(np.int32)
LORA = dict(rank=4, alpha=8.0, target='.*/(q_proj|v_proj|down_proj)')


@pytest.fixture(scope='module')
def model(tmp_path_factory):
  """A random tiny llama (GQA): (module, params, checkpoint dir that transformers loads)."""
  config = registry.config_from_hf(dict(
      model_type='llama', vocab_size=61, hidden_size=32, intermediate_size=64,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
      eos_token_id=2, initializer_range=0.2))
  module = registry.build(config, 'causal_lm')
  params = nn.unbox(module.init(jax.random.key(1), jnp.zeros((1, 2), jnp.int32)))['params']
  directory = auto.save_pretrained(tmp_path_factory.mktemp('llama'), config, params)
  return module, params, directory


def hf_model(directory):
  return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def lora_adapter(params, seed):
  """A LoRA adapter with non-zero B (so it changes the model)."""
  lora = methods.lora(**LORA)
  adapter = tree.flatten(nn.unbox(lora.init(jax.random.key(seed), params)))
  keys = dict(zip(adapter, jax.random.split(jax.random.key(seed + 100), len(adapter))))
  return lora, tree.unflatten({
      p: 0.5 * jax.random.normal(keys[p], v.shape) if p.endswith('lora_B') else v
      for p, v in adapter.items()})


def hf_lora_model(directory, adapter):
  """transformers + HF PEFT with the same LoRA weights, written into the injected layers."""
  config = peft.LoraConfig(r=LORA['rank'], lora_alpha=LORA['alpha'],
                           target_modules=['q_proj', 'v_proj', 'down_proj'], lora_dropout=0.0)
  model = peft.get_peft_model(hf_model(directory), config)
  with torch.no_grad():
    for path, value in tree.flatten(adapter).items():
      module, leaf = path.rsplit('/', 1)
      layer = model.get_submodule('base_model.model.' + module.replace('layers_', 'layers.')
                                  .replace('/', '.'))
      getattr(layer, leaf)['default'].weight.copy_(torch.as_tensor(np.asarray(value).T))
  return model.eval()


def teacher_forced_log_probs(apply, prompts, mask, out):
  """log p(token_j | prompt, tokens_<j) from one forward of prompt + completion."""
  t = prompts.shape[1]
  valid = np.arange(out.tokens.shape[1])[None] < np.asarray(out.lengths)[:, None]
  ids = np.concatenate([prompts, np.asarray(out.tokens)], axis=1)
  logits = apply(ids, attention_mask=np.concatenate([mask, valid], axis=1).astype(np.int32))
  logp = jax.nn.log_softmax(logits[:, t - 1:-1].astype(jnp.float32))
  return np.where(valid, np.take_along_axis(logp, ids[:, t:, None], axis=-1)[..., 0], 0.0)


def test_greedy_equals_transformers_with_left_padding(model):
  module, params, directory = model
  out = gen.generate(module, {'params': params}, PROMPTS, MASK, max_new_tokens=6,
                     eos_token_id=())
  want = hf_model(directory).generate(
      input_ids=torch.as_tensor(PROMPTS).long(), attention_mask=torch.as_tensor(MASK).long(),
      max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
  np.testing.assert_array_equal(out.tokens, want[:, PROMPTS.shape[1]:].numpy())
  np.testing.assert_array_equal(out.lengths, [6, 6, 6])


def test_lora_generation_equals_transformers_peft(model):
  """Greedy tokens and their log-probs equal transformers + HF PEFT's (``output_logits``)."""
  module, params, directory = model
  lora, adapter = lora_adapter(params, 0)
  sample = gen.sampler(lora.apply(module.apply), module.config, max_new_tokens=8,
                       eos_token_id=())
  out = sample(adapter, params, PROMPTS, MASK)
  want = hf_lora_model(directory, adapter).generate(
      input_ids=torch.as_tensor(PROMPTS).long(), attention_mask=torch.as_tensor(MASK).long(),
      max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None,
      output_logits=True, return_dict_in_generate=True)
  np.testing.assert_array_equal(out.tokens, want.sequences[:, PROMPTS.shape[1]:].numpy())
  plain = gen.generate(module, {'params': params}, PROMPTS, MASK, max_new_tokens=8,
                       eos_token_id=())
  assert (np.asarray(plain.tokens) != np.asarray(out.tokens)).any()   # the adapter matters
  hf_logp = torch.stack(want.logits, 1).log_softmax(-1).gather(
      -1, want.sequences[:, PROMPTS.shape[1]:, None])[..., 0].numpy()
  np.testing.assert_allclose(out.log_probs, hf_logp, atol=1e-5, rtol=0)


def test_new_adapter_value_does_not_recompile(model):
  module, params, _ = model
  lora, first = lora_adapter(params, 0)
  _, second = lora_adapter(params, 1)
  traces = []
  adapted = lora.apply(module.apply)

  def counted(*args, **kw):
    traces.append(1)          # runs once per trace, never when the compiled function runs
    return adapted(*args, **kw)

  sample = gen.sampler(counted, module.config, max_new_tokens=5, eos_token_id=(),
                       sampling=gen.Sampling(temperature=1.0, top_k=10))
  a = sample(first, params, PROMPTS, MASK, jax.random.key(0))
  traced = len(traces)        # the prefill's calls and the decode-loop body, traced once
  b = sample(second, params, PROMPTS, MASK, jax.random.key(0))
  sample(first, params, PROMPTS, MASK, jax.random.key(1))
  assert sample._cache_size() == 1 and len(traces) == traced == 3
  assert (np.asarray(a.log_probs) != np.asarray(b.log_probs)).all()


def test_log_probs_equal_teacher_forced_forward(model):
  """Sampled (temperature, top-k, top-p) with a row stopped at eos: the returned log-probs are
  the model's own (temperature 1, unfiltered) and 0 after eos."""
  module, params, _ = model
  lora, adapter = lora_adapter(params, 2)
  adapted = lora.apply(module.apply)
  kw = dict(max_new_tokens=7, sampling=gen.Sampling(temperature=0.8, top_k=20, top_p=0.9))
  rng = jax.random.key(5)
  free = gen.sampler(adapted, module.config, eos_token_id=(), **kw)(
      adapter, params, PROMPTS, MASK, rng)
  eos = int(free.tokens[1, 3])
  out = gen.sampler(adapted, module.config, eos_token_id=eos, pad_token_id=0, **kw)(
      adapter, params, PROMPTS, MASK, rng)
  assert int(out.lengths[1]) <= 4 and (np.asarray(out.tokens[1, int(out.lengths[1]):]) == 0).all()
  want = teacher_forced_log_probs(
      lambda ids, **k: adapted(adapter, params, ids, **k).logits, PROMPTS, MASK, out)
  np.testing.assert_allclose(out.log_probs, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize('hook', ['prefix_kv', 'prompt_embeds'])
def test_input_hooks_at_prefill_reach_every_decode_step(model, hook):
  """Prefix key/values (with a mask) or virtual-token embeddings given at prefill enter the
  cache (sized for them) and steer every decode step: the log-probs equal a teacher-forced
  forward with the same hook, and differ from generation without it."""
  module, params, _ = model
  cfg = module.config
  keys = jax.random.split(jax.random.key(7), 2)
  if hook == 'prefix_kv':
    shape = (cfg.num_layers, PROMPTS.shape[0], 3, cfg.num_kv_heads, cfg.head_dim)
    kw = dict(prefix_kv=tuple(jax.random.normal(k, shape) for k in keys),
              prefix_mask=np.array([[1, 1, 1], [0, 1, 1], [1, 1, 1]], np.int32))
  else:
    kw = dict(prompt_embeds=jax.random.normal(keys[0], (1, 2, cfg.hidden_size)))
  sample = gen.sampler(module.apply, cfg, max_new_tokens=6, eos_token_id=())
  out = sample(None, params, PROMPTS, MASK, **kw)
  want = teacher_forced_log_probs(
      lambda ids, **k: module.apply({'params': params}, ids, **kw, **k).logits,
      PROMPTS, MASK, out)
  np.testing.assert_allclose(out.log_probs, want, atol=1e-5, rtol=0)
  plain = sample(None, params, PROMPTS, MASK)
  assert (np.asarray(plain.log_probs) != np.asarray(out.log_probs)).any()


def test_rows_stop_at_eos_and_are_padded(model):
  module, params, _ = model
  variables = {'params': params}
  free = gen.generate(module, variables, PROMPTS, MASK, max_new_tokens=6, eos_token_id=())
  eos = int(free.tokens[1, 2])         # pretend the third token of row 1 is end-of-sequence
  out = gen.generate(module, variables, PROMPTS, MASK, max_new_tokens=6, eos_token_id=eos,
                     pad_token_id=0)
  row = np.asarray(out.tokens[1])
  first = int(np.argmax(row == eos))
  np.testing.assert_array_equal(row[:first + 1], np.asarray(free.tokens[1, :first + 1]))
  assert (row[first + 1:] == 0).all() and out.lengths[1] == first + 1
  assert (np.asarray(out.log_probs[1, first + 1:]) == 0).all()


def test_top_k_one_and_tiny_top_p_are_greedy(model):
  module, params, _ = model
  variables = {'params': params}
  greedy = gen.generate(module, variables, PROMPTS, MASK, max_new_tokens=4, eos_token_id=())
  for kw in (dict(top_k=1), dict(top_p=1e-6), dict(top_k=5, top_p=1e-6)):
    out = gen.generate(module, variables, PROMPTS, MASK, max_new_tokens=4, eos_token_id=(),
                       temperature=1.0, rng=jax.random.key(3), **kw)
    np.testing.assert_array_equal(out.tokens, greedy.tokens)
    np.testing.assert_allclose(out.log_probs, greedy.log_probs, atol=0, rtol=0)


@pytest.mark.parametrize('sampling, allowed', [
    (gen.Sampling(1.0, 2, 1.0), {0, 1}),        # top-k
    (gen.Sampling(1.0, 0, 0.7), {0, 1}),        # top-p: 0.5 + 0.3 reaches 0.7
    (gen.Sampling(1.0, 3, 0.5), {0}),           # both: top-p within the top 3
    (gen.Sampling(1.0, 0, 1.0), {0, 1, 2, 3}),  # neither
])
def test_sampling_filters_keep_only_allowed_tokens(sampling, allowed):
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 512))
  keys = jax.random.split(jax.random.key(0), 512)
  sample = jax.vmap(lambda k, l: gen.sample_logits(k, l[None], sampling)[0])
  assert set(np.asarray(sample(keys, logits)).tolist()) == allowed


@pytest.mark.parametrize('kw, message', [
    (dict(max_new_tokens=0), 'max_new_tokens must be >= 1, got 0'),
    (dict(max_new_tokens=2, sampling=gen.Sampling(top_p=0.0)), 'invalid sampling'),
    (dict(max_new_tokens=2, sampling=gen.Sampling(temperature=-1.0)), 'temperature >= 0'),
    (dict(max_new_tokens=2, sampling=gen.Sampling(top_k=-2)), 'top_k=-2'),
])
def test_bad_settings_are_refused(model, kw, message):
  module, _, _ = model
  with pytest.raises(ValueError, match=message.replace('(', r'\(')):
    gen.sampler(module.apply, module.config, **kw)
