"""Model hooks == their explicit equivalents: virtual tokens (``prompt_embeds``) == HF PEFT prompt
tuning and == a longer ``inputs_embeds``; prefix key/values == transformers ``past_key_values``;
both under ``nn.scan`` and with the KV cache. Plus the family layout table and bad inputs."""
import copy
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

from peftjax import errors, tree
from peftjax.models import families, hooks, layers, registry

TOL = 5e-6   # float32; measured agreement is ~1e-6
V = 3        # virtual tokens
P = 4        # prefix length
DECODERS = ['llama_gqa', 'gpt2']


def embedding(m):
  return tree.flatten(m.params)[families.embedding_path(m.config) + '/embedding']


def prompts(m, seed=0, batch=1):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=(batch, V, m.config.hidden_size)), jnp.float32)


def prefix(m, seed=1, batch=3):
  cfg = m.config
  rng = np.random.default_rng(seed)
  shape = (cfg.num_layers, batch, P, cfg.num_kv_heads, cfg.head_dim)
  return tuple(jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in 'kv')


def hf_past(prefix_kv):
  """A transformers cache holding ``prefix_kv`` ([layers, batch, P, kv_heads, head_dim])."""
  cache = transformers.DynamicCache()
  for i, (k, v) in enumerate(zip(*prefix_kv)):
    as_torch = lambda a: torch.as_tensor(np.asarray(a)).transpose(1, 2)   # [b, heads, P, d]
    cache.update(as_torch(k), as_torch(v), i)
  return cache


def torch_call(model, **kw):
  with torch.no_grad():
    out = model(**{k: torch.as_tensor(np.asarray(a)) if isinstance(a, (np.ndarray, jax.Array))
                   else a for k, a in kw.items()})
  return out


def ones(n, batch=3):
  return np.ones((batch, n), np.int32)


# ----------------------------------------------------------------------------- virtual tokens

def hf_prompt_tuning(hf, task_type, embeds):
  model = peft.get_peft_model(copy.deepcopy(hf.torch_model),
                              peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=V))
  with torch.no_grad():
    model.prompt_encoder['default'].embedding.weight.copy_(torch.as_tensor(np.asarray(embeds[0])))
  return model.eval()


@pytest.mark.parametrize('name', DECODERS)
@pytest.mark.parametrize('scan', [False, True])
def test_prompt_embeds_equal_hf_peft_prompt_tuning_causal_lm(name, scan, hf_model, flax_model,
                                                             zoo):
  ids, mask = zoo.right_padded_batch()
  m = flax_model(name, scan_layers=scan)
  e = prompts(m)
  got = m.module.apply({'params': m.params}, ids, attention_mask=mask, prompt_embeds=e,
                       keep_virtual=True).logits
  model = hf_prompt_tuning(hf_model(name), 'CAUSAL_LM', e)
  want = torch_call(model, input_ids=ids.astype(np.int64), attention_mask=mask).logits.numpy()
  assert got.shape == want.shape == (3, V + ids.shape[1], zoo.VOCAB)
  assert zoo.max_diff_at(got, want, np.concatenate([ones(V), mask], 1)) < TOL
  stripped = m.apply({'params': m.params}, ids, attention_mask=mask, prompt_embeds=e).logits
  assert zoo.max_diff_at(stripped, want[:, V:], mask) < TOL


@pytest.mark.parametrize('name', ['bert', 'roberta'])
def test_prompt_embeds_equal_hf_peft_prompt_tuning_classification(name, hf_model, flax_model,
                                                                  zoo):
  """BERT pools, RoBERTa classifies, the first virtual token (HF PEFT); token types get zeros
  in front (BERT is given non-zero ones)."""
  m = flax_model(name, 'classification')
  ids, mask = zoo.right_padded_batch(pad_id=m.config.pad_token_id)
  kw = dict(attention_mask=mask)
  if name == 'bert':
    kw['token_type_ids'] = (np.arange(ids.shape[1]) >= 3).astype(np.int32)[None].repeat(3, 0)
  e = prompts(m)
  got = m.module.apply({'params': m.params}, ids, prompt_embeds=e,
                       keep_virtual=name == 'roberta', **kw).logits
  model = hf_prompt_tuning(hf_model(name, 'classification'), 'SEQ_CLS', e)
  want = torch_call(model, input_ids=ids.astype(np.int64), **kw).logits.numpy()
  assert np.abs(got - want).max() < TOL


