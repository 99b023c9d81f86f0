"""Instruction tuning (SFT) of SmolLM2-135M-Instruct on chatterbot prompt/response pairs.

The loss covers the assistant reply only (chat template of the model); rows may be packed.

  python launch.py --config=configs/sft.py:method=lora --workdir=/tmp/sft
  python launch.py --config=configs/sft.py:method=ia3,runlocal --workdir=/tmp/smoke
  python launch.py --config=configs/sft.py:method=lora,qlora --workdir=/tmp/qlora

``method``: any name of ``peftjax.config.PEFT_DEFAULTS`` (lora, ia3, ..., prompt, ptuning, prefix,
ptuning_v2, unipelt); prompt-family methods add their virtual tokens to each packed row. UniPELT
runs with per-token gates and without its prefix here (causal, packed rows). ``qlora``: QLoRA, an
NF4 base with double quantisation (``--config.model.quantize=nf4|fp4|int4|int8`` for any
method), LoRA-family methods on all linear layers of the blocks, as the paper.
"""
import ml_collections

from peftjax import config as pconfig


def get_config(arg=None):
  a = ml_collections.ConfigDict(pconfig.parse_arg(arg, method='lora', runlocal=False,
                                                   qlora=False))
  c = ml_collections.ConfigDict()
  c.task = 'sft'
  c.seed = 0

  c.model = dict(source='smollm2-135m-instruct', dtype='float32', scan_layers=True, remat='none',
                 **pconfig.quantize_defaults('nf4' if a.qlora else None))
  c.data = dict(source='chatterbot-english', deduplicate=True, validation_fraction=0.05,
                system='', max_length=128, overflow='skip', packing=True,
                batch_size=8, eval_batch_size=16, max_train_examples=0, max_eval_examples=0)

  c.train = dict(steps=300, log_every=20, eval_every=100, checkpoint_every=100, keep=2)
  pconfig.method_config(c, a.method, trainable_heads=False, warmup_steps=20)
  if a.qlora and a.method in ('lora', 'rslora', 'dora'):
    c.peft.target = 'all-linear'
  if a.method == 'unipelt':   # per-token gates: a sequence mean would see later tokens (and
    c.peft.update(gate_pool='token', prefix=False)   # other packed rows); no prefix gate then
  c.export = dict(adapter=True, merged=False)

  if a.runlocal:
    pconfig.runlocal(c, steps=6, every=3, max_train_examples=64, max_eval_examples=16,
                     max_length=64, batch_size=4, eval_batch_size=8)
  return c
