"""Every weight-space method on a user-defined Linen model, unscanned and nn.scan'ned."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax import methods, tree

HIDDEN, LAYERS = 16, 2


class Block(nn.Module):
  """A pre-norm attention + MLP block with HF-style projection names."""

  @nn.compact
  def __call__(self, x, _=None):
    h = nn.LayerNorm(name='input_layernorm')(x)
    q, k, v = (nn.Dense(HIDDEN, name=n)(h) for n in ('q_proj', 'k_proj', 'v_proj'))
    att = jax.nn.softmax(q @ k.swapaxes(-1, -2) / np.sqrt(HIDDEN)) @ v
    x = x + nn.Dense(HIDDEN, name='o_proj')(att)
    h = nn.LayerNorm(name='post_attention_layernorm')(x)
    x = x + nn.Dense(HIDDEN, name='down_proj')(nn.gelu(nn.Dense(2 * HIDDEN, name='up_proj')(h)))
    return x, None


class Net(nn.Module):
  scan: bool = False

  @nn.compact
  def __call__(self, x):
    if self.scan:
      stack = nn.scan(Block, variable_axes={True: 0}, split_rngs={'params': True, 'dropout': True},
                      length=LAYERS)
      x, _ = stack(name='layers')(x, None)
    else:
      for i in range(LAYERS):
        x, _ = Block(name=f'layers_{i}')(x)
    return nn.Dense(5, name='lm_head')(x)


METHODS = {
    'full': methods.full,
    'bitfit': methods.bitfit,
    'bitfit_norm': functools.partial(methods.bitfit, include_norm=True),
    'lora': functools.partial(methods.lora, rank=4, alpha=8, target=r'.*/(q_proj|v_proj)'),
    'rslora': functools.partial(methods.get, 'rslora', rank=4, model_type='llama'),
    'dora': functools.partial(methods.lora, rank=4, dora=True),  # all-linear
    'ia3': functools.partial(methods.get, 'ia3', model_type='llama'),
    'houlsby': functools.partial(methods.get, 'houlsby', model_type='llama', bottleneck=3),
    'pfeiffer': functools.partial(methods.get, 'pfeiffer', model_type='llama', bottleneck=3),
    'lora+bitfit': lambda: methods.compose(methods.lora(rank=2, target='.*_proj'),
                                           methods.bitfit()),
    'ia3+lora': lambda: methods.compose(methods.get('ia3', model_type='llama'),
                                        methods.lora(rank=2, target='.*_proj')),
}


@functools.cache
def _model(scan):
  """The model, its jitted apply, an input and params (jitted: eager Flax is slow on CPU)."""
  model = Net(scan=scan)
  x = jax.random.normal(jax.random.key(0), (2, 3, HIDDEN))
  params = jax.jit(model.init)(jax.random.key(1), x)['params']
  return model, jax.jit(model.apply), x, params


def _setup(name, scan):
  model, _, x, params = _model(scan)
  method = METHODS[name]()
  adapter = method.init(jax.random.key(2), params)
  return model, x, params, method, adapter


def _perturb(adapter):
  rng = np.random.default_rng(3)
  return jax.tree.map(lambda l: l + 0.1 * rng.normal(size=l.shape).astype(np.float32), adapter)


@pytest.mark.parametrize('scan', [False, True], ids=['unscanned', 'scanned'])
@pytest.mark.parametrize('name', list(METHODS))
def test_identity_at_init_and_merged_equals_unmerged(name, scan):
  model, x, params, method, adapter = _setup(name, scan)
  apply = _model(scan)[1]
  base = apply({'params': params}, x)
  adapted = jax.jit(method.apply(model.apply))
  # measured max |diff| 8.3e-7 (DoRA recomputes the column norms), 0.0 for the others
  np.testing.assert_allclose(adapted(adapter, params, x), base, atol=2e-6, rtol=0)

  tuned = _perturb(adapter)
  y = adapted(tuned, params, x)
  assert np.abs(y - base).max() > 1e-3  # the adapter does act on the output
  if method.merge is not None:
    merged = jax.jit(method.merge)(tuned, params)
    # outputs up to ~7: measured max |diff| 1.9e-6 (rslora), 1.7e-6 (ia3, lora+bitfit)
    np.testing.assert_allclose(apply({'params': merged}, x), y, atol=5e-6, rtol=0)
    assert jax.tree.structure(merged) == jax.tree.structure(tree.unflatten(tree.flatten(params)))


@pytest.mark.parametrize('name, scan', [('lora', False), ('dora', True), ('ia3', True),
                                        ('houlsby', False), ('lora+bitfit', True)])
def test_gradients_only_for_adapter_and_base_untouched(name, scan):
  model, x, params, method, adapter = _setup(name, scan)
  frozen = jax.tree.map(np.array, params)
  adapted = method.apply(model.apply)
  tx = optax.adam(1e-2)

  @jax.jit
  def step(adapter, opt_state):
    loss = lambda a: jnp.mean(adapted(a, params, x) ** 2)
    grads = jax.grad(loss)(adapter)
    updates, opt_state = tx.update(grads, opt_state, adapter)
    return optax.apply_updates(adapter, updates), opt_state, grads

  new, _, grads = step(adapter, tx.init(adapter))
  assert jax.tree.structure(grads) == jax.tree.structure(adapter)
  assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))
  assert any(np.abs(n - a).max() > 0
             for n, a in zip(jax.tree.leaves(new), jax.tree.leaves(adapter)))
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(frozen)))


def test_scanned_adapter_has_layer_axis_and_is_sliced_per_layer():
  model, x, params, method, adapter = _setup('lora', scan=True)
  assert adapter['layers']['q_proj']['lora_A'].shape == (LAYERS, HIDDEN, 4)
  assert not np.allclose(*adapter['layers']['q_proj']['lora_A'])  # per-layer random init
  adapted = jax.jit(method.apply(model.apply))
  b = adapter['layers']['v_proj']['lora_B']
  only_layer_1 = b.at[1].set(1.0)
  y0 = adapted(adapter, params, x)
  y1 = adapted({**adapter, 'layers': {**adapter['layers'], 'v_proj': {
      'lora_A': adapter['layers']['v_proj']['lora_A'], 'lora_B': only_layer_1}}}, params, x)
  assert np.abs(y1 - y0).max() > 1e-3


def test_trainable_counts_on_toy_model():
  _, _, params, _, lora_adapter = _setup('lora', scan=False)
  assert tree.count(lora_adapter) == LAYERS * 2 * (HIDDEN * 4 + 4 * HIDDEN)
  _, _, _, _, ia3_adapter = _setup('ia3', scan=True)  # k, v out scaling; down_proj input scaling
  assert tree.count(ia3_adapter) == LAYERS * (HIDDEN + HIDDEN + 2 * HIDDEN)
  _, _, _, _, full_adapter = _setup('full', scan=True)
  assert tree.count(full_adapter) == tree.count(params)


def test_lora_dropout_uses_dropout_rng_only_when_training():
  model, _, x, params = _model(scan=False)
  method = methods.lora(rank=4, target='.*q_proj', dropout=0.5)
  adapter = _perturb(method.init(jax.random.key(2), params))
  adapted = jax.jit(method.apply(model.apply))
  eval_out = adapted(adapter, params, x)
  train_a = adapted(adapter, params, x, rngs={'dropout': jax.random.key(4)})
  train_b = adapted(adapter, params, x, rngs={'dropout': jax.random.key(5)})
  assert np.abs(train_a - eval_out).max() > 1e-4 and np.abs(train_a - train_b).max() > 1e-4
  np.testing.assert_array_equal(
      adapted(adapter, params, x, rngs={'dropout': jax.random.key(4)}), train_a)


def test_bad_inputs_name_the_value():
  model, x, params, _, _ = _setup('lora', scan=False)
  with pytest.raises(ValueError, match="unknown PEFT method 'lorra'.*'lora'"):
    methods.get('lorra')
  with pytest.raises(ValueError, match='rank must be a positive int, got 0'):
    methods.lora(rank=0)
  with pytest.raises(ValueError, match=r'rank 17 exceeds min\(in, out\) = 16 of layers_0/q_proj'):
    methods.lora(rank=17, target='.*q_proj').init(jax.random.key(0), params)
  with pytest.raises(ValueError,
                     match=r"pattern '.\*/query' matches no linear or embedding module path.*q_proj"):
    methods.lora(target='.*/query').init(jax.random.key(0), params)
  with pytest.raises(ValueError, match="model_type 'gptj'"):
    methods.get('lora', model_type='gptj')
  with pytest.raises(ValueError, match="present in more than one tree"):
    methods.compose(methods.bitfit(), methods.bitfit()).init(jax.random.key(0), params)


def test_all_linear_excludes_output_head():
  _, _, params, _, adapter = _setup('dora', scan=False)
  modules = methods.by_module(adapter)
  assert 'lm_head' not in modules and len(modules) == LAYERS * 6


def test_multi_axis_dense_general_is_rejected_by_name():
  class Heads(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.DenseGeneral((2, 4), name='q_proj')(x)

  x = jnp.ones((1, 8))
  params = Heads().init(jax.random.key(0), x)['params']
  method = methods.lora(rank=2, target='q_proj')
  adapter = method.init(jax.random.key(1), params)
  with pytest.raises(ValueError, match=r'q_proj: adapters support DenseGeneral with one input'):
    method.apply(Heads().apply)(adapter, params, x)


def test_scan_without_adapter_collection_raises_instead_of_ignoring_adapter():
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return nn.Dense(4, name='q_proj')(x), None

  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      stack = nn.scan(Block, variable_axes={'params': 0}, split_rngs={'params': True}, length=2)
      return stack(name='layers')(x, None)[0]

  x = jnp.ones((1, 4))
  params = Stack().init(jax.random.key(0), x)['params']
  method = methods.lora(rank=2, target='.*q_proj')
  with pytest.raises(ValueError, match=r"\['layers/q_proj'\].*variable_axes"):
    method.apply(Stack().apply)(method.init(jax.random.key(1), params), params, x)


@pytest.mark.parametrize('scan', [False, True], ids=['unscanned', 'scanned'])
def test_houlsby_trains_the_layer_norms_pfeiffer_does_not(scan):
  model, x, params, method, adapter = _setup('houlsby', scan)
  norms = {p: v for p, v in tree.flatten(adapter).items() if 'layernorm' in p}
  want = {p for p in tree.flatten(params) if 'layernorm' in p}  # scale and bias of 2 LNs per layer
  assert set(norms) == want and len(want) == (4 if scan else 4 * LAYERS)
  grads = jax.grad(lambda a: jnp.mean(method.apply(model.apply)(a, params, x) ** 2))(
      _perturb(adapter))
  assert all(np.abs(tree.flatten(grads)[p]).max() > 0 for p in norms)
  tuned = {**tree.flatten(adapter), **{p: v + 0.5 for p, v in norms.items()}}
  base = method.apply(model.apply)(adapter, params, x)
  assert np.abs(method.apply(model.apply)(tree.unflatten(tuned), params, x) - base).max() > 1e-2
  pfeiffer = _setup('pfeiffer', scan)[-1]
  assert not any('layernorm' in p for p in tree.flatten(pfeiffer))
