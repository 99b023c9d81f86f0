"""Building blocks shared by every model family: parameters with logical axes, norms, RoPE,
masks, the KV cache, the attention core (GQA, prefix key/values, cache update;
``jax.nn.dot_product_attention``, the blockwise ``flash`` attention and the einsum reference) and
the layer stack with its remat policy.

Every projection is a plain ``nn.Dense`` named as in Hugging Face, so PEFT methods can intercept
it by module path. ``model.init`` returns ``nn.Partitioned`` boxes carrying logical axis names;
``flax.core.meta.unbox`` (or ``nn.unbox``) turns them into plain arrays, which is what
``apply`` and ``convert.params_from_hf`` use.

>>> q = k = v = jnp.ones((1, 3, 2, 4))                 # [batch, seq, heads, head_dim]
>>> causal = jnp.tril(jnp.ones((3, 3), bool))[None]    # [batch, q_len, kv_len]
>>> dot_product_attention(q, k, v, causal, impl='xla').shape
(1, 3, 2, 4)
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from peftjax import errors, quant
from peftjax.models import flash

Array = jax.Array

ACTIVATIONS = {
    'silu': jax.nn.silu,
    'swish': jax.nn.silu,
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'relu': jax.nn.relu,
    'tanh': jnp.tanh,
}


def activation(name: str):
  if name not in ACTIVATIONS:
    raise errors.UnsupportedModelError(
        f'activation {name!r} not supported; supported: {", ".join(sorted(ACTIVATIONS))}')
  return ACTIVATIONS[name]


@struct.dataclass
class ModelOutput:
  """What every model returns: ``logits`` for heads, ``hidden`` (and BERT's ``pooled``) always."""
  logits: Array | None = None
  hidden: Array | None = None
  pooled: Array | None = None
  cache: Any = None


# ----------------------------------------------------------------------------- configs

class MultiHeadConfig:
  """Mixin for configs with plain multi-head attention (one key/value head per query head)."""

  @property
  def num_kv_heads(self):
    return self.num_heads

  @property
  def head_dim(self):
    return self.hidden_size // self.num_heads


def common_fields(hf: dict) -> dict:
  """Config fields every family reads the same way from a Hugging Face config dict."""
  eos = hf.get('eos_token_id')
  return dict(
      pad_token_id=hf.get('pad_token_id'), bos_token_id=hf.get('bos_token_id'),
      eos_token_id=tuple(eos) if isinstance(eos, list) else eos,   # lists are unhashable
      num_labels=int(hf.get('num_labels') or len(hf.get('id2label') or {}) or 2),
      initializer_range=hf.get('initializer_range', 0.02))


def common_to_hf(config) -> dict:
  eos = config.eos_token_id
  return dict(
      pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id,
      eos_token_id=list(eos) if isinstance(eos, tuple) else eos,
      id2label={i: f'LABEL_{i}' for i in range(config.num_labels)},
      initializer_range=config.initializer_range, dtype=jnp.dtype(config.param_dtype).name)


# ----------------------------------------------------------------------------- parameters

class Dense(nn.Dense):
  """``nn.Dense`` whose kernel may also be a frozen ``quant.QuantizedKernel``: it is
  dequantised here, inside the call, to the compute dtype (``dtype``, else the input's), so no
  full-precision copy outlives the layer. A float kernel computes exactly as ``nn.Dense``."""

  @nn.compact
  def __call__(self, inputs):
    kernel = nn.meta.unbox(self.get_variable('params', 'kernel'))
    quantized = isinstance(kernel, quant.QuantizedKernel)
    if not quantized:   # created before the bias, as nn.Dense (the same init RNG streams)
      kernel = self.param('kernel', self.kernel_init, (jnp.shape(inputs)[-1], self.features),
                          self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)

    def dot(x, kernel, bias):
      x, kernel, bias = self.promote_dtype(x, kernel, bias, dtype=self.dtype)
      y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
                              precision=self.precision)
      return y if bias is None else y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))

    if quantized:
      # A checkpointed region: the backward pass recomputes the float kernel from the codes
      # instead of keeping it as a residual of every layer (measured on a scan of 8 NF4 512x512
      # layers: 10.1 MiB of temporaries without, 1.1 MiB with; the float kernels are 8 MiB).
      dtype = self.dtype or inputs.dtype
      return jax.checkpoint(lambda x, q, b: dot(x, q.dequantize(dtype), b))(inputs, kernel, bias)
    return dot(inputs, kernel, bias)


