"""Train-step benchmark: peftjax (JAX/Flax) against Hugging Face transformers + PEFT (PyTorch).

Both frameworks train the same model on the same batch with LoRA and AdamW (lr 1e-4, weight
decay 0.01, constant schedule). Each (config, framework) runs in its own subprocess, so its peak
memory is its own. The JAX step is the library's real path: ``methods.get('lora', ...).apply``,
``train.state.init_train_state``, ``train.step.make_train_step`` and the chunked LM loss
(``objectives.lm.chunked_nll`` on the final hidden states and ``heads.output_embedding``, so
the [B, T, vocab] logits never exist).

  .venv/bin/python experiments/bench_train_step.py                     # SmolLM2-135M, CPU
  .venv/bin/python experiments/bench_train_step.py --configs qv --frameworks jax --steps 5
  .venv/bin/python experiments/bench_train_step.py --device-model 1b   # ~1.1B bf16, for a GPU

Reported per row: median seconds/step over ``--steps`` timed steps after ``--warmup`` (JAX's
compile time separately), tokens/s, peak RSS of the process and what training adds to the RSS
after loading (VmHWM reset after loading; compilation included), the loss of the first step (a
parity check: LoRA starts as the identity, so both frameworks start at the base model's loss),
and FLOP/s as a fraction of a measured matmul peak, counted two ways: XLA's
``cost_analysis()['flops']`` of the compiled step, and an analytic model count (forward +
activation gradients, the same number for both frameworks).
"""
import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from anywhere

SMOLLM = 'smollm2-135m-instruct'
LR, WEIGHT_DECAY = 1e-4, 0.01
# name -> (rank, alpha, HF PEFT target_modules)
CONFIGS = {
    'qv': (8, 16, ['q_proj', 'v_proj']),
    'all': (16, 32, 'all-linear'),
}
# Llama-shaped random models for accelerator runs (TinyLlama-1.1B's shape), as HF config dicts.
DEVICE_MODELS = {
    '1b': dict(model_type='llama', vocab_size=32000, hidden_size=2048, intermediate_size=5632,
               num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
               max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False),
}
RESULT = 'RESULT '


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--steps', type=int, default=10, help='timed steps (median reported)')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps after compilation (>= 1)')
  p.add_argument('--batch', type=int, default=4)
  p.add_argument('--seq', type=int, default=128)
  p.add_argument('--configs', default='qv,all', help=f'comma list of {sorted(CONFIGS)}')
  p.add_argument('--frameworks', default='jax,qlora,torch',
                 help='comma list of jax, qlora (jax on an NF4 base, double quantisation), torch')
  p.add_argument('--data', choices=['random', 'chatterbot'], default='random',
                 help='uniform random token ids, or the chatterbot corpus tokenised and cut')
  p.add_argument('--device-model', choices=sorted(DEVICE_MODELS),
                 help='a random bf16 Llama of this size instead of SmolLM2 (meant for a GPU)')
  p.add_argument('--scan-layers', action='store_true', help='JAX: nn.scan over layers')
  p.add_argument('--remat', nargs='?', const='full', default='none',
                 help='JAX remat policy: none, dots (keep matmul outputs), full (bare --remat)')
  p.add_argument('--attention-impl', default='auto',
                 help='JAX: auto, xla, cudnn, einsum or flash (layers.ATTENTION_IMPLS)')
  p.add_argument('--grad-ckpt', action='store_true',
                 help='PyTorch: gradient checkpointing (non-reentrant)')
  p.add_argument('--loss-chunk', type=int, default=512, help='JAX: tokens per chunked-loss block')
  p.add_argument('--peak-size', type=int, default=2048, help='n of the n^3 peak matmul')
  p.add_argument('--threads', type=int, default=len(os.sched_getaffinity(0)),
                 help='torch.set_num_threads (XLA uses every core)')
  p.add_argument('--json', help='also write the results here')
  p.add_argument('--profile', help='JAX: write a jax.profiler trace of 2 more steps to this directory')
  p.add_argument('--worker', choices=['jax', 'qlora', 'torch', 'peak'], help=argparse.SUPPRESS)
  p.add_argument('--config', help=argparse.SUPPRESS)
  p.add_argument('--batch-file', help=argparse.SUPPRESS)
  return p.parse_args()


# ----------------------------------------------------------------------------- model and data

def model_hf_config(args) -> dict:
  if args.device_model:
    return DEVICE_MODELS[args.device_model]
  from peftjax.models import checkpoint
  return checkpoint.open_checkpoint(SMOLLM).config


