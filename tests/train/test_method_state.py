"""A method's regulariser and per-step update with its own state, through the train step, the
checkpoints and a real SIGKILL + resume of launch.py.

The toy method is LoRA plus an L2 penalty on the LoRA factors, an EMA of |w * grad| with a step
counter, and a mask that zeroes the ``lora_A`` entries of below-mean EMA every ``EVERY`` steps
(AdaLoRA's shape: importance averages in the state, the adapter masked from them).

Run as a script, this file is launch.py with the configured method wrapped by ``toy``: the
subprocess driver of ``test_sigkill_then_resume_keeps_the_method_state``.
"""
import json
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from peftjax import methods, sharding
from peftjax.train import loop
from peftjax.train.checkpoint import Checkpointer, with_shardings
from peftjax.train.state import TrainState, state_shardings
from peftjax.train.step import make_eval_step, make_train_step

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # --import-mode=importlib: not on sys.path
from test_loop import ROOT, _config, _flags, kill_after_checkpoint_then_resume, tiny  # noqa: E402,F401  (the tiny run's fixture)

WEIGHT, DECAY, EVERY = 1e-2, 0.9, 3


def _name(path) -> str:
  return path[-1].key


def regularizer(adapter):
  return WEIGHT * sum(jnp.sum(jnp.square(x)) for p, x in jax.tree_util.tree_leaves_with_path(adapter)
                      if _name(p).startswith('lora_'))


def init_state(adapter):
  return {'ema': jax.tree.map(jnp.zeros_like, adapter), 'count': jnp.zeros([], jnp.int32),
          'step': jnp.zeros([], jnp.int32)}


def update(state, adapter, grads, step):
  ema = jax.tree.map(lambda e, w, g: DECAY * e + (1 - DECAY) * jnp.abs(w * g),
                     state['ema'], adapter, grads)

  def mask(path, w, e):
    if _name(path) != 'lora_A':
      return w
    return jnp.where((step % EVERY == 0) & (e < jnp.mean(e)), 0.0, w)

  adapter = jax.tree_util.tree_map_with_path(mask, adapter, ema)
  return {'ema': ema, 'count': state['count'] + 1, 'step': step}, adapter


def toy(method: methods.PeftMethod) -> methods.PeftMethod:
  return method._replace(regularizer=regularizer, init_state=init_state, update=update)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(8, name='v_proj')(jnp.tanh(nn.Dense(8, name='q_proj')(x)))


def setup(method, optimizer, compute_dtype=None):
  """A one-device step for ``method`` on a tiny MLP: (step, eval_step, state, params, batch, loss)."""
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  rep, batch_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  rng = np.random.RandomState(0)
  x, y = (rng.normal(size=(4, 8)).astype(np.float32) for _ in range(2))
  params = MLP().init(jax.random.key(0), x)['params']
  apply = method.apply(MLP().apply)
  loss = lambda adapter, params, batch, rng: (jnp.mean((apply(adapter, params, batch['x'])
                                                        - batch['y']) ** 2), {})
  state = TrainState.create(method.init(jax.random.key(1), params), optimizer, jax.random.key(2),
                            init_state=method.init_state)
  shardings = state_shardings(state, jax.tree.map(lambda _: rep, state.adapter), mesh)
  state = jax.device_put(state, shardings)
  step = make_train_step(loss, optimizer, state_shardings=shardings, base_shardings=rep,
                         batch_sharding=batch_sh, compute_dtype=compute_dtype, donate=False,
                         regularizer=method.regularizer, update=method.update)
  eval_step = make_eval_step(loss, adapter_shardings=shardings.adapter, base_shardings=rep,
                             batch_sharding=batch_sh, compute_dtype=compute_dtype)
  return step, eval_step, state, params, {'x': x, 'y': y}, loss


LORA = methods.lora(rank=2, target='.*_proj')