def dense(features: int, axes: tuple, name: str | None, config, *,
          use_bias: bool = False) -> nn.Dense:
  """A ``Dense`` named ``name`` whose kernel/bias carry logical ``axes`` (in, out)."""
  return Dense(
      features, use_bias=use_bias, dtype=config.dtype, param_dtype=config.param_dtype,
      kernel_init=nn.with_logical_partitioning(
          nn.initializers.normal(config.initializer_range), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[-1:]),
      name=name)


def embed(num: int, features: int, axes: tuple, name: str | None, config) -> nn.Embed:
  return nn.Embed(
      num, features, dtype=config.dtype, param_dtype=config.param_dtype,
      embedding_init=nn.with_logical_partitioning(
          nn.initializers.normal(config.initializer_range), axes),
      name=name)


def layer_norm(config, name: str | None = None) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=config.norm_eps, dtype=config.dtype, param_dtype=config.param_dtype,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ('norm',)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ('norm',)),
      name=name)


class RMSNorm(nn.Module):
  """Llama RMSNorm: normalise in float32, cast back, then scale (the Hugging Face order)."""
  eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    init = nn.with_logical_partitioning(nn.initializers.ones_init(), ('norm',))
    scale = self.param('scale', init, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * y.astype(self.dtype)


# ----------------------------------------------------------------------------- rope

def rope_inv_freq(config) -> np.ndarray:
  """Inverse frequencies [head_dim // 2] for ``config.rope_type`` (default, linear, llama3)."""
  dim = config.head_dim
  inv = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
  kind = config.rope_type
  if kind == 'default':
    return inv
  if kind == 'linear':
    return inv / config.rope_factor
  if kind == 'llama3':
    factor, lo, hi = config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
    old = config.rope_original_max_position
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
    return np.where(medium, smoothed, scaled).astype(np.float32)
  raise errors.UnsupportedModelError(f'rope_type {kind!r} is not supported')


def rope_cos_sin(positions: Array, inv_freq: np.ndarray, dtype) -> tuple[Array, Array]:
  """cos/sin [batch, seq, head_dim] in the half-rotation layout (freqs repeated, not
  interleaved), computed in float32 like Hugging Face and cast to ``dtype``."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """Rotates x [batch, seq, heads, head_dim]: x * cos + rotate_half(x) * sin."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


# ----------------------------------------------------------------------------- cache and masks

@struct.dataclass
class KVCache:
  """Keys/values: tuples with one ``[batch, kv_heads, max_len, head_dim]`` array per layer
  (separate buffers, so a decode step writes its token into each in place: a stacked
  ``[layers, ...]`` array is sliced and re-stacked, a copy of the whole cache per step; heads
  before slots, the layout attention's matmuls read, so no step copies the cache transposed), the
  valid-slot ``mask`` ``[batch, max_len]``, the next write slot ``index`` and the next position
  id per row ``pos``.

  ``started`` (static) is False until a call has written into the cache: the input hooks
  (``prompt_embeds``, ``prefix_kv``) enter a cache only then, at prefill, as HF PEFT injects
  them only into an empty cache; later calls (decode steps) ignore them."""
  k: tuple[Array, ...]
  v: tuple[Array, ...]
  mask: Array
  index: Array
  pos: Array
  started: bool = struct.field(pytree_node=False, default=False)


def init_cache(config, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
  """An empty cache for ``config`` (any decoder family). ``max_len`` counts every slot: the
  prompt, the new tokens, and any prefix key/values or virtual tokens given at prefill.

  >>> from peftjax.models import llama
  >>> config = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
  ...                            num_layers=2, num_heads=4, num_kv_heads=2)
  >>> cache = init_cache(config, batch=2, max_len=16)
  >>> len(cache.k), cache.k[0].shape     # layers; [batch, kv_heads, max_len, head_dim]
  (2, (2, 2, 16, 8))
  """
  shape = (batch, config.num_kv_heads, max_len, config.head_dim)
  zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
  return KVCache(k=zeros(), v=zeros(),
                 mask=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32),
                 pos=jnp.zeros((batch,), jnp.int32))


@struct.dataclass
class AttentionContext:
  """Per-call attention inputs shared by all layers (broadcast through ``nn.scan``).

  ``spec``: the mask in compact form (`flash.MaskSpec`: padding, causality, window, segments);
  without a cache its first ``prefix_len`` key slots are the prefix key/values (``attend``
  prepends them). ``mask`` [batch, q_len, kv_len]: the same mask as an array, built once per
  call for the implementations that take one (None for 'flash', which tiles ``spec``).
  ``cos``/``sin`` for RoPE or None, ``index`` the cache write slot, ``impl`` the attention
  implementation ('auto' already resolved to 'flash' where that applies)."""
  spec: flash.MaskSpec
  mask: Array | None = None
  cos: Array | None = None
  sin: Array | None = None
  index: Array | None = None
  deterministic: bool = struct.field(pytree_node=False, default=True)
  impl: str = struct.field(pytree_node=False, default='auto')


def default_positions(attention_mask: Array | None, batch: int, length: int,
                      cache: KVCache | None = None, offset=0) -> Array:
  """Position ids that skip padding: ``cumsum(mask) - 1`` (left padding safe), continued from
  ``cache.pos`` when decoding, plus ``offset`` (visible prefix positions, [batch] or scalar)."""
  if attention_mask is None:
    attention_mask = jnp.ones((batch, length), jnp.int32)
  pos = jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1
  if cache is not None:
    pos = pos + cache.pos[:, None]
  return jnp.maximum(pos, 0) + jnp.reshape(offset, (-1, 1))


def attention_context(batch: int, length: int, *, attention_mask=None, prefix_mask=None,
                      prefix_len: int = 0, num_virtual: int = 0, cache: KVCache | None = None,
                      causal: bool, window: int | None = None, cos=None, sin=None,
                      deterministic: bool = True, impl: str = 'auto'):
  """Builds the ``AttentionContext`` and the updated cache metadata (k/v are filled by layers).

  Slots number the keys in order: without a cache the ``prefix_len`` prefix key/values
  (visible where ``prefix_mask`` [batch, prefix_len] is nonzero), then the ``length`` tokens;
  with a cache its slots (a prefix written at prefill occupies the first ones). ``window``
  (Mistral sliding window) limits each query to the last ``window`` slots, itself included, as
  Hugging Face counts cache positions (padding and prefix included). Packed rows (segment ids
  1..k in ``attention_mask``, 0 = pad) attend within their segment; the first ``num_virtual``
  tokens (virtual tokens) and the prefix are visible to every segment.

  Returns ``(ctx, cache)`` where ``cache`` has ``mask``/``index``/``pos`` advanced (or None)."""
  valid = (jnp.ones((batch, length), bool) if attention_mask is None
           else attention_mask != 0)
  index = q_seg = k_seg = None
  if cache is not None:
    index = cache.index
    kv_valid = jax.lax.dynamic_update_slice_in_dim(cache.mask, valid, index, axis=1)
    q_slots = index + jnp.arange(length)
    cache = cache.replace(mask=kv_valid, index=index + length,
                          pos=cache.pos + valid.sum(axis=1, dtype=jnp.int32), started=True)
  else:
    pvalid = (jnp.ones((batch, prefix_len), bool) if prefix_mask is None
              else prefix_mask.astype(bool))
    kv_valid = jnp.concatenate([pvalid, valid], axis=1)
    q_slots = prefix_len + jnp.arange(length)
    if attention_mask is not None:
      # Packed rows carry segment ids (1..k, 0 = pad): tokens attend within their own segment;
      # the prefix and the virtual tokens (segment -1) are visible to every segment. For 0/1
      # masks this changes nothing at valid positions.
      q_seg = attention_mask.astype(jnp.int32)
      k_seg = jnp.concatenate([jnp.full((batch, prefix_len), -1, jnp.int32),
                               jnp.where(jnp.arange(length) < num_virtual, -1, q_seg)], axis=1)
  spec = flash.MaskSpec(q_slots, kv_valid, q_seg, k_seg, causal=causal, window=window)
  impl = resolve_impl(impl, length)
  ctx = AttentionContext(spec=spec, mask=None if impl == 'flash' else spec.dense(), cos=cos,
                         sin=sin, index=index, deterministic=deterministic, impl=impl)
  return ctx, cache


# ----------------------------------------------------------------------------- attention

ATTENTION_IMPLS = ('auto', 'xla', 'cudnn', 'einsum', 'flash')


# 'auto' on CPU takes the blockwise attention from this many query tokens on: its memory is
# linear in the length (docs/benchmarks.md, "Sequence length").
FLASH_AUTO_MIN_LENGTH = 1024


def resolve_impl(impl: str, q_len: int) -> str:
  """``impl`` with 'auto' resolved to 'flash' on CPU for ``q_len >= FLASH_AUTO_MIN_LENGTH``
  (training and long prefills; decode steps keep the one-shot path); otherwise unchanged
  ('auto' then picks cuDNN or XLA per call in ``dot_product_attention``)."""
  if impl == 'auto' and jax.default_backend() == 'cpu' and q_len >= FLASH_AUTO_MIN_LENGTH:
    return 'flash'
  return impl


def check_attention_impl(impl: str) -> None:
  """Config validation: ``attention_impl`` must be one of ``ATTENTION_IMPLS``."""
  if impl not in ATTENTION_IMPLS:
    raise errors.UnsupportedModelError(
        f'attention_impl {impl!r} is not supported; supported: {", ".join(ATTENTION_IMPLS)}')


def einsum_attention(q, k, v, mask, *, heads_first=False, dropout_rate=0.0, dropout_rng=None):
  """The reference: softmax attention in float32 with grouped KV heads (no key/value
  repetition), and attention dropout.

  q [b, t, heads, d]; k, v [b, s, kv_heads, d] (``heads_first``: [b, kv_heads, s, d], the
  ``KVCache`` layout); mask bool [b, t, s] -> [b, t, heads, d]."""
  b, t, h, d = q.shape
  kvh, kv = (k.shape[1], 'bksd') if heads_first else (k.shape[2], 'bskd')
  q = q.reshape(b, t, kvh, h // kvh, d)
  scores = jnp.einsum(f'btkgd,{kv}->bkgts', q, k, preferred_element_type=jnp.float32)
  scores = scores.astype(jnp.float32) / math.sqrt(d)
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  if dropout_rng is not None and dropout_rate > 0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0).astype(v.dtype)
  # Heads-first output, transposed after: asked for [b, t, ...] directly, XLA:CPU computes the
  # dot transposed, 13x slower at decode (batch 8, 170 slots; docs/benchmarks.md).
  out = jnp.einsum(f'bkgts,{kv}->bkgtd', probs, v)
  return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, h, d)


