"""What a DPO step with LoRA costs against an SFT step on the same sequences (SmolLM2-135M).

Both steps are the tasks' own loss functions (``train.tasks``: ``dpo`` with the reference in the
same compiled step, and ``sft``) under ``train.step.make_train_step``, on the same B chosen + B
rejected sequences of the chatterbot proxy pairs (the SFT step trains on all 2B of them). Prints:

- the base weights' bytes and the compiled steps' buffers (``memory_analysis``): arguments (base
  weights + adapter state + batch), temporaries, and the device arrays alive after a step;
- XLA's FLOP count of each compiled step (layers unscanned and one loss chunk, so no loop body is
  counted once) and the median wall time of ``--steps`` steps, with their DPO / SFT ratios.

  .venv/bin/python experiments/dpo_cost.py --pairs 4 --seq 64 --steps 5
"""
import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from peftjax import data, methods, sharding
from peftjax.models import auto
from peftjax.objectives import lm
from peftjax.train import optim, step as step_lib, state as state_lib, tasks


def nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--pairs', type=int, default=4)
  p.add_argument('--seq', type=int, default=64)
  p.add_argument('--steps', type=int, default=5)
  p.add_argument('--json')
  args = p.parse_args()

  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  rules = sharding.DEFAULT_RULES
  pre = auto.load_pretrained('smollm2-135m-instruct', scan_layers=False)
  module = pre.module
  boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.ones((1, 2), jnp.int32)))
  base_axes = sharding.logical_axes(boxed['params'])
  base_sh = sharding.param_shardings(boxed['params'], mesh, rules)
  params = jax.device_put(pre.params, base_sh)
  pre = dataclasses.replace(pre, params=None)   # one copy of the base weights alive
  lora = methods.get('lora', rank=8, alpha=16.0, model_type='llama')
  tx = optim.make_optimizer({'learning_rate': 1e-4, 'total_steps': 1, 'schedule': 'constant'})
  apply = lora.apply(module.apply)

  rows = data.chatterbot_preferences()['train'].select(range(args.pairs))
  enc = data.encode_preferences(rows, pre.tokenizer, max_length=args.seq)
  pairs = next(data.Loader(enc.dataset, global_batch_size=args.pairs, seq_len=args.seq,
                           shuffle=False, process_count=1, process_index=0))
  both = lambda k: np.stack([pairs[f'chosen_{k}'], pairs[f'rejected_{k}']], 1).reshape(
      2 * args.pairs, args.seq)
  ids, attention = both('input_ids'), both('attention_mask')
  labels, mask = lm.next_token_targets(jnp.asarray(ids), jnp.asarray(both('loss_mask')))
  sft_batch = dict(input_ids=ids, attention_mask=attention, labels=np.asarray(labels),
                   loss_mask=np.asarray(mask, np.int32),
                   position_ids=np.where(attention == 1, np.arange(args.seq), 0).astype(np.int32))
  config = ml_collections.ConfigDict(dict(dpo=dict(beta=0.1, loss_type='sigmoid',
                                                   label_smoothing=0.0, dropout=False)))
  batch_sh = sharding.batch_sharding(mesh)
  out = {'params_mib': nbytes(params) / 2**20, 'tokens': int(ids.size),
         'backend': jax.default_backend()}
  for name, batch in (('sft', sft_batch), ('dpo', pairs)):
    loss_fn = tasks.get(name).loss_fn(apply, pre, config)
    if name == 'sft':   # the same dropout setting as DPO (TRL's disable_dropout)
      inner = loss_fn
      loss_fn = lambda a, b, batch, rng, inner=inner: inner(a, b, batch, None)
    state, state_sh = state_lib.init_train_state(lora.init, tx, jax.random.key(1), params,
                                                 base_axes, mesh, rules)
    step = step_lib.make_train_step(loss_fn, tx, state_shardings=state_sh,
                                    base_shardings=base_sh, batch_sharding=batch_sh)
    batch = jax.device_put(jax.tree.map(jnp.asarray, batch), batch_sh)
    t0 = time.perf_counter()
    compiled = step.lower(state, params, batch).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    times = []
    for i in range(args.steps + 1):
      t0 = time.perf_counter()
      state, metrics = compiled(state, params, batch)
      jax.block_until_ready(metrics)
      if i:   # the first call is a warm-up
        times.append(time.perf_counter() - t0)
    live = sum(x.nbytes for x in jax.live_arrays())
    out[name] = dict(flops=float(cost['flops']), step_s=float(np.median(times)),
                     compile_s=compile_s, argument_mib=mem.argument_size_in_bytes / 2**20,
                     temp_mib=mem.temp_size_in_bytes / 2**20,
                     output_mib=mem.output_size_in_bytes / 2**20, live_mib=live / 2**20,
                     adapter_state_mib=nbytes(state) / 2**20)
    del state, compiled
  out['flops_ratio'] = out['dpo']['flops'] / out['sft']['flops']
  out['time_ratio'] = out['dpo']['step_s'] / out['sft']['step_s']
  print(f"base weights {out['params_mib']:.1f} MiB; {args.pairs} pairs x {args.seq} tokens "
        f"= {out['tokens']} tokens per step ({out['backend']})")
  print('| step | XLA GFLOP | s/step | arguments MiB | temporaries MiB | live after step MiB |')
  print('|---|---|---|---|---|---|')
  for name in ('sft', 'dpo'):
    r = out[name]
    print(f"| {name} | {r['flops'] / 1e9:.1f} | {r['step_s']:.2f} | {r['argument_mib']:.1f} | "
          f"{r['temp_mib']:.1f} | {r['live_mib']:.1f} |")
  print(f"DPO / SFT: FLOPs {out['flops_ratio']:.3f}, time {out['time_ratio']:.3f}")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(out, f, indent=2)


if __name__ == '__main__':
  main()