def make_batch(args, vocab_size: int) -> np.ndarray:
  """int32 token ids [batch, seq]: seeded uniform ids, or chatterbot pairs joined by EOS."""
  n = args.batch * args.seq
  if args.data == 'random':
    return np.random.default_rng(0).integers(0, vocab_size, (args.batch, args.seq), np.int32)
  from peftjax.data import sources
  from peftjax.models import tokenizer
  tok = tokenizer.load_tokenizer(SMOLLM)
  ids = []
  for row in sources.chatterbot_pairs(deduplicate=True):
    ids += tok(f"{row['prompt']}\n{row['response']}")['input_ids'] + [tok.eos_token_id]
    if len(ids) >= n:
      return np.asarray(ids[:n], np.int32).reshape(args.batch, args.seq)
  raise ValueError(f'chatterbot corpus has fewer than {n} tokens')


def model_flops(hf: dict, rank: int, targets, tokens: int, seq: int) -> float:
  """Analytic FLOPs of one LoRA step: 2x the forward (forward + activation gradients; frozen
  weights get no weight gradient) plus the adapter's weight gradients. Attention counts the full
  T x T scores, as the implementations compute them."""
  d, f, layers = hf['hidden_size'], hf['intermediate_size'], hf['num_hidden_layers']
  hd = hf.get('head_dim') or d // hf['num_attention_heads']
  q, kv = hf['num_attention_heads'] * hd, hf['num_key_value_heads'] * hd
  linears = {'q_proj': (d, q), 'k_proj': (d, kv), 'v_proj': (d, kv), 'o_proj': (q, d),
             'gate_proj': (d, f), 'up_proj': (d, f), 'down_proj': (f, d)}
  adapted = linears if targets == 'all-linear' else {k: linears[k] for k in targets}
  dense = sum(i * o for i, o in linears.values())
  lora = sum(rank * (i + o) for i, o in adapted.values())
  attention = 2 * seq * q
  forward = 2 * tokens * (layers * (dense + lora + attention) + d * hf['vocab_size'])
  return 2 * forward + 2 * tokens * layers * lora


# ----------------------------------------------------------------------------- memory

def reset_peak_rss():
  """Resets the kernel's peak-RSS mark (VmHWM) of this process; returns the current RSS in MiB."""
  with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')
  return _status_mib('VmRSS')


def _status_mib(field: str) -> float:
  for line in open('/proc/self/status'):
    if line.startswith(field + ':'):
      return int(line.split()[1]) / 1024
  raise KeyError(field)


def memory_report(rss_after_load: float) -> dict:
  return {'rss_after_load_mib': rss_after_load, 'train_peak_rss_mib': _status_mib('VmHWM'),
          'process_peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# ----------------------------------------------------------------------------- workers

def matmul_flops(dot, n: int) -> float:
  """FLOP/s of ``dot()`` (a synchronous n x n x n matmul): median of 10 after one warm-up."""
  dot()
  times = []
  for _ in range(10):
    t = time.perf_counter()
    dot()
    times.append(time.perf_counter() - t)
  return 2 * n**3 / statistics.median(times)


def torch_matmul_flops(n: int, dtype, device: str = 'cpu') -> float:
  """FLOP/s of an n x n x n ``torch.mm`` of ``dtype`` on ``device`` (see `matmul_flops`)."""
  import torch
  a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in 'ab')
  sync = torch.cuda.synchronize if device == 'cuda' else lambda: None
  return matmul_flops(lambda: (a @ b, sync()), n)


def time_steps(run_step, warmup: int, steps: int) -> tuple[list[float], float]:
  """Runs ``warmup`` then ``steps`` synchronous steps; returns (per-step seconds, first loss)."""
  first = run_step()
  for _ in range(max(warmup, 1) - 1):
    run_step()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    run_step()
    times.append(time.perf_counter() - t)
  return times, first


def make_loss_fn(apply, config, loss_chunk: int):
  """``loss_fn(adapter, base, batch, rng) -> (mean next-token NLL, {})`` of the adapted
  ``apply``: the chunked LM loss on the final hidden states and the (tied) output embedding."""
  import jax.numpy as jnp
  from peftjax.models import heads
  from peftjax.objectives import lm

  def loss_fn(adapter, base, batch, rng):
    hidden = apply(adapter, base, batch['input_ids'], attention_mask=batch['attention_mask'],
                   deterministic=False, rngs={'dropout': rng}).hidden
    kernel, tied = heads.output_embedding(config, base)
    labels, mask = lm.next_token_targets(batch['input_ids'], batch['attention_mask'])
    nll, count = lm.chunked_nll(hidden, kernel.astype(hidden.dtype), labels, mask,
                                chunk=loss_chunk, tied=tied)
    return nll / jnp.maximum(count, 1.0), {}
  return loss_fn


