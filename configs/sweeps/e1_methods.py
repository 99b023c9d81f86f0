"""E1, method comparison: sentiment on all-MiniLM-L6-v2 (bundled tweets), every PEFT method of
``peftjax.config.PEFT_DEFAULTS`` (each with its default learning rate) plus a frozen-encoder
linear probe (BitFit restricted to the classifier), over seeds.

  python -m experiments.run e1_methods              # 3 seeds
  python -m experiments.run e1_methods:seeds=1      # one seed (what docs/experiments.md ran)

Scaled down for 2 shared CPU cores (see docs/experiments.md): 60 steps x 16 tweets of at most
32 tokens, evaluated on 300 held-out tweets. Methods registered later join automatically.
"""
from experiments import sweep
from peftjax import config as pconfig

CONFIG = 'configs/sentiment.py'
BASE = {'train.steps': 60, 'data.batch_size': 16, 'data.max_length': 32,
        'data.max_eval_examples': 300, 'optim.warmup_steps': 6, 'train.log_every': 10,
        'train.eval_every': 60, 'train.checkpoint_every': 30}
REPORT = {'metrics': ['accuracy', 'f1_macro', 'loss'], 'curve': 'train/loss',
          'title': 'E1: methods on MiniLM sentiment'}


def get_sweep(arg=None):
  a = pconfig.parse_arg(arg, seeds=3)
  names = list(pconfig.PEFT_DEFAULTS)
  methods = sweep.chain(sweep.sweep('arg.method', names[:2]),   # full, bitfit, then the probe
                        sweep.fixed({'arg.method': 'bitfit', 'peft.target': 'classifier'}),
                        sweep.sweep('arg.method', names[2:]))
  return sweep.product(methods, sweep.seeds(a['seeds']))
