"""The training loop behind ``launch.py``: load, adapt, train sharded, evaluate, checkpoint, export.

>>> from peftjax.train import loop
>>> loop.run(get_config('method=lora,runlocal'), '/tmp/run')     # doctest: +SKIP

A run is resumable: every ``train.checkpoint_every`` steps the adapter, optimizer state, step,
RNG, data position and the method's own state (``PeftMethod.init_state``/``update``) are saved
(orbax, atomic, keep-last-K); starting the same command again continues from the latest
checkpoint and ends with the same adapter as an uninterrupted run.
The workdir is a :class:`peftjax.train.rundir.RunDir`: locked while a run uses it, its config
pinned in ``config.json`` (a resume with other settings is refused), checkpoints verified
against a checksum manifest. Outputs there: ``checkpoints/``, ``metrics.jsonl``, TensorBoard
events in ``tb/``, ``adapter/`` (HF PEFT format) and optionally ``merged/`` (a plain HF model).
"""
from __future__ import annotations

import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import tqdm

from peftjax import data, methods, quant, sharding, tree
from peftjax.models import auto, families
from peftjax.train import optim, rundir, step as step_lib, tasks
from peftjax.train import state as state_lib

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def build_method(peft_config, pretrained) -> methods.PeftMethod:
  """The configured PEFT method (targets default per family); with ``trainable_heads`` the
  classification head joins the trainable set (HF PEFT's ``modules_to_save``: a fresh head must
  be trained)."""
  kwargs = {k: v for k, v in peft_config.items()
            if k not in ('method', 'trainable_heads') and v is not None}
  if peft_config.method in ('prefix', 'ptuning_v2', 'unipelt'):   # per-layer key/value shapes
    kwargs.update(methods.prefix.model_dims(pretrained.config))
  method = methods.get(peft_config.method, model_type=pretrained.config.model_type, **kwargs)
  if peft_config.trainable_heads and peft_config.method != 'full':
    trained = tree.flatten(jax.eval_shape(method.init, jax.random.key(0), pretrained.params))
    heads = [p for p in tree.flatten(pretrained.params)
             if p.split('/')[0] in families.head_modules(pretrained.config, 'classification')
             and p not in trained]   # BitFit already has head biases
    method = methods.compose(method, methods.modules_to_save(heads))
  return method


def quantize_config(model_config) -> quant.QuantConfig | None:
  """The frozen base's quantisation (QLoRA) from ``config.model``: ``quantize`` ('nf4', 'fp4',
  'int4', 'int8'; None or '' for a float base), ``block_size``, ``double_quant`` and
  ``compute_dtype`` (None: ``model.dtype``)."""
  m = model_config
  if not m.get('quantize'):
    return None
  compute = m.get('compute_dtype')
  return quant.QuantConfig(quant.check_type(m.quantize), m.get('block_size', 64),
                           m.get('double_quant', True), DTYPES[compute] if compute else None)


def validate(config):
  """Refuses settings that cannot make a run, before anything loads."""
  t = config.train
  for key in ('steps', 'checkpoint_every', 'log_every', 'eval_every'):
    if not isinstance(t[key], int) or t[key] < 1:
      raise ValueError(f'config.train.{key}={t[key]!r} must be an integer >= 1')
  max_length = config.data.get('max_length')
  if max_length is not None and max_length < 1:
    raise ValueError(f'config.data.max_length={max_length} must be >= 1')


def _check_positions(config, pre):
  max_length, positions = config.data.get('max_length'), getattr(
      pre.config, 'max_position_embeddings', None)
  if max_length is not None and positions is not None and max_length > positions:
    raise ValueError(f'config.data.max_length={max_length} exceeds the model\'s '
                     f'{positions} positions (max_position_embeddings of {config.model.source})')


def run(config, workdir) -> dict:
  """Trains as ``config`` says; returns the final evaluation metrics. The workdir is a
  `rundir.RunDir`: locked for the run, its config pinned, its checkpoints verified."""
  validate(config)
  sharding.maybe_initialize_distributed(config.get('distributed') or {})
  run_dir = rundir.RunDir(workdir).lock()
  try:
    return _run(config, run_dir)
  finally:
    run_dir.release()