def jax_worker(args, ids: np.ndarray) -> dict:
  import jax
  import jax.numpy as jnp
  from peftjax import methods, quant, sharding
  from peftjax.methods import targets
  from peftjax.models import auto, registry
  from peftjax.train import optim, step as step_lib, state as state_lib

  dtype = jnp.bfloat16 if args.device_model else jnp.float32
  overrides = dict(scan_layers=args.scan_layers, remat=args.remat,
                   attention_impl=args.attention_impl)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  rules = sharding.DEFAULT_RULES
  t0 = time.perf_counter()
  if args.device_model:
    config = registry.config_from_hf(model_hf_config(args), dtype=dtype, param_dtype=dtype, **overrides)
    module = registry.build(config, 'causal_lm')
    variables, base_sh, axes = sharding.sharded_init(module.init, mesh, rules, jax.random.key(0),
                                                     jnp.ones((1, 2), jnp.int32))
    params, base_sh, base_axes = variables['params'], base_sh['params'], axes['params']
  else:
    pre = auto.load_pretrained(SMOLLM, dtype=dtype,
                               quantize='nf4' if args.worker == 'qlora' else None, **overrides)
    module, config = pre.module, pre.config
    boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.ones((1, 2), jnp.int32)))
    base_axes = sharding.logical_axes(boxed['params'])
    base_sh = sharding.param_shardings(boxed['params'], mesh, rules)
    base_sh = quant.shardings(pre.params, base_sh)   # the arrays of quantised kernels
    params = jax.device_put(pre.params, base_sh)
  jax.block_until_ready(params)
  load_s = time.perf_counter() - t0

  rank, alpha, names = CONFIGS[args.config]
  target = targets.ALL_LINEAR if names == 'all-linear' else targets.suffix_regex(names)
  method = methods.get('lora', rank=rank, alpha=alpha, target=target)
  tx = optim.make_optimizer({'learning_rate': LR, 'total_steps': 1, 'schedule': 'constant',
                             'weight_decay': WEIGHT_DECAY})
  state, state_sh = state_lib.init_train_state(method.init, tx, jax.random.key(1), params,
                                               base_axes, mesh, rules)
  loss_fn = make_loss_fn(method.apply(module.apply), config, args.loss_chunk)
  batch_sh = sharding.batch_sharding(mesh)
  step = step_lib.make_train_step(loss_fn, tx, state_shardings=state_sh, base_shardings=base_sh,
                                  batch_sharding=batch_sh,
                                  compute_dtype=dtype if args.device_model else None)
  batch = jax.device_put({'input_ids': jnp.asarray(ids), 'attention_mask': jnp.ones_like(ids)},
                         batch_sh)
  rss_after_load = reset_peak_rss()
  t0 = time.perf_counter()
  compiled = step.lower(state, params, batch).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()

  def run_step():
    nonlocal state
    state, metrics = compiled(state, params, batch)
    return float(metrics['loss'])

  times, first_loss = time_steps(run_step, args.warmup, args.steps)
  if args.profile:
    with jax.profiler.trace(args.profile, create_perfetto_trace=True):
      run_step(), run_step()
  out = dict(load_s=load_s, compile_s=compile_s, step_times=times, first_loss=first_loss,
             base_mib=quant.nbytes(params) / 2**20, xla_flops=float(cost['flops']),
             xla_args_mib=mem.argument_size_in_bytes / 2**20,
             xla_temp_mib=mem.temp_size_in_bytes / 2**20, backend=jax.default_backend(),
             xla_loops=args.scan_layers or ids.size > args.loss_chunk,
             trainable=int(sum(x.size for x in jax.tree.leaves(state.adapter))),
             **memory_report(rss_after_load))
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    out['device_peak_mib'] = stats['peak_bytes_in_use'] / 2**20
  return out


