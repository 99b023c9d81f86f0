"""Checkpoints of the TrainState with orbax: every N steps, keep the last K, atomic, sharded restore.

The whole TrainState is one checkpoint, so a method's own state (`TrainState.method_state`, e.g.
importance averages and rank masks) is saved and restored into its shardings with the adapter.

Orbax writes each step into a temporary directory and renames it when complete, so a killed
process never leaves a half-written step that `latest_step` would pick up.

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
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from peftjax.train.state import TrainState


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


class Checkpointer:
  """A `CheckpointManager` for TrainStates (adapter, optimizer state, step, RNG, data position,
  method state): saves when `step % save_every == 0` (or forced), keeps the newest `keep` steps."""

  def __init__(self, directory: str, *, save_every: int = 1000, keep: int | None = 3,
               async_save: bool = False):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(save_every))
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, state: TrainState, *, step: int | None = None, metrics: Mapping[str, Any] | None = None,
           force: bool = False) -> bool:
    """Saves at `state.step` when it is a save step (or `force`); returns whether it saved.
    Refuses (returns False) when `metrics`, the adapter or the method state hold NaN/inf
    (integer leaves such as counters are not checked). Pass the host-side
    `step` (== state.step) to call it every step without waiting for the device: nothing is
    then read from the devices on steps that are not saved."""
    step = int(state.step) if step is None else step
    if not (force or self._manager.should_save(step)):
      return False
    if metrics is not None and nonfinite_keys(metrics):
      return False
    floats = [x for x in jax.tree.leaves((state.adapter, state.method_state))
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    if not all(bool(jnp.all(jnp.isfinite(x))) for x in floats):
      return False
    return self._manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def restore(self, target: Any, step: int | None = None) -> TrainState | None:
    """Restores `step` (default: latest) into `target`'s structure and shardings; `target` holds
    arrays or `with_shardings(...)` structs. Returns None when there is no checkpoint."""
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def wait(self):
    """Blocks until an async save has finished."""
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()
