"""Low-resource: UniPELT vs its parts (Mao et al. 2022, Table 1's K = 100/500/1000 setting):
sentiment on all-MiniLM-L6-v2 with 100, 500 and 1,000 training tweets, over seeds (a seed draws
the training subset, the held-out tweets, the init and the order).

  python -m experiments.run lowres_unipelt              # 3 seeds
  python -m experiments.run lowres_unipelt:seeds=1

Methods, all at learning rate 1e-2 (at the defaults, 2e-3 for LoRA and UniPELT, 60 steps leave
every method at the majority class), every one training the new classifier head:
UniPELT (gated LoRA r=8 on query/value, a 10-token prefix without the reparameterisation MLP,
a bottleneck-24 adapter after the feed-forward: 242k parameters), its parts alone with the same
sizes (LoRA r=8, P-tuning v2 = prefix without MLP, P=10, Pfeiffer adapter 24), and LoRA r=26
and AdaLoRA 32 -> 24 at about UniPELT's budget. Scaled down for 2 shared CPU cores: 60 steps
x 8 tweets of at most 32 tokens (so 1,000 examples are seen about half), 300 held-out tweets
(docs/experiments.md). Cells run seed by seed, the four core methods first:

  python -m experiments.run lowres_unipelt --only '^seed=0,method=(unipelt|lora,d|ptuning|pfeiffer)'
  python -m experiments.report runs/sweeps/lowres_unipelt
"""
from experiments import sweep
from peftjax import config as pconfig

CONFIG = 'configs/sentiment.py'
BASE = {'train.steps': 60, 'data.batch_size': 8, 'data.max_length': 32,
        'data.max_eval_examples': 300, 'data.eval_batch_size': 150, 'optim.learning_rate': 1e-2,
        'optim.warmup_steps': 6, 'model.scan_layers': True, 'train.log_every': 10,
        'train.eval_every': 60, 'train.checkpoint_every': 60}
REPORT = {'metrics': ['accuracy', 'f1_macro', 'loss'], 'x': 'data.max_train_examples',
          'curve': 'train/loss', 'title': 'Low-resource sentiment: UniPELT vs its parts'}

METHODS = [
    {'arg.method': 'unipelt', 'peft.projection': False},
    {'arg.method': 'lora'},
    {'arg.method': 'ptuning_v2', 'peft.num_virtual_tokens': 10},
    {'arg.method': 'pfeiffer', 'peft.bottleneck': 24},
    {'arg.method': 'lora', 'peft.rank': 26},
    {'arg.method': 'adalora', 'peft.init_r': 32, 'peft.target_r': 24},
]


def get_sweep(arg=None):
  a = pconfig.parse_arg(arg, seeds=3)
  return sweep.product(sweep.seeds(a['seeds']), METHODS,
                       sweep.sweep('data.max_train_examples', [100, 500, 1000]))