def torch_worker(args, ids: np.ndarray) -> dict:
  import peft
  import torch
  import transformers

  torch.set_num_threads(args.threads)
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  mm_dtype = torch.float32 if device == 'cpu' else torch.bfloat16
  t0 = time.perf_counter()
  if args.device_model:
    hf = transformers.LlamaConfig(**{k: v for k, v in model_hf_config(args).items() if k != 'model_type'})
    with torch.device(device):
      model = transformers.LlamaForCausalLM._from_config(hf, dtype=torch.bfloat16)
  else:
    from peftjax import assets
    gguf = assets.path(SMOLLM)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                              dtype=torch.float32).to(device)
  if args.grad_ckpt:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})
  rank, alpha, names = CONFIGS[args.config]
  model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=names,
                                                     lora_dropout=0.0, task_type='CAUSAL_LM'))
  model.train()
  trainable = [p for p in model.parameters() if p.requires_grad]  # float32 (PEFT's autocast)
  opt = torch.optim.AdamW(trainable, lr=LR, weight_decay=WEIGHT_DECAY)
  input_ids = torch.from_numpy(ids).long().to(device)
  mask = torch.ones_like(input_ids)
  load_s = time.perf_counter() - t0
  rss_after_load = reset_peak_rss()

  def run_step():
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bool(args.device_model)):
      loss = model(input_ids=input_ids, attention_mask=mask, labels=input_ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()

  times, first_loss = time_steps(run_step, args.warmup, args.steps)
  out = dict(load_s=load_s, compile_s=0.0, step_times=times, first_loss=first_loss,
             torch_matmul_flops=torch_matmul_flops(args.peak_size, mm_dtype, device),
             backend=device, trainable=int(sum(p.numel() for p in trainable)),
             attn_implementation=model.config._attn_implementation,
             torch_threads=torch.get_num_threads(), **memory_report(rss_after_load))
  if device == 'cuda':
    out['device_peak_mib'] = torch.cuda.max_memory_allocated() / 2**20
  return out


def peak_worker(args) -> dict:
  """Matmul throughput of one jitted n x n x n ``jnp.dot`` (float32 on CPU, bf16 otherwise);
  on CPU also bf16 ``jnp.dot`` against ``torch.mm`` (recorded, not targeted: PyTorch's oneDNN
  uses AMX where the CPU has it)."""
  import jax
  import jax.numpy as jnp
  n = args.peak_size
  cpu = jax.default_backend() == 'cpu'

  def jax_flops(dtype):
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    dot = jax.jit(jnp.dot)
    return matmul_flops(lambda: dot(a, b).block_until_ready(), n)

  dtype = jnp.float32 if cpu else jnp.bfloat16
  out = {'peak_flops': jax_flops(dtype), 'n': n, 'dtype': jnp.dtype(dtype).name}
  if cpu:
    import torch
    torch.set_num_threads(args.threads)
    out['bf16_flops'] = {'jax': jax_flops(jnp.bfloat16),
                         'torch': torch_matmul_flops(n, torch.bfloat16)}
  return out


# ----------------------------------------------------------------------------- driver

def spawn(args, worker: str, config: str | None = None, batch_file: str | None = None) -> dict:
  cmd = [sys.executable, __file__, *sys.argv[1:], '--worker', worker]
  cmd += ['--config', config] if config else []
  cmd += ['--batch-file', batch_file] if batch_file else []
  proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, 'TQDM_DISABLE': '1'})
  lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT)]
  if proc.returncode or not lines:
    raise RuntimeError(f'{worker} worker ({config}) failed with exit code {proc.returncode}')
  return json.loads(lines[-1][len(RESULT):])


def summarize(rows: list[dict], peak: float) -> list[dict]:
  torch_time = {r['config']: r['s_per_step'] for r in rows if r['framework'] == 'torch'}
  for r in rows:
    r['tokens_per_s'] = r['tokens'] / r['s_per_step']
    r['model_flops_per_s'] = r['model_flops'] / r['s_per_step']
    r['model_frac_peak'] = r['model_flops_per_s'] / peak
    if 'xla_flops' in r:
      r['xla_flops_per_s'] = r['xla_flops'] / r['s_per_step']
      r['xla_frac_peak'] = r['xla_flops_per_s'] / peak
    if r['config'] in torch_time:
      r['time_vs_torch'] = r['s_per_step'] / torch_time[r['config']]
  lora = {r['config']: r for r in rows if r['framework'] == 'jax'}
  for r in rows:
    if r['framework'] == 'qlora' and r['config'] in lora:   # the same step on an NF4 base
      r['time_vs_lora'] = r['s_per_step'] / lora[r['config']]['s_per_step']
      r['base_smaller'] = lora[r['config']]['base_mib'] / r['base_mib']
  return rows


