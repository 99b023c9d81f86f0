"""Device mesh, logical-axis rules, and shardings for base params, adapters, optimizer state, batches.

Everything is explicit data: a mesh built from config sizes, an ordered tuple of
(logical axis, mesh axis or None) rules, and functions that turn shapes plus logical names into
`NamedSharding`s. No global partitioning context is used.

>>> mesh = make_mesh(data=1, fsdp=-1, tensor=1)
>>> batch_sharding(mesh).spec
P(('data', 'fsdp'),)
"""
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

# Ordered (logical axis, mesh axis) rules; the first rule whose mesh axis is still free wins.
DEFAULT_RULES = (
    ('batch', BATCH_AXES),
    ('vocab', 'tensor'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('embed', 'fsdp'),
    ('vocab', 'fsdp'),
    ('mlp', 'fsdp'),
    ('head_dim', None),
    ('layers', None),
    ('norm', None),
)



def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
  """A `('data', 'fsdp', 'tensor')` mesh; one size may be -1 (= the remaining devices).

  >>> make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1]).shape['fsdp']
  1
  """
  devices = jax.devices() if devices is None else list(devices)
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f'mesh sizes {dict(zip(MESH_AXES, sizes))}: at most one may be -1')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f'mesh sizes {dict(zip(MESH_AXES, sizes))} do not divide {len(devices)} devices')
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f'mesh sizes {dict(zip(MESH_AXES, sizes))} need {math.prod(sizes)} devices, '
                     f'have {len(devices)}')
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def mesh_from_config(config: Mapping[str, Any]) -> Mesh:
  """Builds the mesh from `config.mesh` (`data`, `fsdp`, `tensor`; missing keys default to 1, -1, 1)."""
  mesh = config.get('mesh', {}) or {}
  return make_mesh(mesh.get('data', 1), mesh.get('fsdp', -1), mesh.get('tensor', 1))


def rules_from_config(config: Mapping[str, Any]) -> tuple:
  """`config.sharding_rules` as a tuple of (logical, mesh axis) pairs, or `DEFAULT_RULES`."""
  rules = config.get('sharding_rules', None)
  if rules is None:
    return DEFAULT_RULES
  return tuple((logical, tuple(m) if isinstance(m, list) else m) for logical, m in rules)


