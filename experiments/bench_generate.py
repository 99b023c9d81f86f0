"""Generation benchmark: peftjax ``generate.sampler`` against transformers ``generate`` (+ PEFT).

SmolLM2-135M-Instruct (the bundled GGUF, float32) in both frameworks, the same weights (peftjax
writes them with ``auto.save_pretrained``, transformers loads that directory) and the same LoRA
adapter (r=8, alpha=16 on q_proj/v_proj, random non-zero B; written with
``hf_format.save_adapter``, loaded with ``peft.PeftModel.from_pretrained``), neither merged.
Chat-template prompts, left padded; ``--new-tokens`` generated per row (no early stop at EOS,
so both frameworks produce the same number of tokens). Greedy, and sampled (temperature 0.7,
top-k 50, top-p 0.9). Runs alternate between the frameworks, in one process.

  .venv/bin/python experiments/bench_generate.py                       # the full table
  .venv/bin/python experiments/bench_generate.py --batches 8 --modes greedy --new-tokens 32

Reported per row: tokens/s (new tokens over the wall time of the whole call, prefill included;
best of ``--repeats`` and median), the ratio, JAX's compile time, and greedy agreement (rows
whose tokens match transformers'). Also the CPU model, the load average, a measured copy
bandwidth, and the batch-1 bound it implies: weight bytes read per token / bandwidth.
"""
import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from anywhere

QUESTIONS = ['What is the capital of France?', 'Write a haiku about the sea.',
             'How do I sort a list in Python?', 'Why is the sky blue?',
             'Give me three tips for sleeping better.', 'What is a prime number?',
             'Summarise the plot of Hamlet in two sentences.', 'Explain recursion to a child.']
SAMPLED = dict(temperature=0.7, top_k=50, top_p=0.9)
LORA = dict(rank=8, alpha=16.0, target='.*/(q_proj|v_proj)')


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--batches', default='1,8', help='comma list of batch sizes')
  p.add_argument('--new-tokens', type=int, default=128)
  p.add_argument('--modes', default='greedy,sampled', help='comma list of greedy, sampled')
  p.add_argument('--adapters', default='lora,none', help='comma list of lora, none')
  p.add_argument('--frameworks', default='jax,torch', help='comma list of jax, torch')
  p.add_argument('--repeats', type=int, default=2, help='timed calls per framework and row')
  p.add_argument('--threads', type=int, default=len(os.sched_getaffinity(0)),
                 help='torch.set_num_threads (XLA uses every core)')
  p.add_argument('--copy-mib', type=int, default=512, help='array size of the bandwidth copy')
  p.add_argument('--json', help='also write the results here')
  return p.parse_args()


def machine() -> dict:
  import jax
  import torch
  import transformers
  import run
  return dict(cpu=run.machine(), cores=len(os.sched_getaffinity(0)), jax=jax.__version__,
              torch=torch.__version__, transformers=transformers.__version__)


def copy_bandwidth(mib: int) -> dict:
  """STREAM-style copy bandwidth (bytes read + written per second, best of 5) with numpy and
  jax, and jax's read-only bandwidth (a sum)."""
  import jax
  import jax.numpy as jnp
  a = np.random.default_rng(0).standard_normal(mib * 2**18, np.float32)
  b = np.empty_like(a)
  np.copyto(b, a)                                         # fault the pages in first

  def best(fn):
    times = []
    for _ in range(5):
      t = time.perf_counter()
      jax.block_until_ready(fn())
      times.append(time.perf_counter() - t)
    return min(times)
  x = jnp.asarray(a)
  copy, total = jax.jit(lambda x: x * 1.5), jax.jit(jnp.sum)
  jax.block_until_ready((copy(x), total(x)))
  return dict(numpy_copy=2 * a.nbytes / best(lambda: np.copyto(b, a)) / 1e9,
              jax_copy=2 * a.nbytes / best(lambda: copy(x)) / 1e9,
              jax_read=a.nbytes / best(lambda: total(x)) / 1e9)


