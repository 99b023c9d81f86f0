"""Block-wise absmax quantisation: the NF4, FP4, int4 and int8 code tables, and double
quantisation of the absmax constants (QLoRA, Dettmers et al. 2023).

A block of ``block_size`` consecutive values is scaled by its absolute maximum into [-1, 1] and
each value replaced by the index of the nearest entry of a code table (16 entries for the 4-bit
types, 256 for int8). The arithmetic is bitsandbytes' (``quantize_4bit``/``quantize_blockwise``,
CPU backend), so codes and absmax are bit-identical to it: ``x * (1 / absmax)`` in float32,
clipped to [-1, 1], bucketed against the float32 midpoints of the sorted table (a value on a
midpoint takes the lower entry); dequantisation is ``table[code] * absmax`` in float32.
Two 4-bit codes share a byte, the first in the high nibble.

Double quantisation stores the float32 absmax as 8-bit codes of bitsandbytes' signed dynamic
map (``create_dynamic_map``) in blocks of 256, after subtracting their mean (the ``offset``):
0.5 + 1/64 + 4/(64 * 256) bytes per parameter for NF4 with block size 64 (about 4.127 bits).

Quantisation runs on the host (numpy, one tensor at a time, while loading); dequantisation in
JAX (``jax.numpy``), inside the forward pass.

>>> x = np.linspace(-1, 1, 64, dtype=np.float32)
>>> codes, absmax = quantize(x, 'nf4', 64)
>>> codes[:8], absmax
(array([0, 0, 0, 0, 0, 1, 1, 1], dtype=uint8), array([1.], dtype=float32))
>>> float(np.abs(np.asarray(dequantize(codes, absmax, 'nf4', 64)) - x).max()) < 0.15
True
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# The 16 NF4 values of the QLoRA paper (Appendix E) and bitsandbytes' ``get_4bit_type('nf4')``.
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
# bitsandbytes' FP4 (E2M1, exponent bias 2, no inf/nan) in bit-pattern order (sign bit 3),
# normalised by its largest magnitude 12.
FP4 = np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3],
               np.float32) / np.float32(12)
# Symmetric integers: code c means (c - 8) / 7 (int4) or (c - 128) / 127 (int8); absmax scaling
# keeps values in [-1, 1], so codes 0 (-8/7, -128/127) never occur.
INT4 = ((np.arange(16) - 8) / 7).astype(np.float32)
INT8 = ((np.arange(256) - 128) / 127).astype(np.float32)

TABLES = {'nf4': NF4, 'fp4': FP4, 'int4': INT4, 'int8': INT8}
BITS = {'nf4': 4, 'fp4': 4, 'int4': 4, 'int8': 8}
ABSMAX_BLOCK = 256   # double quantisation: block size of the second level (QLoRA, bitsandbytes)


def check_type(qtype: str) -> str:
  """``qtype`` if it is a known quantisation type, else ValueError naming it."""
  if qtype not in TABLES:
    raise ValueError(f'unknown quantisation type {qtype!r}; known: {", ".join(TABLES)}')
  return qtype


def _linspace_f32(n: int) -> np.ndarray:
  """``torch.linspace(0.1, 1, n, dtype=float32)`` bit for bit: ``start + step * i`` for the
  first half and ``end - step * (n - 1 - i)`` for the rest, each with one rounding (FMA)."""
  start, end = np.float32(0.1), np.float32(1.0)
  step = np.float32((end - start) / np.float32(n - 1))
  i = np.arange(n)
  low = (np.float64(start) + np.float64(step) * i).astype(np.float32)
  high = (np.float64(end) - np.float64(step) * (n - 1 - i)).astype(np.float32)
  return np.where(i < n // 2, low, high)


def dynamic_map() -> np.ndarray:
  """bitsandbytes' ``create_dynamic_map(signed=True)`` (8-bit dynamic tree quantisation, Dettmers
  2016): the table of double quantisation, 256 sorted float32 values in [-1, 1]."""
  data = []
  for i in range(7):   # max_exponent_bits = 7, total_bits = 8, signed
    bounds = _linspace_f32(2 ** i + 1)
    means = (bounds[:-1] + bounds[1:]) / np.float32(2)
    scaled = np.float32(10.0 ** (i - 6)) * means
    data += scaled.tolist() + (-scaled).tolist()
  data += [0.0, 1.0]
  data += [0.0] * (256 - len(data))
  return np.sort(np.array(data, np.float32))


def _bounds(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Midpoints of the sorted table (float32) and the sort order (stable: bitsandbytes' FP4
  order puts +0 before -0)."""
  order = np.argsort(table, kind='stable')
  s = table[order]
  return (s[:-1] + s[1:]) / np.float32(2), order


