"""The blockwise attention (``attention_impl='flash'``) == the einsum reference, values and
gradients in float32: causal, padding, sliding-window and segment masks, GQA, rows that see no
key, prefix key/values, virtual tokens, the KV cache; remat policies; sequence-length checks."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import errors
from peftjax.models import flash, layers, llama, registry

TOL = 1e-5


@pytest.fixture
def small_blocks(monkeypatch):
  """Blocks of 3 queries and 4 keys, so the tiny models' sequences span several (padded) ones."""
  monkeypatch.setattr(flash, 'BLOCK_Q', 3)
  monkeypatch.setattr(flash, 'BLOCK_K', 4)


def assert_close_tree(got, ref, tol=TOL):
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), got, ref))
  assert max(diffs) < tol, max(diffs)


@pytest.mark.parametrize('causal,window,segments,kv_heads', [
    (False, None, False, 4), (True, None, False, 2), (True, 5, False, 1),
    (False, None, True, 2), (True, 3, True, 2)])
def test_flash_equals_einsum_values_and_gradients(causal, window, segments, kv_heads):
  rng = np.random.default_rng(0)
  b, t, s, heads, d = 2, 13, 17, 4, 8
  q, w = (jnp.asarray(rng.normal(size=(b, t, heads, d)), jnp.float32) for _ in 'qw')
  k, v = (jnp.asarray(rng.normal(size=(b, s, kv_heads, d)), jnp.float32) for _ in 'kv')
  q_seg = k_seg = None
  if segments:   # k_seg -1: visible to every segment (prefix, virtual tokens)
    q_seg = jnp.asarray(rng.integers(0, 3, (b, t)))
    k_seg = jnp.asarray(rng.integers(-1, 3, (b, s)))
  spec = flash.MaskSpec(jnp.arange(t) + s - t, jnp.asarray(rng.random((b, s)) < 0.8), q_seg,
                        k_seg, causal=causal, window=window)
  mask = spec.dense()
  if window == 3:
    assert (~mask.any(-1)).sum() > 0   # rows that see no key: uniform weights in both
  ref_fn = lambda q, k, v: layers.einsum_attention(q, k, v, mask)
  for bq, bk in ((4, 5), (1, 1), (512, 512)):   # padded blocks, single keys, one block
    got_fn = lambda q, k, v: flash.flash_attention(q, k, v, spec, block_q=bq, block_k=bk)
    np.testing.assert_allclose(got_fn(q, k, v), ref_fn(q, k, v), atol=TOL)
    grads = [jax.grad(lambda *a: jnp.sum(w * f(*a)), (0, 1, 2))(q, k, v)
             for f in (got_fn, ref_fn)]
    assert_close_tree(*grads)


def with_config(m, **changes):
  config = dataclasses.replace(m.config, **changes)
  return registry.build(config, 'causal_lm' if config.is_decoder else 'base'), config


def test_packed_rows_with_virtual_tokens(flax_model, small_blocks):
  """Segment ids 1..k (0 = pad) and prompt embeddings visible to every segment."""
  m = flax_model('llama_gqa')
  ids = jnp.asarray(np.random.default_rng(1).integers(2, 97, (2, 8)), jnp.int32)
  seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 3, 3], [1, 1, 1, 1, 2, 2, 0, 0]])
  prompts = jnp.asarray(np.random.default_rng(2).normal(size=(1, 3, 32)), jnp.float32)

  def run(impl):
    module, _ = with_config(m, attention_impl=impl)
    loss = lambda p: jnp.sum(jnp.where(seg[..., None] > 0, module.apply(
        {'params': m.params}, ids, attention_mask=seg, prompt_embeds=p).logits, 0) ** 2)
    return jax.value_and_grad(loss)(prompts)

  (l_ref, g_ref), (l_got, g_got) = run('einsum'), run('flash')
  assert abs(float(l_got - l_ref)) / float(l_ref) < TOL
  np.testing.assert_allclose(g_got, g_ref, rtol=TOL, atol=TOL * float(jnp.abs(g_ref).max()))