@pytest.mark.parametrize('name', DECODERS)
@pytest.mark.parametrize('scan', [False, True])
def test_prompt_embeds_with_left_padding_equal_longer_inputs_embeds(name, scan, hf_model,
                                                                     flax_model, zoo):
  """Virtual tokens, then the left-padded row: positions count the visible tokens."""
  ids, mask, _ = zoo.left_padded_batch()
  m = flax_model(name, scan_layers=scan)
  e = prompts(m, batch=3)
  got = m.module.apply({'params': m.params}, ids, attention_mask=mask, prompt_embeds=e,
                       keep_virtual=True).logits
  long_mask = np.concatenate([ones(V), mask], 1)
  long_embeds = jnp.concatenate([e, embedding(m)[ids]], axis=1)
  same = m.apply({'params': m.params}, inputs_embeds=long_embeds, attention_mask=long_mask).logits
  pos = np.maximum(np.cumsum(long_mask, 1) - 1, 0)
  want = torch_call(hf_model(name).torch_model, inputs_embeds=np.asarray(long_embeds),
                    attention_mask=long_mask, position_ids=pos).logits.numpy()
  assert zoo.max_diff_at(got, want, long_mask) < TOL
  assert zoo.max_diff_at(got, same, long_mask) < 1e-6


def test_prompt_embeds_with_packed_rows_reach_every_segment(flax_model):
  """Explicit positions restart per segment: each packed example sees the virtual tokens and
  gives the logits it gives alone."""
  m = flax_model('llama_gqa')
  rng = np.random.default_rng(3)
  a, b = rng.integers(2, 97, 4), rng.integers(2, 97, 3)
  packed = np.concatenate([a, b, [0]])[None].astype(np.int32)
  seg = np.array([[1, 1, 1, 1, 2, 2, 2, 0]], np.int32)
  pos = np.array([[0, 1, 2, 3, 0, 1, 2, 0]], np.int32)
  e = prompts(m)
  v = {'params': m.params}
  out = m.apply(v, packed, attention_mask=seg, position_ids=pos, prompt_embeds=e).logits
  for ids, at in ((a, slice(0, 4)), (b, slice(4, 7))):
    alone = m.apply(v, ids[None].astype(np.int32), prompt_embeds=e).logits
    np.testing.assert_allclose(out[0, at], alone[0], atol=TOL)


@pytest.mark.parametrize('name,scan', [('llama_gqa', False), ('llama_gqa', True),
                                       ('gpt2', False)])
def test_prompt_embeds_with_kv_cache_equal_full_forward(name, scan, flax_model, zoo):
  """Prefill caches the virtual tokens; decode steps (which pass them again) ignore them."""
  ids, mask, _ = zoo.left_padded_batch()
  m = flax_model(name, scan_layers=scan)
  v = {'params': m.params}
  e = prompts(m)
  full = m.apply(v, ids, attention_mask=mask, prompt_embeds=e).logits
  cache = layers.init_cache(m.config, 3, V + ids.shape[1])
  out = m.apply(v, ids[:, :4], attention_mask=mask[:, :4], prompt_embeds=e, cache=cache)
  steps, cache = [out.logits], out.cache
  for i in range(4, ids.shape[1]):
    out = m.apply(v, ids[:, i:i + 1], attention_mask=mask[:, i:i + 1], prompt_embeds=e,
                  cache=cache)
    steps.append(out.logits)
    cache = out.cache
  assert int(cache.index) == V + ids.shape[1]
  np.testing.assert_array_equal(cache.pos, V + mask.sum(1))
  assert zoo.max_diff_at(jnp.concatenate(steps, axis=1), full, mask) < TOL