def quantize_table(x: np.ndarray, table: np.ndarray, block_size: int):
  """Codes (uint8, ``x.shape``) and per-block absmax (float32) of the flattened ``x`` against
  ``table``; a last partial block is its own block (bitsandbytes' rule)."""
  flat = np.asarray(x, np.float32).reshape(-1)
  n = flat.size
  blocks = -(-n // block_size)
  padded = np.zeros(blocks * block_size, np.float32)   # zeros never raise a block's absmax
  padded[:n] = flat
  padded = padded.reshape(blocks, block_size)
  absmax = np.abs(padded).max(axis=1)
  inv = np.float32(1.0) / np.maximum(absmax, np.float32(1e-38))
  scaled = np.clip(padded * inv[:, None], np.float32(-1), np.float32(1)).reshape(-1)[:n]
  bounds, order = _bounds(table)
  codes = order[np.searchsorted(bounds, scaled, side='left')].astype(np.uint8)
  return codes.reshape(np.shape(x)), absmax


def quantize(x: np.ndarray, qtype: str, block_size: int):
  """``(codes, absmax)``: unpacked uint8 codes (``x.shape``) and float32 absmax per block of the
  flattened ``x`` (``x.size`` a multiple of ``block_size``)."""
  check_type(qtype)
  if block_size < 1 or np.size(x) % block_size:
    raise ValueError(f'block_size {block_size} does not divide the {np.size(x)} values')
  return quantize_table(x, TABLES[qtype], block_size)


def dequantize(codes, absmax, qtype: str, block_size: int, dtype=jnp.float32):
  """``table[codes] * absmax`` per block, in float32, cast to ``dtype``; ``codes`` unpacked,
  shaped like the result (leading axes and blocks in row-major order, as ``quantize``)."""
  values = jnp.asarray(TABLES[check_type(qtype)])[jnp.asarray(codes, jnp.int32)]
  shape = values.shape
  values = values.reshape(*absmax.shape, block_size) * jnp.asarray(absmax)[..., None]
  return values.reshape(shape).astype(dtype)


def pack4(codes: np.ndarray) -> np.ndarray:
  """Two 4-bit codes per byte along the last axis (even length), the first in the high nibble."""
  codes = np.asarray(codes, np.uint8)
  return (codes[..., 0::2] << 4) | codes[..., 1::2]


def unpack4(packed):
  """The inverse of ``pack4`` (numpy or JAX arrays)."""
  hi, lo = packed >> 4, packed & 15
  return jnp.stack([hi, lo], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


_LUT_SIZE = 65536


def _dynamic_lut() -> np.ndarray:
  """bitsandbytes' CPU lookup table for the dynamic map (``build_quantize_lut``): the nearest
  code for each of 65536 evenly spaced values in [-1, 1]."""
  table = dynamic_map()
  midpoints = np.float32(0.5) * (table[:-1] + table[1:])
  grid = np.float32(-1) + np.float32(2) * np.arange(_LUT_SIZE, dtype=np.float32) / np.float32(
      _LUT_SIZE - 1)
  return np.searchsorted(midpoints, grid, side='left').astype(np.uint8)


def quantize_dynamic(x: np.ndarray, block_size: int = ABSMAX_BLOCK):
  """bitsandbytes' ``quantize_blockwise`` (dynamic map) as its CPU kernel computes it: the scaled
  value is rounded to the nearest of 65536 grid points, whose code a lookup table gives; an
  all-zero block gets codes 0. Returns ``(codes uint8, absmax float32 per block)``."""
  flat = np.asarray(x, np.float32).reshape(-1)
  blocks = -(-flat.size // block_size)
  padded = np.zeros(blocks * block_size, np.float32)
  padded[:flat.size] = flat
  padded = padded.reshape(blocks, block_size)
  absmax = np.abs(padded).max(axis=1)
  with np.errstate(divide='ignore'):
    inv = np.where(absmax > 0, np.float32(1) / absmax, np.float32(0))
  scaled = np.clip(padded * inv[:, None], np.float32(-1), np.float32(1))
  index = ((scaled + np.float32(1)) * np.float32(0.5) * np.float32(_LUT_SIZE - 1)
           + np.float32(0.5)).astype(np.uint16)
  codes = np.where(absmax[:, None] > 0, _dynamic_lut()[index], 0).astype(np.uint8)
  return codes.reshape(-1)[:flat.size].reshape(np.shape(x)), absmax


def quantize_absmax(absmax: np.ndarray):
  """Double quantisation of float32 absmax (any shape, row-major order): ``(codes uint8 like
  absmax, absmax2 float32 [ceil(n / 256)], offset float32 scalar)``. The offset is the mean,
  computed exactly and rounded once (torch's float32 reduction may differ by one ulp)."""
  absmax = np.asarray(absmax, np.float32)
  offset = np.float32(absmax.astype(np.float64).mean())
  codes, absmax2 = quantize_dynamic(absmax - offset)
  return codes, absmax2, offset


def dequantize_absmax(codes, absmax2, offset):
  """The inverse of ``quantize_absmax`` over trailing axes (leading axes: one set per stacked
  kernel): ``dynamic_map[codes] * absmax2 + offset`` in float32, as bitsandbytes."""
  lead, shape = absmax2.shape[:-1], codes.shape
  n = int(np.prod(shape[len(lead):]))
  flat = jnp.asarray(codes).reshape(*lead, n)
  pad = absmax2.shape[-1] * ABSMAX_BLOCK - n
  flat = jnp.pad(flat, [(0, 0)] * len(lead) + [(0, pad)])
  values = jnp.asarray(dynamic_map())[flat.astype(jnp.int32)].reshape(
      *lead, absmax2.shape[-1], ABSMAX_BLOCK) * absmax2[..., None]
  values = values.reshape(*lead, -1)[..., :n] + jnp.asarray(offset)[..., None]
  return values.reshape(shape)
