"""UniPELT (gated LoRA + gated prefix + gated Pfeiffer adapter) on tiny random llama / gpt2 /
bert: identity at init (and the gated prefix's measured distance from it), a gradient for every
gate, submodules switched off == the plain methods exactly, the gate in place of alpha / r,
per-token gates are causal, bad inputs, and a runlocal sentiment run whose loss goes down."""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import methods, tree
from peftjax.methods import prefix
from peftjax.train import loop

ROOT = pathlib.Path(__file__).parents[2]
P = 3
CASES = [('llama_gqa', 'causal_lm', False), ('gpt2', 'causal_lm', False),
         ('bert', 'classification', True)]
FAMILY = {'llama_gqa': 'llama', 'gpt2': 'gpt2', 'bert': 'bert'}


def build(m, name, **kw):
  kw = {'num_virtual_tokens': P, 'encoder_hidden_size': 16, 'bottleneck': 4, **kw}
  return methods.get('unipelt', model_type=FAMILY[name], **prefix.model_dims(m.config), **kw)


def run(method, m, adapter, ids, mask):
  return method.apply(m.module.apply)(adapter, m.params, ids, attention_mask=mask).logits


def perturbed(adapter, seed=0):
  """Every leaf plus noise: LoRA B and the adapter's up projection become nonzero."""
  leaves, treedef = jax.tree.flatten(adapter)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape)
                                      for x, k in zip(leaves, keys)])


def gate_leaves(adapter) -> dict:
  return {p: v for p, v in tree.flatten(adapter).items() if '_gate' in p.rsplit('/', 1)[-1]}


@pytest.mark.parametrize('name,task,scan', CASES)
def test_identity_at_init_except_the_gated_prefix(name, task, scan, flax_model, zoo):
  """LoRA B = 0 and the adapter's up projection = 0 make the output the base's, bit for bit.
  The prefix (on by default) is not zero at init (nor in the paper: its keys/values come out of
  a randomly initialised MLP), so the output moves, with the gates (about 0.5) or without."""
  m = flax_model(name, task, scan_layers=scan)
  ids, mask = zoo.right_padded_batch(pad_id=m.config.pad_token_id)
  want = m.module.apply({'params': m.params}, ids, attention_mask=mask).logits   # not jitted, as ours
  method = build(m, name, prefix=False)
  got = run(method, m, method.init(jax.random.key(0), m.params), ids, mask)
  np.testing.assert_array_equal(got, want)

  method = build(m, name)
  adapter = method.init(jax.random.key(0), m.params)
  gated = float(jnp.abs(run(method, m, adapter, ids, mask) - want).max())
  ungated_method = build(m, name, gated=False)
  same_prefix = {**ungated_method.init(jax.random.key(0), m.params),
                 prefix.ENCODER: adapter[prefix.ENCODER]}
  ungated = float(jnp.abs(run(ungated_method, m, same_prefix, ids, mask) - want).max())
  print(f'{name} scan={scan}: max |logits - base| at init gated {gated:.3g}, ungated '
        f'{ungated:.3g}')
  # measured, docs/methods.md: the prefix moves logits by O(1) at init, gated or not
  assert gated > 1e-2 and ungated > 1e-2


def test_every_gate_gets_a_gradient(flax_model, zoo):
  """At init only the prefix gates get a gradient (LoRA B = 0 and up = 0 make the others
  zero, as the paper's LoRA init does for its LoRA gate); after one step every gate, in every
  layer, gets a nonzero one."""
  m = flax_model('bert', 'classification', scan_layers=True)
  ids, mask = zoo.right_padded_batch(pad_id=m.config.pad_token_id)
  method = build(m, 'bert')
  forward = method.apply(m.module.apply)
  loss = lambda a: jnp.sum(forward(a, m.params, ids, attention_mask=mask).logits ** 2)
  adapter = method.init(jax.random.key(0), m.params)
  grads = gate_leaves(jax.grad(loss)(adapter))
  assert len(grads) == 8                          # query, value, prefix, adapter: kernel + bias
  for path, g in grads.items():
    per_layer = jnp.abs(g).reshape(g.shape[0], -1).max(axis=1)   # scan: leading layer axis
    assert bool(jnp.all(per_layer > 0)) == ('prefix_gate' in path), path
  stepped = jax.tree.map(lambda a, g: a - 0.1 * g, adapter, jax.grad(loss)(adapter))
  for path, g in gate_leaves(jax.grad(loss)(stepped)).items():
    assert bool(jnp.all(jnp.abs(g).reshape(g.shape[0], -1).max(axis=1) > 0)), path


