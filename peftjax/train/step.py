"""Jitted train and eval steps with explicit shardings; gradients only w.r.t. the adapter.

`loss_fn(adapter, base_params, batch, rng) -> (loss, metrics)`; `rng` is None in eval (run the
model deterministically then). A PEFT method's optional `regularizer` is added to the training
loss and its `update` advances `TrainState.method_state` after each optimizer step; the step
never needs to know which method it runs.

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

With a method's regulariser and per-step update (here: count the steps, halve ``w`` every 2):

>>> def update(count, adapter, grads, step):
...   return count + 1, jax.tree.map(lambda w: jnp.where(step % 2 == 0, w / 2, w), adapter)
>>> state = TrainState.create({'w': jnp.ones(2)}, tx, jax.random.key(0), init_state=lambda a: 0)
>>> step = make_train_step(loss_fn, tx, state_shardings=state_shardings(state, rep, mesh),
...                        base_shardings=rep, batch_sharding=sharding.batch_sharding(mesh),
...                        regularizer=lambda a: jnp.sum(a['w'] ** 2), update=update)
>>> state, metrics = step(state, {'w': jnp.ones(2)}, {'x': jnp.ones((4, 2))})
>>> float(metrics['regularizer']), int(state.method_state)
(2.0, 1)
"""
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from peftjax.train.state import TrainState, cast_floating

LossFn = Callable[[Any, Any, Any, Any], tuple[jax.Array, dict]]
Regularizer = Callable[[Any], jax.Array]                           # adapter -> scalar
Update = Callable[[Any, Any, Any, jax.Array], tuple[Any, Any]]    # (state, adapter, grads, step)


def _replicated_like(sharding: Any) -> NamedSharding:
  leaf = jax.tree.leaves(sharding)[0]
  return NamedSharding(leaf.mesh, jax.sharding.PartitionSpec())


def _check_unchanged(what: str, before, after):
  """Raises at trace time when `update` changed a tree's structure, shapes or dtypes (the state's
  shardings and checkpoints are fixed by its first value)."""
  describe = lambda t: {jax.tree_util.keystr(p) or '(root)': f'{x.dtype}{list(x.shape)}'
                        for p, x in jax.tree_util.tree_leaves_with_path(t)}
  b, a = describe(before), describe(after)
  if b != a or jax.tree.structure(before) != jax.tree.structure(after):
    changed = [f'{k}: {b.get(k, "missing")} -> {a.get(k, "missing")}'
               for k in sorted(b.keys() | a.keys()) if b.get(k) != a.get(k)]
    raise ValueError(f'the method update changed the {what}: ' + ('; '.join(changed) or
                     f'{jax.tree.structure(before)} -> {jax.tree.structure(after)}'))