def dot_product_attention(q, k, v, mask, *, impl='auto', dropout_rate=0.0, dropout_rng=None):
  """Attention through ``jax.nn.dot_product_attention`` (``impl`` 'xla' or 'cudnn'), or the
  einsum reference (``impl='einsum'``, and always when attention dropout is active:
  ``jax.nn.dot_product_attention`` has no dropout). ``'auto'`` takes cuDNN flash attention on
  GPU for 16-bit inputs whose shapes cuDNN accepts, else 'xla'. The mask travels as a boolean
  [b, 1, t, s] array (cuDNN turns it into a bias), so GQA, padding, prefixes, windows, segments
  and the cache all take the same path.

  q [b, t, heads, d]; k, v [b, s, kv_heads, d]; mask bool [b, t, s] -> [b, t, heads, d]."""
  if impl == 'einsum' or (dropout_rng is not None and dropout_rate > 0):
    return einsum_attention(q, k, v, mask, dropout_rate=dropout_rate, dropout_rng=dropout_rng)
  mask = mask[:, None]
  if impl == 'auto':
    impl = 'xla'
    if cudnn_accepts(q, k):
      try:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation='cudnn')
      except (NotImplementedError, RuntimeError):   # an older GPU or cuDNN
        pass
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)


def cudnn_accepts(q, k) -> bool:
  """Whether cuDNN flash attention takes these shapes, checked before tracing: cuDNN checks
  some only when differentiating, which under ``nn.scan`` happens outside any ``try``. GPU,
  16-bit, head_dim a multiple of 8 up to 128, even lengths (the mask is a bias, which cuDNN
  trains only with even query and key lengths)."""
  d, t, s = q.shape[-1], q.shape[1], k.shape[1]
  return (jax.default_backend() == 'gpu' and q.dtype in (jnp.bfloat16, jnp.float16) and
          d % 8 == 0 and d <= 128 and t % 2 == 0 and s % 2 == 0)


