"""Length-scaling benchmark: one LoRA q,v train step of SmolLM2-135M-Instruct (real weights),
batch 1, against the sequence length T, peftjax per remat policy against transformers + PEFT
(SDPA) with and without gradient checkpointing.

Every (row, T) runs in its own subprocess: ``bench_train_step.py``'s workers (the library's real
train step and the PyTorch loop), so each peak RSS is the process's own. Reported: s/step,
peak RSS (process, and what the step adds after loading), the ratio to PyTorch without
checkpointing at the same T, and per row the longest T measured within ``--limit-gib`` (plus a
linear or quadratic extrapolation of the step's memory when the grid stops below it). A row is
skipped from the T where its memory, extrapolated from the previous ones, would pass the limit.

  .venv/bin/python experiments/bench_length.py                            # T = 512 .. 8192
  nice -n 10 .venv/bin/python experiments/bench_length.py --lengths 512,1024,2048,4096 \\
      --steps 1 --warmup 1 --json docs/bench_length.json --plot docs/bench_length.png
"""
import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
TRAIN_STEP = HERE / 'bench_train_step.py'
RESULT = 'RESULT '
# row name -> (framework, extra bench_train_step.py arguments)
ROWS = {
    'torch SDPA': ('torch', []),
    'peftjax flash remat=none': ('jax', ['--attention-impl', 'flash', '--remat', 'none']),
    'torch SDPA + grad ckpt': ('torch', ['--grad-ckpt']),
    'peftjax flash remat=full': ('jax', ['--attention-impl', 'flash', '--remat', 'full']),
    'peftjax xla (T x T) remat=none': ('jax', ['--attention-impl', 'xla', '--remat', 'none']),
    'peftjax flash remat=dots': ('jax', ['--attention-impl', 'flash', '--remat', 'dots']),
}
BASELINE = 'torch SDPA'


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--lengths', default='512,1024,2048,4096,8192')
  p.add_argument('--rows', default=','.join(ROWS), help='comma list of the row names')
  p.add_argument('--steps', type=int, default=3, help='timed steps (median)')
  p.add_argument('--warmup', type=int, default=1)
  p.add_argument('--limit-gib', type=float, default=16.0, help='the memory budget')
  p.add_argument('--json', help='write the raw results here')
  p.add_argument('--plot', help='write a plot of s/step and peak RSS against T here (.png)')
  p.add_argument('--report', help='no runs: the table and plot of a --json file (partial ones too)')
  p.add_argument('--xla-memory', action='store_true',
                 help="no runs: compile each peftjax row's gradient from shapes alone and print "
                      "XLA's planned memory (load-independent, cheap at any T)")
  p.add_argument('--resume', action='store_true',
                 help='keep the runs already in the --json file and do only the missing ones')
  return p.parse_args()


def run_worker(framework: str, extra: list, seq: int, args, batch_file: str) -> dict:
  cmd = [sys.executable, str(TRAIN_STEP), '--batch', '1', '--seq', str(seq), '--configs', 'qv',
         '--scan-layers', '--steps', str(args.steps), '--warmup', str(args.warmup), *extra,
         '--worker', framework, '--config', 'qv', '--batch-file', batch_file]
  proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True,
                        env={**os.environ, 'TQDM_DISABLE': '1'})
  lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT)]
  if proc.returncode or not lines:
    return {'error': f'exit code {proc.returncode}'}
  r = json.loads(lines[-1][len(RESULT):])
  r['s_per_step'] = statistics.median(r['step_times'])
  r['step_rss_mib'] = r['train_peak_rss_mib'] - r['rss_after_load_mib']
  return r


def longest_within(points: list[tuple[int, dict]], limit_mib: float) -> str:
  """The longest measured T within the limit; beyond the grid, an extrapolation of the step's
  memory (a power law through the last two points, exponent clipped to [1, 2]) marked '~'."""
  ok = [(t, r) for t, r in points if 'error' not in r and r['process_peak_rss_mib'] <= limit_mib]
  if not ok:
    return '-'
  t, r = ok[-1]
  done = [(t, r) for t, r in points if 'error' not in r]
  if done[-1][0] != t:
    return f'{t:,}'   # the limit was passed inside the grid (or a run failed)
  if len(done) < 2:
    return f'>= {t:,} (one T measured)'
  k, (t1, r1) = growth(done), done[-1]
  base = r1['rss_after_load_mib']
  est = t1 * ((limit_mib - base) / max(r1['step_rss_mib'], 1)) ** (1 / k)
  return f'~{int(est):,} (memory ~ T^{k:.1f})'