# ----------------------------------------------------------------------------- prefix key/values

@pytest.mark.parametrize('name', ['llama_gqa', 'llama_tied', 'gpt2', 'mistral_window'])
@pytest.mark.parametrize('scan', [False, True])
def test_prefix_kv_equals_transformers_past_key_values(name, scan, hf_model, flax_model, zoo):
  """Left padding: HF gets the extended mask and positions ``cumsum - 1`` after the prefix, as
  its ``generate`` computes them; transformers starts positions at the past length P."""
  ids, mask, pos = zoo.left_padded_batch()
  m = flax_model(name, scan_layers=scan)
  kv = prefix(m)
  got = m.apply({'params': m.params}, ids, attention_mask=mask, prefix_kv=kv).logits
  want = torch_call(hf_model(name).torch_model, input_ids=ids.astype(np.int64),
                    attention_mask=np.concatenate([ones(P), mask], 1), position_ids=pos + P,
                    cache=hf_past(kv)).logits.numpy()
  assert zoo.max_diff_at(got, want, mask) < TOL
  explicit = m.apply({'params': m.params}, ids, attention_mask=mask, prefix_kv=kv,
                     position_ids=pos).logits   # explicit positions are shifted too (HF PEFT)
  assert zoo.max_diff_at(explicit, want, mask) < TOL


@pytest.mark.parametrize('name', ['bert', 'roberta'])
def test_prefix_kv_equals_transformers_cache_for_encoders(name, hf_model, flax_model, zoo):
  """BERT's absolute positions start at the past length P; RoBERTa's at padding_idx + 1 + P."""
  m = flax_model(name, 'base')
  ids, mask = zoo.right_padded_batch(pad_id=m.config.pad_token_id)
  kv = prefix(m)
  out = m.apply({'params': m.params}, ids, attention_mask=mask, prefix_kv=kv)
  want = torch_call(hf_model(name, 'base').torch_model, input_ids=ids.astype(np.int64),
                    attention_mask=np.concatenate([ones(P), mask], 1), cache=hf_past(kv))
  assert zoo.max_diff_at(out.hidden, want.last_hidden_state.numpy(), mask) < TOL
  assert np.abs(out.pooled - want.pooler_output.numpy()).max() < TOL


@pytest.mark.parametrize('name,scan', [('llama_gqa', False), ('llama_gqa', True),
                                       ('gpt2', True), ('mistral_window', False)])
def test_prefix_kv_with_kv_cache_equals_full_forward(name, scan, flax_model, zoo):
  """Prefill writes the prefix into the first cache slots; decode steps ignore it."""
  ids, mask, _ = zoo.left_padded_batch()
  m = flax_model(name, scan_layers=scan)
  v = {'params': m.params}
  kv = prefix(m)
  pmask = np.array([[1, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]], np.int32)
  full = m.apply(v, ids, attention_mask=mask, prefix_kv=kv, prefix_mask=pmask).logits
  cache = layers.init_cache(m.config, 3, P + ids.shape[1])
  out = m.apply(v, ids[:, :4], attention_mask=mask[:, :4], prefix_kv=kv, prefix_mask=pmask,
                cache=cache)
  steps, cache = [out.logits], out.cache
  for i in range(4, ids.shape[1]):
    out = m.apply(v, ids[:, i:i + 1], attention_mask=mask[:, i:i + 1], prefix_kv=kv,
                  prefix_mask=pmask, cache=cache)
    steps.append(out.logits)
    cache = out.cache
  np.testing.assert_array_equal(cache.pos, pmask.sum(1) + mask.sum(1))
  assert zoo.max_diff_at(jnp.concatenate(steps, axis=1), full, mask) < TOL


