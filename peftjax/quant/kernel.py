"""A frozen quantised Dense kernel as a pytree leaf type, and whole-params helpers.

``QuantizedKernel`` stands where a Dense ``kernel`` of logical shape ``(*stack, in, out)``
would (``stack``: the ``nn.scan`` layer axis, if any). Its arrays use bitsandbytes' layout of the
Hugging Face weight ``(out, in)``: blocks of ``block_size`` consecutive input features of one
output feature, so each layer's codes and absmax equal ``bitsandbytes.functional.quantize_4bit``
of the HF tensor. Every array keeps one axis per logical axis (``codes (*stack, out, in *
bits / 8)``, ``absmax (*stack, out, in / block_size)``), so the kernel's logical axes shard it
(``shardings``); double quantisation adds ``absmax2 (*stack, blocks of 256)`` and ``offset
(*stack,)``. ``jit``, ``nn.scan`` (it slices every array on the layer axis) and orbax take it as
any pytree of arrays. ``layers.Dense`` dequantises it inside the call, to the compute dtype.

>>> w = np.random.default_rng(0).standard_normal((128, 32)).astype(np.float32)   # (in, out)
>>> q = quantize_kernel(w, 'nf4', block_size=64, double_quant=True)
>>> q.shape, q.codes.shape, q.absmax.shape, q.absmax.dtype
((128, 32), (32, 64), (32, 2), dtype('uint8'))
>>> float(jnp.abs(q.dequantize() - w).mean()) < 0.1
True
"""
from __future__ import annotations

import re
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from peftjax import tree
from peftjax.quant import formats


@flax.struct.dataclass
class QuantizedKernel:
  """A block-quantised kernel of logical shape ``shape`` = ``(*stack, in, out)``.

  ``codes``: uint8 ``(*stack, out, in)`` (int8) or ``(*stack, out, in / 2)`` (4-bit, two codes
  per byte); ``absmax``: float32 ``(*stack, out, in / block_size)``, or their 8-bit codes with
  ``absmax2``/``offset`` (double quantisation)."""
  codes: jax.Array
  absmax: jax.Array
  absmax2: Optional[jax.Array] = None
  offset: Optional[jax.Array] = None
  qtype: str = flax.struct.field(pytree_node=False, default='nf4')
  block_size: int = flax.struct.field(pytree_node=False, default=64)
  shape: tuple = flax.struct.field(pytree_node=False, default=())

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def double_quant(self) -> bool:
    return self.absmax2 is not None

  @property
  def nbytes(self) -> int:
    return sum(int(np.prod(np.shape(a))) * np.dtype(a.dtype).itemsize
               for a in jax.tree.leaves(self))

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    """The ``(*stack, in, out)`` kernel, computed in float32 (as bitsandbytes) and cast."""
    absmax = self.absmax
    if self.double_quant:
      absmax = formats.dequantize_absmax(absmax, self.absmax2, self.offset)
    codes = self.codes
    if formats.BITS[self.qtype] == 4:
      codes = formats.unpack4(codes)
    w = formats.dequantize(codes, absmax, self.qtype, self.block_size, dtype)
    return jnp.swapaxes(w, -1, -2)