def attend(q, k, v, ctx: AttentionContext, layer_cache=None, layer_prefix=None, *,
           dropout_rate=0.0, dropout_rng=None):
  """Writes k/v into ``layer_cache`` at ``ctx.index``, prepends ``layer_prefix`` keys/values
  (no cache: ``ctx.mask`` has their columns first), and attends.

  ``ctx.impl == 'flash'`` runs `flash.flash_attention` on ``ctx.spec``, except with active
  attention dropout (the einsum reference on the dense mask). With a cache, the XLA path is the
  einsum attention on the cache's own layout (``KVCache``); cuDNN and flash get the keys and
  values transposed back.

  Returns ``(out [b, t, heads, d], new layer_cache or None)``."""
  dropout = dropout_rng is not None and dropout_rate > 0
  if layer_cache is not None:
    write = lambda buf, a: jax.lax.dynamic_update_slice_in_dim(
        buf, jnp.swapaxes(a, 1, 2).astype(buf.dtype), ctx.index, axis=2)
    layer_cache = (write(layer_cache[0], k), write(layer_cache[1], v))
    k, v = (a.astype(q.dtype) for a in layer_cache)
    cudnn = ctx.impl == 'cudnn' or (ctx.impl == 'auto' and cudnn_accepts(q, jnp.swapaxes(k, 1, 2)))
    if dropout or not (cudnn or ctx.impl == 'flash'):
      mask = ctx.spec.dense() if ctx.mask is None else ctx.mask
      return einsum_attention(q, k, v, mask, heads_first=True, dropout_rate=dropout_rate,
                              dropout_rng=dropout_rng), layer_cache
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
  if layer_prefix is not None:
    pk, pv = layer_prefix
    k = jnp.concatenate([pk.astype(k.dtype), k], axis=1)
    v = jnp.concatenate([pv.astype(v.dtype), v], axis=1)
  k, v = k.astype(q.dtype), v.astype(q.dtype)
  if ctx.impl == 'flash' and not dropout:
    return flash.flash_attention(q, k, v, ctx.spec), layer_cache
  mask = ctx.spec.dense() if ctx.mask is None else ctx.mask
  out = dot_product_attention(q, k, v, mask, impl=ctx.impl, dropout_rate=dropout_rate,
                              dropout_rng=dropout_rng)
  return out, layer_cache


