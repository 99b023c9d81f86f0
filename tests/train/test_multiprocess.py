"""A real 2-process run (``jax.distributed`` on localhost, gloo CPU collectives, 4 fake devices
each) trains the tiny sentiment runlocal config on an fsdp mesh spanning both processes and
exports the adapter the 1-process run on 8 devices exports."""
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy
import tokenizers
import transformers
from tokenizers import models, pre_tokenizers, trainers

from peftjax.train import loop

ROOT = pathlib.Path(__file__).parents[2]
POSITIVE = ['good movie', 'i like it', 'great fun', 'so good']
NEGATIVE = ['bad movie', 'i hate it', 'awful stuff', 'so bad']


@pytest.fixture
def tiny_run(hf_model, tmp_path, monkeypatch):
  """The sentiment runlocal config on a tiny random BERT with a word-level tokenizer; fsdp over
  all 8 devices, so that base params, LoRA factors and optimizer state are split across
  processes."""
  monkeypatch.syspath_prepend(str(ROOT))
  from configs import sentiment
  model_dir = tmp_path / 'bert'
  shutil.copytree(hf_model('bert', 'base').dir, model_dir)
  backend = tokenizers.Tokenizer(models.WordLevel(unk_token='[UNK]'))
  backend.pre_tokenizer = pre_tokenizers.Whitespace()
  backend.train_from_iterator(POSITIVE + NEGATIVE,
                              trainers.WordLevelTrainer(special_tokens=['[PAD]', '[UNK]']))
  transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token='[PAD]',
                                       unk_token='[UNK]').save_pretrained(model_dir)
  rows = ['text,label'] + [f'{t},1' for t in POSITIVE] * 4 + [f'{t},0' for t in NEGATIVE] * 4
  (tmp_path / 'data.csv').write_text('\n'.join(rows) + '\n')
  c = sentiment.get_config('method=lora,runlocal')
  c.model.source, c.data.source = str(model_dir), str(tmp_path / 'data.csv')
  c.data.update(max_length=8, batch_size=8, eval_batch_size=8, validation_fraction=0.25,
                max_train_examples=0, max_eval_examples=0)
  c.train.update(steps=3, log_every=1, eval_every=100, checkpoint_every=100)
  c.mesh = dict(data=1, fsdp=-1, tensor=1)
  c.export.merged = True
  return c


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _exported(workdir):
  """(adapter tensors, merged-model tensors) that a run exported."""
  return (safetensors.numpy.load_file(str(workdir / 'adapter' / 'adapter_model.safetensors')),
          safetensors.numpy.load_file(str(workdir / 'merged' / 'model.safetensors')))


def test_two_process_run_exports_the_one_process_adapter(tiny_run, tmp_path):
  loop.run(tiny_run, tmp_path / 'one')
  config_file = tmp_path / 'config.json'
  config_file.write_text(tiny_run.to_json())
  workdir, port = tmp_path / 'two', _free_port()
  env = {**os.environ, 'PYTHONPATH': str(ROOT)}
  procs = [subprocess.Popen([sys.executable, str(ROOT / 'tests' / 'train' / 'loop_process.py'),
                             str(config_file), str(workdir), str(i), '2', str(port), '4'],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  try:
    logs = [p.communicate(timeout=300)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f'process {i}:\n{log[-3000:]}'
  assert 'final eval' in logs[1]          # process 1 trained and evaluated too
  (one, one_merged), (two, two_merged) = _exported(tmp_path / 'one'), _exported(workdir)
  assert sorted(one) == sorted(two) and sorted(one_merged) == sorted(two_merged)
  assert len(one) == 2 * 2 * 2 + 2         # 2 layers x (query, value) x (A, B) + head W, b
  diff = max(float(np.abs(one[k] - two[k]).max()) for k in one)
  merged_diff = max(float(np.abs(one_merged[k] - two_merged[k]).max()) for k in one_merged)
  print(f'max |2-process - 1-process|: adapter {diff:.3g}, merged model {merged_diff:.3g}')
  assert diff <= 1e-6 and merged_diff <= 1e-6, (diff, merged_diff)
  moved = min(float(np.abs(one[k]).max()) for k in one if 'lora_B' in k)
  assert moved > 0             # the runs trained (B starts at zero), so equality is not trivial
