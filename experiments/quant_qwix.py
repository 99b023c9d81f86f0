"""qwix (Google's JAX quantisation library) against peftjax.quant and bitsandbytes on one real
SmolLM2 kernel: does qwix's NF4 give bitsandbytes' codes, what does its storage cost, how fast
does it quantise. The numbers behind the decision in docs/quantization.md.

  .venv/bin/python experiments/quant_qwix.py [--kernel model/layers_0/mlp/down_proj/kernel]
"""
from __future__ import annotations

import argparse
import json
import time

import bitsandbytes.functional as bnbf
import jax
import numpy as np
import qwix
import torch

from peftjax import quant
from peftjax.models import auto


def _timed(fn, repeats=3):
  fn()
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn()
  return out, (time.perf_counter() - start) / repeats


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--kernel', default='model/layers_0/mlp/down_proj/kernel')
  args = ap.parse_args()
  pre = auto.load_pretrained('smollm2-135m-instruct')
  node = pre.params
  for k in args.kernel.split('/'):
    node = node[k]
  w = np.asarray(node, np.float32).T            # HF (out, in): blocks of 64 along `in`
  packed, state = bnbf.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type='nf4')
  bnb_codes = np.stack([packed.numpy().reshape(-1) >> 4, packed.numpy().reshape(-1) & 15],
                       -1).reshape(w.shape)
  bnb_w = bnbf.dequantize_4bit(packed, state).numpy()

  ours, t_ours = _timed(lambda: quant.quantize_kernel(w.T, 'nf4', 64, double_quant=False))
  ours_codes = np.asarray(quant.formats.unpack4(ours.codes))
  qfn = jax.jit(lambda x: qwix.quantize(x, 'nf4', channelwise_axes=(0,), tiled_axes={1: 64}))
  qw, t_qwix = _timed(lambda: jax.block_until_ready(qfn(w)))
  qwix_w = np.asarray(qwix.dequantize(qw))
  row = dict(
      kernel=args.kernel, shape=list(w.shape),
      qwix_nf4_table_equals_bnb=bool(np.array_equal(
          np.asarray(qwix._src.core.numerics.get_nf4_buckets(), np.float32), quant.formats.NF4)),
      codes_equal_bnb=dict(peftjax=float(np.mean(ours_codes == bnb_codes)),
                           qwix=float(np.mean(np.asarray(qw.qvalue).astype(np.uint8) == bnb_codes))),
      max_abs_diff_vs_bnb_dequantised=dict(
          peftjax=float(np.abs(np.asarray(ours.dequantize()).T - bnb_w).max()),
          qwix=float(np.abs(qwix_w - bnb_w).max())),
      bytes_per_param=dict(
          peftjax_nf4=ours.nbytes / w.size,
          peftjax_nf4_double_quant=quant.quantize_kernel(w.T, 'nf4', 64).nbytes / w.size,
          qwix_nf4=(qw.qvalue.nbytes + qw.scale.nbytes) / w.size,
          qwix_qvalue_dtype=str(qw.qvalue.dtype)),
      quantize_seconds=dict(peftjax_numpy=t_ours, qwix_jit=t_qwix))
  print(json.dumps(row, indent=2))


if __name__ == '__main__':
  main()