def _method_update(update: Update, state: TrainState, opt_state, adapter, grads):
  """``update`` after an optimizer step. Under ``optax.MultiSteps`` (gradient accumulation) it
  runs only on the micro-batch that completes an optimizer step, with the accumulated (mean)
  gradient the optimizer used and the count of optimizer steps; other micro-batches keep the
  method state and the adapter."""
  if not isinstance(state.opt_state, optax.MultiStepsState):
    new_state, new_adapter = update(state.method_state, adapter, grads, state.step + 1)
    emitted = None
  else:
    old = state.opt_state
    mean = jax.tree.map(lambda acc, g: acc + (g - acc) / (old.mini_step + 1), old.acc_grads, grads)
    new_state, new_adapter = update(state.method_state, adapter, mean, opt_state.gradient_step)
    emitted = opt_state.gradient_step > old.gradient_step
  _check_unchanged('adapter', state.adapter, new_adapter)
  _check_unchanged('method state', state.method_state, new_state)
  if emitted is None:
    return new_state, new_adapter
  keep = lambda new, prev: jnp.where(emitted, new, prev)
  return jax.tree.map(keep, new_state, state.method_state), jax.tree.map(keep, new_adapter, adapter)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                    state_shardings: TrainState, base_shardings: Any, batch_sharding: Any,
                    compute_dtype=None, donate: bool = True,
                    regularizer: Optional[Regularizer] = None,
                    update: Optional[Update] = None) -> Callable:
  """One `jax.jit`: `(state, base_params, batch) -> (state, metrics)`, the state donated.

  Base params are an argument (never closed over, so never baked into the executable) and are
  under `stop_gradient`; only the adapter is differentiated. With `compute_dtype` (e.g. bf16)
  the float32 master adapter is cast for the forward pass and its gradient comes back float32.

  `regularizer` and `update` are a `PeftMethod`'s fields (None: none). `regularizer(adapter)`
  sees the adapter the loss sees (cast to `compute_dtype`) and is added to the loss that is
  differentiated and reported. `update(state.method_state, adapter, grads, step)` runs after
  the optimizer step on the float32 master adapter and its float32 gradients, `step` being the
  count of optimizer steps done including this one; it returns `(method_state, adapter)` of
  unchanged structure, shapes and dtypes. With gradient accumulation (an `optax.MultiSteps`
  optimizer) it runs once per optimizer step, on the micro-batch that completes it, with the
  accumulated gradient (as HF PEFT's `update_and_allocate` after `optimizer.step()`).
  Metrics are the loss_fn's plus `loss`, `grad_norm` and, with a regulariser, `regularizer`,
  replicated.
  """
  def train_step(state: TrainState, base_params, batch):
    key, step_key = jax.random.split(state.key())
    base_params = jax.lax.stop_gradient(base_params)

    def compute_loss(adapter):
      if compute_dtype is not None:
        adapter = cast_floating(adapter, compute_dtype)
      loss, metrics = loss_fn(adapter, base_params, batch, step_key)
      if regularizer is not None:
        penalty = regularizer(adapter)
        loss, metrics = loss + penalty, {**metrics, 'regularizer': penalty}
      return loss, metrics

    (loss, metrics), grads = jax.value_and_grad(compute_loss, has_aux=True)(state.adapter)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.adapter)
    adapter, method_state = optax.apply_updates(state.adapter, updates), state.method_state
    if update is not None:
      method_state, adapter = _method_update(update, state, opt_state, adapter, grads)
    state = state.replace(step=state.step + 1, adapter=adapter, opt_state=opt_state,
                          rng=jax.random.key_data(key), data_position=state.data_position + 1,
                          method_state=method_state)
    return state, {**metrics, 'loss': loss, 'grad_norm': optax.tree.norm(grads)}

  return jax.jit(train_step, in_shardings=(state_shardings, base_shardings, batch_sharding),
                 out_shardings=(state_shardings, _replicated_like(batch_sharding)),
                 donate_argnums=(0,) if donate else ())


def make_eval_step(loss_fn: LossFn, *, adapter_shardings: Any, base_shardings: Any,
                   batch_sharding: Any, compute_dtype=None) -> Callable:
  """One `jax.jit`: `(adapter, base_params, batch) -> metrics` (loss_fn's plus `loss`), rng=None.

  The eval loss is the loss_fn's alone: a method's regulariser is a training penalty and is not
  added, so eval losses compare across methods (the train `loss` includes it)."""
  def eval_step(adapter, base_params, batch):
    if compute_dtype is not None:
      adapter = cast_floating(adapter, compute_dtype)
    loss, metrics = loss_fn(adapter, base_params, batch, None)
    return {**metrics, 'loss': loss}

  return jax.jit(eval_step, in_shardings=(adapter_shardings, base_shardings, batch_sharding),
                 out_shardings=_replicated_like(batch_sharding))


@jax.jit
def first_nonfinite(first: jax.Array, metrics: dict, step: jax.Array) -> jax.Array:
  """The first step whose loss or gradient norm was NaN/inf, 0 while all were finite.

  Kept on the device and advanced after every train step (dispatched asynchronously, so no
  host sync per step); the loop reads it only before a save or a log.

  >>> import jax.numpy as jnp
  >>> first = jnp.int32(0)
  >>> for step, loss in enumerate([1.0, float('nan'), 2.0], 1):
  ...   first = first_nonfinite(first, {'loss': jnp.float32(loss), 'grad_norm': 1.0}, step)
  >>> int(first)
  2
  """
  finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])
  return jnp.where((first == 0) & ~finite, jnp.asarray(step, jnp.int32), first)
