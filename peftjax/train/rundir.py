"""A run directory: one workdir per run, locked, its config pinned, its checkpoints verified.

``RunDir(workdir)`` checks that the workdir is (or can become) a writable directory; then

- ``lock()`` takes an exclusive lock (``workdir/lock``, ``flock``; it names the holder's pid
  and host). A second run on the same workdir fails at once naming them; a lock left by a
  process that is gone is taken over with a message.
- ``pin_config(config)`` writes the resolved config to ``workdir/config.json``. When a run
  resumes from a checkpoint it refuses a config that differs from the pinned one, naming the
  keys, except for the keys in ``MAY_CHANGE`` (``train.steps`` only upwards, and never below
  the newest checkpoint).
- ``checkpointer(...)``: verified checkpoints in ``workdir/checkpoints``
  (:mod:`peftjax.train.checkpoint`).
- ``metrics(step)``: ``metrics.jsonl`` and TensorBoard events in ``tb/``; rows past the
  restored ``step`` (logged after the last checkpoint by a run that died) are dropped.
- ``export(...)``: ``adapter/`` (HF PEFT format) and optionally ``merged/``.

Only process 0 locks and writes; every process reads and checks.

>>> import ml_collections, tempfile
>>> run = RunDir(tempfile.mkdtemp()).lock()
>>> run.pin_config(ml_collections.ConfigDict({'train': {'steps': 10}}))
>>> run.pin_config(ml_collections.ConfigDict({'train': {'steps': 20}}))   # raising steps is fine
>>> run.release()
"""
from __future__ import annotations

import fcntl
import fnmatch
import json
import os
import pathlib
import socket

import jax
from jax.experimental import multihost_utils
import numpy as np
import safetensors.numpy

from peftjax import quant, tree
from peftjax.methods import hf_format, hf_prompt
from peftjax.models import auto
from peftjax.train import checkpoint as ckpt_lib

# Config keys that may differ from the pinned config when a run resumes (fnmatch patterns).
MAY_CHANGE = ('train.steps', 'train.log_every', 'train.eval_every', 'train.checkpoint_every',
              'train.keep', 'export.*', 'distributed.*')


class RunDirError(RuntimeError):
  """The workdir is in use, or does not match the run (config, checkpoints)."""


def _flat(d, prefix='') -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and v:
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


