"""Schedules (warmup/decay, ULMFiT STLR), discriminative LRs, gradual unfreezing, LoRA+, config."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax.train import optim


def test_slanted_triangular_matches_ulmfit_formula():
  T, cut_frac, ratio, lr = 1000, 0.1, 32, 0.01
  schedule = optim.slanted_triangular(lr, T, cut_frac, ratio)
  cut = 100
  for t in (0, 50, 99, 100, 101, 550, 999, 1000):
    p = t / cut if t < cut else 1 - (t - cut) / (cut * (1 / cut_frac - 1))
    np.testing.assert_allclose(schedule(t), lr * (1 + p * (ratio - 1)) / ratio, rtol=1e-6)
  np.testing.assert_allclose(schedule(0), lr / 32, rtol=1e-6)
  np.testing.assert_allclose(schedule(100), lr, rtol=1e-6)
  np.testing.assert_allclose(schedule(1000), lr / 32, rtol=1e-6)
  with pytest.raises(ValueError, match='cut_frac'):
    optim.slanted_triangular(lr, 5, 0.1)


def test_warmup_then_decay():
  cos = optim.warmup_decay(1.0, 110, warmup_steps=10, decay='cosine')
  np.testing.assert_allclose([cos(0), cos(5), cos(10), cos(60), cos(110)], [0, 0.5, 1, 0.5, 0], atol=1e-6)
  lin = optim.warmup_decay(1.0, 110, warmup_steps=10, decay='linear', end_lr=0.1)
  np.testing.assert_allclose([lin(60), lin(110)], [0.55, 0.1], atol=1e-6)
  np.testing.assert_allclose(optim.warmup_decay(2.0, 10, decay='constant')(7), 2.0)
  with pytest.raises(ValueError, match="'step'"):
    optim.warmup_decay(1.0, 10, decay='step')


def test_layer_positions_from_paths():
  tree = {'model': {'embed_tokens': {'embedding': 0.}, 'layers_0': {'w': 0.}, 'layers_3': {'w': 0.},
                    'norm': {'scale': 0.}}, 'lm_head': {'kernel': 0.},
          'transformer': {'h_1': {'w': 0.}}, 'bert': {'encoder': {'layer_2': {'w': 0.}}}}
  pos, L = optim.layer_positions(tree)
  assert L == 4
  assert pos['model']['embed_tokens']['embedding'] == 0 and pos['model']['layers_3']['w'] == 4
  assert pos['model']['norm']['scale'] == 5 and pos['lm_head']['kernel'] == 5
  assert pos['transformer']['h_1']['w'] == 2 and pos['bert']['encoder']['layer_2']['w'] == 3
  scanned, L = optim.layer_positions({'model': {'layers': {'w': np.zeros((3, 2))}}})
  assert L == 3 and scanned['model']['layers']['w'].tolist() == [1, 2, 3]


def test_discriminative_lr_per_layer():
  L, lr = 4, 0.1
  params = {'embed_tokens': jnp.ones(()), **{f'layers_{l}': jnp.ones(()) for l in range(L)},
            'score': jnp.ones(()), 'scanned': {'layers': jnp.ones((L, 2))}}
  tx = optax.chain(optax.sgd(lr), optim.discriminative_lr(2.6))
  updates, _ = tx.update(params, tx.init(params), params)
  for l in range(L):
    np.testing.assert_allclose(updates[f'layers_{l}'], -lr / 2.6 ** (L - 1 - l), rtol=1e-6)
  np.testing.assert_allclose(updates['embed_tokens'], -lr / 2.6 ** L, rtol=1e-6)
  np.testing.assert_allclose(updates['score'], -lr, rtol=1e-6)
  want = np.array([-lr / 2.6 ** (L - 1 - l) for l in range(L)])[:, None].repeat(2, 1)
  np.testing.assert_allclose(updates['scanned']['layers'], want, rtol=1e-6)


def test_gradual_unfreezing_keeps_frozen_groups_bit_identical():
  params = {'embed_tokens': jnp.full((2,), 0.3), 'layers_0': jnp.full((2,), 0.7), 'layers_1': jnp.full((2,), 1.1),
            'scanned': {'layers': jnp.full((2, 3), 0.5)}}
  tx = optim.gradual_unfreezing(optax.adamw(0.1, weight_decay=0.1), steps_per_stage=2)
  state = tx.init(params)
  start = params
  grads = jax.tree.map(jnp.ones_like, params)
  trained_at = {}
  for step in range(8):
    updates, state = jax.jit(tx.update)(grads, state, params)
    params = optax.apply_updates(params, updates)
    for name in ('layers_1', 'layers_0', 'embed_tokens'):
      if name not in trained_at and not np.array_equal(params[name], start[name]):
        trained_at[name] = step
    if step < 2:  # scanned layer 0 (position 1) frozen, layer 1 (position 2) trains with layers_1
      np.testing.assert_array_equal(params['scanned']['layers'][0], start['scanned']['layers'][0])
  # groups by position, top first: {layers_1, scanned[1]}, {layers_0, scanned[0]}, {embed_tokens}
  assert trained_at == {'layers_1': 0, 'layers_0': 2, 'embed_tokens': 4}


def test_lora_plus_multiplier():
  params = {'q': {'lora_A': jnp.ones(2), 'lora_B': jnp.ones(2)}}
  tx = optim.make_optimizer({'name': 'sgd', 'learning_rate': 0.1, 'total_steps': 10, 'schedule': 'constant',
                             'lr_multipliers': {'lora_B': 16.0}})
  updates, _ = tx.update(params, tx.init(params), params)
  np.testing.assert_allclose(updates['q']['lora_A'], -0.1)
  np.testing.assert_allclose(updates['q']['lora_B'], -1.6, rtol=1e-6)


def test_path_multipliers_scale_the_matching_leaves():
  params = {'classifier': {'kernel': jnp.ones(2)}, 'prefix_encoder': {'embedding': jnp.ones(2)}}
  tx = optim.make_optimizer({'name': 'sgd', 'learning_rate': 0.1, 'total_steps': 10,
                             'schedule': 'constant',
                             'path_lr_multipliers': optim.parse_multipliers('classifier/=10')})
  updates, _ = tx.update(params, tx.init(params), params)
  np.testing.assert_allclose(updates['classifier']['kernel'], -1.0, rtol=1e-6)
  np.testing.assert_allclose(updates['prefix_encoder']['embedding'], -0.1)


@pytest.mark.parametrize('spec', ['classifier', 'classifier=fast', '=10', 'cl(assifier=2'])
def test_malformed_multipliers_are_named(spec):
  with pytest.raises(ValueError, match=rf'config.optim.lr_multipliers: .* is not REGEX=FACTOR'):
    optim.parse_multipliers(spec)


def test_a_multiplier_matching_nothing_is_refused():
  trainable = {'classifier': {'kernel': jnp.ones(2)}, 'q': {'lora_A': jnp.ones(2)}}
  optim.check_multipliers({'lora_A': 2.0}, trainable)
  with pytest.raises(ValueError, match="'clasifier' matches no trainable parameter; trainable: "
                                       "classifier/kernel, q/lora_A"):
    optim.check_multipliers({'clasifier': 2.0}, trainable)


@pytest.mark.parametrize('name', ['adamw', 'adafactor', 'sgd'])
def test_make_optimizer_runs_with_all_options(name):
  params = {'embed_tokens': jnp.ones((4, 2)), 'layers_0': {'q': {'lora_A': jnp.ones((2, 2)), 'lora_B': jnp.ones((2, 2))}}}
  cfg = {'name': name, 'learning_rate': 1e-2, 'total_steps': 20, 'schedule': 'stlr', 'clip_norm': 1.0,
         'weight_decay': 0.01, 'momentum': 0.9, 'layer_decay': 2.6, 'unfreeze_every': 2,
         'lr_multipliers': {'lora_B': 4.0}, 'grad_accum_steps': 2}
  tx = optim.make_optimizer(cfg)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, state = tx.update(grads, state, params)  # micro-step 1 of 2: no update yet
  assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates))
  updates, state = tx.update(grads, state, params)
  assert float(jnp.abs(updates['layers_0']['q']['lora_B']).max()) > 0
  with pytest.raises(ValueError, match="'lion'"):
    optim.make_optimizer({'name': 'lion', 'learning_rate': 1.0, 'total_steps': 1})
