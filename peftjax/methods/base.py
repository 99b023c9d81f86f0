"""The PEFT method abstraction and the mechanism shared by weight-space methods.

A ``PeftMethod`` is three pure functions (in the spirit of optax's
``GradientTransformation``):

* ``init(rng, base_params) -> adapter``: reads shapes/paths of the base, never writes it.
* ``apply(apply_fn) -> apply_fn'``: ``apply_fn`` is Flax-style ``apply_fn(variables, *a, **kw)``
  (e.g. ``model.apply``); ``apply_fn'(adapter, base_params, *a, **kw)`` has the same outputs.
* ``merge(adapter, base_params) -> base_params'`` folds the adapter into the weights (export,
  inference), or is None where the method cannot be merged.

Weight-space methods keep the adapter as a nested dict mirroring module paths, e.g.
``{'model': {'layers_3': {'self_attn': {'q_proj': {'lora_A': ..., 'lora_B': ...}}}}}``, and
pass it to the model as its own variable collection ``'adapter'``, so ``nn.scan`` with
``variable_axes={True: 0}`` slices it per layer like params. A ``flax.linen.intercept_methods``
interceptor wraps every ``nn.Dense`` / ``nn.DenseGeneral`` call whose scope holds adapter
variables; the model code is never edited. An adapter leaf whose path is also a base param path
(BitFit biases, full fine-tuning) replaces that param.

>>> import jax, jax.numpy as jnp, flax.linen as nn
>>> from peftjax import methods
>>> class Net(nn.Module):
...   @nn.compact
...   def __call__(self, x):
...     return nn.Dense(2, name='head')(nn.Dense(4, name='q_proj')(x))
>>> model = Net()
>>> x = jnp.ones((1, 3))
>>> params = model.init(jax.random.key(0), x)['params']
>>> lora = methods.lora(rank=2, target='q_proj')
>>> adapter = lora.init(jax.random.key(1), params)
>>> y = lora.apply(model.apply)(adapter, params, x)
>>> bool(jnp.allclose(y, model.apply({'params': params}, x)))  # identity at init (B = 0)
True
"""
import functools
from typing import Any, Callable, Mapping, NamedTuple, Optional

import flax.linen as nn
import jax

from peftjax import tree

ADAPTER = 'adapter'  # variable collection holding weight-space adapters

# hook(adapter_vars, module, call, x, train) -> y. ``adapter_vars``: this Dense's adapter leaves
# that the method owns (non-empty); ``call(x)`` runs the wrapped (inner) Dense call.
Hook = Callable[[Mapping[str, jax.Array], nn.Module, Callable, jax.Array, bool], jax.Array]


class Spec(NamedTuple):
  """What a method is, as data: ``methods.get(spec.name, **spec.hparams)`` rebuilds it.

  Serialisable (``asdict``/``from_dict``); what ``adapter_config.json`` is written from and
  what a sweep table shows. ``compose`` has ``name='compose'`` and ``hparams={'methods':
  [spec dicts]}``.

  >>> Spec('lora', {'rank': 8}).asdict()
  {'name': 'lora', 'rank': 8}
  """
  name: str
  hparams: Mapping[str, Any]

  def asdict(self) -> dict:
    return {'name': self.name, **self.hparams}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'Spec':
    d = dict(d)
    return cls(d.pop('name'), d)


class PeftMethod(NamedTuple):
  """A PEFT method: pure functions over the adapter pytree (optax-style; optional fields
  default to None, so methods that do not need them stay three functions).

  * ``init(rng, base_params) -> adapter``: leaves are ``nn.Partitioned`` boxes carrying logical
    axes taken from the (boxed) base param they adapt; plain arrays in, plain arrays out.
  * ``apply(apply_fn) -> apply_fn'(adapter, base_params, *a, **kw)``, which calls
    ``apply_fn({'params': ..., 'adapter': adapter, ...}, *a, **kw)`` (the contract ``compose``
    relies on); boxed or unboxed adapters are accepted.
  * ``merge(adapter, base_params) -> base_params'`` or None (not mergeable).
  * ``spec``: the method's ``Spec`` (name and hyper-parameters).
  * ``regularizer(adapter) -> scalar`` added to the training loss, or None.
  * ``init_state(adapter) -> state`` and ``update(state, adapter, grads, step) -> (state,
    adapter)``: a per-step update after the optimizer step, with its own state (kept in the
    train state and its checkpoints), or None. ``step`` is the count of steps done.
  """
  init: Callable[[jax.Array, Any], Any]
  apply: Callable[[Callable], Callable]
  merge: Optional[Callable[[Any, Any], Any]]
  spec: Optional[Spec] = None
  regularizer: Optional[Callable[[Any], jax.Array]] = None
  init_state: Optional[Callable[[Any], Any]] = None
  update: Optional[Callable[[Any, Any, Any, jax.Array], tuple[Any, Any]]] = None


def substitute(adapter, params):
  """``params`` with every leaf that ``adapter`` holds at the same path replaced by it (boxes
  removed)."""
  flat = tree.flatten(nn.meta.unbox(params))
  flat.update((p, v) for p, v in tree.flatten(nn.meta.unbox(adapter)).items() if p in flat)
  return tree.unflatten(flat)


def by_module(adapter) -> dict[str, dict[str, Any]]:
  """Adapter leaves grouped by module path: ``{'a/q_proj': {'lora_A': ..., 'lora_B': ...}}``."""
  groups = {}
  for path, leaf in tree.flatten(nn.meta.unbox(adapter)).items():
    module, _, name = path.rpartition('/')
    groups.setdefault(module, {})[name] = leaf
  return groups


