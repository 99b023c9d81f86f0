"""Mesh, logical-axis shardings, adapter shardings, and sharded == single-device training."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax import sharding
from peftjax.objectives import lm
from peftjax.train.state import init_train_state
from peftjax.train.step import make_train_step

VOCAB, EMBED, MLP, LAYERS, RANK = 32, 16, 32, 2, 4
dense_init = lambda axes: nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes)


class Block(nn.Module):
  """Toy MLP block whose projections take a LoRA-like adapter {'up'|'down': {lora_A, lora_B}}."""

  @nn.compact
  def __call__(self, x, adapter):
    def project(name, features, axes, inputs):
      out = nn.Dense(features, use_bias=False, kernel_init=dense_init(axes), name=name)(inputs)
      if name in adapter:
        out = out + inputs @ adapter[name]['lora_A'] @ adapter[name]['lora_B']
      return out
    h = nn.gelu(project('up', MLP, ('embed', 'mlp'), x))
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('norm',)), (EMBED,))
    return x + project('down', EMBED, ('mlp', 'embed'), h) * scale


class ToyLM(nn.Module):

  @nn.compact
  def __call__(self, ids, adapter=None):
    adapter = adapter or {}
    x = nn.Embed(VOCAB, EMBED, embedding_init=nn.with_logical_partitioning(
        nn.initializers.normal(1.0), ('vocab', 'embed')), name='embed_tokens')(ids)
    for i in range(LAYERS):
      x = Block(name=f'layers_{i}')(x, adapter.get(f'layers_{i}', {}))
    self.param('lm_head', dense_init(('embed', 'vocab')), (EMBED, VOCAB))
    return x


def lora_init(rng, base):
  adapter = {}
  for i in range(LAYERS):
    for name in ('up', 'down'):
      d_in, d_out = base[f'layers_{i}'][name]['kernel'].shape
      rng, ka, kb = jax.random.split(rng, 3)
      adapter.setdefault(f'layers_{i}', {})[name] = {
          'lora_A': jax.random.normal(ka, (d_in, RANK)) * 0.3,
          'lora_B': jax.random.normal(kb, (RANK, d_out)) * 0.3}
  return adapter


def loss_fn(adapter, base, batch, rng):
  del rng
  hidden = ToyLM().apply({'params': base}, batch['ids'], adapter)
  labels, mask = lm.next_token_targets(batch['ids'])
  return lm.chunked_lm_loss(hidden, base['lm_head'], labels, mask, chunk=16), {}


def train(mesh, steps=3):
  ids = jnp.asarray(np.random.RandomState(0).randint(0, VOCAB, (8, 8)))
  variables, shardings, axes = sharding.sharded_init(ToyLM().init, mesh, sharding.DEFAULT_RULES,
                                                     jax.random.key(0), ids)
  base = variables['params']
  tx = optax.adamw(1e-2)
  state, state_sh = init_train_state(lora_init, tx, jax.random.key(1), base, axes['params'], mesh)
  step = make_train_step(loss_fn, tx, state_shardings=state_sh, base_shardings=shardings['params'],
                         batch_sharding=sharding.batch_sharding(mesh))
  batch = sharding.global_batch({'ids': np.asarray(ids)}, mesh)
  losses = []
  for _ in range(steps):
    state, metrics = step(state, base, batch)
    losses.append(float(metrics['loss']))
  return np.array(losses), jax.device_get(state.adapter), base, state


@pytest.fixture(scope='module')
def reference():
  return train(sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]))


@pytest.mark.parametrize('sizes', [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2)])
def test_sharded_training_equals_single_device(sizes, reference):
  ref_losses, ref_adapter, _, _ = reference
  losses, adapter, base, state = train(sharding.make_mesh(*sizes))
  assert ref_losses[-1] < ref_losses[0]
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), adapter, ref_adapter)
  up = base['layers_0']['up']['kernel'].sharding.spec
  assert up == jax.sharding.PartitionSpec('fsdp', 'tensor')
  lora = state.adapter['layers_0']['up']
  assert lora['lora_A'].sharding.spec == jax.sharding.PartitionSpec(up[0], None)
  assert lora['lora_B'].sharding.spec == jax.sharding.PartitionSpec(None, up[1])
  mu = state.opt_state[0].mu['layers_0']['up']['lora_A']
  assert mu.sharding == lora['lora_A'].sharding


def test_fsdp8_params_take_an_eighth_per_device():
  mesh = sharding.make_mesh(1, 8, 1)
  ids = jnp.zeros((8, 8), jnp.int32)
  variables, _, _ = sharding.sharded_init(ToyLM().init, mesh, sharding.DEFAULT_RULES, jax.random.key(0), ids)
  leaves = jax.tree.leaves(variables)
  total = sum(x.nbytes for x in leaves)
  per_device = sum(x.addressable_shards[0].data.nbytes for x in leaves)
  # everything but the two (EMBED,) norm scales is split 8 ways: (3072 / 8 + 32) / 3104 = 0.134
  assert per_device / total == pytest.approx((3072 / 8 + 2 * EMBED) / (3072 + 2 * EMBED))


def test_adapter_axes_follow_base_params():
  base = {'layers': {'q': {'kernel': np.zeros((3, 16, 4, 8))},  # scanned DenseGeneral
                     'o': {'kernel': np.zeros((3, 32, 16))}},
          'embed_tokens': {'embedding': np.zeros((64, 16))}, 'norm': {'scale': np.zeros(16)}}
  axes = {'layers': {'q': {'kernel': ('layers', 'embed', 'heads', 'head_dim')},
                     'o': {'kernel': ('layers', 'mlp', 'embed')}},
          'embed_tokens': {'embedding': ('vocab', 'embed')}, 'norm': {'scale': ('norm',)}}
  adapter = {'layers': {'q': {'lora_A': np.zeros((3, 16, 2)), 'lora_B': np.zeros((3, 2, 4, 8))},
                        'o': {'ia3_l': np.zeros((3, 16)), 'ia3_in': np.zeros((3, 1, 32)), 'gate': np.zeros(()),
                              'lora_A': np.zeros((3, 32, 16)), 'lora_B': np.zeros((3, 1, 16))}},
             'embed_tokens': {'lora_embedding_A': np.zeros((64, 2)), 'lora_embedding_B': np.zeros((2, 16))},
             'norm': {'scale': np.zeros(16)}, 'prompt': {'embedding': np.zeros((5, 16))}}
  got = sharding.adapter_axes(adapter, base, axes)
  assert got == {
      'layers': {'q': {'lora_A': ('layers', 'embed', None), 'lora_B': ('layers', None, 'heads', 'head_dim')},
                 'o': {'ia3_l': ('layers', 'embed'), 'ia3_in': ('layers', None, 'mlp'), 'gate': (),
                       'lora_A': ('layers', 'mlp', None), 'lora_B': ('layers', None, 'embed')}},  # rank 16, 1
      'embed_tokens': {'lora_embedding_A': ('vocab', None), 'lora_embedding_B': (None, 'embed')},
      'norm': {'scale': ('norm',)}, 'prompt': {'embedding': (None, None)}}


def test_undividable_dims_are_replicated_and_rules_are_data():
  mesh = sharding.make_mesh(1, 2, 4)
  s = sharding.logical_to_sharding(('embed', 'kv_heads'), (16, 2), mesh, sharding.DEFAULT_RULES)
  assert s.spec == jax.sharding.PartitionSpec('fsdp', None)  # 2 kv heads over tensor=4: replicated
  rules = sharding.rules_from_config({'sharding_rules': [['embed', ['fsdp', 'tensor']]]})
  s = sharding.logical_to_sharding(('embed',), (16,), mesh, rules)
  assert s.spec == jax.sharding.PartitionSpec(('fsdp', 'tensor'))


def test_mesh_sizes_and_errors():
  assert dict(sharding.make_mesh(2, -1, 2).shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}
  assert dict(sharding.mesh_from_config({'mesh': {'tensor': 4}}).shape) == {'data': 1, 'fsdp': 2, 'tensor': 4}
  with pytest.raises(ValueError, match='need 12 devices, have 8'):
    sharding.make_mesh(3, 4, 1)
  with pytest.raises(ValueError, match='at most one may be -1'):
    sharding.make_mesh(-1, -1, 1)


def test_process_slices_and_global_batch():
  slices = [sharding.process_batch_slice(16, i, 4) for i in range(4)]
  assert [(s.start, s.stop) for s in slices] == [(0, 4), (4, 8), (8, 12), (12, 16)]
  with pytest.raises(ValueError, match='not divisible by 3'):
    sharding.process_batch_slice(16, 0, 3)
  mesh = sharding.make_mesh(2, 2, 2)
  batch = sharding.global_batch({'ids': np.arange(32).reshape(8, 4)}, mesh)
  assert batch['ids'].sharding.spec == jax.sharding.PartitionSpec(('data', 'fsdp'))
  np.testing.assert_array_equal(batch['ids'], np.arange(32).reshape(8, 4))
  assert not sharding.maybe_initialize_distributed(None)


@pytest.mark.parametrize('sizes', [(1, 8, 1), (2, 2, 2)])
def test_zoo_llama_lora_sharded_equals_single_device(sizes, flax_model):
  """The real path: zoo llama, methods.lora, chunked loss, shardings from logical axes."""
  from peftjax import methods
  fm = flax_model('llama_gqa')
  method = methods.get('lora', rank=4, alpha=8.0)
  apply = method.apply(fm.module.apply)
  ids = np.random.RandomState(0).randint(1, 97, (8, 8)).astype(np.int32)

  def loss(adapter, base, batch, rng):
    hidden = apply(adapter, base, batch['ids']).hidden
    labels, mask = lm.next_token_targets(batch['ids'])
    return lm.chunked_lm_loss(hidden, base['lm_head']['kernel'], labels, mask, chunk=16), {}

  def run(mesh):
    axes, shardings = sharding.model_shardings(fm.module, mesh)
    base = jax.device_put(fm.params, shardings)
    tx = optax.adamw(1e-2)
    state, state_sh = init_train_state(method.init, tx, jax.random.key(1), base, axes, mesh)
    step = make_train_step(loss, tx, state_shardings=state_sh, base_shardings=shardings,
                           batch_sharding=sharding.batch_sharding(mesh))
    losses = []
    for _ in range(3):
      state, metrics = step(state, base, sharding.global_batch({'ids': ids}, mesh))
      losses.append(float(metrics['loss']))
    return np.array(losses), jax.device_get(state.adapter)

  ref_losses, ref_adapter = run(sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
  losses, adapter = run(sharding.make_mesh(*sizes))
  assert ref_losses[-1] < ref_losses[0]
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), adapter,
               ref_adapter)
