"""The jitted train step: compiles once, trains only the adapter, donates the state, bf16 compute."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from peftjax import sharding
from peftjax.train import optim
from peftjax.train.state import TrainState, init_train_state
from peftjax.train.step import make_eval_step, make_train_step

D, R = 8, 2
AXES = {f'layers_{i}': {'kernel': ('embed', 'mlp')} for i in range(2)}


def lora_init(rng, base):
  ka, kb = jax.random.split(rng)
  return {name: {'lora_A': jax.random.normal(ka, (D, R)) * 0.3, 'lora_B': jax.random.normal(kb, (R, D)) * 0.3}
          for name in base}


def setup(optimizer_cfg=None, compute_dtype=None):
  mesh = sharding.make_mesh(2, 2, 2)
  traces, dtypes = [], []

  def loss_fn(adapter, base, batch, rng):
    traces.append(rng is not None)
    dtypes.append(adapter['layers_0']['lora_A'].dtype)
    x = batch['x']
    for name in ('layers_0', 'layers_1'):
      a = adapter[name]
      x = jnp.tanh(x @ base[name]['kernel'] + (x @ a['lora_A']) @ a['lora_B'])
    return jnp.mean((x - batch['y']) ** 2), {'out_mean': x.mean()}

  rng = np.random.RandomState(0)
  base_np = {name: {'kernel': rng.normal(size=(D, D)).astype(np.float32) / 3} for name in AXES}
  base_sh = sharding.tree_shardings(AXES, base_np, mesh, sharding.DEFAULT_RULES)
  base = jax.device_put(base_np, base_sh)
  tx = optim.make_optimizer(optimizer_cfg or {'learning_rate': 1e-2, 'total_steps': 10, 'schedule': 'constant'})
  state, state_sh = init_train_state(lora_init, tx, jax.random.key(0), base, AXES, mesh)
  batch_sh = sharding.batch_sharding(mesh)
  batch = sharding.global_batch({'x': rng.normal(size=(8, D)).astype(np.float32),
                                 'y': rng.normal(size=(8, D)).astype(np.float32)}, mesh)
  step = make_train_step(loss_fn, tx, state_shardings=state_sh, base_shardings=base_sh,
                         batch_sharding=batch_sh, compute_dtype=compute_dtype)
  eval_step = make_eval_step(loss_fn, adapter_shardings=state_sh.adapter, base_shardings=base_sh,
                             batch_sharding=batch_sh, compute_dtype=compute_dtype)
  return step, eval_step, state, base, base_np, batch, traces, dtypes


def test_step_compiles_once_trains_adapter_and_keeps_base_frozen():
  cfg = {'learning_rate': 1e-2, 'total_steps': 10, 'schedule': 'stlr', 'clip_norm': 1.0, 'layer_decay': 2.6,
         'unfreeze_every': 2, 'lr_multipliers': {'lora_B': 2.0}, 'grad_accum_steps': 1}
  step, _, state, base, base_np, batch, traces, _ = setup(cfg)
  losses = []
  for _ in range(5):
    state, metrics = step(state, base, batch)
    losses.append(float(metrics['loss']))
  assert traces == [True] and step._cache_size() == 1
  assert losses[-1] < losses[0]
  assert int(state.step) == 5 and int(state.data_position) == 5
  assert set(metrics) == {'loss', 'grad_norm', 'out_mean'}
  jax.tree.map(lambda got, want: np.testing.assert_array_equal(np.asarray(got), want), base, base_np)


def test_state_is_donated_and_rng_advances():
  step, _, state, base, _, batch, _, _ = setup()
  old_rng = np.asarray(state.rng)
  new_state, _ = step(state, base, batch)
  assert all(leaf.is_deleted() for leaf in jax.tree.leaves(state.adapter))
  assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(base))
  assert not np.array_equal(np.asarray(new_state.rng), old_rng)


def test_bf16_compute_with_float32_master_weights():
  step, eval_step, state, base, _, batch, _, dtypes = setup(compute_dtype=jnp.bfloat16)
  before = eval_step(state.adapter, base, batch)
  for _ in range(3):
    state, metrics = step(state, base, batch)
  assert dtypes[0] == jnp.bfloat16
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.adapter))
  moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim == 2]
  assert len(moments) == 8 and all(x.dtype == jnp.float32 for x in moments)  # mu, nu of 4 leaves
  assert float(eval_step(state.adapter, base, batch)['loss']) < float(before['loss'])


def test_eval_step_matches_train_loss_without_rng():
  step, eval_step, state, base, _, batch, traces, _ = setup()
  evaluated = eval_step(state.adapter, base, batch)
  _, metrics = step(state, base, batch)
  assert False in traces  # eval ran with rng=None
  np.testing.assert_allclose(evaluated['loss'], metrics['loss'], rtol=1e-6)


def test_train_state_create_stores_raw_key_and_float32_adapter():
  state = TrainState.create({'w': jnp.ones(2, jnp.bfloat16)}, optax.sgd(1.0), jax.random.key(3), data_position=7)
  assert state.rng.dtype == jnp.uint32 and state.adapter['w'].dtype == jnp.float32
  assert int(state.data_position) == 7
  np.testing.assert_array_equal(jax.random.key_data(state.key()), jax.random.key_data(jax.random.key(3)))
