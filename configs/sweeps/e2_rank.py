"""E2, rank scaling (rsLoRA, Kalajdzievski 2023): SFT of SmolLM2-135M-Instruct on the chatterbot
pairs, LoRA (scale alpha/r) against rsLoRA (alpha/sqrt(r)) at ranks 4, 16, 64 and 192 on q_proj
and v_proj, alpha 16 and one learning rate per scaling rule (the same at every rank). 192, not the
issue's 256: SmolLM2's v_proj has 192 outputs (3 KV heads x 64), and a rank above min(in, out)
is refused (it adds parameters, not rank).

  python -m experiments.run e2_rank                 # 1 seed
  python -m experiments.run e2_rank:seeds=3

The paper's claim: with alpha/r, larger ranks stop helping (the update's scale shrinks as 1/r
and learning slows), while with alpha/sqrt(r) the loss keeps improving with rank. Scaled down
for 2 CPU cores: 40 steps x 4 packed rows of 64 tokens, 64 held-out rows evaluated.
"""
from experiments import sweep
from peftjax import config as pconfig

CONFIG = 'configs/sft.py'
BASE = {'train.steps': 40, 'data.batch_size': 4, 'data.max_length': 64,
        'data.max_eval_examples': 64, 'data.eval_batch_size': 16, 'optim.warmup_steps': 4,
        'optim.learning_rate': 1e-3, 'peft.dropout': 0.0, 'train.log_every': 5,
        'train.eval_every': 20, 'train.checkpoint_every': 20}
REPORT = {'metrics': ['loss', 'perplexity'], 'x': 'peft.rank', 'curve': 'train/loss',
          'title': 'E2: LoRA vs rsLoRA rank scaling (SmolLM2-135M SFT)'}


def get_sweep(arg=None):
  a = pconfig.parse_arg(arg, seeds=1)
  return sweep.product(sweep.sweep('arg.method', ['lora', 'rslora']),
                       sweep.sweep('peft.rank', [4, 16, 64, 192]), sweep.seeds(a['seeds']))