def _run(config, run_dir: rundir.RunDir) -> dict:
  run_dir.pin_config(config)
  task = tasks.get(config.task)
  m = config.model
  overrides = dict(scan_layers=m.scan_layers, remat=m.remat)
  if task.model_task == 'classification':
    overrides['num_labels'] = m.num_labels
  mesh = sharding.mesh_from_config(config)
  rules = sharding.rules_from_config(config)
  # Every tensor is read straight into its shards; no whole tensor is placed on one device.
  pre = auto.load_pretrained(m.source, task=task.model_task, dtype=DTYPES[m.dtype],
                             shardings=lambda module: sharding.model_shardings(
                                 module, mesh, rules)[1], quantize=quantize_config(m),
                             **overrides)
  _check_positions(config, pre)
  train_ds, eval_ds = task.datasets(config, pre.tokenizer)
  seq_len = task.seq_len(config)
  method = build_method(config.peft, pre)

  shards = mesh.shape['data'] * mesh.shape['fsdp']
  for name in ('batch_size', 'eval_batch_size'):
    if config.data[name] % shards:
      raise ValueError(f'config.data.{name}={config.data[name]} is not divisible by the '
                       f"mesh's data x fsdp = {shards} batch shards ({dict(mesh.shape)})")
  base_axes, base_shardings = sharding.model_shardings(pre.module, mesh, rules)
  params = pre.params
  base_shardings = quant.shardings(params, base_shardings)   # a quantised base's arrays
  pre = dataclasses.replace(pre, params=None)   # one reference to the base params
  if task.prepare is not None:   # e.g. DPO's reference log-probs, computed once and cached
    train_ds, eval_ds = task.prepare(config, pre, params, (train_ds, eval_ds), mesh)
  multipliers = optim.parse_multipliers(config.optim.get('lr_multipliers'))
  optimizer = optim.make_optimizer(
      {**config.optim.to_dict(), 'total_steps': config.train.steps,
       'num_layers': pre.config.num_layers,
       'lr_multipliers': ({'lora_B': config.optim.lora_plus_ratio}
                          if config.optim.lora_plus_ratio else None),
       'path_lr_multipliers': multipliers})
  rng = jax.random.key(config.seed)
  state, state_shardings = state_lib.init_train_state(
      method.init, optimizer, rng, params, base_axes, mesh, rules, init_state=method.init_state)
  optim.check_multipliers(multipliers, state.adapter)

  checkpointer = run_dir.checkpointer(save_every=config.train.checkpoint_every,
                                      keep=config.train.keep)
  restored = checkpointer.restore(state)
  if restored is not None:
    state = restored
    print(f'resumed from step {int(state.step)} ({checkpointer.directory})')

  apply = method.apply(pre.module.apply)
  loss_fn = task.loss_fn(apply, pre, config)
  batch_sharding = sharding.batch_sharding(mesh)
  # Mixed precision: a bfloat16 model computes in bfloat16; adapter master weights stay float32.
  compute_dtype = None if m.dtype == 'float32' else DTYPES[m.dtype]
  train_step = step_lib.make_train_step(loss_fn, optimizer, state_shardings=state_shardings,
                                        base_shardings=base_shardings,
                                        batch_sharding=batch_sharding, compute_dtype=compute_dtype,
                                        regularizer=method.regularizer, update=method.update)
  eval_step = step_lib.make_eval_step(loss_fn, adapter_shardings=state_shardings.adapter,
                                      base_shardings=base_shardings,
                                      batch_sharding=batch_sharding, compute_dtype=compute_dtype)
  d = config.data
  loader = data.Loader(train_ds, global_batch_size=d.batch_size, seq_len=seq_len,
                       seed=config.seed, pad_id=_pad_id(pre.tokenizer))
  position = int(state.data_position)
  loader.state = data.LoaderState(*divmod(position, loader.batches_per_epoch))

  def evaluate():
    eval_loader = data.Loader(eval_ds, global_batch_size=d.eval_batch_size, seq_len=seq_len,
                              shuffle=False, last_batch='pad', num_epochs=1,
                              pad_id=_pad_id(pre.tokenizer))
    sums = None
    for batch in eval_loader:
      sums = tasks.sum_metrics(sums, eval_step(state.adapter, params,
                                               sharding.global_batch(batch, mesh)))
    return task.summarize(sums)

  start = int(state.step)
  writer = run_dir.metrics(start)
  bar = tqdm.tqdm(total=config.train.steps, initial=start, disable=jax.process_index() != 0,
                  desc=f'{config.task}/{config.peft.method}')
  tokens_per_step = d.batch_size * seq_len
  last_time, last_step = time.perf_counter(), start
  first_bad = jnp.int32(0)   # on the device: the first step with a non-finite loss/gradient

  def check_finite():
    if int(first_bad):
      kept = checkpointer.latest_step()
      kept = (f'the last good checkpoint (step {kept}) in {checkpointer.directory} is kept'
              if kept is not None else f'no checkpoint exists in {checkpointer.directory}')
      raise FloatingPointError(f'non-finite loss or gradient norm at step {int(first_bad)}; '
                               f'{kept}; nothing after step {int(first_bad) - 1} was saved')

  try:
    for step in range(start + 1, config.train.steps + 1):
      batch = sharding.global_batch(next(loader), mesh)
      state, metrics = train_step(state, params, batch)
      first_bad = step_lib.first_nonfinite(
          first_bad, {k: metrics[k] for k in ('loss', 'grad_norm')}, step)
      bar.update(1)
      if step % config.train.log_every == 0 or step == config.train.steps:
        check_finite()
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        rate = (step - last_step) * tokens_per_step / (now - last_time)
        last_time, last_step = now, step
        bar.set_postfix(loss=f'{float(metrics["loss"]):.4f}', tok_s=f'{rate:.0f}')
        writer.write(step, 'train', {**(task.summarize(metrics) if task.log_train else {}),
                                     'loss': metrics['loss'], 'grad_norm': metrics['grad_norm'],
                                     **{k: metrics[k] for k in ('regularizer',) if k in metrics},
                                     'tokens_per_s': rate})
      if step % config.train.eval_every == 0 and step != config.train.steps:
        check_finite()
        writer.write(step, 'eval', evaluate())
      if checkpointer.is_save_step(step):
        check_finite()
        checkpointer.save(state, step=step)
    final = evaluate()
    writer.write(config.train.steps, 'eval', final)
    if checkpointer.latest_step() != config.train.steps:
      check_finite()
      checkpointer.save(state, step=config.train.steps, force=True)
    checkpointer.wait()
  finally:
    bar.close()
    writer.close()
  run_dir.export(config, method, state.adapter, pre, params)   # every process: it gathers
  print(f'final eval: {json.dumps(final)}')
  return final


def _pad_id(tokenizer) -> int:
  return tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0