def prompts(tokenizer, batch: int):
  texts = [tokenizer.apply_chat_template([{'role': 'user', 'content': q}], tokenize=False,
                                         add_generation_prompt=True)
           for q in (QUESTIONS * batch)[:batch]]
  enc = tokenizer(texts, padding=True, padding_side='left', return_tensors='np')
  return enc['input_ids'].astype(np.int32), enc['attention_mask'].astype(np.int32)


def lora_adapter(params):
  """peftjax LoRA on q/v with random non-zero B (so the adapter changes the output)."""
  import jax
  from flax import linen as nn
  from peftjax import methods, tree
  method = methods.lora(**LORA)
  flat = tree.flatten(nn.unbox(method.init(jax.random.key(1), params)))
  rng = np.random.default_rng(2)
  return method, tree.unflatten({
      p: rng.standard_normal(v.shape, np.float32) * 0.02 if p.endswith('lora_B') else v
      for p, v in flat.items()})


class Jax:
  name = 'jax'

  def __init__(self, pre, method, adapter, new_tokens):
    self.pre, self.adapter, self.new_tokens, self.samplers = pre, adapter, new_tokens, {}
    self.apply = pre.module.apply if method is None else method.apply(pre.module.apply)

  def __call__(self, ids, mask, mode, seed, new_tokens=None):
    """``new_tokens`` is ignored: the warm-up call compiles the sampler for --new-tokens."""
    import jax
    from peftjax import generate
    if mode not in self.samplers:
      sampling = generate.Sampling(**SAMPLED) if mode == 'sampled' else generate.Sampling()
      self.samplers[mode] = generate.sampler(self.apply, self.pre.config, sampling=sampling,
                                             max_new_tokens=self.new_tokens, eos_token_id=())
    out = self.samplers[mode](self.adapter, self.pre.params, ids, mask, jax.random.key(seed))
    return np.asarray(out.tokens)


class Torch:
  name = 'torch'

  def __init__(self, model, pad_token_id, new_tokens):
    self.model, self.pad, self.new_tokens = model, pad_token_id, new_tokens

  def __call__(self, ids, mask, mode, seed, new_tokens=None):
    import torch
    torch.manual_seed(seed)
    kw = dict(do_sample=True, **SAMPLED) if mode == 'sampled' else dict(do_sample=False)
    with torch.no_grad():
      out = self.model.generate(input_ids=torch.as_tensor(ids).long(),
                                attention_mask=torch.as_tensor(mask).long(),
                                max_new_tokens=new_tokens or self.new_tokens,
                                pad_token_id=self.pad, eos_token_id=None, **kw)
    return out[:, ids.shape[1]:].numpy()


def load(args):
  """(peftjax Pretrained, {adapter: (jax runner, torch runner)})."""
  import torch
  import transformers
  import peft
  from peftjax.methods import hf_format
  from peftjax.models import auto
  torch.set_num_threads(args.threads)
  pre = auto.load_pretrained('smollm2-135m-instruct')
  tmp = pathlib.Path(tempfile.mkdtemp())
  auto.save_pretrained(tmp / 'base', pre.config, pre.params, pre.tokenizer)
  method, adapter = lora_adapter(pre.params)
  hf_format.save_adapter(tmp / 'lora', method, adapter, pre.config)
  runners = {}
  for name in args.adapters.split(','):
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp / 'base', dtype=torch.float32)
    if name == 'lora':
      hf = peft.PeftModel.from_pretrained(hf, tmp / 'lora')
      runners[name] = (Jax(pre, method, adapter, args.new_tokens),
                       Torch(hf.eval(), pre.tokenizer.pad_token_id, args.new_tokens))
    else:
      runners[name] = (Jax(pre, None, None, args.new_tokens),
                       Torch(hf.eval(), pre.tokenizer.pad_token_id, args.new_tokens))
  return pre, runners