def test_prefix_of_batch_one_broadcasts(flax_model, zoo):
  ids, mask, _ = zoo.left_padded_batch()
  m = flax_model('llama_gqa')
  one = prefix(m, batch=1)
  three = tuple(jnp.repeat(a, 3, axis=1) for a in one)
  a = m.apply({'params': m.params}, ids, attention_mask=mask, prefix_kv=one).logits
  b = m.apply({'params': m.params}, ids, attention_mask=mask, prefix_kv=three).logits
  np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- bad inputs

def test_bad_hook_inputs_are_named(flax_model, zoo):
  ids, mask, _ = zoo.left_padded_batch()
  m = flax_model('llama_gqa')
  v = {'params': m.params}
  with pytest.raises(ValueError, match=r'prompt_embeds shape \(3, 3, 16\); expected \(3 or 1'):
    m.module.apply(v, ids, prompt_embeds=jnp.zeros((3, 3, 16)))
  with pytest.raises(ValueError, match=r'prefix_kv k shape \(2, 3, 4, 4, 8\); expected '
                                       r'\(2, 3, 4, 2, 8\)'):
    bad = jnp.zeros((2, 3, 4, 4, 8))
    m.module.apply(v, ids, prefix_kv=(bad, bad))
  kv = prefix(m)
  with pytest.raises(ValueError, match=r'prefix_mask shape \(3, 5\); expected \(3, 4\)'):
    m.module.apply(v, ids, prefix_kv=kv, prefix_mask=jnp.ones((3, 5)))
  with pytest.raises(ValueError, match='prefix_mask given without prefix_kv'):
    m.module.apply(v, ids, prefix_mask=jnp.ones((3, 5)))
  with pytest.raises(ValueError, match=r'the KV cache has 8 slots; this call needs at least 14 '
                                       r'\(prefix 4 \+ virtual tokens 3 \+ tokens 7\)'):
    m.module.apply(v, ids, prefix_kv=kv, prompt_embeds=prompts(m),
                   cache=layers.init_cache(m.config, 3, 8))


def test_prefix_and_virtual_tokens_together_equal_transformers(hf_model, flax_model, zoo):
  """P-tuning v2 + prompt tuning stacked: prefix, then virtual tokens, then the tokens."""
  ids, mask = zoo.right_padded_batch()
  m = flax_model('llama_gqa')
  kv, e = prefix(m), prompts(m)
  got = m.module.apply({'params': m.params}, ids, attention_mask=mask, prefix_kv=kv,
                       prompt_embeds=e, keep_virtual=True).logits
  long_mask = np.concatenate([ones(V), mask], 1)
  long_embeds = jnp.concatenate([jnp.repeat(e, 3, 0), embedding(m)[ids]], axis=1)
  want = torch_call(hf_model('llama_gqa').torch_model, inputs_embeds=np.asarray(long_embeds),
                    attention_mask=np.concatenate([ones(P), long_mask], 1),
                    cache=hf_past(kv)).logits.numpy()
  assert zoo.max_diff_at(got, want, long_mask) < TOL


# ----------------------------------------------------------------------------- layout table

@pytest.mark.parametrize('name,task', [('llama_gqa', 'causal_lm'), ('llama_tied', 'causal_lm'),
                                       ('gpt2', 'classification'), ('bert', 'classification'),
                                       ('roberta', 'classification')])
