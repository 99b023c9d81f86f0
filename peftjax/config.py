"""Helpers for ml-collections configs: big_vision-style arguments and per-method PEFT defaults.

>>> parse_arg('method=dora,runlocal', method='lora', runlocal=False, rank=8)
{'method': 'dora', 'runlocal': True, 'rank': 8}
>>> peft_defaults('lora')['rank']
8
>>> peft_defaults('bitfit')['target'].get() is None
True
"""
from __future__ import annotations

import ml_collections

# Hyper-parameters per method name (``peftjax.methods.get`` kwargs) plus the learning rate the
# configs use unless told otherwise (and ``head_lr_multiplier``: a trained head's factor on it).
# Targets default to HF PEFT's per-family defaults.
PEFT_DEFAULTS = {
    'full': dict(learning_rate=5e-5),
    'bitfit': dict(learning_rate=1e-3),
    'lora': dict(rank=8, alpha=16.0, dropout=0.05, learning_rate=2e-3),
    'rslora': dict(rank=8, alpha=16.0, dropout=0.05, learning_rate=2e-3),
    'dora': dict(rank=8, alpha=16.0, dropout=0.05, learning_rate=2e-3),
    # ranks and averages as HF PEFT's AdaLoraConfig, deltaT as its example, alpha/dropout as
    # LoRA above; the configs tie total_step/tinit/tfinal to train.steps (``adalora_schedule``).
    'adalora': dict(init_r=12, target_r=8, alpha=16.0, dropout=0.05, deltaT=10, beta1=0.85,
                    beta2=0.85, orth_reg_weight=0.5, learning_rate=2e-3),
    'ia3': dict(learning_rate=3e-3),
    'houlsby': dict(bottleneck=64, learning_rate=1e-3),
    'pfeiffer': dict(bottleneck=64, learning_rate=1e-3),
    'prompt': dict(num_virtual_tokens=20, learning_rate=3e-2),
    'ptuning': dict(num_virtual_tokens=20, encoder_hidden_size=128, learning_rate=1e-3),
    # prefix: at 1e-2 Adam grows the projected prefix from std 0.27 to 4.4 in 10 steps (MiniLM's
    # keys ~1, values ~0.6) and attention collapses onto it; at 1e-3 the values still reach 2-3x
    # the model's in 200 steps and the classifier stays at the majority class. 3e-4 with the
    # head at 10x learns (docs/methods.md).
    'prefix': dict(num_virtual_tokens=20, projection=True, learning_rate=3e-4,
                   head_lr_multiplier=10.0),
    'ptuning_v2': dict(num_virtual_tokens=20, learning_rate=1e-2),
    # the paper's r, prefix length and MLP width; bottleneck 24 = hidden / 16 on MiniLM
    # (``lora``/``prefix``/``adapter`` switch its parts, ``gated=False``: no gates)
    'unipelt': dict(rank=8, num_virtual_tokens=10, encoder_hidden_size=512, bottleneck=24,
                    projection=True, gate_pool='mean', lora=True, prefix=True, adapter=True,
                    gated=True, learning_rate=2e-3),
}


# The classification / reward heads (bert's ``classifier``, llama's and gpt2's ``score``), as a
# regex of parameter paths (``optim.lr_multipliers``).
HEADS = '(^|/)(classifier|score)/'


def parse_arg(arg: str | None, **defaults) -> dict:
  """Parses ``k=v,flag`` into a dict, typed after ``defaults``; unknown keys are an error."""
  out = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    if key not in defaults:
      raise ValueError(f'unknown config argument {key!r} in {arg!r}; valid: {", ".join(defaults)}')
    kind = type(defaults[key])
    if kind is bool:
      out[key] = (value.lower() in ('1', 'true', 'yes')) if sep else True
    elif defaults[key] is None:
      out[key] = value
    else:
      out[key] = kind(value)
  return out


def peft_defaults(method: str) -> dict:
  """A copy of the defaults for ``method`` plus ``target`` (None: the family's HF PEFT default;
  typed so that ``--config.peft.target=REGEX`` works); the error lists the valid names."""
  if method not in PEFT_DEFAULTS:
    raise ValueError(f'unknown PEFT method {method!r}; valid names: {", ".join(PEFT_DEFAULTS)}')
  return dict(PEFT_DEFAULTS[method], target=ml_collections.FieldReference(None, field_type=str))