@pytest.mark.parametrize('name,task,scan', [CASES[0], ('bert', 'classification', False)])
def test_switched_off_submodules_reproduce_the_plain_methods(name, task, scan, flax_model, zoo):
  """Ungated, each submodule alone equals its plain method exactly (same adapter leaves);
  gated with a zero gate Linear (gate = sigmoid(0) = 0.5 exactly), LoRA equals LoRA with
  alpha / r = 0.5 (the gate takes alpha / r's place), and the prefix and the adapter equal the
  plain ones with their outputs halved."""
  m = flax_model(name, task, scan_layers=scan)
  ids, mask = zoo.right_padded_batch(pad_id=m.config.pad_token_id)
  dims = prefix.model_dims(m.config)
  family = FAMILY[name]
  lora = methods.get('lora', model_type=family, rank=8, alpha=16.0)
  half = methods.get('lora', model_type=family, rank=8, alpha=4.0)
  plain_prefix = methods.get('prefix', num_virtual_tokens=P, projection=True,
                             encoder_hidden_size=16, **dims)
  pfeiffer = methods.get('pfeiffer', model_type=family, bottleneck=4)
  only = {'lora': dict(prefix=False, adapter=False), 'prefix': dict(lora=False, adapter=False),
          'adapter': dict(lora=False, prefix=False)}
  for part, plain in (('lora', lora), ('prefix', plain_prefix), ('adapter', pfeiffer)):
    method = build(m, name, gated=False, **only[part])
    adapter = perturbed(method.init(jax.random.key(1), m.params))
    assert jax.tree.map(jnp.shape, adapter) == jax.tree.map(
        jnp.shape, plain.init(jax.random.key(1), m.params))
    np.testing.assert_array_equal(run(method, m, adapter, ids, mask),
                                  run(plain, m, adapter, ids, mask), err_msg=part)

    method = build(m, name, **only[part])
    adapter = perturbed(method.init(jax.random.key(1), m.params))
    adapter = tree.unflatten({p: jnp.zeros_like(v) if p in gate_leaves(adapter) else v
                              for p, v in tree.flatten(adapter).items()})
    ungated = {p: v for p, v in tree.flatten(adapter).items() if p not in gate_leaves(adapter)}
    if part == 'lora':
      plain = half
    else:
      halved = ('transform_2/' if part == 'prefix' else 'adapter_up')
      ungated = {p: v * 0.5 if halved in p else v for p, v in ungated.items()}
    np.testing.assert_array_equal(run(method, m, adapter, ids, mask),
                                  run(plain, m, tree.unflatten(ungated), ids, mask),
                                  err_msg=f'gated {part}')


def test_token_gates_are_causal_and_mean_gates_are_not(flax_model, zoo):
  """``gate_pool='token'`` (for decoders, packed rows): a token's output ignores later tokens;
  the paper's sequence mean lets later tokens move earlier outputs."""
  m = flax_model('llama_gqa')
  ids, mask = zoo.right_padded_batch(pad_id=0, pads=(0, 0, 0))
  later = ids.copy()
  later[:, -1] = (later[:, -1] + 1) % zoo.VOCAB
  for pool, causal in (('token', True), ('mean', False)):
    method = build(m, 'llama_gqa', prefix=False, gate_pool=pool)
    adapter = perturbed(method.init(jax.random.key(0), m.params))
    a, b = (run(method, m, adapter, x, mask)[:, :-1] for x in (ids, later))
    assert bool(jnp.array_equal(a, b)) == causal, pool