def _training(kw) -> bool:
  """Dropout is on for ``deterministic=False``, or, without that kwarg, given a dropout rng."""
  if 'deterministic' in kw:
    return not kw['deterministic']
  return 'dropout' in (kw.get('rngs') or {})


def _ndim(axes) -> int:
  return len(axes) if isinstance(axes, (tuple, list)) else 1


_INTERCEPTED = (nn.Dense, nn.DenseGeneral, nn.Embed)   # an Embed's lookup, never its ``attend``


def _interceptor(hook: Hook, leaves: frozenset, train: bool, used: set):
  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != '__call__' or not isinstance(module, _INTERCEPTED):
      return next_fun(*args, **kwargs)
    adapter_vars = {k: v for k, v in module.variables.get(ADAPTER, {}).items() if k in leaves}
    if not adapter_vars:
      return next_fun(*args, **kwargs)
    path = '/'.join(module.path)
    if isinstance(module, nn.DenseGeneral) and (
        _ndim(module.axis) != 1 or _ndim(module.features) != 1):
      raise ValueError(f'{path}: adapters support DenseGeneral with one input and one output '
                       f'axis, got axis={module.axis} features={module.features}')
    used.add(path)
    x, = args or (kwargs.pop('inputs'),)
    return hook(adapter_vars, module, lambda x: next_fun(x, **kwargs), x, train)
  return intercept


def weight_space(init, hook: Optional[Hook] = None, *, leaves=(), merge=substitute,
                 spec: Optional[Spec] = None) -> PeftMethod:
  """A weight-space PeftMethod from its ``init``, ``merge``, ``spec`` and a hook on
  Dense/DenseGeneral/Embed calls (``x`` is the token ids for an Embed) that runs where the
  adapter holds any of the leaf names ``leaves``.

  Raises ValueError at trace time if such an adapter module is never called (e.g. an ``nn.scan``
  whose ``variable_axes`` leaves out the ``'adapter'`` collection) in a whole-model call (no
  ``method=``; a ``method=`` call such as the head runs only part of the model).
  """
  leaves = frozenset(leaves)

  def apply(apply_fn):
    @functools.wraps(apply_fn)
    def adapted(adapter, params, *args, **kw):
      adapter = nn.meta.unbox(adapter)
      variables = {'params': substitute(adapter, params), ADAPTER: adapter}
      if hook is None:
        return apply_fn(variables, *args, **kw)
      used = set()
      with nn.intercept_methods(_interceptor(hook, leaves, _training(kw), used)):
        out = apply_fn(variables, *args, **kw)
      unused = sorted(m for m, av in by_module(adapter).items()
                      if leaves & av.keys() and m not in used)
      if unused and kw.get('method') is None:   # a method= call (e.g. the head) runs a part
        raise ValueError(f'adapter modules never called as nn.Dense/DenseGeneral/Embed: {unused}; is '
                         f"the '{ADAPTER}' collection in each nn.scan's variable_axes "
                         '(e.g. {True: 0})?')
      return out
    return adapted
  if merge is not None:
    merge = functools.partial(_unboxed, merge)
  return PeftMethod(init, apply, merge, spec)


def _unboxed(fn, adapter, params):
  return fn(nn.meta.unbox(adapter), nn.meta.unbox(params))


def compose(*methods: PeftMethod) -> PeftMethod:
  """One method whose adapter holds the (disjoint) adapters of all ``methods``.

  The first method is innermost: its change to a layer is applied (and merged) first.
  Regularisers add up; each method's state is one entry of a tuple, updated in order.

  >>> from peftjax import methods
  >>> both = methods.compose(methods.lora(rank=8, target='.*/(q_proj|v_proj)'), methods.bitfit())
  >>> both.spec.asdict()['methods'][1]
  {'name': 'bitfit', 'target': '.*', 'include_norm': False}
  """
  def init(rng, params):
    rngs = jax.random.split(rng, len(methods))
    return tree.combine(*(m.init(r, params) for m, r in zip(methods, rngs)))

  def apply(apply_fn):
    # An interceptor entered earlier wraps outside later ones: the last method's apply runs first.
    for m in methods:
      inner = m.apply(apply_fn)
      apply_fn = lambda variables, *a, _inner=inner, **kw: _inner(
          variables[ADAPTER], variables['params'], *a, **kw)
    return lambda adapter, params, *a, **kw: apply_fn(
        {'params': params, ADAPTER: nn.meta.unbox(adapter)}, *a, **kw)

  def merge(adapter, params):
    for m in methods:
      params = m.merge(adapter, params)
    return params

  def regularizer(adapter):
    return sum(m.regularizer(adapter) for m in methods if m.regularizer is not None)

  def init_state(adapter):
    return tuple(m.init_state(adapter) if m.init_state else None for m in methods)

  def update(state, adapter, grads, step):
    state = list(state)
    for i, m in enumerate(methods):
      if m.update is not None:
        state[i], adapter = m.update(state[i], adapter, grads, step)
    return tuple(state), adapter

  specs = [m.spec for m in methods]
  spec = None if None in specs else Spec('compose', {'methods': [s.asdict() for s in specs]})
  has = lambda field: any(getattr(m, field) is not None for m in methods)
  return PeftMethod(
      init, apply, merge if all(m.merge is not None for m in methods) else None, spec,
      regularizer if has('regularizer') else None,
      init_state if has('init_state') else None, update if has('update') else None)
