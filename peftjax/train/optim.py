"""Optimizers, learning-rate schedules, discriminative (layer-wise) rates and gradual unfreezing.

All pieces are optax transforms, so they work for any PEFT method (adapter trees) and for full
fine-tuning (trees of base params) alike. Layers are found from parameter paths: `layers_3`,
`h_3`, `layer_3` (or a scanned `layers` / `h` / `layer` module whose leading axis is the layer).

>>> tx = make_optimizer({'learning_rate': 1e-3, 'total_steps': 100, 'warmup_steps': 10})
>>> params = {'model': {'layers_0': {'w': jnp.ones(2)}}}
>>> updates, _ = tx.update(params, tx.init(params), params)
"""
import math
import re
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from peftjax.methods.lora import lora_plus_labels

_LAYER = re.compile(r'(?:^|/)(?:layers|layer|h)_(\d+)(?:/|$)')
_SCANNED = re.compile(r'(?:^|/)(?:layers|layer|h)(?:/|$)')
_EMBEDDING = re.compile(r'embed|(?:^|/)(?:wte|wpe)(?:/|$)', re.IGNORECASE)


def warmup_decay(peak_lr: float, total_steps: int, warmup_steps: int = 0, decay: str = 'cosine',
                 end_lr: float = 0.0) -> optax.Schedule:
  """Linear warmup from 0 to `peak_lr`, then `cosine`, `linear` or `constant` until `total_steps`.

  >>> float(warmup_decay(1.0, 10, warmup_steps=2, decay='linear')(6))
  0.5
  """
  warmup = optax.linear_schedule(0.0, peak_lr, warmup_steps)
  rest = max(total_steps - warmup_steps, 1)
  if decay == 'cosine':
    main = optax.cosine_decay_schedule(peak_lr, rest, alpha=end_lr / peak_lr if peak_lr else 0.0)
  elif decay == 'linear':
    main = optax.linear_schedule(peak_lr, end_lr, rest)
  elif decay == 'constant':
    main = optax.constant_schedule(peak_lr)
  else:
    raise ValueError(f"schedule decay {decay!r}: expected 'cosine', 'linear' or 'constant'")
  return optax.join_schedules([warmup, main], [warmup_steps]) if warmup_steps else main


def slanted_triangular(peak_lr: float, total_steps: int, cut_frac: float = 0.1,
                       ratio: float = 32.0) -> optax.Schedule:
  """ULMFiT's slanted triangular rate (Howard & Ruder 2018, eq. 3).

  cut = floor(T cut_frac); p = t/cut if t < cut else 1 - (t - cut) / (cut (1/cut_frac - 1));
  lr_t = peak_lr (1 + p (ratio - 1)) / ratio.

  >>> round(float(slanted_triangular(0.01, 1000)(100)), 6)
  0.01
  """
  cut = math.floor(total_steps * cut_frac)
  if cut < 1:
    raise ValueError(f'slanted_triangular: total_steps {total_steps} * cut_frac {cut_frac} < 1')

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    p = jnp.where(t < cut, t / cut, 1.0 - (t - cut) / (cut * (1.0 / cut_frac - 1.0)))
    return peak_lr * (1.0 + jnp.maximum(p, 0.0) * (ratio - 1.0)) / ratio

  return schedule