def bench_row(args, runners, ids, mask, mode) -> dict:
  frameworks = [r for r in runners if r.name in args.frameworks.split(',')]
  row, outputs, times = {}, {}, {r.name: [] for r in frameworks}
  for r in frameworks:        # untimed: JAX compiles (timed apart), torch warms up (4 tokens)
    t = time.perf_counter()
    r(ids, mask, mode, seed=0, new_tokens=4)
    row[f'{r.name}_first_s'] = time.perf_counter() - t
  for rep in range(args.repeats):
    for r in frameworks:
      t = time.perf_counter()
      outputs[r.name] = r(ids, mask, mode, seed=rep + 1)
      times[r.name].append(time.perf_counter() - t)
  tokens = ids.shape[0] * args.new_tokens
  for name, ts in times.items():
    row[f'{name}_tok_s'] = tokens / min(ts)
    row[f'{name}_tok_s_median'] = tokens / statistics.median(ts)
    row[f'{name}_s'] = ts
  if len(times) == 2:
    row['ratio'] = row['jax_tok_s'] / row['torch_tok_s']
    if mode == 'greedy':
      same = (outputs['jax'] == outputs['torch']).all(axis=1)
      row['greedy_rows_equal'] = f'{int(same.sum())}/{len(same)}'
  return row


def main():
  import jax
  args = parse_args()
  info = machine()
  info['load_before'] = os.getloadavg()
  info['bandwidth_gb_s'] = copy_bandwidth(args.copy_mib)
  pre, runners = load(args)
  weight_bytes = sum(a.nbytes for a in jax.tree.leaves(pre.params))
  info['weight_bytes'] = weight_bytes
  bw = info['bandwidth_gb_s']['numpy_copy'] * 1e9
  info['batch1_bound_tok_s'] = bw / weight_bytes
  rows = []
  for adapter, pair in runners.items():
    for batch in map(int, args.batches.split(',')):
      ids, mask = prompts(pre.tokenizer, batch)
      for mode in args.modes.split(','):
        row = dict(adapter=adapter, batch=batch, mode=mode, prompt_len=ids.shape[1],
                   load=os.getloadavg()[0], **bench_row(args, pair, ids, mask, mode))
        rows.append(row)
        print(json.dumps(row), flush=True)
  info['load_after'] = os.getloadavg()
  print(f"\n{info['cpu']}, {info['cores']} cores; jax {info['jax']}, torch {info['torch']}, "
        f"transformers {info['transformers']}; load average {info['load_before'][0]:.1f} -> "
        f"{info['load_after'][0]:.1f}")
  b = info['bandwidth_gb_s']
  print(f"copy bandwidth: numpy {b['numpy_copy']:.1f} GB/s, jax {b['jax_copy']:.1f} GB/s "
        f"(read + write); jax read {b['jax_read']:.1f} GB/s. Weights {weight_bytes / 1e6:.0f} MB "
        f"read per decode step: batch-1 bound {info['batch1_bound_tok_s']:.1f} tok/s "
        f"(numpy copy bandwidth)\n")
  print('| adapter | batch | mode | prompt | jax tok/s | torch tok/s | jax / torch | '
        'jax median | torch median | jax compile+first s | greedy rows equal | load |')
  print('|---|---|---|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    get = lambda k, f='{:.1f}': f.format(r[k]) if k in r else '-'
    print(f"| {r['adapter']} | {r['batch']} | {r['mode']} | {r['prompt_len']} | "
          f"{get('jax_tok_s')} | {get('torch_tok_s')} | {get('ratio', '{:.2f}x')} | "
          f"{get('jax_tok_s_median')} | {get('torch_tok_s_median')} | {get('jax_first_s')} | "
          f"{r.get('greedy_rows_equal', '-')} | {r['load']:.1f} |")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(dict(machine=info, rows=rows), indent=2))


if __name__ == '__main__':
  main()
