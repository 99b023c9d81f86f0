"""The LM loss goes through the model's (adapted) head: an adapter on ``lm_head`` trains, and
every path (fused kernel, the model's head on chunks) equals the naive full-logits loss of the
adapted model."""
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax import methods, sharding
from peftjax.models import heads
from peftjax.objectives import lm
from peftjax.train import tasks
from peftjax.train.state import init_train_state
from peftjax.train.step import make_train_step


def sft_batch(vocab, seed=0, b=2, t=9):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab, (b, t)).astype(np.int32)
  attention = np.ones((b, t), np.int32)
  attention[1, -2:] = 0                              # right padding
  response = np.zeros((b, t), np.int32)
  response[:, 4:] = 1
  labels, loss_mask = lm.next_token_targets(jnp.asarray(ids), jnp.asarray(response * attention))
  return {'input_ids': jnp.asarray(ids), 'attention_mask': jnp.asarray(attention),
          'position_ids': jnp.asarray(np.maximum(np.cumsum(attention, 1) - 1, 0)),
          'labels': labels, 'loss_mask': loss_mask}


def perturbed(adapter, seed=1):
  """The adapter with every leaf moved off its identity init (so B = 0 hides nothing)."""
  leaves, treedef = jax.tree.flatten(nn.meta.unbox(adapter))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape)
                                      for x, k in zip(leaves, keys)])


def setup(flax_model, name, method, seed=1):
  fm = flax_model(name)
  adapter = perturbed(method.init(jax.random.key(0), fm.params), seed)
  apply = method.apply(fm.module.apply)
  loss_fn = tasks.get('sft').loss_fn(apply, types.SimpleNamespace(config=fm.config))
  return fm, adapter, apply, loss_fn


def naive_loss(apply, adapter, params, batch):
  logits = apply(adapter, params, batch['input_ids'], attention_mask=batch['attention_mask'],
                 position_ids=batch['position_ids']).logits
  return lm.lm_loss_from_logits(logits, batch['labels'], batch['loss_mask'])


def assert_loss_and_grads_match_naive(loss_fn, apply, adapter, params, batch):
  (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(adapter, params, batch, None)
  want, want_grads = jax.value_and_grad(lambda a: naive_loss(apply, a, params, batch))(adapter)
  np.testing.assert_allclose(loss, want, atol=2e-6, rtol=1e-6)
  for got, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, ref, atol=2e-6, rtol=1e-6)
  return grads


def test_head_method_through_the_peft_apply(flax_model):
  """`apply(adapter, params, hidden, method='head')` runs the adapted lm_head: the logits of the
  model call, from its hidden states."""
  method = methods.lora(rank=4, target='lm_head')
  fm, adapter, apply, _ = setup(flax_model, 'llama_gqa', method)
  batch = sft_batch(fm.config.vocab_size)
  out = apply(adapter, fm.params, batch['input_ids'], attention_mask=batch['attention_mask'])
  logits = apply(adapter, fm.params, out.hidden, method='head')
  np.testing.assert_allclose(logits, out.logits, atol=1e-6, rtol=1e-6)
  plain = fm.module.apply({'params': fm.params}, out.hidden, method='head')
  assert float(jnp.abs(plain - logits).max()) > 1e-2      # the adapter does change the head


@pytest.mark.parametrize('target', ['lm_head', '(.*/)?(q_proj|lm_head)'])
def test_sft_loss_through_adapted_head_equals_naive(flax_model, target):
  method = methods.lora(rank=4, target=target)
  fm, adapter, apply, loss_fn = setup(flax_model, 'llama_gqa', method)
  assert heads.head_adapter(fm.config, adapter, fm.params).keys() == {'lm_head'}
  grads = assert_loss_and_grads_match_naive(loss_fn, apply, adapter, fm.params,
                                            sft_batch(fm.config.vocab_size))
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads['lm_head']))


def test_lm_head_lora_trains(flax_model):
  """From the identity init (B = 0), an lm_head LoRA gets a non-zero gradient and a few Adam
  steps lower the SFT loss."""
  fm = flax_model('llama_gqa')
  method = methods.lora(rank=4, target='lm_head')
  adapter = nn.meta.unbox(method.init(jax.random.key(0), fm.params))
  loss_fn = tasks.get('sft').loss_fn(method.apply(fm.module.apply),
                                     types.SimpleNamespace(config=fm.config))
  batch = sft_batch(fm.config.vocab_size)
  grad_fn = jax.jit(jax.value_and_grad(lambda a: loss_fn(a, fm.params, batch, None)[0]))
  loss0, grads = grad_fn(adapter)
  assert float(jnp.abs(grads['lm_head']['lora_B']).max()) > 1e-3
  tx = optax.adam(1e-2)
  opt = tx.init(adapter)
  for _ in range(5):
    loss, grads = grad_fn(adapter)
    updates, opt = tx.update(grads, opt)
    adapter = optax.apply_updates(adapter, updates)
  assert float(grad_fn(adapter)[0]) < float(loss0) - 0.05


