"""Checkpoints of the TrainState with orbax: every N steps, keep the last K, atomic, verified,
sharded restore.

The whole TrainState is one checkpoint, so a method's own state (`TrainState.method_state`, e.g.
importance averages and rank masks) is saved and restored into its shardings with the adapter.

Orbax writes each step into a temporary directory and renames it when complete, so a killed
process never leaves a half-written step. After that, a manifest of every file's size and
SHA-256 (``peftjax_manifest.json``) is written last, atomically. A restore verifies it; a step
whose files do not match (flipped bits, truncation, missing files or no manifest) is moved to
``<directory>.corrupt/`` with a message, and the newest step that verifies is restored instead.
Keep-last-K never deletes the newest verified step.

>>> import optax, tempfile
>>> from peftjax.train.state import TrainState
>>> state = TrainState.create({'w': jnp.zeros(2)}, optax.sgd(0.1), jax.random.key(0))
>>> ckpt = Checkpointer(tempfile.mkdtemp(), save_every=1, keep=2)
>>> ckpt.save(state, force=True)
True
>>> int(ckpt.restore(state).step)
0
>>> ckpt.close()
"""
import hashlib
import json
import os
import pathlib
import shutil
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from peftjax import errors
from peftjax.train.state import TrainState

MANIFEST = 'peftjax_manifest.json'


def nonfinite_keys(metrics: Mapping[str, Any]) -> list[str]:
  """Names of metrics that are NaN or inf (empty when all are finite). The loop stops on a
  non-empty answer and does not save, so the last good checkpoint stays the latest.

  >>> nonfinite_keys({'loss': float('nan'), 'grad_norm': 1.0})
  ['loss']
  """
  return [k for k, v in metrics.items() if not np.all(np.isfinite(np.asarray(jax.device_get(v))))]


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying shardings: the restore target for `Checkpointer.restore`."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _file_digests(step_dir: pathlib.Path) -> dict[str, list]:
  out = {}
  for f in sorted(p for p in step_dir.rglob('*') if p.is_file() and p.name != MANIFEST):
    h = hashlib.sha256()
    with open(f, 'rb') as fh:
      for block in iter(lambda: fh.read(1 << 20), b''):
        h.update(block)
    out[str(f.relative_to(step_dir))] = [f.stat().st_size, h.hexdigest()]
  return out


def write_manifest(step_dir: pathlib.Path):
  """Records every file's size and SHA-256 in ``step_dir/peftjax_manifest.json`` (atomic)."""
  tmp = step_dir / (MANIFEST + '.tmp')
  tmp.write_text(json.dumps(_file_digests(step_dir), indent=0))
  os.replace(tmp, step_dir / MANIFEST)


def verify(step_dir: pathlib.Path) -> str | None:
  """None when ``step_dir`` matches its manifest, else what is wrong (naming the file)."""
  manifest = step_dir / MANIFEST
  if not manifest.is_file():
    return f'no {MANIFEST} (the save did not finish)'
  try:
    want = json.loads(manifest.read_text())
  except ValueError as e:
    return f'{MANIFEST} is unreadable ({e})'
  got = _file_digests(step_dir)
  for name, (size, digest) in want.items():
    if name not in got:
      return f'{name} is missing'
    if got[name][0] != size:
      return f'{name} has {got[name][0]} bytes, {size} when saved'
    if got[name][1] != digest:
      return f'{name} does not match its SHA-256 (changed since it was saved)'
  return None


def _barrier(name: str):
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class Checkpointer:
  """A `CheckpointManager` for TrainStates (adapter, optimizer state, step, RNG, data position,
  method state): saves when `step % save_every == 0` (or forced), keeps the newest `keep`
  verified steps."""

  def __init__(self, directory: str, *, save_every: int = 1000, keep: int | None = 3,
               async_save: bool = False):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None, create=True, enable_async_checkpointing=async_save,
        save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(save_every))
    self.directory = os.path.abspath(directory)
    self.keep = keep
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, state: TrainState, *, step: int | None = None, metrics: Mapping[str, Any] | None = None,
           force: bool = False) -> bool:
    """Saves at `state.step` when it is a save step (or `force`); returns whether it saved.
    Refuses (returns False) when `metrics`, the adapter or the method state hold NaN/inf
    (integer leaves such as counters are not checked). Pass the host-side
    `step` (== state.step) to call it every step without waiting for the device: nothing is
    then read from the devices on steps that are not saved."""
    step = int(state.step) if step is None else step
    if not self.is_save_step(step, force):
      return False
    if metrics is not None and nonfinite_keys(metrics):
      return False
    floats = [x for x in jax.tree.leaves((state.adapter, state.method_state))
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    if not all(bool(jnp.all(jnp.isfinite(x))) for x in floats):
      return False
    if not self._manager.save(step, args=ocp.args.StandardSave(state), force=force):
      return False
    self._manager.wait_until_finished()
    if jax.process_index() == 0:
      write_manifest(pathlib.Path(self.directory) / str(step))
    _barrier(f'peftjax_manifest_{step}')
    self._prune()
    return True

  def is_save_step(self, step: int, force: bool = False) -> bool:
    return force or self._manager.should_save(step)

  def _prune(self):
    """Deletes every step older than the newest `keep` that have a manifest (so never the
    newest verified one)."""
    if self.keep is None:
      return
    steps = self.all_steps()
    kept = [s for s in steps if (pathlib.Path(self.directory) / str(s) / MANIFEST).is_file()]
    if len(kept) >= self.keep:
      oldest_kept = kept[-self.keep]
      for s in steps:
        if s < oldest_kept:
          self._manager.delete(s)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def restore(self, target: Any, step: int | None = None) -> TrainState | None:
    """Restores `step` (default: the newest that verifies) into `target`'s structure and
    shardings; `target` holds arrays or `with_shardings(...)` structs. Returns None when there
    is no checkpoint. With no `step` given, a step that fails verification is moved aside with
    a message and the next older one is tried; a given `step` that fails raises
    `CheckpointError`."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
    for s in ([step] if step is not None else self.all_steps()[::-1]):
      problem = verify(pathlib.Path(self.directory) / str(s))
      if problem is None:
        try:
          return self._manager.restore(s, args=ocp.args.StandardRestore(abstract))
        except Exception as e:   # verified bytes that orbax cannot read (e.g. another structure)
          problem = f'orbax cannot restore it: {type(e).__name__}: {str(e)[:300]}'
      if step is not None:
        raise errors.CheckpointError(f'checkpoint {s} in {self.directory} is corrupt: {problem}')
      self._set_aside(s, problem)
    return None

  def _set_aside(self, step: int, problem: str):
    aside = pathlib.Path(self.directory + '.corrupt') / str(step)
    print(f'checkpoint {step} in {self.directory} is corrupt: {problem}; moved to {aside}, '
          f'falling back to the newest checkpoint that verifies')
    if jax.process_index() == 0:
      aside.parent.mkdir(parents=True, exist_ok=True)
      if aside.exists():
        shutil.rmtree(aside)
      os.replace(pathlib.Path(self.directory) / str(step), aside)
    _barrier(f'peftjax_set_aside_{step}')
    self._manager.reload()

  def wait(self):
    """Blocks until an async save has finished."""
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()
