"""Reward modelling: SmolLM2-135M-Instruct with a scalar head (HF ``LlamaForSequenceClassification``,
``num_labels=1``) trained with the Bradley-Terry loss on chatterbot preference pairs (chosen: the
conversation's own reply; rejected: a reply from another conversation; a proxy, see docs/data.md).

  python launch.py --config=configs/reward.py:method=lora --workdir=/tmp/reward
  python launch.py --config=configs/reward.py:method=ia3,runlocal --workdir=/tmp/smoke

``method``: any name of ``peftjax.config.PEFT_DEFAULTS``; the fresh ``score`` head is trained with
every method (HF PEFT's ``modules_to_save``). ``last_layers=N`` (LoRA family, default 10): adapt
``q_proj``/``v_proj`` of SmolLM2's last N of 30 layers only (unscanned layers), so the backward
pass stops at layer 30 - N (about half the CPU time of all layers); 0: the family's default
targets in every layer. Evaluation reports pairwise ``accuracy`` and the mean
reward ``margin`` on held-out pairs (prompts unseen in training). The run exports ``adapter/``
(HF PEFT, ``task_type=SEQ_CLS``) and ``merged/`` (a plain HF checkpoint that
``AutoModelForSequenceClassification`` loads).
"""
import ml_collections

from peftjax import config as pconfig


def get_config(arg=None):
  a = ml_collections.ConfigDict(pconfig.parse_arg(arg, method='lora', runlocal=False,
                                                         last_layers=10))
  c = ml_collections.ConfigDict()
  c.task = 'reward'
  c.seed = 0

  c.model = dict(source='smollm2-135m-instruct', dtype='float32', scan_layers=True, remat='none',
                 num_labels=1)
  # max_prompt_length: the prompt's last tokens kept (0: only max_length cuts, from the left).
  c.data = dict(source='chatterbot-english', validation_fraction=0.1, system='', max_length=64,
                max_prompt_length=0, overflow='skip', batch_size=8, eval_batch_size=16,
                max_train_examples=0, max_eval_examples=0)
  # TRL's RewardConfig.center_rewards_coefficient (None: off); a dataset `margin` column is used
  # whenever present.
  c.reward = dict(center_rewards_coefficient=ml_collections.FieldReference(None, field_type=float))

  c.train = dict(steps=100, log_every=10, eval_every=50, checkpoint_every=25, keep=2)
  pconfig.method_config(c, a.method, trainable_heads=True, warmup_steps=10)
  if a.last_layers and a.method in ('lora', 'rslora', 'dora'):
    c.model.scan_layers = False
    layers = '|'.join(str(i) for i in range(30 - a.last_layers, 30))
    c.peft.target = f'model/layers_({layers})/self_attn/(q_proj|v_proj)'
  c.export = dict(adapter=True, merged=True)

  if a.runlocal:
    pconfig.runlocal(c, steps=4, every=2, max_train_examples=32, max_eval_examples=8,
                     max_length=48, batch_size=4, eval_batch_size=8)
  return c
