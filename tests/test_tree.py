import jax
import jax.numpy as jnp
import pytest

from peftjax import tree

PARAMS = {'layers_0': {'q_proj': {'kernel': jnp.ones((4, 8)), 'bias': jnp.ones(8)},
                       'norm': {'scale': jnp.ones(4)}},
          'lm_head': {'kernel': jnp.ones((4, 10))}}


def test_flatten_paths_are_slash_joined_and_round_trip():
  flat = tree.flatten(PARAMS)
  assert sorted(flat) == ['layers_0/norm/scale', 'layers_0/q_proj/bias', 'layers_0/q_proj/kernel',
                          'lm_head/kernel']
  assert jax.tree.structure(tree.unflatten(flat)) == jax.tree.structure(PARAMS)


def test_golden_mask_uses_fullmatch():
  m = tree.flatten(tree.mask(PARAMS, r'.*/kernel'))
  assert m == {'layers_0/q_proj/kernel': True, 'layers_0/q_proj/bias': False,
               'layers_0/norm/scale': False, 'lm_head/kernel': True}
  assert tree.select(PARAMS, r'.*q_proj/bias') == ['layers_0/q_proj/bias']
  with pytest.raises(ValueError):  # a prefix is not a full match
    tree.select(PARAMS, r'layers_0')


def test_no_match_names_pattern_and_near_misses():
  with pytest.raises(ValueError, match=r"'.\*/q_prj/kernel'.*layers_0/q_proj/kernel"):
    tree.select(PARAMS, r'.*/q_prj/kernel')


def test_partition_combine_round_trip_and_counts():
  trainable, frozen = tree.partition(PARAMS, tree.mask(PARAMS, r'.*/(bias|scale)'))
  assert tree.count(trainable) == 8 + 4 and tree.count(frozen) == 4 * 8 + 4 * 10   # bias, scale; kernels
  assert tree.count(PARAMS) == 12 + 72
  back = tree.combine(trainable, frozen)
  assert jax.tree.all(jax.tree.map(lambda a, b: a is b, back, tree.unflatten(tree.flatten(PARAMS))))
  with pytest.raises(ValueError, match='layers_0/q_proj/bias'):
    tree.combine(trainable, trainable)


def test_count_works_on_shapes():
  shapes = jax.eval_shape(lambda: PARAMS)
  assert tree.count(shapes) == 4 * 8 + 8 + 4 + 4 * 10
