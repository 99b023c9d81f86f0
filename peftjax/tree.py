"""Pytree paths, regex selection, partition/combine and counting.

Paths are '/'-joined keys of a nested dict (``flax.traverse_util.flatten_dict``),
e.g. ``model/layers_3/self_attn/q_proj/kernel``. Patterns are matched with
``re.fullmatch`` against whole paths.

>>> import jax.numpy as jnp
>>> params = {'dense': {'kernel': jnp.ones((2, 3)), 'bias': jnp.ones(3)}}
>>> select(params, r'.*/bias')
['dense/bias']
>>> trainable, frozen = partition(params, mask(params, r'.*/bias'))
>>> count(trainable), count(frozen)
(3, 6)
>>> combine(trainable, frozen) == unflatten(flatten(params))
True
"""
import difflib
import math
import re
from typing import Any, Iterable, Mapping

from flax import traverse_util

Tree = Mapping[str, Any]


def flatten(tree: Tree) -> dict[str, Any]:
  """Nested dict -> ``{'a/b/c': leaf}``."""
  return traverse_util.flatten_dict(tree, sep='/') if tree else {}


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """``{'a/b/c': leaf}`` -> nested dict."""
  return traverse_util.unflatten_dict(dict(flat), sep='/')


def match(paths: Iterable[str], pattern: str, what: str = 'path') -> list[str]:
  """Paths that ``re.fullmatch`` the pattern; raises ValueError naming near misses if none."""
  paths = list(paths)
  hits = [p for p in paths if re.fullmatch(pattern, p)]
  if not hits:
    near = difflib.get_close_matches(pattern, paths, n=5, cutoff=0.0)
    raise ValueError(f'pattern {pattern!r} matches no {what} (re.fullmatch over {len(paths)} '
                     f'{what}s); nearest: {near}')
  return hits


def select(tree: Tree, pattern: str) -> list[str]:
  """Leaf paths of ``tree`` matching ``pattern``; raises ValueError if none do."""
  return match(flatten(tree), pattern)


def mask(tree: Tree, pattern: str) -> dict[str, Any]:
  """Boolean tree, True where the leaf path matches ``pattern`` (at least one must)."""
  hits = set(select(tree, pattern))
  return unflatten({p: p in hits for p in flatten(tree)})


def partition(tree: Tree, mask_tree: Tree) -> tuple[dict[str, Any], dict[str, Any]]:
  """Splits ``tree`` into (leaves where mask is True, the rest), both sparse nested dicts."""
  flat_mask = flatten(mask_tree)
  flat = flatten(tree)
  return (unflatten({p: v for p, v in flat.items() if flat_mask[p]}),
          unflatten({p: v for p, v in flat.items() if not flat_mask[p]}))


def combine(*trees: Tree) -> dict[str, Any]:
  """Union of sparse trees (inverse of ``partition``); raises ValueError on a shared path."""
  out = {}
  for t in trees:
    for p, v in flatten(t).items():
      if p in out:
        raise ValueError(f'path {p!r} is present in more than one tree')
      out[p] = v
  return unflatten(out)


def count(tree: Tree) -> int:
  """Number of scalars in the tree (works on arrays and ``jax.ShapeDtypeStruct``)."""
  return sum(math.prod(v.shape) for v in flatten(tree).values())