def _path_str(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def layer_positions(tree, num_layers: int | None = None) -> tuple[Any, int]:
  """Depth of each leaf from the bottom: embeddings 0, layer l -> l + 1, everything else (final
  norm, heads) L + 1. Scanned leaves get a vector of positions along their leading axis.

  >>> pos, L = layer_positions({'embed_tokens': 0., 'layers_0': 0., 'layers_1': 0., 'lm_head': 0.})
  >>> L, [int(p) for p in pos.values()]
  (2, [0, 1, 2, 3])
  """
  flat = jax.tree_util.tree_leaves_with_path(tree)
  if num_layers is None:
    num_layers = 0
    for path, leaf in flat:
      name = _path_str(path)
      if m := _LAYER.search(name):
        num_layers = max(num_layers, int(m.group(1)) + 1)
      elif _SCANNED.search(name):
        num_layers = max(num_layers, np.shape(leaf)[0])

  def position(path, leaf):
    name = _path_str(path)
    if m := _LAYER.search(name):
      return np.asarray(int(m.group(1)) + 1)
    if _SCANNED.search(name):
      return np.arange(1, np.shape(leaf)[0] + 1)
    return np.asarray(0 if _EMBEDDING.search(name) else num_layers + 1)

  return jax.tree_util.tree_map_with_path(position, tree), num_layers


def _broadcast(value: np.ndarray, leaf) -> np.ndarray:
  """Reshapes a per-layer vector (L,) to (L, 1, ...) so it scales a scanned leaf's slices."""
  return value.reshape(value.shape + (1,) * (np.ndim(leaf) - value.ndim))


def discriminative_lr(factor: float = 2.6, num_layers: int | None = None) -> optax.GradientTransformation:
  """Scales updates of layer l by 1 / factor**(L-1-l): the top layer keeps the base rate, each layer
  below is `factor` slower, embeddings get 1 / factor**L, heads the base rate. Chain it after the
  optimizer so it scales the effective learning rate (weight decay included).

  >>> tx = discriminative_lr(2.0)
  >>> u, _ = tx.update({'layers_0': jnp.ones(()), 'layers_1': jnp.ones(())}, tx.init(None))
  >>> [float(v) for v in u.values()]
  [0.5, 1.0]
  """
  def update_fn(updates, state, params=None):
    del params
    positions, L = layer_positions(updates, num_layers)
    scale = jax.tree.map(lambda p, u: _broadcast(float(factor) ** -np.maximum(L - p, 0), u)
                         .astype(np.float32), positions, updates)
    return jax.tree.map(lambda u, s: (u * s).astype(u.dtype), updates, scale), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


class UnfreezeState(NamedTuple):
  count: jax.Array
  inner_state: Any


def gradual_unfreezing(inner: optax.GradientTransformation, steps_per_stage: int,
                       num_layers: int | None = None) -> optax.GradientTransformation:
  """ULMFiT gradual unfreezing: only the top group present in the tree trains for the first
  `steps_per_stage` updates, then one more group (downwards) per stage. Frozen leaves get zero
  gradients and exactly zero updates, so they stay bit-identical; the step compiles once.

  >>> tx = gradual_unfreezing(optax.sgd(1.0), steps_per_stage=1)
  >>> g = {'layers_0': jnp.ones(()), 'layers_1': jnp.ones(())}
  >>> u, s = tx.update(g, tx.init(g), g)
  >>> [float(v) for v in u.values()]
  [0.0, -1.0]
  """
  def masks(tree, count):
    positions, _ = layer_positions(tree, num_layers)
    flat = [np.ravel(p) for p in jax.tree.leaves(positions)]
    present = sorted({int(p) for p in np.concatenate(flat)} if flat else (), reverse=True)
    rank = {p: r for r, p in enumerate(present)}
    stage = count // steps_per_stage
    return jax.tree.map(lambda p, u: _broadcast(np.vectorize(rank.get)(p), u) <= stage, positions, tree)

  def init_fn(params):
    return UnfreezeState(jnp.zeros([], jnp.int32), inner.init(params))

  def update_fn(updates, state, params=None):
    keep = masks(updates, state.count)
    zero = lambda m, u: jnp.where(m, u, jnp.zeros_like(u))
    updates = jax.tree.map(zero, keep, updates)
    updates, inner_state = inner.update(updates, state.inner_state, params)
    updates = jax.tree.map(zero, keep, updates)
    return updates, UnfreezeState(optax.safe_increment(state.count), inner_state)

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_label(label_fn: Callable[[Any], Any], multipliers: Mapping[str, float]) -> optax.GradientTransformation:
  """Per-label learning-rate multipliers (e.g. LoRA+: B learns `ratio` times faster than A).
  Labels missing from `multipliers` keep 1.

  >>> tx = scale_by_label(lora_plus_labels, {'lora_B': 16.0})
  >>> u, _ = tx.update({'q': {'lora_A': jnp.ones(()), 'lora_B': jnp.ones(())}}, tx.init(None))
  >>> float(u['q']['lora_B'])
  16.0
  """
  def update_fn(updates, state, params=None):
    del params
    labels = label_fn(updates)
    return jax.tree.map(lambda u, l: (u * multipliers.get(l, 1.0)).astype(u.dtype), updates, labels), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def path_labels(patterns) -> Callable[[Any], Any]:
  """A label function for `scale_by_label`: a leaf's label is the first regex of ``patterns``
  that ``re.search``es its '/'-joined path (None, multiplier 1, when none does).

  >>> path_labels(['classifier', 'prefix'])({'classifier': {'kernel': 0}, 'q': {'lora_A': 0}})
  {'classifier': {'kernel': 'classifier'}, 'q': {'lora_A': None}}
  """
  compiled = [(p, re.compile(p)) for p in patterns]
  return lambda tree: jax.tree_util.tree_map_with_path(
      lambda path, _: next((p for p, c in compiled if c.search(_path_str(path))), None), tree)


def parse_multipliers(spec: str, *, name: str = 'config.optim.lr_multipliers') -> dict:
  """``'REGEX=FACTOR,...'`` -> ``{REGEX: FACTOR}`` (learning-rate multipliers by parameter path,
  e.g. ``'classifier=10'``: the head learns 10x faster); ``name`` goes into errors.

  >>> parse_multipliers('classifier=10,prefix_encoder/transform=0.5')
  {'classifier': 10.0, 'prefix_encoder/transform': 0.5}
  """
  out = {}
  for item in filter(None, (spec or '').split(',')):
    pattern, sep, factor = item.rpartition('=')
    try:
      if not (sep and pattern):
        raise ValueError
      re.compile(pattern)
      out[pattern] = float(factor)
    except (ValueError, re.error):
      raise ValueError(f'{name}: {item!r} is not REGEX=FACTOR (a regex of parameter paths and '
                       f'a number), in {spec!r}') from None
  return out


def check_multipliers(multipliers: Mapping[str, float], trainable, *,
                      name: str = 'config.optim.lr_multipliers'):
  """Refuses a pattern that matches no trainable leaf (a typo would otherwise do nothing)."""
  paths = [_path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(trainable)[0]]
  for pattern in multipliers:
    if not any(re.search(pattern, p) for p in paths):
      raise ValueError(f'{name}: {pattern!r} matches no trainable parameter; trainable: '
                       f'{", ".join(paths[:12])}{" ..." if len(paths) > 12 else ""}')


def make_schedule(cfg: Mapping[str, Any]) -> optax.Schedule:
  """Schedule from config: `schedule` in {cosine, linear, constant, stlr}, `learning_rate`,
  `total_steps`, `warmup_steps`, `end_lr`, `cut_frac`, `ratio`."""
  name = cfg.get('schedule', 'cosine')
  if name == 'stlr':
    return slanted_triangular(cfg['learning_rate'], cfg['total_steps'], cfg.get('cut_frac', 0.1),
                              cfg.get('ratio', 32.0))
  return warmup_decay(cfg['learning_rate'], cfg['total_steps'], cfg.get('warmup_steps', 0), name,
                      cfg.get('end_lr', 0.0))


def make_optimizer(cfg: Mapping[str, Any], label_fn: Callable[[Any], Any] | None = None
                   ) -> optax.GradientTransformation:
  """The optimizer a config asks for (keys optional unless noted):

  `learning_rate`, `total_steps` (required); `name` adamw|adafactor|sgd; `weight_decay`, `b1`,
  `b2`, `eps`, `momentum`; schedule keys (see `make_schedule`); `clip_norm` (global norm);
  `layer_decay` (discriminative factor, e.g. 2.6), `num_layers`; `unfreeze_every` (steps per
  gradual-unfreezing stage); `lr_multipliers` {label: factor} with `label_fn` (LoRA+);
  `path_lr_multipliers` {regex of parameter paths: factor} (`path_labels`);
  `grad_accum_steps` (optax.MultiSteps; schedules then count optimizer updates).
  """
  schedule = make_schedule(cfg)
  name = cfg.get('name', 'adamw')
  wd = cfg.get('weight_decay', 0.0)
  if name == 'adamw':
    base = optax.adamw(schedule, b1=cfg.get('b1', 0.9), b2=cfg.get('b2', 0.999),
                       eps=cfg.get('eps', 1e-8), weight_decay=wd)
  elif name == 'adafactor':
    base = optax.adafactor(schedule, weight_decay_rate=wd or None)
  elif name == 'sgd':
    base = optax.chain(optax.add_decayed_weights(wd), optax.sgd(schedule, momentum=cfg.get('momentum') or None))
  else:
    raise ValueError(f"optimizer name {name!r}: expected 'adamw', 'adafactor' or 'sgd'")
  parts = [optax.clip_by_global_norm(cfg['clip_norm'])] if cfg.get('clip_norm') else []
  parts.append(base)
  if cfg.get('layer_decay'):
    parts.append(discriminative_lr(cfg['layer_decay'], cfg.get('num_layers')))
  if cfg.get('lr_multipliers'):
    parts.append(scale_by_label(label_fn or lora_plus_labels, dict(cfg['lr_multipliers'])))
  if cfg.get('path_lr_multipliers'):
    parts.append(scale_by_label(path_labels(list(cfg['path_lr_multipliers'])),
                                dict(cfg['path_lr_multipliers'])))
  tx = optax.chain(*parts)
  if cfg.get('unfreeze_every'):
    tx = gradual_unfreezing(tx, cfg['unfreeze_every'], cfg.get('num_layers'))
  if cfg.get('grad_accum_steps', 1) > 1:
    tx = optax.MultiSteps(tx, cfg['grad_accum_steps']).gradient_transformation()
  return tx
