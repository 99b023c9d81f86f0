"""UniPELT (Mao et al. 2022): gated LoRA, gated prefix tuning and a gated bottleneck adapter.

The composition (``base.compose``) of the existing methods, each given a gate (``gate.py``):

* LoRA on the query and value projections (``target``), whose gate of the projection's input
  takes the place of ``alpha / r``: ``y = x W + g(x) (x A) B`` (the paper's ``LoRA_Linear``);
* prefix tuning, whose prefix keys and values each attention module (the parents of
  ``attention_target``) scales by a gate of its input (``prefix_embed_k * gate``);
* a Pfeiffer adapter after the feed-forward output (``adapter_target``), its output scaled by a
  gate of its input (``output = up * gate``).

Each gate is ``sigmoid(Linear(input))``, averaged over the sequence (``gate_pool='mean'``, the
paper's code: one scalar per example, padding included) or per token (``'token'``: causal, for
decoders and packed rows; the prefix gate exists only as a mean, so ``'token'`` needs
``prefix=False``). ``gated=False`` gives the paper's ungated combination (LoRA scaled by
``alpha / r``). Each submodule can be switched off (``lora``, ``prefix``, ``adapter``).
Defaults are the paper's: r = 8, 10 prefix tokens through a 512-unit MLP, adapter bottleneck
48 (reduction factor 16 of BERT-base). Not mergeable (the gates depend on the input).

>>> import jax, jax.numpy as jnp
>>> from peftjax.methods import prefix
>>> from peftjax.models import bert
>>> config = bert.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
...                          num_heads=4, max_position_embeddings=32)
>>> model = bert.BertModel(config)
>>> ids = jnp.ones((2, 5), jnp.int32)
>>> params = model.init(jax.random.key(0), ids)['params']
>>> method = unipelt(**prefix.model_dims(config), target='.*/(query|value)',
...                  adapter_target='.*/layer_\\\\d+/output/dense', bottleneck=4, prefix=False)
>>> adapter = method.init(jax.random.key(1), params)
>>> sorted(adapter['encoder']['layer_0']['attention']['self']['query'])
['lora_A', 'lora_B', 'lora_gate', 'lora_gate_bias']
>>> out = method.apply(model.apply)(adapter, params, ids)     # LoRA B = 0, adapter up = 0
>>> bool(jnp.array_equal(out.hidden, model.apply({'params': params}, ids).hidden))
True
"""
from typing import Optional

from peftjax.methods import base, gate
from peftjax.methods.adapter import bottleneck_adapter
from peftjax.methods.lora import lora as lora_method
from peftjax.methods.prefix import prefix_tuning


def unipelt(num_layers: int, num_kv_heads: int, head_dim: int, *, target: str,
            adapter_target: str, attention_target: Optional[str] = None, lora: bool = True,
            prefix: bool = True, adapter: bool = True, gated: bool = True,
            gate_pool: str = 'mean', rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
            num_virtual_tokens: int = 10, projection: bool = True,
            encoder_hidden_size: Optional[int] = 512, bottleneck: int = 48,
            activation: str = 'relu') -> base.PeftMethod:
  """UniPELT over a model with these dimensions (``prefix.model_dims(config)``).

  ``target``: LoRA's modules (the query and value projections); ``adapter_target``: the
  feed-forward output projections; ``attention_target`` (default ``target``): projections
  whose parent module is the attention that receives the prefix. ``lora``/``prefix``/
  ``adapter`` switch submodules; ``gated``/``gate_pool`` as the module docstring says; ``rank``,
  ``alpha`` (ungated only), ``dropout`` are LoRA's; ``num_virtual_tokens``, ``projection``,
  ``encoder_hidden_size`` the prefix's; ``bottleneck``, ``activation`` the adapter's.
  """
  if not (lora or prefix or adapter):
    raise ValueError('UniPELT needs at least one submodule: lora, prefix and adapter are all '
                     'switched off')
  pool = gate.check_pool(gate_pool, 'UniPELT') if gated else None
  if pool is None and gated:
    raise ValueError("UniPELT gate_pool must be 'mean' or 'token' when gated")
  if prefix and pool == 'token':
    raise ValueError("UniPELT gate_pool='token' does not gate a prefix (its gate is a mean over "
                     'the sequence); switch the prefix off (prefix=False) or use '
                     "gate_pool='mean'")
  hparams = dict(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                 target=target, adapter_target=adapter_target,
                 attention_target=attention_target, lora=lora, prefix=prefix, adapter=adapter,
                 gated=gated, gate_pool=gate_pool, rank=rank, alpha=alpha, dropout=dropout,
                 num_virtual_tokens=num_virtual_tokens, projection=projection,
                 encoder_hidden_size=encoder_hidden_size, bottleneck=bottleneck,
                 activation=activation)
  parts = []
  if lora:
    parts.append(lora_method(rank=rank, alpha=alpha, target=target, dropout=dropout, gate=pool))
  if adapter:
    parts.append(bottleneck_adapter(adapter_target, bottleneck, activation, gate=pool))
  if prefix:
    parts.append(prefix_tuning(
        num_layers, num_kv_heads, head_dim, num_virtual_tokens, projection, encoder_hidden_size,
        gate_target=(attention_target or target) if pool else None))
  method = parts[0] if len(parts) == 1 else base.compose(*parts)
  return method._replace(spec=base.Spec('unipelt', hparams))