def growth(points: list[tuple[int, dict]]) -> float:
  """The exponent k of the step's memory ~ T^k between the last two points, clipped to [1, 2]
  (1 with a single point)."""
  if len(points) < 2:
    return 1.0
  (t0, r0), (t1, r1) = points[-2:]
  return float(np.clip(np.log(max(r1['step_rss_mib'], 1) / max(r0['step_rss_mib'], 1)) /
                       np.log(t1 / t0), 1.0, 2.0))


def predicted_mib(by_t: dict, t: int) -> float:
  """The process peak at ``t`` extrapolated from the measured points (0 without any)."""
  done = sorted((s, r) for s, r in by_t.items() if 'step_rss_mib' in r and s < t)
  if not done:
    return 0.0
  s, r = done[-1]
  return r['rss_after_load_mib'] + r['step_rss_mib'] * (t / s) ** growth(done)


def format_table(results: dict, lengths: list[int], limit_gib: float) -> str:
  head = '| row | ' + ' | '.join(f'T={t:,}' for t in lengths) + f' | longest T in {limit_gib:g} GiB |'
  lines = [head, '|' + '---|' * (len(lengths) + 2)]
  for name, by_t in results.items():
    cells = []
    for t in lengths:
      r = by_t.get(t)
      if r is None or 'skipped' in r:
        cells.append('skipped (memory)' if r else '-')
      elif 'error' in r:
        cells.append(r['error'])
      else:
        base = results.get(BASELINE, {}).get(t, {})
        ratio = (f" ({base['s_per_step'] / r['s_per_step']:.2f}x)"
                 if 's_per_step' in base and name != BASELINE else '')
        cells.append(f"{r['s_per_step']:.2f} s{ratio}, {r['process_peak_rss_mib'] / 1024:.2f} GiB")
    points = sorted((t, r) for t, r in by_t.items() if 'skipped' not in r)
    lines.append(f'| {name} | ' + ' | '.join(cells) +
                 f' | {longest_within(points, limit_gib * 1024)} |')
  lines.append('\ncells: s/step (speed relative to torch SDPA at the same T, >1 = faster), '
               'peak RSS of the process')
  return '\n'.join(lines)


def plot(results: dict, path: str, title: str):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
  for name, by_t in results.items():
    pts = sorted((t, r) for t, r in by_t.items() if 's_per_step' in r)
    if not pts:
      continue
    ts = [t for t, _ in pts]
    style = '-o' if name.startswith('peftjax') else '--s'
    ax_t.plot(ts, [r['s_per_step'] for _, r in pts], style, label=name)
    ax_m.plot(ts, [r['process_peak_rss_mib'] / 1024 for _, r in pts], style, label=name)
  for ax, label in ((ax_t, 's / step'), (ax_m, 'peak RSS (GiB)')):
    ax.set_xscale('log', base=2)
    ax.set_yscale('log')
    ax.set_xlabel('sequence length T (batch 1)')
    ax.set_ylabel(label)
    ax.grid(True, which='both', alpha=0.3)
  ax_m.legend(fontsize=7)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def xla_memory(rows: list[str], lengths: list[int], bts) -> str:
  """A table of ``compiled.memory_analysis()`` (temporaries; arguments and outputs are the
  weights, the same at every T) of the adapter gradient of the benchmark's loss, per peftjax
  row and T, compiled from abstract shapes: nothing runs and no weights load."""
  import argparse as ap
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from peftjax import methods
  from peftjax.methods import targets
  from peftjax.models import registry
  hf = bts.model_hf_config(ap.Namespace(device_model=None))
  rank, alpha, names = bts.CONFIGS['qv']
  method = methods.get('lora', rank=rank, alpha=alpha, target=targets.suffix_regex(names))
  lines = ['| row | ' + ' | '.join(f'T={t:,}' for t in lengths) + ' |',
           '|' + '---|' * (len(lengths) + 1)]
  for name in rows:
    framework, extra = ROWS[name]
    if framework != 'jax':
      continue
    opts = dict(zip(extra[::2], extra[1::2]))
    config = registry.config_from_hf(hf, scan_layers=True, remat=opts['--remat'],
                                     attention_impl=opts['--attention-impl'])
    module = registry.build(config, 'causal_lm')
    base = jax.eval_shape(lambda: nn.unbox(
        module.init(jax.random.key(0), jnp.ones((1, 2), jnp.int32))['params']))
    adapter = jax.eval_shape(method.init, jax.random.key(1), base)
    loss = bts.make_loss_fn(method.apply(module.apply), config, 512)
    grad = jax.jit(jax.grad(lambda a, b, batch: loss(a, b, batch, jax.random.key(2))[0]))
    cells = []
    for t in lengths:
      ids = jax.ShapeDtypeStruct((1, t), jnp.int32)
      mem = grad.lower(adapter, base, {'input_ids': ids, 'attention_mask': ids}).compile()
      cells.append(f'{mem.memory_analysis().temp_size_in_bytes / 2**30:.2f}')
      print(f'{name} T={t}: {cells[-1]} GiB', file=sys.stderr, flush=True)
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n\ncells: GiB of XLA temporaries of the adapter gradient'


