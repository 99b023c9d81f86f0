"""E3, layer-wise fine-tuning: full fine-tuning of all-MiniLM-L6-v2 on 500 and 5,000 sentiment
tweets; plain (AdamW, warmup + cosine) against ULMFiT's discriminative learning rates (factor
2.6 per layer) with the slanted triangular schedule, against the same plus gradual unfreezing
(one more layer group every ``unfreeze_every`` updates, top first).

  python -m experiments.run e3_layerwise            # 3 seeds
  python -m experiments.run e3_layerwise:seeds=1    # what docs/experiments.md ran

Scaled down for 2 shared CPU cores (the same scale as E1): 60 steps x 16 tweets (500 examples:
~2 epochs; 5,000: a fifth of one) of at most 32 tokens, evaluated on 300 held-out tweets. The
same peak learning rate (the top layer's) for all variants.
"""
from experiments import sweep
from peftjax import config as pconfig

CONFIG = 'configs/sentiment.py:method=full'
BASE = {'train.steps': 60, 'data.batch_size': 16, 'data.max_length': 32,
        'data.max_eval_examples': 300, 'optim.warmup_steps': 6, 'train.log_every': 10,
        'train.eval_every': 60, 'train.checkpoint_every': 30, 'optim.learning_rate': 1e-4}
# MiniLM: 6 layers + embeddings below + the classifier on top = 8 groups; unfreezing one more
# group every 6 updates has everything training after 42 of the 60 steps.
VARIANTS = {
    'plain': {'optim.schedule': 'cosine', 'optim.layer_decay': 0.0, 'optim.unfreeze_every': 0},
    'discriminative+stlr': {'optim.schedule': 'stlr', 'optim.layer_decay': 2.6,
                            'optim.unfreeze_every': 0},
    'discriminative+stlr+unfreezing': {'optim.schedule': 'stlr', 'optim.layer_decay': 2.6,
                                       'optim.unfreeze_every': 6},
}
REPORT = {'metrics': ['accuracy', 'f1_macro', 'loss'], 'curve': 'train/loss',
          'title': 'E3: layer-wise full fine-tuning of MiniLM'}


def get_sweep(arg=None):
  a = pconfig.parse_arg(arg, seeds=3)
  return sweep.product(sweep.sweep('data.max_train_examples', [500, 5000]),
                       [dict(v) for v in VARIANTS.values()], sweep.seeds(a['seeds']))
