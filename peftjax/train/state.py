"""The train state (step, adapter, optimizer state, RNG, data position) and its sharded creation.

>>> import optax
>>> tx = optax.sgd(0.1)
>>> state = TrainState.create({'w': jnp.zeros(2)}, tx, jax.random.key(0))
>>> int(state.step), int(state.data_position)
(0, 0)
"""
from typing import Any, Callable

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
  """
  step: jax.Array
  adapter: Any
  opt_state: Any
  rng: jax.Array
  data_position: jax.Array

  @classmethod
  def create(cls, adapter, optimizer: optax.GradientTransformation, rng: jax.Array,
             data_position: int = 0, master_dtype=jnp.float32) -> 'TrainState':
    adapter = cast_floating(adapter, master_dtype)
    return cls(step=jnp.zeros([], jnp.int32), adapter=adapter, opt_state=optimizer.init(adapter),
               rng=key_data(rng), data_position=jnp.asarray(data_position, jnp.int32))

  def key(self) -> jax.Array:
    return jax.random.wrap_key_data(self.rng)


def state_shardings(abstract_state: TrainState, adapter_shardings, mesh: Mesh) -> TrainState:
  """Shardings for a TrainState: adapter as given, optimizer state following the adapter leaves
  it mirrors (others replicated), scalars and RNG replicated."""
  rep = sharding_lib.replicated(mesh)
  opt = sharding_lib.follow_params(abstract_state.opt_state, abstract_state.adapter, adapter_shardings, mesh)
  return TrainState(step=rep, adapter=adapter_shardings, opt_state=opt, rng=rep, data_position=rep)


def init_train_state(adapter_init: Callable, optimizer: optax.GradientTransformation, rng: jax.Array,
                     base_params, base_axes, mesh: Mesh, rules=sharding_lib.DEFAULT_RULES
                     ) -> tuple[TrainState, TrainState]:
  """Creates the state directly in its shardings (adapter shardings derived from the base params).

  `adapter_init(rng, base_params) -> adapter` is a `PeftMethod.init`; `base_axes` are the logical
  axes of the base params (from `sharding.sharded_init`). Returns `(state, shardings)`.
  """
  def create(rng, base):
    init_rng, state_rng = jax.random.split(jax.random.wrap_key_data(key_data(rng)))
    return TrainState.create(adapter_init(init_rng, base), optimizer, state_rng)

  abstract = jax.eval_shape(create, rng, base_params)
  axes = sharding_lib.adapter_axes(abstract.adapter, base_params, base_axes)
  adapter_shardings = sharding_lib.tree_shardings(axes, abstract.adapter, mesh, rules)
  shardings = state_shardings(abstract, adapter_shardings, mesh)
  return jax.jit(create, out_shardings=shardings)(rng, base_params), shardings
