"""Low-resource: UniPELT vs its parts (Mao et al. 2022, Table 1's K = 100/500/1000 setting):
sentiment on all-MiniLM-L6-v2 with 100, 500 and 1,000 training tweets, over seeds (a seed draws
the training subset, the held-out tweets, the init and the order).

  python -m experiments.run lowres_unipelt              # 3 seeds
  python -m experiments.run lowres_unipelt:seeds=1

Methods, at their ``PEFT_DEFAULTS`` learning rates, every one training the new classifier head:
UniPELT (gated LoRA r=8 on query/value, a 10-token prefix without the reparameterisation MLP,
a bottleneck-24 adapter after the feed-forward: 242k parameters), its parts alone with the same
sizes (LoRA r=8, P-tuning v2 = prefix without MLP, P=10, Pfeiffer adapter 24), and LoRA r=26
and AdaLoRA 32 -> 24 at about UniPELT's budget. Scaled down for 2 shared CPU cores: 100 steps
x 16 tweets of at most 32 tokens, 500 held-out tweets (docs/experiments.md).
"""
from experiments import sweep
from peftjax import config as pconfig

CONFIG = 'configs/sentiment.py'
BASE = {'train.steps': 100, 'data.batch_size': 16, 'data.max_length': 32,
        'data.max_eval_examples': 500, 'optim.warmup_steps': 10, 'train.log_every': 20,
        'train.eval_every': 100, 'train.checkpoint_every': 100}
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
  return sweep.product(sweep.sweep('data.max_train_examples', [100, 500, 1000]), METHODS,
                       sweep.seeds(a['seeds']))