def method_config(c: ml_collections.ConfigDict, method: str, *, trainable_heads: bool,
                  warmup_steps: int, weight_decay: float = 0.0, lr_scale: float = 1.0):
  """Fills ``c.peft`` (the method's defaults), ``c.optim`` (AdamW, cosine schedule, at the method's
  learning rate times ``lr_scale``; a trained head at the method's ``head_lr_multiplier`` times
  that), ``c.mesh`` (data parallel) and ``c.distributed``; with AdaLoRA, ties its schedule to
  ``c.train.steps`` (set ``c.train`` first).

  >>> c = ml_collections.ConfigDict(dict(train=dict(steps=10)))
  >>> method_config(c, 'lora', trainable_heads=False, warmup_steps=2)
  >>> c.peft.rank, c.optim.learning_rate, c.mesh.data
  (8, 0.002, -1)
  >>> method_config(c, 'prefix', trainable_heads=True, warmup_steps=2)
  >>> c.optim.learning_rate, c.optim.lr_multipliers
  (0.0003, '(^|/)(classifier|score)/=10.0')
  """
  peft = peft_defaults(method)
  lr = peft.pop('learning_rate') * lr_scale
  head = peft.pop('head_lr_multiplier', None)
  c.peft = dict(method=method, trainable_heads=trainable_heads, **peft)
  c.optim = dict(name='adamw', learning_rate=lr, schedule='cosine', warmup_steps=warmup_steps,
                 weight_decay=weight_decay, clip_norm=1.0, grad_accum_steps=1, layer_decay=0.0,
                 unfreeze_every=0, lora_plus_ratio=0.0,
                 lr_multipliers=f'{HEADS}={head}' if head and trainable_heads else '')
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.distributed = distributed_defaults()
  if method == 'adalora':
    adalora_schedule(c)


def runlocal(c: ml_collections.ConfigDict, *, steps: int, every: int, **data):
  """Shrinks ``c`` to a smoke run (``runlocal``): ``data`` fields updated, 2 warmup steps,
  ``steps`` steps with evaluation and checkpoints every ``every``.

  >>> c = ml_collections.ConfigDict(dict(data=dict(batch_size=32), optim=dict(warmup_steps=20),
  ...                                    train=dict(steps=200)))
  >>> runlocal(c, steps=4, every=2, batch_size=4)
  >>> c.data.batch_size, c.train.steps, c.train.checkpoint_every
  (4, 4, 2)
  """
  c.data.update(data)
  c.optim.warmup_steps = 2
  c.train.update(steps=steps, log_every=2, eval_every=every, checkpoint_every=every)


def adalora_schedule(c: ml_collections.ConfigDict):
  """Ties an AdaLoRA ``c.peft`` to ``c.train.steps``: ``total_step`` = optimizer steps (steps /
  ``grad_accum_steps``), ``tinit`` 10% and ``tfinal`` 20% of it (lazy references: overriding
  ``train.steps`` or ``peft.total_step`` on the command line moves them).

  >>> c = ml_collections.ConfigDict(dict(train=dict(steps=200), optim=dict(grad_accum_steps=2),
  ...                                    peft=dict(method='adalora')))
  >>> adalora_schedule(c)
  >>> c.train.steps = 100
  >>> c.peft.total_step, c.peft.tinit, c.peft.tfinal
  (50, 5, 10)
  """
  total = c.train.get_ref('steps') // c.optim.get_ref('grad_accum_steps')
  c.peft.total_step = total
  c.peft.tinit = c.peft.get_ref('total_step') // 10
  c.peft.tfinal = c.peft.get_ref('total_step') // 5


def quantize_defaults(quantize: str | None = None) -> dict:
  """``config.model`` fields of the frozen base's quantisation (QLoRA): ``quantize`` (None: a
  float base; 'nf4', 'fp4', 'int4', 'int8'), ``double_quant``, ``block_size`` and
  ``compute_dtype`` (None: ``model.dtype``); typed so that ``--config.model.quantize=nf4`` works.

  >>> quantize_defaults()['quantize'].get() is None
  True
  """
  ref = ml_collections.FieldReference
  return dict(quantize=ref(quantize, field_type=str), double_quant=True, block_size=64,
              compute_dtype=ref(None, field_type=str))


def distributed_defaults() -> ml_collections.ConfigDict:
  """``config.distributed``: single process unless set (``--config.distributed.auto=True`` on
  SLURM / TPU pods, or coordinator address, process count and id); typed so that command-line
  overrides of the None defaults work."""
  ref = ml_collections.FieldReference
  return ml_collections.ConfigDict(dict(
      auto=False, coordinator_address=ref(None, field_type=str),
      num_processes=ref(None, field_type=int), process_id=ref(None, field_type=int)))
