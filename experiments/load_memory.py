"""Peak host memory (max RSS) of loading SmolLM2-135M-Instruct in float32 and quantised while
loading (NF4 with double quantisation, int8, ...), each in a fresh process, beside a baseline
process that imports everything and opens the checkpoint index but loads no weights.

  .venv/bin/python experiments/load_memory.py                  # baseline, float32, nf4, int8
  .venv/bin/python experiments/load_memory.py --modes nf4 --source all-minilm-l6-v2 --task base

Peak RSS includes the runtime (JAX, tokenizer) and the pages of the checkpoint file read so far;
the baseline row says how much of it is not weights.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def measure(mode: str, source: str, task: str) -> dict:
  """Runs in the child process: loads ``source`` as ``mode`` and reports its peak RSS."""
  import jax
  from peftjax import quant
  from peftjax.models import auto, checkpoint
  if mode == 'baseline':
    checkpoint.open_checkpoint(source)
    params_bytes = 0
  else:
    pre = auto.load_pretrained(source, task=task, quantize=None if mode == 'float32' else mode)
    jax.block_until_ready(pre.params)
    params_bytes = quant.nbytes(pre.params)
  return dict(mode=mode, peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              params_mib=params_bytes / 2 ** 20)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--modes', default='baseline,float32,nf4,int8')
  ap.add_argument('--source', default='smollm2-135m-instruct')
  ap.add_argument('--task', default='causal_lm')
  ap.add_argument('--child', default=None, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    print(json.dumps(measure(args.child, args.source, args.task)))
    return
  rows = []
  for mode in args.modes.split(','):
    out = subprocess.run([sys.executable, __file__, '--child', mode, '--source', args.source,
                          '--task', args.task], capture_output=True, text=True, check=True)
    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(json.dumps(rows[-1]), flush=True)
  print(f'\n{args.source}: peak RSS of a fresh process loading it\n')
  print('| load | peak RSS (MiB) | params (MiB) |')
  print('|---|---|---|')
  for r in rows:
    print(f'| {r["mode"]} | {r["peak_rss_mib"]:.0f} | {r["params_mib"]:.1f} |')


if __name__ == '__main__':
  main()