def report(results: dict, lengths: list[int], machine: str, args):
  print(format_table(results, lengths, args.limit_gib))
  print(f'\n{machine}; first losses: ' + ', '.join(
      f"{name} {r['first_loss']:.4f}" for name, by_t in results.items()
      for t, r in list(by_t.items())[:1] if 'first_loss' in r))
  if args.plot:
    plot(results, args.plot, f'SmolLM2-135M LoRA q,v train step, batch 1 ({machine})')


def main():
  args = parse_args()
  lengths = [int(t) for t in args.lengths.split(',')]
  rows = args.rows.split(',')
  if args.report:
    saved = json.loads(pathlib.Path(args.report).read_text())
    results = {n: {int(t): r for t, r in by_t.items()} for n, by_t in saved['results'].items()}
    return report(results, lengths, saved['machine'], args)
  sys.path.insert(0, str(HERE))
  import bench_train_step as bts
  import run
  if args.xla_memory:
    return print(xla_memory(rows, lengths, bts))
  vocab = bts.model_hf_config(argparse.Namespace(device_model=None))['vocab_size']
  limit_mib = args.limit_gib * 1024
  results = {name: {} for name in rows}
  cpu = run.machine()
  load = [os.getloadavg()]
  if args.resume and args.json and os.path.exists(args.json):
    saved = json.loads(pathlib.Path(args.json).read_text())
    load = saved['loadavg'] + load
    for name, by_t in saved['results'].items():
      results.setdefault(name, {}).update({int(t): r for t, r in by_t.items()})
  with tempfile.TemporaryDirectory() as tmp:
    for t in lengths:
      ids = bts.make_batch(argparse.Namespace(batch=1, seq=t, data='random'), vocab)
      batch_file = os.path.join(tmp, f'ids_{t}.npy')
      np.save(batch_file, ids)
      for name in rows:
        framework, extra = ROWS[name]
        if t in results[name]:
          continue
        if any('skipped' in r for r in results[name].values()) or (
            predicted_mib(results[name], t) > limit_mib):
          results[name][t] = {'skipped': True}
          continue
        print(f'T={t} {name} ...', file=sys.stderr, flush=True)
        results[name][t] = run_worker(framework, extra, t, args, batch_file)
        load.append(os.getloadavg())
        machine = (f'{cpu}, {os.cpu_count()} cores, '
                   f'load average up to {max(l[0] for l in load):.1f}')
        if args.json:   # after every run, so a partial grid can be reported (--report)
          pathlib.Path(args.json).write_text(json.dumps(
              dict(args=vars(args), machine=machine, loadavg=load,
                   results={n: {str(t): r for t, r in by_t.items()}
                            for n, by_t in results.items()}), indent=1))
  report(results, lengths, machine, args)


if __name__ == '__main__':
  main()
