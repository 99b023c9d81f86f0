"""The train state (step, adapter, optimizer state, RNG, data position, the method's own state)
and its sharded creation.

>>> import optax
>>> tx = optax.sgd(0.1)
>>> state = TrainState.create({'w': jnp.zeros(2)}, tx, jax.random.key(0))
>>> int(state.step), int(state.data_position), state.method_state
(0, 0, ())
>>> ema = lambda adapter: {'ema': jax.tree.map(jnp.zeros_like, adapter)}   # a PeftMethod.init_state
>>> TrainState.create({'w': jnp.zeros(2)}, tx, jax.random.key(0), init_state=ema).method_state
{'ema': {'w': Array([0., 0.], dtype=float32)}}
"""
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from peftjax import sharding as sharding_lib


def cast_floating(tree, dtype) -> Any:
  """Casts floating-point leaves to `dtype` (integer leaves and keys untouched).

  >>> cast_floating({'w': jnp.ones(2), 'i': jnp.ones(2, jnp.int32)}, jnp.bfloat16)['w'].dtype
  dtype(bfloat16)
  """
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def key_data(rng: jax.Array) -> jax.Array:
  """Raw uint32 key data (what the state stores, so checkpoints need no key types)."""
  return jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to resume; base params live outside it (frozen, never saved here).

  `data_position` counts global batches consumed; the data pipeline maps it to epoch/offset.
  `adapter` holds float32 master weights (see `cast_floating` for bf16 compute).
  `method_state` is the PEFT method's own state (`PeftMethod.init_state` of the master
  adapter, advanced by `PeftMethod.update` in the train step), `()` for methods without one.
  """
  step: jax.Array
  adapter: Any
  opt_state: Any
  rng: jax.Array
  data_position: jax.Array
  method_state: Any

  @classmethod
  def create(cls, adapter, optimizer: optax.GradientTransformation, rng: jax.Array,
             data_position: int = 0, master_dtype=jnp.float32,
             init_state: Callable[[Any], Any] | None = None) -> 'TrainState':
    adapter = cast_floating(adapter, master_dtype)
    return cls(step=jnp.zeros([], jnp.int32), adapter=adapter, opt_state=optimizer.init(adapter),
               rng=key_data(rng), data_position=jnp.asarray(data_position, jnp.int32),
               method_state=() if init_state is None else init_state(adapter))

  def key(self) -> jax.Array:
    return jax.random.wrap_key_data(self.rng)


def state_shardings(abstract_state: TrainState, adapter_shardings, mesh: Mesh) -> TrainState:
  """Shardings for a TrainState: adapter as given, optimizer and method state following the
  adapter leaves they mirror (same key-path suffix and shape; others replicated), scalars and
  RNG replicated."""
  rep = sharding_lib.replicated(mesh)
  follow = lambda t: sharding_lib.follow_params(t, abstract_state.adapter, adapter_shardings, mesh)
  return TrainState(step=rep, adapter=adapter_shardings, opt_state=follow(abstract_state.opt_state),
                    rng=rep, data_position=rep, method_state=follow(abstract_state.method_state))


def init_train_state(adapter_init: Callable, optimizer: optax.GradientTransformation, rng: jax.Array,
                     base_params, base_axes, mesh: Mesh, rules=sharding_lib.DEFAULT_RULES,
                     init_state: Callable | None = None) -> tuple[TrainState, TrainState]:
  """Creates the state directly in its shardings.

  `adapter_init(rng, base_params) -> adapter` is a `PeftMethod.init`, given the base params boxed
  with `base_axes` (their logical axes, e.g. from `sharding.sharded_init`): adapter leaves it
  declares with logical axes are sharded by `rules`, others replicated. `init_state` is the
  method's `PeftMethod.init_state` (None: no method state). Returns `(state, shardings)`.
  """
  def create(rng, base):
    init_rng, state_rng = jax.random.split(jax.random.wrap_key_data(key_data(rng)))
    adapter = adapter_init(init_rng, sharding_lib.boxed(base, base_axes))
    state = TrainState.create(nn.meta.unbox(adapter), optimizer, state_rng, init_state=init_state)
    return state, adapter

  abstract, boxed_adapter = jax.eval_shape(create, rng, base_params)
  axes = sharding_lib.logical_axes(boxed_adapter)
  adapter_shardings = sharding_lib.tree_shardings(axes, abstract.adapter, mesh, rules)
  shardings = state_shardings(abstract, adapter_shardings, mesh)
  return jax.jit(lambda r, b: create(r, b)[0], out_shardings=shardings)(rng, base_params), shardings