def format_table(rows: list[dict]) -> str:
  head = ('| config | framework | trainable | compile s | s/step (median) | tokens/s | '
          'peak RSS MiB (process / train step) | time vs torch | first loss | XLA GFLOP/step | '
          'XLA GFLOP/s (% peak) | model GFLOP/s (% peak) |')
  lines = [head, '|' + '---|' * head.count(' | ') + '---|']
  for r in rows:
    xla = ('-', '-')
    if 'xla_flops' in r:
      mark = '*' if r['xla_loops'] else ''
      xla = (f"{r['xla_flops'] / 1e9:.1f}{mark}",
             f"{r['xla_flops_per_s'] / 1e9:.1f} ({100 * r['xla_frac_peak']:.0f}%){mark}")
    ratio = f"{r['time_vs_torch']:.2f}" if 'time_vs_torch' in r else '-'
    mem = f"{r['process_peak_rss_mib']:.0f} / {r['train_peak_rss_mib'] - r['rss_after_load_mib']:.0f}"
    if 'device_peak_mib' in r:
      mem += f" (device {r['device_peak_mib']:.0f})"
    lines.append(
        f"| {r['config']} | {r['framework']} | {r['trainable']:,} | "
        f"{r['compile_s']:.1f} | {r['s_per_step']:.3f} | {r['tokens_per_s']:.0f} | {mem} | "
        f"{ratio} | {r['first_loss']:.4f} | {xla[0]} | {xla[1]} | "
        f"{r['model_flops_per_s'] / 1e9:.1f} ({100 * r['model_frac_peak']:.0f}%) |")
  qlora = [r for r in rows if 'time_vs_lora' in r]
  if qlora:
    lines += ['', '| config | base MiB LoRA / QLoRA (NF4+DQ) | base smaller | QLoRA s/step vs LoRA |'
              ' compiled step arguments MiB LoRA / QLoRA | temporaries MiB LoRA / QLoRA |'
              ' peak RSS MiB LoRA / QLoRA |', '|---|---|---|---|---|---|---|']
    for r in qlora:
      l = next(x for x in rows if x['framework'] == 'jax' and x['config'] == r['config'])
      lines.append(f"| {r['config']} | {l['base_mib']:.0f} / {r['base_mib']:.0f} | "
                   f"{r['base_smaller']:.2f}x | {r['time_vs_lora']:.2f} | "
                   f"{l['xla_args_mib']:.0f} / {r['xla_args_mib']:.0f} | "
                   f"{l['xla_temp_mib']:.0f} / {r['xla_temp_mib']:.0f} | "
                   f"{l['process_peak_rss_mib']:.0f} / {r['process_peak_rss_mib']:.0f} |")
  if any(r.get('xla_loops') for r in rows):
    lines.append('\n\\* XLA counts a loop body once (scanned layers, several loss chunks): a lower bound.')
  return '\n'.join(lines)


def main():
  args = parse_args()
  if args.worker:
    if args.worker == 'peak':
      result = peak_worker(args)
    else:
      ids = np.load(args.batch_file)
      result = (jax_worker if args.worker in ('jax', 'qlora') else torch_worker)(args, ids)
    print(RESULT + json.dumps({**result, 'loadavg': os.getloadavg()}), flush=True)
    return
  configs, frameworks = args.configs.split(','), args.frameworks.split(',')
  hf = model_hf_config(args)
  ids = make_batch(args, hf['vocab_size'])
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    batch_file = os.path.join(tmp, 'ids.npy')
    np.save(batch_file, ids)
    for config in configs:
      rank, _, names = CONFIGS[config]
      for framework in frameworks:
        print(f'running {framework} {config} ...', file=sys.stderr, flush=True)
        r = spawn(args, framework, config, batch_file)
        r.update(config=config, framework=framework, tokens=ids.size,
                 s_per_step=statistics.median(r['step_times']),
                 model_flops=model_flops(hf, rank, names, ids.size, args.seq))
        rows.append(r)
  peak = spawn(args, 'peak')
  rows = summarize(rows, peak['peak_flops'])
  print(format_table(rows))
  torch_mm = [r['torch_matmul_flops'] for r in rows if 'torch_matmul_flops' in r]
  print(f"matmul peak ({peak['n']}^3 {peak['dtype']}): jnp.dot {peak['peak_flops'] / 1e9:.1f} GFLOP/s"
        + (f", torch {statistics.median(torch_mm) / 1e9:.1f} GFLOP/s" if torch_mm else '')
        + f"; nproc {os.cpu_count()}, load average {os.getloadavg()}")
  if 'bf16_flops' in peak:
    print('bfloat16 matmul: ' + ', '.join(f'{k} {v / 1e9:.1f} GFLOP/s'
                                          for k, v in peak['bf16_flops'].items()))
  if args.json:
    import run
    machine = dict(cpu=run.machine(), nproc=os.cpu_count(), loadavg=os.getloadavg(),
                   uname=' '.join(os.uname()))
    pathlib.Path(args.json).write_text(json.dumps(
        dict(args=vars(args), machine=machine, peak=peak, rows=rows), indent=1))


if __name__ == '__main__':
  main()