def quantize_kernel(kernel, qtype: str = 'nf4', block_size: int = 64,
                    double_quant: bool = True, name: str = 'kernel') -> QuantizedKernel:
  """Quantises a ``(*stack, in, out)`` kernel on the host (numpy children), one stacked layer at a
  time. ``name`` (its param path) goes into errors."""
  formats.check_type(qtype)
  kernel = np.asarray(kernel)
  if kernel.ndim < 2:
    raise ValueError(f'{name}: a kernel needs (in, out) axes, got shape {kernel.shape}')
  *stack, d_in, d_out = kernel.shape
  if block_size < 1 or d_in % block_size:
    raise ValueError(f'{name}: input dimension {d_in} of kernel {kernel.shape} is not '
                     f'divisible by block_size {block_size}')
  layers = kernel.reshape(-1, d_in, d_out)
  parts = []
  for w in layers:
    codes, absmax = formats.quantize(w.T, qtype, block_size)   # the HF (out, in) layout
    if formats.BITS[qtype] == 4:
      codes = formats.pack4(codes)
    absmax = absmax.reshape(d_out, d_in // block_size)
    parts.append((codes, *formats.quantize_absmax(absmax)) if double_quant else (codes, absmax))
  stacked = [np.stack(a).reshape(tuple(stack) + a[0].shape) for a in zip(*parts)]
  return QuantizedKernel(*stacked, qtype=qtype, block_size=block_size, shape=kernel.shape)


class QuantConfig(NamedTuple):
  """How to quantise a base while loading (``auto.load_pretrained(..., quantize=...)``):
  ``qtype`` one of ``formats.TABLES``, ``block_size``, ``double_quant``, and the compute dtype
  that quantised layers dequantise to (None: the model's ``dtype``)."""
  qtype: str = 'nf4'
  block_size: int = 64
  double_quant: bool = True
  compute_dtype: Any = None

  def kernel(self, kernel, name: str = 'kernel') -> 'QuantizedKernel':
    return quantize_kernel(kernel, self.qtype, self.block_size, self.double_quant, name)


def stack(kernels: list) -> QuantizedKernel:
  """Quantised kernels of equal shape stacked on a new leading (layer) axis."""
  out = jax.tree.map(lambda *xs: np.stack(xs), *kernels)
  return out.replace(shape=(len(kernels), *kernels[0].shape))


def is_quantized(x) -> bool:
  return isinstance(nn.meta.unbox(x), QuantizedKernel)


def value(w, dtype=None):
  """A kernel as an array: a ``QuantizedKernel`` dequantised (to ``dtype``, default float32),
  anything else unboxed and returned as is. For code that needs the weight itself (DoRA's
  column norms); the forward pass goes through ``layers.Dense``."""
  w = nn.meta.unbox(w)
  if isinstance(w, QuantizedKernel):
    return w.dequantize(dtype or jnp.float32)
  return w


def require_float(w, path: str, what: str = 'merge into'):
  """``w`` if it is not quantised; else ValueError: a 4-bit kernel cannot change in place
  (merging would re-quantise it, silently losing the adapter's update)."""
  w = nn.meta.unbox(w)
  if isinstance(w, QuantizedKernel):
    raise ValueError(
        f'cannot {what} the {w.qtype} kernel {path} in place: merging would re-quantise it; '
        'dequantise the base first (peftjax.quant.dequantize_params)')
  return w


def _leaf(x) -> bool:
  return isinstance(x, (QuantizedKernel, nn.Partitioned))


def quantize_params(params, qtype: str = 'nf4', block_size: int = 64,
                    double_quant: bool = True, target: str = '.*') -> dict:
  """``params`` with every ``kernel`` whose module path ``re.fullmatch``-es ``target`` replaced
  by a ``QuantizedKernel`` (read to the host one at a time; boxes removed)."""
  flat = tree.flatten(nn.meta.unbox(params))
  for path in list(flat):
    module, _, leaf = path.rpartition('/')
    if leaf == 'kernel' and re.fullmatch(target, module) and not is_quantized(flat[path]):
      flat[path] = quantize_kernel(jax.device_get(flat[path]), qtype, block_size,
                                   double_quant, name=path)
  return tree.unflatten(flat)


def dequantize_params(params, dtype=jnp.float32) -> dict:
  """``params`` with every ``QuantizedKernel`` dequantised to ``dtype`` (export, merging)."""
  return jax.tree.map(lambda x: value(x, dtype) if isinstance(x, QuantizedKernel) else x,
                      params, is_leaf=_leaf)


def nbytes(params) -> int:
  """Bytes held by ``params``' arrays, quantised kernels counted with their absmax."""
  return sum(int(np.prod(np.shape(a))) * np.dtype(a.dtype).itemsize
             for a in jax.tree.leaves(nn.meta.unbox(params)))


def _child_spec(spec: P, q: QuantizedKernel, child) -> P:
  """A child's spec from the kernel's ``(*stack, in, out)`` spec: ``(*stack, out, in)`` for codes
  and absmax, ``(*stack, None)`` / ``(*stack,)`` for absmax2 / offset."""
  full = tuple(spec) + (None,) * (q.ndim - len(spec))
  stack = full[:-2]
  if child.ndim == q.ndim:
    return P(*stack, full[-1], full[-2])
  return P(*stack, *(None,) * (child.ndim - len(stack)))


def _fit(spec: P, shape, mesh) -> P:
  """Drops mesh axes that do not divide their dimension."""
  out = []
  for dim, axes in zip(shape, spec):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    out.append(axes if names and dim % size == 0 else None)
  return P(*out)


def kernel_shardings(q: QuantizedKernel, sharding: NamedSharding) -> QuantizedKernel:
  """Shardings of ``q``'s arrays (a ``QuantizedKernel`` of shardings) from the sharding of the
  logical kernel: codes and absmax split as their logical axes, absmax2/offset on the stack."""
  return jax.tree.map(
      lambda c: NamedSharding(sharding.mesh, _fit(_child_spec(sharding.spec, q, c), c.shape,
                                                  sharding.mesh)), q)


def shardings(params, logical_shardings) -> Any:
  """``logical_shardings`` (a tree like the float params, e.g. ``sharding.model_shardings``)
  fitted to ``params``: each ``QuantizedKernel``'s entry becomes ``kernel_shardings``."""
  flat = tree.flatten(logical_shardings)
  for path, leaf in tree.flatten(nn.meta.unbox(params)).items():
    if isinstance(leaf, QuantizedKernel):
      flat[path] = kernel_shardings(leaf, flat[path])
  return tree.unflatten(flat)