def test_cache_prefill_with_prefix_and_decode(flax_model, zoo, small_blocks):
  """Mistral (window 3, GQA): prefix written into the cache, prefill, then decode steps."""
  ids, mask, _ = zoo.left_padded_batch()
  m = flax_model('mistral_window')
  kv = tuple(jnp.asarray(np.random.default_rng(i).normal(size=(2, 1, 2, 2, 8)), jnp.float32)
             for i in range(2))
  outs = []
  for impl in ('einsum', 'flash'):
    module, config = with_config(m, attention_impl=impl)
    v = {'params': m.params}
    out = module.apply(v, ids[:, :4], attention_mask=mask[:, :4], prefix_kv=kv,
                       cache=layers.init_cache(config, 3, 11))
    steps, cache = [out.logits], out.cache
    for i in range(4, ids.shape[1]):
      out = module.apply(v, ids[:, i:i + 1], attention_mask=mask[:, i:i + 1], cache=cache)
      steps.append(out.logits)
      cache = out.cache
    outs.append(jnp.concatenate(steps, axis=1))
  assert zoo.max_diff_at(outs[1], outs[0], mask) < TOL


def test_auto_takes_flash_for_long_sequences_on_cpu():
  n = layers.FLASH_AUTO_MIN_LENGTH
  assert layers.resolve_impl('auto', n) == 'flash'
  assert layers.resolve_impl('auto', n - 1) == 'auto'     # short sequences, decode steps
  assert layers.resolve_impl('xla', n) == 'xla'
  ctx, _ = layers.attention_context(1, n, causal=True)
  assert ctx.impl == 'flash' and ctx.mask is None          # no [batch, T, T] mask either
  ctx, _ = layers.attention_context(1, 8, causal=True)
  assert ctx.mask.shape == (1, 8, 8)


def test_flash_with_dropout_takes_the_einsum_path():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(1, 5, 2, 4)), jnp.float32) for _ in 'qkv')
  ctx, _ = layers.attention_context(1, 5, causal=True, impl='flash')
  key = jax.random.key(0)
  got, _ = layers.attend(q, k, v, ctx, dropout_rate=0.5, dropout_rng=key)
  ref = layers.einsum_attention(q, k, v, ctx.spec.dense(), dropout_rate=0.5, dropout_rng=key)
  np.testing.assert_array_equal(got, ref)


# ----------------------------------------------------------------------------- remat

@pytest.mark.parametrize('scan', [False, True])
def test_remat_policies_agree_and_recompute_what_they_say(scan, flax_model, zoo):
  m = flax_model('llama_gqa', scan_layers=scan)
  ids, mask, _ = zoo.left_padded_batch()
  results, dots = {}, {}
  for policy in layers.REMAT_POLICIES:
    module, _ = with_config(m, remat=policy)
    loss = lambda p: jnp.mean(module.apply({'params': p}, ids, attention_mask=mask).logits ** 2)
    grad = jax.value_and_grad(loss)
    results[policy] = jax.jit(grad)(m.params)
    dots[policy] = str(jax.make_jaxpr(grad)(m.params)).count('dot_general')
  for policy in ('dots', 'full'):
    assert_close_tree(results[policy], results['none'], 1e-6)
  # the backward recomputes: 'dots' only the batched attention matmuls, 'full' every matmul
  assert dots['none'] < dots['dots'] < dots['full']


def test_remat_bool_and_unknown_policy():
  assert layers.remat_policy(False) == 'none' and layers.remat_policy(True) == 'full'
  with pytest.raises(errors.UnsupportedModelError,
                     match="remat policy 'dot' is not supported; valid: none, dots, full"):
    llama.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                      num_heads=2, remat='dot')


# ----------------------------------------------------------------------------- lengths

@pytest.mark.parametrize('name', ['llama_gqa', 'gpt2', 'roberta'])
def test_sequence_longer_than_positions_names_both_lengths(name, flax_model):
  m = flax_model(name, 'causal_lm' if name != 'roberta' else 'base')
  limit = 64   # tests/conftest.py; RoBERTa's 66 less padding_idx + 1
  m.module.apply({'params': m.params}, jnp.ones((1, limit), jnp.int32))
  with pytest.raises(ValueError, match=f'sequence length {limit + 1} .*tokens {limit + 1}.* '
                                       f'exceeds the {limit} positions'):
    m.module.apply({'params': m.params}, jnp.ones((1, limit + 1), jnp.int32))
  if name == 'llama_gqa':   # virtual tokens count
    with pytest.raises(ValueError, match=r'sequence length 66 \(prefix 0 \+ virtual tokens 6 '
                                         r'\+ tokens 60\) exceeds the 64 positions'):
      m.module.apply({'params': m.params}, jnp.ones((1, 60), jnp.int32),
                     prompt_embeds=jnp.zeros((1, 6, 32)))