def test_regularizer_adds_its_value_to_the_loss_and_its_gradient_to_the_update():
  lr = 0.5
  step, eval_step, state, params, batch, loss = setup(
      LORA._replace(regularizer=regularizer), optax.sgd(lr))
  plain_step, *_ = setup(LORA, optax.sgd(lr))
  new, metrics = step(state, params, batch)
  plain, plain_metrics = plain_step(state, params, batch)
  penalty = regularizer(state.adapter)
  assert float(penalty) > 0
  np.testing.assert_allclose(metrics['regularizer'], penalty, rtol=1e-7)
  np.testing.assert_allclose(metrics['loss'], plain_metrics['loss'] + penalty, rtol=1e-7)
  assert set(metrics) == {'loss', 'grad_norm', 'regularizer'}
  assert set(plain_metrics) == {'loss', 'grad_norm'}
  # The penalty's gradient 2 * WEIGHT * w is in the SGD update: new - plain = -lr * 2 * WEIGHT * w.
  jax.tree.map(lambda n, p, w: np.testing.assert_allclose(n - p, -lr * 2 * WEIGHT * w, atol=1e-7),
               new.adapter, plain.adapter, state.adapter)
  # Evaluation reports the data loss alone.
  np.testing.assert_allclose(eval_step(state.adapter, params, batch)['loss'],
                             loss(state.adapter, params, batch, None)[0], rtol=1e-7)


def test_regularizer_sees_the_bf16_adapter_like_the_loss():
  seen = []
  record = lambda adapter: seen.append(jax.tree.leaves(adapter)[0].dtype) or regularizer(adapter)
  step, _, state, params, batch, _ = setup(LORA._replace(regularizer=record), optax.sgd(0.1),
                                           compute_dtype=jnp.bfloat16)
  state, metrics = step(state, params, batch)
  assert seen == [jnp.bfloat16]
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.adapter))


def test_update_runs_after_the_optimizer_step_with_its_state():
  lr = 0.5
  step, _, state, params, batch, loss = setup(toy(LORA), optax.sgd(lr))
  before = jax.tree.map(np.asarray, params)
  grads = jax.grad(lambda a: loss(a, params, batch, None)[0] + regularizer(a))(state.adapter)
  first, _ = step(state, params, batch)
  # Step 1: the update saw the SGD-updated adapter and this step's gradients (measured: 1.3e-6
  # relative, eager against jitted gradients).
  stepped = jax.tree.map(lambda w, g: w - lr * g, state.adapter, grads)
  jax.tree.map(lambda e, w, g: np.testing.assert_allclose(e, (1 - DECAY) * np.abs(w * g),
                                                          rtol=3e-6, atol=1e-9),
               first.method_state['ema'], stepped, grads)
  states = [first]
  for _ in range(5):
    states.append(step(states[-1], params, batch)[0])
  for n, s in enumerate(states, 1):
    assert int(s.step) == int(s.method_state['step']) == int(s.method_state['count']) == n
    a, ema = s.adapter['q_proj']['lora_A'], s.method_state['ema']['q_proj']['lora_A']
    masked = np.asarray(ema < jnp.mean(ema))
    assert masked.any() and not masked.all()
    if n % EVERY == 0:    # masked on steps 3 and 6 only
      np.testing.assert_array_equal(np.asarray(a) == 0, masked)
    else:
      assert np.all(np.asarray(a) != 0)
  assert step._cache_size() == 1
  jax.tree.map(lambda got, want: np.testing.assert_array_equal(np.asarray(got), want),
               params, before)


