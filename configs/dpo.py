"""Direct preference optimisation of SmolLM2-135M-Instruct on chatterbot preference pairs.

Chosen: the conversation's own reply; rejected: a reply from another conversation (a proxy, see
docs/data.md). The reference model is the base with the adapter off (the same weights, no copy;
with ``method=full`` the frozen base params are the reference copy), computed in the same
compiled step, or once over the dataset with ``--config.dpo.precompute_ref_log_probs=True``.

  python launch.py --config=configs/dpo.py:method=lora --workdir=/tmp/dpo
  python launch.py --config=configs/dpo.py:method=lora,runlocal --workdir=/tmp/smoke
  python launch.py --config=configs/dpo.py --workdir=/tmp/ipo --config.dpo.loss_type=ipo

``method``: any name of ``peftjax.config.PEFT_DEFAULTS``. Train and eval rows report TRL's
metrics (``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``,
``logps/chosen``, ``logps/rejected``, plus the reference's ``logps/ref_*``). The run exports
``adapter/`` (HF PEFT, ``CAUSAL_LM``).
"""
import ml_collections

from peftjax import config as pconfig


def get_config(arg=None):
  a = ml_collections.ConfigDict(pconfig.parse_arg(arg, method='lora', runlocal=False))
  c = ml_collections.ConfigDict()
  c.task = 'dpo'
  c.seed = 0

  c.model = dict(source='smollm2-135m-instruct', dtype='float32', scan_layers=True, remat='none')
  # Truncation keeps the completion and cuts the prompt from the left (max_prompt_length 0: only
  # max_length cuts); overflow='skip' drops pairs whose prompt alone fills max_length.
  c.data = dict(source='chatterbot-english', validation_fraction=0.1, system='', max_length=128,
                max_prompt_length=0, overflow='skip', batch_size=8, eval_batch_size=16,
                max_train_examples=0, max_eval_examples=0)
  # TRL's DPOConfig names. loss_type: sigmoid (DPO; label_smoothing > 0: cDPO), ipo, hinge,
  # robust. dropout=False is TRL's disable_dropout=True.
  c.dpo = dict(beta=0.1, loss_type='sigmoid', label_smoothing=0.0, dropout=False,
               precompute_ref_log_probs=False)

  c.train = dict(steps=150, log_every=10, eval_every=50, checkpoint_every=50, keep=2)
  pconfig.method_config(c, a.method, trainable_heads=False, warmup_steps=10, lr_scale=0.25)
  c.export = dict(adapter=True, merged=False)

  if a.runlocal:
    pconfig.runlocal(c, steps=4, every=2, max_train_examples=32, max_eval_examples=8,
                     max_length=64, batch_size=4, eval_batch_size=8)
  return c