def test_lm_head_lora_dropout_in_training(flax_model):
  """In training the head's adapter dropout is on (loss differs from eval), in eval it is off."""
  method = methods.lora(rank=4, target='lm_head', dropout=0.5)
  fm, adapter, _, loss_fn = setup(flax_model, 'llama_gqa', method)
  batch = sft_batch(fm.config.vocab_size)
  eval_loss = loss_fn(adapter, fm.params, batch, None)[0]
  train_loss = loss_fn(adapter, fm.params, batch, jax.random.key(3))[0]
  assert abs(float(train_loss) - float(eval_loss)) > 1e-4


@pytest.mark.parametrize('name,method', [
    # tied: a LoRA on the embedding adapts the token lookup, not the LM head (HF PEFT)
    ('llama_tied', methods.lora(rank=4, target='.*/(embed_tokens|q_proj)')),
    ('gpt2', methods.lora(rank=4, target='.*/(wte|c_attn)')),
    # a replaced param: the fused path reads the head from the substituted params
    ('llama_tied', methods.full()),
    ('llama_gqa', methods.compose(methods.lora(rank=4, target='.*/q_proj'),
                                  methods.modules_to_save(['lm_head/kernel']))),
])
def test_fused_head_equals_naive(flax_model, name, method):
  fm, adapter, apply, loss_fn = setup(flax_model, name, method)
  assert heads.head_adapter(fm.config, adapter, fm.params) is None
  grads = assert_loss_and_grads_match_naive(loss_fn, apply, adapter, fm.params,
                                            sft_batch(fm.config.vocab_size))
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize('name,target', [('llama_gqa', '(.*/)?(q_proj|lm_head)'),
                                         ('llama_tied', '.*/(embed_tokens|q_proj)')])
def test_lm_logprobs_equal_log_softmax_of_the_adapted_model(flax_model, name, target):
  """Per-token and per-sequence log-probs through the adapted model (fused or via its head)
  equal log_softmax gathered from the adapted model's full logits, gradients included."""
  fm, adapter, apply, _ = setup(flax_model, name, methods.lora(rank=4, target=target))
  batch = sft_batch(fm.config.vocab_size)
  labels, mask = batch['labels'], batch['loss_mask']
  kw = dict(attention_mask=batch['attention_mask'], position_ids=batch['position_ids'])

  def ours(a):
    hidden = apply(a, fm.params, batch['input_ids'], **kw).hidden
    return tasks.lm_logprobs(apply, fm.config, a, fm.params, hidden, labels, mask, chunk=5)

  def naive(a):
    logp = jax.nn.log_softmax(apply(a, fm.params, batch['input_ids'], **kw).logits, -1)
    token = jnp.take_along_axis(logp, labels[..., None], -1)[..., 0] * mask
    return lm.LogProbs(token, token.sum(-1), mask.sum(-1))

  for got, want in zip(ours(adapter), naive(adapter)):
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-6)
  weights = jnp.arange(1.0, 3.0)
  grads = jax.grad(lambda a: jnp.sum(ours(a).sequence * weights))(adapter)
  want = jax.grad(lambda a: jnp.sum(naive(a).sequence * weights))(adapter)
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):   # measured: 3.9e-6 on 1.5
    np.testing.assert_allclose(g, w, atol=2e-6, rtol=5e-6)


def test_lm_head_lora_in_the_sharded_train_step(flax_model):
  """The real step (8 devices, 2x2x2 mesh, state in its shardings, dropout on): an lm_head +
  q_proj LoRA trains from its identity init and the SFT loss goes down."""
  fm = flax_model('llama_gqa')
  mesh = sharding.make_mesh(2, 2, 2)
  axes, base_sh = sharding.model_shardings(fm.module, mesh)
  base = jax.device_put(fm.params, base_sh)
  method = methods.lora(rank=4, target='(.*/)?(q_proj|lm_head)', dropout=0.1)
  tx = optax.adam(1e-2)
  state, state_sh = init_train_state(method.init, tx, jax.random.key(0), base, axes, mesh)
  loss_fn = tasks.get('sft').loss_fn(method.apply(fm.module.apply),
                                     types.SimpleNamespace(config=fm.config))
  step = make_train_step(loss_fn, tx, state_shardings=state_sh, base_shardings=base_sh,
                         batch_sharding=sharding.batch_sharding(mesh))
  batch = sharding.global_batch(sft_batch(fm.config.vocab_size, b=4), mesh)
  losses = []
  for _ in range(6):
    state, metrics = step(state, base, batch)
    losses.append(float(metrics['loss']))
  assert losses[-1] < losses[0] - 0.05
  assert float(jnp.abs(state.adapter['lm_head']['lora_B']).max()) > 1e-3
