"""Quality of the quantised base: SmolLM2-135M perplexity on a fixed held-out text, and the
reconstruction error of every quantisable kernel of SmolLM2 and MiniLM, in float32, int8, NF4,
FP4 and int4 (block size 64; double quantisation as given).

  .venv/bin/python experiments/perplexity.py                    # the table of docs/quantization.md
  .venv/bin/python experiments/perplexity.py --tokens 2048 --types float32,nf4 --json /tmp/p.json

The text: the chatterbot-english responses (bundled asset) in corpus order, joined by newlines,
tokenised with SmolLM2's tokenizer, the first ``--tokens`` tokens in rows of ``--seq``; the
perplexity is exp(mean next-token NLL) over every predicted token. One float32 load; each
variant quantises the same kernels ``convert.quantized_paths`` names (the layer stack's Dense
kernels) in-process.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import quant, tree
from peftjax.data import sources
from peftjax.models import auto, convert


def heldout_tokens(tokenizer, n: int, seq: int) -> np.ndarray:
  """``[n // seq, seq]`` token ids of the chatterbot responses, in corpus order."""
  text = '\n'.join(pair['response'] for pair in sources.chatterbot_pairs())
  ids = np.asarray(tokenizer(text)['input_ids'], np.int32)
  if ids.size < n:
    raise ValueError(f'the text has {ids.size} tokens, fewer than --tokens {n}')
  return ids[:n - n % seq].reshape(-1, seq)


def perplexity(pre, params, rows: np.ndarray, batch: int) -> float:
  @jax.jit
  def nll(params, ids):
    logits = pre.module.apply({'params': params}, ids).logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).sum()

  total = sum(float(nll(params, rows[i:i + batch])) for i in range(0, len(rows), batch))
  return float(np.exp(total / (rows.shape[0] * (rows.shape[1] - 1))))


def _selected(pre) -> list[str]:
  flat = tree.flatten(pre.params)
  return ['/'.join(p) for p in convert.quantized_paths(pre.config, [tuple(k.split('/'))
                                                                      for k in flat])]


def reconstruction(pre, qtype: str, block_size: int, double_quant: bool,
                   quantized=None) -> dict:
  """RMSE of quantise-then-dequantise over the selected kernels, relative to their RMS, and the
  stored bytes per parameter (absmax included); ``quantized``: params already quantised so."""
  flat = tree.flatten(pre.params)
  done = tree.flatten(quantized) if quantized is not None else {}
  err = ref = n = stored = 0.0
  for path in _selected(pre):
    w = np.asarray(flat[path], np.float32)
    q = done.get(path) or quant.quantize_kernel(w, qtype, block_size, double_quant, name=path)
    err += float(np.sum((np.asarray(q.dequantize()) - w) ** 2))
    ref += float(np.sum(w ** 2))
    n += w.size
    stored += q.nbytes
  return dict(rmse=float(np.sqrt(err / n)), rel_rmse=float(np.sqrt(err / ref)),
              bytes_per_param=stored / n)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--types', default='float32,int8,nf4,fp4,int4')
  ap.add_argument("--tokens", type=int, default=4096)
  ap.add_argument('--seq', type=int, default=512)
  ap.add_argument('--batch', type=int, default=4)
  ap.add_argument('--block-size', type=int, default=64)
  ap.add_argument('--no-double-quant', action='store_true')
  ap.add_argument('--skip-minilm', action='store_true')
  ap.add_argument('--json', default=None)
  args = ap.parse_args()
  dq = not args.no_double_quant
  types = args.types.split(',')

  smol = auto.load_pretrained('smollm2-135m-instruct')
  rows = heldout_tokens(smol.tokenizer, args.tokens, args.seq)
  minilm = None if args.skip_minilm else auto.load_pretrained('all-minilm-l6-v2', task='base')
  results = []
  for t in types:
    start = time.perf_counter()
    params = smol.params
    if t != 'float32':
      params = quant.quantize_params(params, t, args.block_size, dq,
                                     target='|'.join(p.rsplit('/', 1)[0] for p in _selected(smol)))
    row = dict(type=t, perplexity=perplexity(smol, params, rows, args.batch))
    if t != 'float32':
      row.update({f'smollm2_{k}': v for k, v in reconstruction(smol, t, args.block_size,
                                                              dq, params).items()})
      if minilm is not None:
        row.update({f'minilm_{k}': v for k, v in reconstruction(minilm, t, args.block_size,
                                                                dq).items()})
    row['seconds'] = time.perf_counter() - start
    results.append(row)
    print(json.dumps(row), flush=True)

  print(f'\nSmolLM2-135M-Instruct, {rows.size} tokens of chatterbot responses ({rows.shape[0]} x '
        f'{args.seq}), block size {args.block_size}, double quantisation {dq}\n')
  print('| type | perplexity | SmolLM2 rel. RMSE | MiniLM rel. RMSE | bytes/param |')
  print('|---|---|---|---|---|')
  for r in results:
    fmt = lambda k, f='{:.4f}': f.format(r[k]) if k in r else '-'
    print(f'| {r["type"]} | {r["perplexity"]:.3f} | {fmt("smollm2_rel_rmse")} | '
          f'{fmt("minilm_rel_rmse")} | {fmt("smollm2_bytes_per_param", "{:.4f}")} |')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  main()