@pytest.mark.parametrize('scan', [False, True])
def test_layout_names_the_modules_the_models_have(name, task, scan, flax_model, zoo):
  m = flax_model(name, task, scan_layers=scan)
  paths = [p.split('/') for p in tree.flatten(m.params)]
  modules = {'/'.join(p[:i]) for p in paths for i in range(1, len(p))}
  emb = families.embedding_path(m.config)
  assert emb in modules
  stack = f'{m.config.base_prefix}/{families.layout(m.config).layers}'
  stacks = {p for p in modules if re.fullmatch(families.layers_regex(m.config), p)}
  assert stacks == ({stack} if scan else {f'{stack}_0', f'{stack}_1'})
  heads = {p[0] for p in paths} - {m.config.base_prefix}
  assert heads == set(families.head_modules(m.config, task)) - (
      {'lm_head'} if m.config.tie_word_embeddings else set())
  assert families.output_head(m.config, tied=True) == emb
  seen = set()

  def spy(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Embed) and context.method_name == '__call__':
      seen.add('/'.join(context.module.path))
    return next_fun(*args, **kwargs)

  ids, mask = zoo.right_padded_batch(pad_id=m.config.pad_token_id)
  with nn.intercept_methods(spy):
    m.module.apply({'params': m.params}, ids, attention_mask=mask, prompt_embeds=prompts(m))
  assert emb in seen   # the tokens go through the model's own embedding, virtual tokens or not


def test_layout_refuses_unknown_model_types():
  with pytest.raises(errors.UnsupportedModelError, match="model_type 't5' is not supported"):
    families.layout('t5')
  assert registry.family('qwen2').layout is families.LAYOUTS['llama']


# ----------------------------------------------------------------------------- gradients

def test_prompt_embeds_gradient_equals_longer_inputs_embeds_gradient(flax_model, zoo):
  """What prompt tuning trains: d loss / d prompt_embeds through the hook == through the
  explicit longer ``inputs_embeds`` (scanned layers)."""
  ids, mask = zoo.right_padded_batch()
  m = flax_model('llama_gqa', scan_layers=True)
  e = prompts(m, batch=3)
  w = np.random.default_rng(2).normal(size=(3, ids.shape[1], zoo.VOCAB)).astype(np.float32)
  w = w * mask[..., None]   # pad positions are garbage (pad queries see the virtual tokens here)
  tokens = embedding(m)[ids]
  long_mask = np.concatenate([ones(V), mask], 1)

  def hook(e):
    return jnp.sum(w * m.apply({'params': m.params}, ids, attention_mask=mask,
                               prompt_embeds=e).logits)

  def explicit(e):
    out = m.apply({'params': m.params}, inputs_embeds=jnp.concatenate([e, tokens], 1),
                  attention_mask=long_mask).logits
    return jnp.sum(w * out[:, V:])

  got, want = jax.grad(hook)(e), jax.grad(explicit)(e)
  assert np.abs(want).max() > 1e-3
  np.testing.assert_allclose(got, want, atol=TOL)


def test_prefix_kv_gradient_equals_transformers(hf_model, flax_model, zoo):
  """What prefix tuning trains: d loss / d prefix (k, v) == torch autograd through transformers'
  cache of the same tensors (scanned layers, left padding)."""
  ids, mask, pos = zoo.left_padded_batch()
  m = flax_model('llama_gqa', scan_layers=True)
  kv = prefix(m)
  w = np.random.default_rng(2).normal(size=(3, ids.shape[1], zoo.VOCAB)).astype(np.float32)
  w = w * mask[..., None]

  def loss(kv):
    out = m.apply({'params': m.params}, ids, attention_mask=mask, prefix_kv=kv).logits
    return jnp.sum(w * out)

  got = jax.grad(loss)(kv)
  tk, tv = (torch.tensor(np.asarray(a), requires_grad=True) for a in kv)
  cache = transformers.DynamicCache()
  for i in range(m.config.num_layers):
    cache.update(tk[i].transpose(1, 2), tv[i].transpose(1, 2), i)
  logits = hf_model('llama_gqa').torch_model(
      input_ids=torch.as_tensor(ids).long(),
      attention_mask=torch.as_tensor(np.concatenate([ones(P), mask], 1)),
      position_ids=torch.as_tensor(pos + P).long(), cache=cache).logits
  (logits * torch.as_tensor(w)).sum().backward()
  for g, t in zip(got, (tk, tv)):
    assert np.abs(t.grad.numpy()).max() > 1e-3
    np.testing.assert_allclose(g, t.grad.numpy(), atol=TOL)
