"""Batched generation with the KV cache == transformers greedy decoding; eos, top-k/top-p."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from peftjax import generate as gen
from peftjax.models import auto, registry

PROMPTS = np.array([[0, 0, 0, 5, 6, 7], [0, 9, 10, 11, 12, 13], [14, 15, 16, 17, 18, 19]],
                   np.int32)
MASK = (PROMPTS != 0).astype(np.int32)


@pytest.fixture(scope='module')
def model(tmp_path_factory):
  """A random tiny llama (GQA), also saved and reloaded in transformers."""
  config = registry.config_from_hf(dict(
      model_type='llama', vocab_size=61, hidden_size=32, intermediate_size=64,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
      eos_token_id=2, initializer_range=0.2))
  module = registry.build(config, 'causal_lm')
  params = nn.unbox(module.init(jax.random.key(1), jnp.zeros((1, 2), jnp.int32)))['params']
  directory = auto.save_pretrained(tmp_path_factory.mktemp('llama'), config, params)
  hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
  return module, {'params': params}, hf


def test_greedy_equals_transformers_with_left_padding(model):
  module, variables, hf = model
  out = gen.generate(module, variables, PROMPTS, MASK, max_new_tokens=6, eos_token_id=())
  want = hf.generate(input_ids=torch.as_tensor(PROMPTS).long(),
                     attention_mask=torch.as_tensor(MASK).long(), max_new_tokens=6,
                     do_sample=False, pad_token_id=0, eos_token_id=None)
  np.testing.assert_array_equal(out.tokens, want[:, PROMPTS.shape[1]:].numpy())
  np.testing.assert_array_equal(out.lengths, [6, 6, 6])


def test_rows_stop_at_eos_and_are_padded(model):
  module, variables, _ = model
  free = gen.generate(module, variables, PROMPTS, MASK, max_new_tokens=6, eos_token_id=())
  eos = int(free.tokens[1, 2])         # pretend the third token of row 1 is end-of-sequence
  out = gen.generate(module, variables, PROMPTS, MASK, max_new_tokens=6, eos_token_id=eos,
                     pad_token_id=0)
  row = np.asarray(out.tokens[1])
  first = int(np.argmax(row == eos))
  np.testing.assert_array_equal(row[:first + 1], np.asarray(free.tokens[1, :first + 1]))
  assert (row[first + 1:] == 0).all() and out.lengths[1] == first + 1


def test_top_k_one_and_tiny_top_p_are_greedy(model):
  module, variables, _ = model
  greedy = gen.generate(module, variables, PROMPTS, MASK, max_new_tokens=4, eos_token_id=())
  for kw in (dict(top_k=1), dict(top_p=1e-6)):
    out = gen.generate(module, variables, PROMPTS, MASK, max_new_tokens=4, eos_token_id=(),
                       temperature=1.0, rng=jax.random.key(3), **kw)
    np.testing.assert_array_equal(out.tokens, greedy.tokens)


def test_sampling_filters_keep_only_allowed_tokens():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 256))
  keys = jax.random.split(jax.random.key(0), 256)
  sample = jax.vmap(lambda k, l: gen.sample_logits(k, l[None], gen.Sampling(1.0, 2, 1.0))[0])
  assert set(np.asarray(sample(keys, logits)).tolist()) == {0, 1}
  sample = jax.vmap(lambda k, l: gen.sample_logits(k, l[None], gen.Sampling(1.0, 0, 0.7))[0])
  assert set(np.asarray(sample(keys, logits)).tolist()) == {0, 1}