def test_spec_counts_and_axes(flax_model):
  m = flax_model('bert', 'classification', scan_layers=True)
  method = build(m, 'bert')
  assert methods.from_spec(method.spec).spec == method.spec
  assert method.merge is None
  adapter = method.init(jax.random.key(0), m.params)
  d, layers = m.config.hidden_size, m.config.num_layers
  assert sum(v.size for v in gate_leaves(adapter).values()) == layers * 4 * (d + 1)
  shapes = jax.eval_shape(m.module.init, jax.random.key(0), jnp.ones((1, 4), jnp.int32))
  boxed = jax.eval_shape(method.init, jax.random.key(0), shapes['params'])
  axes = {p.removeprefix('bert/encoder/layer/'): v.names for p, v in tree.flatten(boxed).items()
          if '_gate' in p}
  assert axes == {'attention/self/query/lora_gate': ('layers', 'embed', None),
                  'attention/self/query/lora_gate_bias': ('layers', None),
                  'attention/self/value/lora_gate': ('layers', 'embed', None),
                  'attention/self/value/lora_gate_bias': ('layers', None),
                  'attention/self/prefix_gate': ('layers', 'embed', None),
                  'attention/self/prefix_gate_bias': ('layers', None),
                  'output/dense/adapter_gate': ('layers', 'embed', None),
                  'output/dense/adapter_gate_bias': ('layers', None)}


def test_bad_inputs_are_named(flax_model, zoo):
  m = flax_model('llama_gqa')
  with pytest.raises(ValueError, match='lora, prefix and adapter are all switched off'):
    build(m, 'llama_gqa', lora=False, prefix=False, adapter=False)
  with pytest.raises(ValueError, match="gate_pool='token' does not gate a prefix"):
    build(m, 'llama_gqa', gate_pool='token')
  with pytest.raises(ValueError, match="UniPELT gate 'max' unknown"):
    build(m, 'llama_gqa', gate_pool='max')
  with pytest.raises(ValueError, match="LoRA gate='mean' does not combine with DoRA"):
    methods.get('lora', model_type='llama', dora=True, gate='mean')
  from peftjax.models import layers
  method = build(m, 'llama_gqa')
  ids, _ = zoo.right_padded_batch(pads=(0, 0, 0))
  with pytest.raises(ValueError, match='gated prefix .* does not run with a KV cache'):
    method.apply(m.module.apply)(method.init(jax.random.key(0), m.params), m.params, ids,
                                 cache=layers.init_cache(m.config, 3, 16))


@pytest.fixture(scope='module')
def tiny_run(minilm_bert, tmp_path_factory):
  """The tiny MiniLM-vocabulary BERT and an easy labelled CSV."""
  root = tmp_path_factory.mktemp('unipelt_run')
  rows = ['text,label'] + ['what a great good movie,1', 'i love it so much,1',
                           'an awful bad film,0', 'i hate this boring thing,0'] * 16
  (root / 'data.csv').write_text('\n'.join(rows) + '\n')
  return root


def test_runlocal_sentiment_config_trains(tiny_run, minilm_bert, tmp_path, monkeypatch):
  monkeypatch.syspath_prepend(str(ROOT))
  from configs import sentiment
  c = sentiment.get_config('method=unipelt,runlocal')
  c.model.source, c.data.source = str(minilm_bert), str(tiny_run / 'data.csv')
  c.data.update(max_length=16, validation_fraction=0.25)
  c.peft.update(bottleneck=4, encoder_hidden_size=16)
  c.optim.learning_rate = 5e-2      # a tiny random BERT: its outputs barely move at 2e-3
  c.train.update(steps=12, log_every=1, eval_every=12, checkpoint_every=12)
  loop.run(c, tmp_path)
  rows = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  losses = [r['loss'] for r in rows if r['split'] == 'train']
  assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3]), losses
  assert (tmp_path / 'adapter' / 'peftjax_adapter.safetensors').exists()
