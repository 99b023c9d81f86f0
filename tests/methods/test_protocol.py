"""The PeftMethod protocol: specs rebuild methods, boxed init, compose of the optional fields, and
the ten-line example method of docs/architecture.md."""
import json
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import methods, sharding, tree

SPECS = [('lora', dict(rank=2)), ('rslora', dict(rank=2, alpha=4.0)), ('dora', dict(rank=2)),
         ('ia3', {}), ('houlsby', dict(bottleneck=3)), ('pfeiffer', dict(activation='gelu')),
         ('full', dict(target='lm_head/kernel')),
         ('modules_to_save', dict(paths=['lm_head/kernel', 'model/embed_tokens/embedding']))]


@pytest.fixture(scope='module')
def llama(flax_model):
  fm = flax_model('llama_gqa')
  boxed = fm.module.init(jax.random.key(0), jnp.ones((1, 2), jnp.int32))['params']
  return fm, boxed


@pytest.mark.parametrize('name,kwargs', SPECS)
def test_spec_is_json_and_rebuilds_the_same_method(name, kwargs, llama):
  fm, _ = llama
  method = methods.get(name, model_type='llama', **kwargs)
  spec = json.loads(json.dumps(method.spec.asdict()))
  rebuilt = methods.from_spec(spec)
  assert rebuilt.spec == method.spec
  a = method.init(jax.random.key(1), fm.params)
  b = rebuilt.init(jax.random.key(1), fm.params)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_compose_spec_and_optional_fields():
  params = {'q': {'kernel': jnp.ones((4, 4)), 'bias': jnp.zeros(4)}}
  counter = lambda method: method._replace(
      regularizer=lambda a: 2.0 * jnp.sum(a['q']['bias'] ** 2),
      init_state=lambda a: jnp.zeros((), jnp.int32),
      update=lambda s, a, g, step: (s + 1, a))
  both = methods.compose(methods.lora(rank=2, target='q'), counter(methods.bitfit()),
                         counter(methods.full(target='q/kernel')))
  assert methods.from_spec(both.spec).spec == both.spec
  adapter = both.init(jax.random.key(0), params)
  adapter['q']['bias'] = jnp.ones(4)
  assert float(both.regularizer(adapter)) == 2 * 2.0 * 4   # the two regularisers add up
  state = both.init_state(adapter)
  assert state[0] is None and int(state[1]) == 0
  state, _ = both.update(state, adapter, adapter, 1)
  assert [None if s is None else int(s) for s in state] == [None, 1, 1]
  assert methods.compose(methods.lora(rank=2, target='q')).regularizer is None


@pytest.mark.parametrize('name', ['lora', 'dora', 'ia3', 'houlsby', 'bitfit', 'full'])
def test_boxed_init_equals_plain_init(name, flax_model):
  """Boxing only adds logical axes: the same values as from plain params, and apply/merge take
  boxed adapters."""
  fm = flax_model('gpt2')
  boxed = sharding.boxed(fm.params, sharding.model_shardings(
      fm.module, sharding.make_mesh(devices=jax.devices()[:1]))[0])
  method = methods.get(name, model_type='gpt2')
  plain = method.init(jax.random.key(1), fm.params)
  from_boxed = method.init(jax.random.key(1), boxed)
  assert all(isinstance(l, nn.Partitioned) for l in jax.tree.leaves(
      from_boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)))
  jax.tree.map(np.testing.assert_array_equal, plain, nn.meta.unbox(from_boxed))
  ids = jnp.array([[3, 4, 5, 6]])
  out = method.apply(fm.module.apply)(from_boxed, fm.params, ids).logits
  np.testing.assert_array_equal(out, method.apply(fm.module.apply)(plain, fm.params, ids).logits)


def test_architecture_doc_example_method_works():
  """The ten-line method of docs/architecture.md: identity at init, merged == unmerged."""
  doc = (pathlib.Path(__file__).parents[2] / 'docs' / 'architecture.md').read_text()
  code = re.search(r'\*\*A new method in ten lines\*\*.*?```python\n(.*?)```', doc, re.S).group(1)
  namespace = {}
  exec(code, namespace)
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3, name='out')(nn.Dense(5, use_bias=False, name='q_proj')(x))
  x = jnp.arange(8.0).reshape(2, 4)
  params = Net().init(jax.random.key(0), x)['params']
  method = namespace['out_scale']('q_proj')
  adapter = method.init(jax.random.key(1), params)
  forward = method.apply(Net().apply)
  np.testing.assert_array_equal(forward(adapter, params, x), Net().apply({'params': params}, x))
  adapter = {'q_proj': {'scale_out': jnp.arange(1.0, 6.0)}}
  np.testing.assert_allclose(Net().apply({'params': method.merge(adapter, params)}, x),
                             forward(adapter, params, x), rtol=1e-6)
  assert method.spec.asdict() == {'name': 'out_scale', 'target': 'q_proj'}