def check_length(config, length: int, parts: str) -> None:
  """A call's ``length`` positions (``parts`` says what they are) must fit the model's
  ``max_position_embeddings`` (RoBERTa reserves its first ``pad_token_id + 1``)."""
  limit = config.max_position_embeddings
  if config.model_type == 'roberta':
    limit -= config.pad_token_id + 1
  if length > limit:
    raise ValueError(f'sequence length {length} ({parts}) exceeds the {limit} positions of '
                     f'this {config.model_type} model (max_position_embeddings)')


# ----------------------------------------------------------------------------- layer stacks

# ``config.remat``: what each layer keeps for the backward pass. 'none' keeps everything;
# 'dots' keeps the outputs of the matmuls without batch dimensions (the projections, not the
# attention scores) and recomputes the rest; 'full' keeps only the layer's input and recomputes
# the whole layer. True and False mean 'full' and 'none'.
REMAT_POLICIES = {
    'none': None,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'full': jax.checkpoint_policies.nothing_saveable,
}


def remat_policy(remat: bool | str) -> str:
  """The ``REMAT_POLICIES`` name of a ``config.remat`` value; unknown names list the valid ones.

  >>> remat_policy(True), remat_policy('dots')
  ('full', 'dots')
  """
  if isinstance(remat, bool):
    return 'full' if remat else 'none'
  if remat not in REMAT_POLICIES:
    raise errors.UnsupportedModelError(
        f'remat policy {remat!r} is not supported; valid: {", ".join(REMAT_POLICIES)} '
        '(or True / False for full / none)')
  return remat


