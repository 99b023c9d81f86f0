"""Checkpoints: bit-exact sharded round trip, keep-last-K, save interval, resume, NaN guard."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import sharding
from peftjax.errors import CheckpointError
from peftjax.train import optim
from peftjax.train.checkpoint import Checkpointer, nonfinite_keys, with_shardings
from peftjax.train.state import init_train_state
from peftjax.train.step import make_train_step

AXES = {'layers_0': {'kernel': ('embed', 'mlp')}}


def loss_fn(adapter, base, batch, rng):
  noise = jax.random.normal(rng, batch['x'].shape) * 0.01  # makes the result depend on the RNG
  x = batch['x'] + noise
  out = x @ base['layers_0']['kernel'] + x @ adapter['layers_0']['lora_A'] @ adapter['layers_0']['lora_B']
  return jnp.mean((out - 1.0) ** 2), {}


def lora_init(rng, base):
  ka, kb = jax.random.split(rng)
  return {'layers_0': {'lora_A': jax.random.normal(ka, (8, 2)), 'lora_B': jax.random.normal(kb, (2, 8))}}


@pytest.fixture
def run():
  mesh = sharding.make_mesh(2, 2, 2)
  base_sh = sharding.tree_shardings(AXES, {'layers_0': {'kernel': np.zeros((8, 8))}}, mesh, sharding.DEFAULT_RULES)
  base = jax.device_put({'layers_0': {'kernel': np.eye(8, dtype=np.float32)}}, base_sh)
  tx = optim.make_optimizer({'learning_rate': 1e-2, 'total_steps': 10, 'warmup_steps': 2, 'clip_norm': 1.0})
  state, state_sh = init_train_state(lora_init, tx, jax.random.key(0), base, AXES, mesh)
  step = make_train_step(loss_fn, tx, state_shardings=state_sh, base_shardings=base_sh,
                         batch_sharding=sharding.batch_sharding(mesh))
  batch = sharding.global_batch({'x': np.random.RandomState(0).normal(size=(8, 8)).astype(np.float32)}, mesh)
  return lambda s: step(s, base, batch)[0], state, state_sh


def assert_bit_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b) and len(la) == len(lb)
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_bit_exact_into_shardings(run, tmp_path):
  step, state, state_sh = run
  for _ in range(3):
    state = step(state)
  ckpt = Checkpointer(str(tmp_path), save_every=1, keep=2)
  assert ckpt.save(state)
  ckpt.close()
  target = with_shardings(jax.eval_shape(lambda: state), state_sh)
  restored = Checkpointer(str(tmp_path)).restore(target)  # a fresh manager, as after a restart
  assert_bit_equal(restored, state)
  assert int(restored.step) == 3 and int(restored.data_position) == 3
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state_sh)):
    assert got.sharding == want


def test_resume_equals_uninterrupted(run, tmp_path):
  step, state, _ = run
  ckpt = Checkpointer(str(tmp_path), save_every=2, keep=3)
  straight = jax.tree.map(jnp.copy, state)  # the step donates its input
  for _ in range(4):
    straight = step(straight)
  resumed = step(step(state))
  ckpt.save(resumed)
  ckpt.close()
  resumed = Checkpointer(str(tmp_path)).restore(resumed)
  assert_bit_equal(step(step(resumed)), straight)


def test_keep_last_k_and_save_interval(run, tmp_path):
  step, state, _ = run
  ckpt = Checkpointer(str(tmp_path), save_every=2, keep=2)
  saved = []
  for i in range(1, 8):
    state = step(state)
    saved.append(ckpt.save(state, step=i) if i % 2 else ckpt.save(state))  # host step: no device read
  assert saved == [False, True, False, True, False, True, False]
  assert ckpt.all_steps() == [4, 6] and ckpt.latest_step() == 6
  assert sorted(p.name for p in tmp_path.iterdir()) == ['4', '6']
  assert ckpt.save(state, force=True) and ckpt.all_steps() == [6, 7]
  assert Checkpointer(str(tmp_path / 'empty')).restore(state) is None


def test_nonfinite_guard_keeps_last_good_checkpoint(run, tmp_path):
  step, state, _ = run
  ckpt = Checkpointer(str(tmp_path), save_every=1, keep=3)
  state = step(state)
  assert ckpt.save(state, metrics={'loss': jnp.float32(0.5)})
  state = step(state)
  assert nonfinite_keys({'loss': jnp.float32(jnp.nan), 'grad_norm': jnp.float32(jnp.inf), 'ok': 1.0}) == \
      ['loss', 'grad_norm']
  assert not ckpt.save(state, metrics={'loss': jnp.float32(jnp.nan)})
  bad = state.replace(adapter=jax.tree.map(lambda x: x * jnp.inf, state.adapter))
  assert not ckpt.save(bad)
  assert ckpt.all_steps() == [1]


def _largest_file(step_dir):
  """The largest array data file (ocdbt ``d/`` chunks) of a checkpoint."""
  return max((p for p in step_dir.rglob('*') if p.is_file() and p.parent.name == 'd'),
             key=lambda p: p.stat().st_size)


def _truncate(step_dir):
  f = _largest_file(step_dir)
  f.write_bytes(f.read_bytes()[:-7])
  return f'{f.relative_to(step_dir)} has {f.stat().st_size} bytes, {f.stat().st_size + 7} when saved'


def _flip_bit(step_dir):
  f = _largest_file(step_dir)
  data = bytearray(f.read_bytes())
  data[len(data) // 3] ^= 0x10
  f.write_bytes(bytes(data))
  return f'{f.relative_to(step_dir)} does not match its SHA-256 (changed since it was saved)'


def _drop_manifest(step_dir):
  (step_dir / 'peftjax_manifest.json').unlink()
  return 'no peftjax_manifest.json (the save did not finish)'


def _drop_metadata(step_dir):
  f = step_dir / '_CHECKPOINT_METADATA'
  f.unlink()
  return '_CHECKPOINT_METADATA is missing'


@pytest.mark.parametrize('corrupt', [_truncate, _flip_bit, _drop_manifest, _drop_metadata])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(run, tmp_path, capsys, corrupt):
  step, state, _ = run
  ckpt = Checkpointer(str(tmp_path / 'ckpt'), save_every=1, keep=3)
  state = step(state)
  ckpt.save(state)
  good = jax.tree.map(np.asarray, state)
  state = step(state)
  ckpt.save(state)
  ckpt.close()
  problem = corrupt(tmp_path / 'ckpt' / '2')
  fresh = Checkpointer(str(tmp_path / 'ckpt'), save_every=1, keep=3)
  restored = fresh.restore(state)
  assert f'checkpoint 2 in {tmp_path / "ckpt"} is corrupt: {problem}; moved to ' in \
      capsys.readouterr().out
  assert_bit_equal(restored, good)
  assert fresh.all_steps() == [1] and (tmp_path / 'ckpt.corrupt' / '2').is_dir()


def test_a_requested_corrupt_step_raises(run, tmp_path):
  step, state, _ = run
  ckpt = Checkpointer(str(tmp_path), save_every=1)
  state = step(state)
  ckpt.save(state)
  problem = _flip_bit(tmp_path / '1')
  with pytest.raises(CheckpointError, match=re.escape(f'checkpoint 1 in {tmp_path} is corrupt: '
                                                      f'{problem}')):
    ckpt.restore(state, step=1)
  assert ckpt.all_steps() == [1]       # not moved: the caller asked for it


def test_keep_counts_only_verified_checkpoints(run, tmp_path):
  """A step without a manifest (killed before it was written) does not count towards keep-last-K,
  so the newest verified step is never deleted in its favour."""
  step, state, _ = run
  ckpt = Checkpointer(str(tmp_path), save_every=1, keep=1)
  state = step(state)
  ckpt.save(state)
  state = step(state)
  ckpt.save(state)
  _drop_manifest(tmp_path / '2')
  state = step(state)
  ckpt._prune()
  assert ckpt.all_steps() == [2]       # 2 was verified when 1 was deleted: keep=1 held
  assert ckpt.save(state) and ckpt.all_steps() == [3]