def test_method_state_is_sharded_like_the_adapter_and_checkpointed(tmp_path):
  mesh = sharding.make_mesh(2, 2, 2)
  adapter_sh = {'layers_0': {'lora_A': NamedSharding(mesh, P('fsdp', None)),
                             'lora_B': NamedSharding(mesh, P(None, 'tensor'))}}
  create = lambda: TrainState.create(
      {'layers_0': {'lora_A': jax.random.normal(jax.random.key(0), (8, 2)),
                    'lora_B': jnp.ones((2, 8))}}, optax.adam(1e-2), jax.random.key(1),
      init_state=init_state)
  state_sh = state_shardings(jax.eval_shape(create), adapter_sh, mesh)
  assert state_sh.method_state == {'ema': adapter_sh, 'count': sharding.replicated(mesh),
                                   'step': sharding.replicated(mesh)}
  state = jax.jit(create, out_shardings=state_sh)()
  state = state.replace(method_state={**state.method_state, 'count': jnp.int32(5),
                                      'ema': jax.tree.map(lambda x: x + 0.5, state.adapter)})
  ckpt = Checkpointer(str(tmp_path), save_every=1)
  assert ckpt.save(state, force=True)
  ckpt.wait()
  restored = Checkpointer(str(tmp_path)).restore(
      with_shardings(jax.eval_shape(lambda: state), state_sh))
  assert int(restored.method_state['count']) == 5
  for got, want, sh in zip(jax.tree.leaves(restored), jax.tree.leaves(state),
                           jax.tree.leaves(state_sh)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert got.sharding == sh and got.dtype == want.dtype
  nan = state.replace(method_state={**state.method_state, 'ema': jax.tree.map(
      lambda x: x * jnp.nan, state.method_state['ema'])})
  assert not ckpt.save(nan.replace(step=nan.step + 1), force=True)   # NaN state is never saved


@pytest.mark.parametrize('bad, message', [
    (lambda s, a, g, t: (s, jax.tree.map(lambda x: x.astype(jnp.bfloat16), a)),
     r"the method update changed the adapter: \['q_proj'\]\['lora_A'\]: float32\[8, 2\] -> "
     r"bfloat16\[8, 2\]; "),
    (lambda s, a, g, t: ({**s, 'count': s['count'][None]}, a),
     r"the method update changed the method state: \['count'\]: int32\[\] -> int32\[1\](\n|$)"),
    (lambda s, a, g, t: ({**s, 'extra': t}, a),
     r"the method update changed the method state: \['extra'\]: missing -> int32\[\](\n|$)"),
], ids=['adapter dtype', 'state shape', 'state structure'])
def test_update_that_changes_shapes_or_dtypes_is_refused(bad, message):
  step, _, state, params, batch, _ = setup(toy(LORA)._replace(update=bad), optax.sgd(0.1))
  with pytest.raises(ValueError, match=message):
    step(state, params, batch)


def test_sigkill_then_resume_keeps_the_method_state(tiny, tmp_path, monkeypatch):
  """launch.py with the toy method (this file as the driver) is SIGKILLed after a checkpoint and
  resumed; its last checkpoint (adapter, optimizer and method state, RNG) and exported adapter
  equal an uninterrupted run's bit for bit."""
  build = loop.build_method
  monkeypatch.setattr(loop, 'build_method', lambda peft, pre: toy(build(peft, pre)))
  loop.run(_config(tiny), tmp_path / 'ref')
  workdir = tmp_path / 'killed'
  cmd = [sys.executable, __file__] + _flags(tiny, workdir)
  kill_after_checkpoint_then_resume(cmd, workdir)
  for step in (6, 8):    # step 6 masks (the killed run resumed from step 4 or 6); 8 is the end
    ref, resumed = (ocp.PyTreeCheckpointer().restore(d / 'checkpoints' / str(step) / 'default')
                    for d in (tmp_path / 'ref', workdir))
    assert int(resumed['method_state']['count']) == int(resumed['method_state']['step']) == step
    assert jax.tree.structure(ref) == jax.tree.structure(resumed)
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(ref), jax.tree.leaves(resumed)):
      np.testing.assert_array_equal(got, want, err_msg=f'step {step} {jax.tree_util.keystr(path)}')
    lora_a = [x for p, x in jax.tree_util.tree_leaves_with_path(resumed['adapter'])
              if _name(p) == 'lora_A']
    assert len(lora_a) == 4   # query and value of 2 layers
    assert all(np.any(x == 0) == (step == 6) for x in lora_a)
  trains = [json.loads(l) for l in (tmp_path / 'ref' / 'metrics.jsonl').read_text().splitlines()
            if json.loads(l)['split'] == 'train']
  assert len(trains) == 8 and all(l['regularizer'] > 0 for l in trains)


if __name__ == '__main__':     # launch.py with the configured method wrapped by ``toy``
  sys.path.insert(0, str(ROOT))
  import launch
  from absl import app
  build_method = loop.build_method
  loop.build_method = lambda peft, pre: toy(build_method(peft, pre))
  app.run(launch.main)