def stack_layers(block_cls, config):
  """The per-layer modules, to assign in ``setup`` (``self.layers = stack_layers(...)``): a list,
  which Flax names ``layers_0, layers_1, ...``, or one ``nn.scan``ned module named ``layers``,
  each layer rematerialised as ``config.remat`` says (``REMAT_POLICIES``).

  Each block is called as ``block(x, layer_cache, layer_prefix, ctx) -> (x, layer_cache)``."""
  policy = remat_policy(config.remat)
  if policy != 'none':
    block_cls = nn.remat(block_cls, prevent_cse=not config.scan_layers,
                         policy=REMAT_POLICIES[policy])
  if not config.scan_layers:
    return [block_cls(config) for _ in range(config.num_layers)]
  scanned = nn.scan(
      block_cls, variable_axes={True: 0}, split_rngs={'params': True, 'dropout': True},
      in_axes=(0, 0, nn.broadcast), length=config.num_layers,
      metadata_params={nn.PARTITION_NAME: 'layers'})
  return scanned(config)


def run_layers(layers, x, kv=None, prefix_kv=None, ctx=None):
  """Runs a ``stack_layers`` result; ``kv`` is a cache's (k, v), tuples with one array per
  layer; ``prefix_kv`` is (k, v) with a leading layer axis.

  Returns ``(x, (k, v) per-layer tuples, or None)``."""
  if not isinstance(layers, (list, tuple)):   # nn.scan slices stacked arrays
    stacked = None if kv is None else tuple(jnp.stack(a) for a in kv)
    x, stacked = layers(x, stacked, prefix_kv, ctx)
    return x, None if kv is None else tuple(tuple(a) for a in stacked)
  outs = []
  for i, layer in enumerate(layers):
    layer_prefix = None if prefix_kv is None else (prefix_kv[0][i], prefix_kv[1][i])
    x, layer_kv = layer(x, None if kv is None else (kv[0][i], kv[1][i]), layer_prefix, ctx)
    outs.append(layer_kv)
  return x, None if kv is None else tuple(zip(*outs))
