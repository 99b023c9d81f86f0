"""Jitted train and eval steps with explicit shardings; gradients only w.r.t. the adapter.

`loss_fn(adapter, base_params, batch, rng) -> (loss, metrics)`; `rng` is None in eval (run the
model deterministically then).

>>> import jax.numpy as jnp, optax
>>> from peftjax import sharding
>>> from peftjax.train.state import TrainState, state_shardings
>>> mesh = sharding.make_mesh(devices=jax.devices()[:1])
>>> loss_fn = lambda a, b, batch, rng: (jnp.sum((batch['x'] @ (b['w'] + a['w'])) ** 2), {})
>>> tx = optax.sgd(0.1)
>>> state = TrainState.create({'w': jnp.zeros(2)}, tx, jax.random.key(0))
>>> rep = sharding.replicated(mesh)
>>> step = make_train_step(loss_fn, tx, state_shardings=state_shardings(state, rep, mesh),
...                        base_shardings=rep, batch_sharding=sharding.batch_sharding(mesh))
>>> state, metrics = step(state, {'w': jnp.ones(2)}, {'x': jnp.ones((4, 2))})
>>> int(state.step)
1
"""
from typing import Any, Callable

import jax
import optax
from jax.sharding import NamedSharding

from peftjax.train.state import TrainState, cast_floating

LossFn = Callable[[Any, Any, Any, Any], tuple[jax.Array, dict]]


def _replicated_like(sharding: Any) -> NamedSharding:
  leaf = jax.tree.leaves(sharding)[0]
  return NamedSharding(leaf.mesh, jax.sharding.PartitionSpec())


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                    state_shardings: TrainState, base_shardings: Any, batch_sharding: Any,
                    compute_dtype=None, donate: bool = True) -> Callable:
  """One `jax.jit`: `(state, base_params, batch) -> (state, metrics)`, the state donated.

  Base params are an argument (never closed over, so never baked into the executable) and are
  under `stop_gradient`; only the adapter is differentiated. With `compute_dtype` (e.g. bf16)
  the float32 master adapter is cast for the forward pass and its gradient comes back float32.
  Metrics are the loss_fn's plus `loss` and `grad_norm`, replicated.
  """
  def train_step(state: TrainState, base_params, batch):
    key, step_key = jax.random.split(state.key())
    base_params = jax.lax.stop_gradient(base_params)

    def compute_loss(adapter):
      if compute_dtype is not None:
        adapter = cast_floating(adapter, compute_dtype)
      return loss_fn(adapter, base_params, batch, step_key)

    (loss, metrics), grads = jax.value_and_grad(compute_loss, has_aux=True)(state.adapter)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.adapter)
    state = state.replace(step=state.step + 1, adapter=optax.apply_updates(state.adapter, updates),
                          opt_state=opt_state, rng=jax.random.key_data(key),
                          data_position=state.data_position + 1)
    return state, {**metrics, 'loss': loss, 'grad_norm': optax.tree.norm(grads)}

  return jax.jit(train_step, in_shardings=(state_shardings, base_shardings, batch_sharding),
                 out_shardings=(state_shardings, _replicated_like(batch_sharding)),
                 donate_argnums=(0,) if donate else ())


def make_eval_step(loss_fn: LossFn, *, adapter_shardings: Any, base_shardings: Any,
                   batch_sharding: Any, compute_dtype=None) -> Callable:
  """One `jax.jit`: `(adapter, base_params, batch) -> metrics` (loss_fn's plus `loss`), rng=None."""
  def eval_step(adapter, base_params, batch):
    if compute_dtype is not None:
      adapter = cast_floating(adapter, compute_dtype)
    loss, metrics = loss_fn(adapter, base_params, batch, None)
    return {**metrics, 'loss': loss}

  return jax.jit(eval_step, in_shardings=(adapter_shardings, base_shardings, batch_sharding),
                 out_shardings=_replicated_like(batch_sharding))
