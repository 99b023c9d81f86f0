"""The run directory: lock (a second process, a stale lock), pinned config refused/allowed on
resume, metrics deduplicated, workdir validation; and end to end, a resume with another config
refused before the model loads, and a corrupted newest checkpoint falling back to the previous
one and ending with the uninterrupted run's adapter bit for bit."""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from peftjax.train import loop
from peftjax.train.checkpoint import MANIFEST
from peftjax.train.rundir import MetricWriter, RunDir, RunDirError

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # --import-mode=importlib: not on sys.path
from test_loop import ROOT, _adapter, _config, _configs_importable, _metrics, tiny  # noqa: E402,F401

HOLD = ('import sys, time; from peftjax.train.rundir import RunDir; '
        'r = RunDir(sys.argv[1]).lock(); print("locked", flush=True); time.sleep(120)')


def test_second_process_is_refused_naming_the_holder_and_a_stale_lock_is_taken_over(
    tmp_path, capsys):
  holder = subprocess.Popen([sys.executable, '-c', HOLD, str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(RunDirError, match=rf'workdir {tmp_path} is in use by another run \(pid '
                       rf'{holder.pid} on host {socket.gethostname()}\)'):
      RunDir(tmp_path).lock()
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  run = RunDir(tmp_path).lock()      # the holder is gone: its lock is stale
  assert (f'taking over the stale lock of {tmp_path} (pid {holder.pid} on host '
          f'{socket.gethostname()}; that process is gone)') in capsys.readouterr().out
  run.release()
  RunDir(tmp_path).lock().release()  # a released lock is not stale: no message
  assert 'stale' not in capsys.readouterr().out


def test_a_run_on_a_locked_workdir_fails_before_the_model_loads(tiny, tmp_path):
  held = RunDir(tmp_path).lock()
  try:
    with pytest.raises(RunDirError, match=rf'in use by another run \(pid {os.getpid()} on host '):
      loop.run(_config(tiny), tmp_path)
  finally:
    held.release()
  assert not (tmp_path / 'config.json').exists()


def _pinned(tmp_path, checkpoint_step=None, **train):
  config = ml_collections.ConfigDict({'train': {'steps': 30, 'log_every': 10, **train},
                                      'peft': {'method': 'lora', 'rank': 8}})
  run = RunDir(tmp_path)
  run.pin_config(config)
  if checkpoint_step is not None:
    (tmp_path / 'checkpoints' / str(checkpoint_step)).mkdir(parents=True)
    (tmp_path / 'checkpoints' / str(checkpoint_step) / MANIFEST).write_text('{}')
  return run, config


def test_resume_with_another_config_names_the_keys(tmp_path):
  run, config = _pinned(tmp_path, checkpoint_step=30)
  config.peft.rank, config.peft.method = 16, 'dora'
  with pytest.raises(RunDirError, match=r"Differing keys: peft.method: 'lora' -> 'dora'; "
                     r"peft.rank: 8 -> 16\. Only these may change on resume: train.steps, "):
    run.pin_config(config)


def test_steps_below_the_newest_checkpoint_or_the_pinned_steps_are_refused(tmp_path):
  run, config = _pinned(tmp_path, checkpoint_step=25)
  config.train.steps = 20
  with pytest.raises(RunDirError, match=r'config.train.steps=20 is below the step of the newest '
                     r'checkpoint \(25\)'):
    run.pin_config(config)
  config.train.steps = 28
  with pytest.raises(RunDirError, match=r'Differing keys: train.steps: 30 -> 28\.'):
    run.pin_config(config)


def test_raising_steps_and_logging_intervals_may_change_and_are_pinned(tmp_path):
  run, config = _pinned(tmp_path, checkpoint_step=30)
  config.train.update(steps=40, log_every=5)
  run.pin_config(config)
  pinned = json.loads((tmp_path / 'config.json').read_text())
  assert pinned['train'] == {'steps': 40, 'log_every': 5}


def test_without_a_checkpoint_the_config_is_pinned_afresh(tmp_path):
  run, config = _pinned(tmp_path)
  config.peft.rank = 4
  run.pin_config(config)
  assert json.loads((tmp_path / 'config.json').read_text())['peft']['rank'] == 4


def test_workdir_must_be_a_directory(tmp_path):
  (tmp_path / 'file').write_text('x')
  with pytest.raises(NotADirectoryError, match=rf'workdir {tmp_path / "file"} exists and is not '
                     r'a directory'):
    RunDir(tmp_path / 'file')


def test_metrics_past_the_restored_step_are_dropped(tmp_path, capsys):
  rows = [{'step': s, 'split': 'train', 'loss': 1.0 / s} for s in range(1, 7)]
  (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows)
                                         + '{"step": 7, "spl')   # torn by a kill
  writer = MetricWriter(tmp_path, step=4)
  writer.write(5, 'train', {'loss': 0.5})
  writer.close()
  assert [r['step'] for r in _metrics(tmp_path)] == [1, 2, 3, 4, 5]
  assert 'metrics.jsonl: dropped 3 rows past step 4' in capsys.readouterr().out


@pytest.mark.parametrize('key, value, message', [
    ('train.steps', -5, r'config.train.steps=-5 must be an integer >= 1'),
    ('train.checkpoint_every', 0, r'config.train.checkpoint_every=0 must be an integer >= 1'),
    ('train.log_every', 0, r'config.train.log_every=0 must be an integer >= 1'),
    ('train.eval_every', -1, r'config.train.eval_every=-1 must be an integer >= 1'),
    ('data.max_length', 0, r'config.data.max_length=0 must be >= 1'),
])
def test_bad_settings_are_refused_before_anything_loads(tiny, tmp_path, key, value, message):
  c = _config(tiny)
  group, name = key.split('.')
  c[group][name] = value
  with pytest.raises(ValueError, match=message):
    loop.run(c, tmp_path / 'run')
  assert not (tmp_path / 'run').exists()


def test_max_length_beyond_the_model_positions_is_refused(tiny, tmp_path):
  c = _config(tiny)
  c.data.max_length = 10_000
  with pytest.raises(ValueError, match=r"config.data.max_length=10000 exceeds the model's "
                     r'\d+ positions'):
    loop.run(c, tmp_path)


def test_workdir_that_is_a_file_is_refused_before_the_model_loads(tiny, tmp_path):
  (tmp_path / 'file').write_text('x')
  with pytest.raises(NotADirectoryError, match='is not a directory'):
    loop.run(_config(tiny), tmp_path / 'file')


def _flip_one_bit(step_dir):
  """Flips the lowest bit of the middle byte of the largest array file of a checkpoint."""
  f = max((p for p in (step_dir / 'default').rglob('*') if p.is_file()),
          key=lambda p: p.stat().st_size)
  data = bytearray(f.read_bytes())
  data[len(data) // 2] ^= 1
  f.write_bytes(bytes(data))
  return f


def test_resume_refuses_fewer_steps_and_corrupt_checkpoints_fall_back(tiny, tmp_path, capsys):
  """A finished 8-step run: re-running it with steps=4 or another rank is refused before the
  model loads; with one bit flipped in checkpoint 8 the re-run restores checkpoint 6, trains
  steps 7-8 again and exports the first run's adapter bit for bit."""
  loop.run(_config(tiny), tmp_path)
  first = _adapter(tmp_path)
  with pytest.raises(RunDirError, match=r'config.train.steps=4 is below the step of the newest '
                     r'checkpoint \(8\)'):
    loop.run(_config(tiny, steps=4), tmp_path)
  c = _config(tiny)
  c.peft.rank = 4
  with pytest.raises(RunDirError, match=r'Differing keys: peft.rank: 8 -> 4\.'):
    loop.run(c, tmp_path)
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['2', '4', '6', '8']
  bad = _flip_one_bit(tmp_path / 'checkpoints' / '8')
  capsys.readouterr()
  loop.run(_config(tiny), tmp_path)
  out = capsys.readouterr().out
  assert (f'checkpoint 8 in {tmp_path / "checkpoints"} is corrupt: '
          f'{bad.relative_to(tmp_path / "checkpoints" / "8")} does not match its SHA-256') in out
  assert 'resumed from step 6' in out
  assert (tmp_path / 'checkpoints.corrupt' / '8').is_dir()
  again = _adapter(tmp_path)
  for k in first:
    np.testing.assert_array_equal(again[k], first[k], err_msg=k)
  assert [l['step'] for l in _metrics(tmp_path) if l['split'] == 'train'] == list(range(1, 9))


@pytest.mark.parametrize('line, message', [
    ('{"prompt": "b", "response": ', r'line 2: not valid JSON \(Expecting value at column 29\)'),
    ('["a", "b"]', r'line 2: expected a JSON object, got list'),
])
def test_malformed_jsonl_names_the_file_and_line(tmp_path, line, message):
  from peftjax.data import sources
  from peftjax.errors import DataError
  f = tmp_path / 'chat.jsonl'
  f.write_text('{"prompt": "a", "response": "b"}\n' + line + '\n{"prompt": "c", "response": "d"}\n')
  with pytest.raises(DataError, match=rf'{f}, {message}'):
    sources.open_dataset(str(f))


def test_adapter_on_a_base_with_another_layer_count_is_refused(tmp_path):
  import jax
  import jax.numpy as jnp
  from peftjax import methods
  from peftjax.errors import CheckpointError
  from peftjax.methods import hf_format
  from peftjax.models import registry

  def base(layers):
    config = registry.config_from_hf(dict(
        model_type='llama', vocab_size=16, hidden_size=8, intermediate_size=8,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1))
    module = registry.build(config, 'causal_lm')
    return config, module.init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))['params']

  (c2, p2), (c3, p3) = base(2), base(3)
  method = methods.get('lora', rank=2, alpha=4, target='.*/q_proj')
  directory = hf_format.save_adapter(tmp_path, method, method.init(jax.random.key(1), p2), c2,
                                     base_params=p2)
  saved = json.loads((directory / 'peftjax_base.json').read_text())
  assert saved['param_shapes_sha256'] == hf_format.base_fingerprint(c2, p2)['param_shapes_sha256']
  assert saved['param_shapes_sha256'] != hf_format.base_fingerprint(c3, p3)['param_shapes_sha256']
  hf_format.load_adapter(directory, p2, c2)
  with pytest.raises(CheckpointError, match=rf'{tmp_path}: the adapter was saved for a 2-layer '
                     r'llama; this base is a 3-layer llama'):
    hf_format.load_adapter(directory, p3, c3)
