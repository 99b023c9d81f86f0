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
  """Factors declaring their logical axes from the (boxed) kernel they adapt."""
  adapter = {}
  for i in range(LAYERS):
    for name in ('up', 'down'):
      kernel = base[f'layers_{i}'][name]['kernel']
      (d_in, d_out), (ax_in, ax_out) = kernel.value.shape, kernel.names
      rng, ka, kb = jax.random.split(rng, 3)
      adapter.setdefault(f'layers_{i}', {})[name] = {
          'lora_A': nn.Partitioned(jax.random.normal(ka, (d_in, RANK)) * 0.3, (ax_in, None)),
          'lora_B': nn.Partitioned(jax.random.normal(kb, (RANK, d_out)) * 0.3, (None, ax_out))}
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


def test_adapter_axes_are_declared_at_init_from_the_adapted_weight(flax_model):
  """Houlsby, LoRA (incl. embeddings), DoRA and IA3 box their leaves with the logical axes of the
  weight they adapt (scanned: the 'layers' axis first); nothing is guessed from names."""
  from peftjax import methods
  fm = flax_model('llama_gqa', scan_layers=True)
  boxed = jax.eval_shape(fm.module.init, jax.random.key(0), jnp.ones((1, 2), jnp.int32))['params']
  init = lambda m: sharding.logical_axes(jax.eval_shape(m.init, jax.random.key(0), boxed))
  layer = lambda axes: axes['model']['layers']
  houlsby = layer(init(methods.get('houlsby', model_type='llama', bottleneck=4)))
  assert houlsby['self_attn']['o_proj'] == {   # o_proj kernel: ('layers', 'heads', 'embed')
      'adapter_down': ('layers', 'embed', None), 'adapter_down_bias': ('layers', None),
      'adapter_up': ('layers', None, 'embed'), 'adapter_up_bias': ('layers', 'embed')}
  assert houlsby['input_layernorm'] == {'scale': ('layers', 'norm')}
  dora = init(methods.compose(
      methods.lora(rank=2, target='.*/(k_proj|down_proj)', dora=True),
      methods.lora(rank=2, target='model/embed_tokens', rank_pattern={'model/embed_tokens': 3})))
  assert layer(dora)['self_attn']['k_proj'] == {
      'lora_A': ('layers', 'embed', None), 'lora_B': ('layers', None, 'kv_heads'),
      'lora_magnitude_vector': ('layers', 'kv_heads')}
  assert layer(dora)['mlp']['down_proj']['lora_A'] == ('layers', 'mlp', None)
  assert dora['model']['embed_tokens'] == {'lora_embedding_A': ('vocab', None),
                                          'lora_embedding_B': (None, 'embed')}
  ia3 = layer(init(methods.get('ia3', model_type='llama')))
  assert ia3['self_attn']['k_proj'] == {'ia3_l': ('layers', 'kv_heads', None)}
  assert ia3['mlp']['down_proj'] == {'ia3_l': ('layers', None, 'mlp')}   # feedforward: input


def test_multi_axis_dense_general_is_refused_at_init_and_merge():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.DenseGeneral((2, 4), kernel_init=dense_init(('embed', 'heads', 'head_dim')),
                             name='q_proj')(x)
  from peftjax import methods
  boxed = Net().init(jax.random.key(0), jnp.ones((1, 8)))['params']
  with pytest.raises(ValueError, match=r'q_proj: adapters support weights with one input and '
                                       r'one output axis .* shape \(8, 2, 4\)'):
    methods.lora(rank=2, target='q_proj').init(jax.random.key(0), boxed)
  bad = {'q_proj': {'lora_A': jnp.zeros((8, 2)), 'lora_B': jnp.zeros((2, 8))}}
  with pytest.raises(ValueError, match=r'q_proj: LoRA factors \(8, 2\) x \(2, 8\) do not fit '
                                       r'kernel \(8, 2, 4\)'):
    methods.lora(rank=2, target='q_proj').merge(bad, boxed)


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


@pytest.mark.parametrize('sizes,name', [((1, 8, 1), 'lora'), ((2, 2, 2), 'lora'),
                                        ((2, 2, 2), 'dora'), ((1, 2, 4), 'ia3'),
                                        ((1, 2, 4), 'houlsby')])
def test_zoo_llama_sharded_equals_single_device(sizes, name, flax_model):
  """The real path: zoo llama, a method, chunked loss, shardings from declared logical axes."""
  from peftjax import methods
  fm = flax_model('llama_gqa')
  kwargs = {'lora': dict(rank=4, alpha=8.0), 'dora': dict(rank=4), 'houlsby': dict(bottleneck=4)}
  method = methods.get(name, model_type='llama', **kwargs.get(name, {}))
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
    specs = {tuple(l.sharding.spec) for l in jax.tree.leaves(state.adapter)}
    return np.array(losses), jax.device_get(state.adapter), specs

  ref_losses, ref_adapter, _ = run(sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
  losses, adapter, specs = run(sharding.make_mesh(*sizes))
  assert any(any(spec) for spec in specs), specs   # declared axes shard some adapter leaves
  assert ref_losses[-1] < ref_losses[0]
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), adapter,
               ref_adapter)