class RunDir:
  """The workdir of one run; see the module docstring."""

  def __init__(self, path):
    self.path = pathlib.Path(path)
    self.primary = jax.process_index() == 0
    if self.path.exists() and not self.path.is_dir():
      raise NotADirectoryError(f'workdir {self.path} exists and is not a directory')
    self.path.mkdir(parents=True, exist_ok=True)
    if not os.access(self.path, os.W_OK | os.X_OK):
      raise PermissionError(f'workdir {self.path} is not writable')
    self._lock_file = None

  # -- lock ----------------------------------------------------------------------------------
  def lock(self) -> 'RunDir':
    """Takes the workdir's exclusive lock (process 0 only); returns self."""
    if not self.primary:
      return self
    f = open(self.path / 'lock', 'a+')
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or 'unknown'
      f.close()
      raise RunDirError(f'workdir {self.path} is in use by another run ({holder}); wait for it '
                        f'or use another workdir') from None
    f.seek(0)
    previous = f.read().strip()
    if previous:
      print(f'taking over the stale lock of {self.path} ({previous}; that process is gone)')
    f.seek(0)
    f.truncate()
    f.write(f'pid {os.getpid()} on host {socket.gethostname()}\n')
    f.flush()
    self._lock_file = f
    return self

  def release(self):
    """Releases the lock (emptied, so the next run sees a clean release)."""
    if self._lock_file is not None:
      self._lock_file.seek(0)
      self._lock_file.truncate()
      fcntl.flock(self._lock_file, fcntl.LOCK_UN)
      self._lock_file.close()
      self._lock_file = None

  # -- config --------------------------------------------------------------------------------
  def checkpoint_steps(self) -> list[int]:
    """Steps of the saved checkpoints that have a manifest (not yet verified), ascending."""
    d = self.path / 'checkpoints'
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()
                  and (p / ckpt_lib.MANIFEST).is_file()) if d.is_dir() else []

  def pin_config(self, config):
    """Writes ``config`` as ``config.json``; when a checkpoint exists, first refuses changes
    to keys outside ``MAY_CHANGE`` and ``train.steps`` below the pinned value or the newest
    checkpoint."""
    new = json.loads(json.dumps(config.to_dict(), default=str))
    pinned_file = self.path / 'config.json'
    steps = self.checkpoint_steps()
    if steps and new.get('train', {}).get('steps', steps[-1]) < steps[-1]:
      raise RunDirError(f'config.train.steps={new["train"]["steps"]} is below the step of the '
                        f'newest checkpoint ({steps[-1]}) in {self.path / "checkpoints"}; '
                        f'use another workdir to train fewer steps')
    if steps and pinned_file.is_file():
      old, cur = _flat(json.loads(pinned_file.read_text())), _flat(new)
      changed = sorted(k for k in old.keys() | cur.keys() if old.get(k) != cur.get(k))
      refused = [k for k in changed if not any(fnmatch.fnmatch(k, p) for p in MAY_CHANGE)]
      if 'train.steps' in changed and cur.get('train.steps', 0) < old.get('train.steps', 0):
        refused.append('train.steps')
      if refused:
        diff = '; '.join(f'{k}: {old.get(k, "(absent)")!r} -> {cur.get(k, "(absent)")!r}'
                         for k in refused)
        raise RunDirError(
            f'{self.path} holds a run with another config; resuming would mix two runs. '
            f'Differing keys: {diff}. Only these may change on resume: {", ".join(MAY_CHANGE)} '
            f'(train.steps only upwards); use another workdir')
    if self.primary:
      tmp = self.path / 'config.json.tmp'
      tmp.write_text(json.dumps(new, indent=2, sort_keys=True))
      os.replace(tmp, pinned_file)

  # -- checkpoints, metrics ------------------------------------------------------------------
  def checkpointer(self, **kwargs) -> ckpt_lib.Checkpointer:
    return ckpt_lib.Checkpointer(str(self.path / 'checkpoints'), **kwargs)

  def metrics(self, step: int = 0) -> 'MetricWriter':
    """The metric writer of a run (re)starting after ``step``: rows past it are dropped."""
    return MetricWriter(self.path, step, self.primary)

  # -- export --------------------------------------------------------------------------------
  def export(self, config, method, adapter, pre, params):
    """LoRA-family, IA3 and prompt-family adapters in HF PEFT format; other methods as a flat safetensors of
    the adapter tree; ``export.merged`` also writes the merged model as a plain HF checkpoint.

    Every process calls it: arrays sharded across processes are gathered to host memory (a
    collective, ``process_allgather``); only process 0 writes.
    """
    def to_host(tree_):
      return jax.tree.map(lambda x: multihost_utils.process_allgather(x, tiled=True)
                          if isinstance(x, jax.Array) and not x.is_fully_addressable
                          else jax.device_get(x), tree_)

    adapter = to_host(adapter)
    merged = config.export.merged and method.merge is not None
    base_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    params = quant.dequantize_params(to_host(params)) if merged else None   # never re-quantised
    if not self.primary:
      return
    if config.export.adapter and config.peft.method in hf_format.EXPORTABLE:
      hf_format.save_adapter(self.path / 'adapter', method, adapter, pre.config, task=pre.task,
                             base_model_name_or_path=str(config.model.source),
                             base_params=base_shapes)
    elif config.export.adapter and config.peft.method in hf_prompt.METHODS:
      hf_prompt.save_adapter(self.path / 'adapter', method, adapter, pre.config, task=pre.task,
                             base_model_name_or_path=str(config.model.source))
    elif config.export.adapter:
      (self.path / 'adapter').mkdir(exist_ok=True)
      safetensors.numpy.save_file({k: np.asarray(v) for k, v in tree.flatten(adapter).items()},
                                  str(self.path / 'adapter' / 'peftjax_adapter.safetensors'))
    if config.export.merged and method.merge is None:
      print(f'export.merged: {config.peft.method} adds layers and cannot be merged; skipped')
    elif merged:
      auto.save_pretrained(self.path / 'merged', pre.config, method.merge(adapter, params),
                           pre.tokenizer, task=pre.task)


def _row_step(row: str) -> float:
  """The step of a metrics.jsonl row; inf for a row torn by a kill (so it is dropped)."""
  try:
    return json.loads(row)['step']
  except (ValueError, KeyError, TypeError):
    return float('inf')


class MetricWriter:
  """Metrics to ``metrics.jsonl`` and TensorBoard; only process 0 writes. Opened after
  ``step``: rows past it are dropped and TensorBoard purges its events past it."""

  def __init__(self, workdir: pathlib.Path, step: int = 0, enabled: bool = True):
    self.enabled = enabled
    if not self.enabled:
      return
    path = workdir / 'metrics.jsonl'
    if path.is_file():
      rows = path.read_text().splitlines(keepends=True)
      kept = [r for r in rows if _row_step(r) <= step]
      if len(kept) != len(rows):
        print(f'metrics.jsonl: dropped {len(rows) - len(kept)} rows past step {step} '
              f'(logged after the checkpoint this run resumes from)')
        tmp = workdir / 'metrics.jsonl.tmp'
        tmp.write_text(''.join(kept))
        os.replace(tmp, path)
    from tensorboardX import SummaryWriter
    self._jsonl = open(path, 'a')
    self._tb = SummaryWriter(str(workdir / 'tb'), purge_step=step + 1 if step else None)

  def write(self, step: int, split: str, metrics: dict):
    if not self.enabled:
      return
    metrics = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
    self._jsonl.write(json.dumps({'step': step, 'split': split, **metrics}) + '\n')
    self._jsonl.flush()
    for k, v in metrics.items():
      self._tb.add_scalar(f'{split}/{k}', v, step)

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
