"""Win rate of a DPO policy against its base, judged by a trained reward model.

Held-out prompts (the chatterbot proxy's validation split: prompts unseen in training) are
answered by the policy (the base plus the DPO run's exported adapter) and by the base (the same
compiled sampler with the adapter zeroed: the base exactly), one sampled reply each with the
same rng; the reward model (a ``configs/reward.py`` run, ``train.reward_model.RewardModel``)
scores each prompt + reply rendered as in its training. A win is policy reward > base reward; ties
count half. Prints the win rate with a 95% binomial interval and a few examples.

  .venv/bin/python experiments/dpo_win_rate.py --policy /tmp/dpo --reward /work/runs/reward \
      --prompts 64 --max-new-tokens 32
"""
import argparse
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import data, generate
from peftjax.data import chat
from peftjax.methods import hf_format
from peftjax.models import auto
from peftjax.train import reward_model


def left_padded(tokenizer, prompts):
  rendered = [tokenizer(chat.render(tokenizer, chat.pair_messages(p, '')[:1],
                                    add_generation_prompt=True),
                        add_special_tokens=False)['input_ids'] for p in prompts]
  width = max(map(len, rendered))
  ids = np.zeros((len(prompts), width), np.int32)
  mask = np.zeros((len(prompts), width), np.int32)
  for i, r in enumerate(rendered):
    ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
  return ids, mask


def replies(tokenizer, out):
  tokens = np.asarray(out.tokens)
  return [tokenizer.decode(tokens[i, :int(n)], skip_special_tokens=True).strip()
          for i, n in enumerate(np.asarray(out.lengths))]


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--policy', required=True, help='a configs/dpo.py workdir (its adapter/)')
  p.add_argument('--reward', required=True, help='a configs/reward.py workdir')
  p.add_argument('--prompts', type=int, default=64)
  p.add_argument('--max-new-tokens', type=int, default=32)
  p.add_argument('--temperature', type=float, default=0.7)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--json')
  args = p.parse_args()

  pre = auto.load_pretrained('smollm2-135m-instruct')
  method, adapter = hf_format.load_adapter(pathlib.Path(args.policy) / 'adapter', pre.params,
                                           pre.config)
  held_out = data.chatterbot_preferences()['validation']['prompt'][:]
  prompts = list(dict.fromkeys(held_out))[:args.prompts]
  ids, mask = left_padded(pre.tokenizer, prompts)
  sample = generate.sampler(method.apply(pre.module.apply), pre.config,
                            max_new_tokens=args.max_new_tokens,
                            sampling=generate.Sampling(temperature=args.temperature, top_p=0.9),
                            eos_token_id=pre.tokenizer.eos_token_id)
  rng = jax.random.key(args.seed)
  base_adapter = jax.tree.map(jnp.zeros_like, adapter)   # x A B = 0: the base exactly
  policy_answers = replies(pre.tokenizer, sample(adapter, pre.params, ids, mask, rng))
  base_answers = replies(pre.tokenizer, sample(base_adapter, pre.params, ids, mask, rng))

  judge = reward_model.RewardModel.load(args.reward)   # renders pairs as its training did
  r_policy, r_base = (judge.score(prompts, a) for a in (policy_answers, base_answers))
  wins = float(np.mean((r_policy > r_base) + 0.5 * (r_policy == r_base)))
  half = 1.96 * math.sqrt(wins * (1 - wins) / len(prompts))
  out = dict(prompts=len(prompts), win_rate=wins, ci95=half,
             reward_policy=float(r_policy.mean()), reward_base=float(r_base.mean()),
             identical_replies=int(sum(a == b for a, b in zip(policy_answers, base_answers))),
             mean_words_policy=float(np.mean([len(a.split()) for a in policy_answers])),
             mean_words_base=float(np.mean([len(a.split()) for a in base_answers])))
  print(json.dumps(out, indent=2))
  for i in range(min(5, len(prompts))):
    print(f'\n{prompts[i]!r}\n  policy ({r_policy[i]:+.2f}): {policy_answers[i]!r}'
          f'\n  base   ({r_base[i]:+.2f}): {base_answers[i]!r}')
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(
        {**out, 'examples': list(zip(prompts, policy_answers, base_answers,
                                     r_policy.tolist(), r_base.tolist()))}, indent=2))


if __name__ == '__main__':
  main()