def logical_axes(boxed_tree) -> Any:
  """Per-leaf tuples of logical axis names (None for unnamed dims), with the boxes removed.

  >>> boxed = {'w': nn.LogicallyPartitioned(np.zeros((2, 4)), ('embed', 'mlp'))}
  >>> logical_axes(boxed)
  {'w': ('embed', 'mlp')}
  """
  def names(leaf):
    if isinstance(leaf, nn.Partitioned):
      return tuple(leaf.names)
    return (None,) * np.ndim(leaf)
  return jax.tree.map(names, boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _fits(spec: Sequence, shape: Sequence[int], mesh: Mesh) -> P:
  """Drops mesh axes that do not divide their dimension (the dim is then replicated)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[a] for a in names)
    out.append(axes if names and dim % size == 0 else None)
  return P(*out)


def logical_to_sharding(axes: Sequence, shape: Sequence[int], mesh: Mesh, rules) -> NamedSharding:
  """`NamedSharding` for one array from its logical names, replicating dims the mesh does not divide."""
  spec = nn.logical_to_mesh_axes(tuple(axes), rules) if any(axes) else P()
  return NamedSharding(mesh, _fits(spec, shape, mesh))


def tree_shardings(axes_tree, shapes_tree, mesh: Mesh, rules) -> Any:
  """`NamedSharding`s for a tree of arrays/ShapeDtypeStructs with a matching tree of logical axes."""
  is_axes = lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)
  return jax.tree.map(lambda a, s: logical_to_sharding(a, np.shape(s), mesh, rules),
                      axes_tree, shapes_tree, is_leaf=is_axes)


def param_shardings(boxed_abstract, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
  """Shardings of base params from a boxed (logically partitioned) tree such as `eval_shape(init)`."""
  return tree_shardings(logical_axes(boxed_abstract), nn.meta.unbox(boxed_abstract), mesh, rules)


def model_shardings(module: nn.Module, mesh: Mesh, rules=DEFAULT_RULES) -> tuple[Any, Any]:
  """Logical axes and shardings of a zoo model's params, from an abstract (never materialised)
  init: what loaded checkpoints are `device_put` with.

  >>> from peftjax.models import registry
  >>> config = registry.config_from_hf(dict(
  ...     model_type='llama', vocab_size=64, hidden_size=32, intermediate_size=64,
  ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
  >>> axes, shardings = model_shardings(registry.build(config, 'causal_lm'), make_mesh())
  >>> axes['lm_head']['kernel'], shardings['lm_head']['kernel'].spec
  (('embed', 'vocab'), P('fsdp', 'tensor'))
  """
  boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), np.ones((1, 2), np.int32)))
  return logical_axes(boxed['params']), param_shardings(boxed['params'], mesh, rules)


def sharded_init(init_fn, mesh: Mesh, rules, *args):
  """Runs a Linen `init_fn(*args)` directly into its shardings; nothing is materialised unsharded.

  Returns `(variables, shardings, axes)` with boxes removed; `boxed(params, axes)` gives a
  `PeftMethod.init` the axes its adapters take.
  """
  boxed = jax.eval_shape(init_fn, *args)
  axes = logical_axes(boxed)
  shardings = param_shardings(boxed, mesh, rules)
  init = jax.jit(lambda *a: nn.meta.unbox(init_fn(*a)), out_shardings=shardings)
  return init(*args), shardings, axes


def boxed(params, axes) -> Any:
  """``params`` boxed as ``nn.Partitioned`` with their logical ``axes`` (the inverse of
  ``logical_axes``): what a ``PeftMethod.init`` reads its adapters' axes from.

  >>> boxed({'w': np.zeros((2, 4))}, {'w': ('embed', 'mlp')})['w'].names
  ('embed', 'mlp')
  """
  is_axes = lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)
  return jax.tree.map(lambda a, v: nn.Partitioned(v, a), axes, nn.meta.unbox(params),
                      is_leaf=is_axes)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim split over `('data', 'fsdp')`; applies as a prefix to a whole batch dict."""
  return NamedSharding(mesh, P(BATCH_AXES))


def _dict_keys(path) -> tuple:
  return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def follow_params(tree_shapes, param_shapes, param_shardings_, mesh: Mesh) -> Any:
  """Shardings for a tree (e.g. optimizer state) whose leaves mirror params: a leaf whose dict-key
  path ends with a param's path and has its shape gets that param's sharding; all else replicated.

  >>> mesh = make_mesh(devices=jax.devices()[:1])
  >>> params = {'w': np.zeros((4, 2))}
  >>> s = follow_params({'mu': params, 'count': np.zeros(())}, params, {'w': replicated(mesh)}, mesh)
  >>> s['count'].spec, s['mu']['w'] == replicated(mesh)
  (P(), True)
  """
  by_path = {}
  for (path, shape), sharding in zip(jax.tree_util.tree_leaves_with_path(param_shapes),
                                     jax.tree.leaves(param_shardings_)):
    by_path[_dict_keys(path)] = (tuple(np.shape(shape)), sharding)

  def pick(path, leaf):
    keys = _dict_keys(path)
    for start in range(len(keys)):
      hit = by_path.get(keys[start:])
      if hit is not None and hit[0] == tuple(np.shape(leaf)):
        return hit[1]
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(pick, tree_shapes)


def maybe_initialize_distributed(settings: Mapping[str, Any] | None) -> bool:
  """Calls `jax.distributed.initialize` when `settings` (a config's `distributed` entry) ask for it;
  call before any other JAX use. `settings` may hold `coordinator_address`, `num_processes`,
  `process_id`, `local_device_ids`; `{'auto': True}` lets JAX detect the cluster (SLURM,
  Open MPI, TPU pods, or the `JAX_COORDINATOR_ADDRESS` environment variable). Without `auto`
  and with every other entry None: single process, nothing happens. Returns True when
  initialisation happened.

  >>> maybe_initialize_distributed({'auto': False, 'coordinator_address': None})
  False
  """
  settings = dict(settings or {})
  kwargs = {k: v for k, v in settings.items() if k != 'auto' and v is not None}
  if not (settings.get('auto') or kwargs):
    return False
  jax.distributed.initialize(**kwargs)
  return True


def process_batch_slice(global_batch_size: int, process_index=None, process_count=None) -> slice:
  """The rows of a global batch this process loads (contiguous, equal-sized).

  >>> process_batch_slice(32, process_index=1, process_count=4)
  slice(8, 16, None)
  """
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if global_batch_size % count:
    raise ValueError(f'global batch size {global_batch_size} not divisible by {count} processes')
  per = global_batch_size // count
  return slice(index * per, (index + 1) * per)


def global_batch(local_batch, mesh: Mesh) -> Any:
  """Assembles the global, batch-sharded `jax.Array`s from this process's rows of every leaf.

  >>> mesh = make_mesh(devices=jax.devices()[:1])
  >>> global_batch({'x': np.zeros((4, 3))}, mesh)['x'].shape
  (4, 3)
  """
  sharding = batch_sharding(mesh)

  def make(x):
    x = np.asarray(x)
    shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, shape)

  return jax.tree.map(make, local_batch)
