"""The DPO task: its loss equals TRL's ``DPOTrainer._compute_loss`` on the same model and pairs
(HF PEFT LoRA, reference = adapter disabled), the cached reference equals the in-step one, and
configs/dpo.py trains (reward accuracy and margin rise), resumes after a SIGKILL and exports."""
import collections
import json
import pathlib
import shutil
import sys
import types

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.utils import add_fused_lm_head

from peftjax import methods, sharding
from peftjax.methods import hf_format
from peftjax.models import auto
from peftjax.train import loop, tasks

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # --import-mode=importlib: not on sys.path
from test_loop import (NEGATIVE, PAIRS, POSITIVE, ROOT, _configs_importable, _metrics,  # noqa: E402,F401
                       _tokenizer, kill_after_checkpoint_then_resume)


def _dpo_config(workdir_model, data_file, **dpo):
  from configs import dpo as dpo_config
  c = dpo_config.get_config('method=lora,runlocal')
  c.model.source, c.data.source = str(workdir_model), str(data_file)
  c.data.update(max_length=16, batch_size=8, eval_batch_size=8, validation_fraction=0.25,
                max_train_examples=0, max_eval_examples=0)
  c.optim.learning_rate = 1e-2
  c.train.update(steps=10, log_every=1, eval_every=5, checkpoint_every=10)
  c.dpo.update(dpo)
  return c


@pytest.fixture(scope='module')
def tiny_pairs(hf_model, tmp_path_factory):
  """A tiny untied llama with a chat-template tokenizer, and preference pairs (jsonl) whose
  chosen replies are the positive phrases and rejected ones the negative phrases."""
  root = tmp_path_factory.mktemp('tiny_dpo')
  shutil.copytree(hf_model('llama_gqa', 'causal_lm').dir, root / 'llama')
  _tokenizer().save_pretrained(root / 'llama')
  rows = [json.dumps({'prompt': p, 'chosen': POSITIVE[i % 6], 'rejected': NEGATIVE[(i + 1) % 6]})
          for i, (p, _) in enumerate(PAIRS * 8)]
  (root / 'pairs.jsonl').write_text('\n'.join(rows) + '\n')
  return root / 'llama', root / 'pairs.jsonl'


def _batch(vocab, seed=0, b=3, t=10):
  """Right-padded pairs: prompt tokens, then completion tokens (``loss_mask``), then padding."""
  rng = np.random.default_rng(seed)
  batch = {'example_mask': np.ones(b, np.int32)}
  for k, (prompts, ends) in (('chosen', ((3, 2, 4), (10, 6, 7))),
                             ('rejected', ((3, 2, 4), (8, 9, 5)))):
    ids = rng.integers(3, vocab, (b, t)).astype(np.int32)
    pos = np.arange(t)
    attention = (pos < np.array(ends)[:, None]).astype(np.int32)
    batch[f'{k}_input_ids'] = ids * attention
    batch[f'{k}_attention_mask'] = attention
    batch[f'{k}_loss_mask'] = (attention * (pos >= np.array(prompts)[:, None])).astype(np.int32)
  batch['rejected_input_ids'][:, :4] = batch['chosen_input_ids'][:, :4]   # a shared prompt
  return batch


def _trl_loss(peft_model, batch, loss_type, beta):
  """TRL's own DPO loss (``_compute_loss``, unbound) on a stand-in trainer around a HF PEFT
  model: TRL runs the reference as that model with its adapters disabled."""
  add_fused_lm_head(peft_model.get_base_model(),
                    outputs=('log_probs', 'entropy', 'mean_logits', 'is_top1'))
  cat = lambda k: torch.as_tensor(np.concatenate([batch[f'chosen_{k}'],
                                                  batch[f'rejected_{k}']])).long()
  inputs = {'input_ids': cat('input_ids'), 'attention_mask': cat('attention_mask'),
            'completion_mask': cat('loss_mask')}
  trainer = types.SimpleNamespace(
      model=peft_model, ref_model=None, aux_loss_enabled=False, ld_alpha=None,
      args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
      accelerator=types.SimpleNamespace(device='cpu', gather=lambda x: x,
                                        gather_for_metrics=lambda x: x, unwrap_model=lambda m: m,
                                        autocast=__import__('contextlib').nullcontext),
      precompute_ref_logps=False, f_divergence_type='reverse_kl', loss_types=[loss_type],
      loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
      _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
      _total_train_tokens=0, _tp_size=1)
  with torch.no_grad():
    loss = DPOTrainer._compute_loss(trainer, peft_model, inputs, False)
  return float(loss), {k: v[0] for k, v in trainer._metrics['eval'].items()}


@pytest.mark.parametrize('loss_type, beta', [('sigmoid', 0.1), ('ipo', 0.5), ('hinge', 1.0)])
def test_task_loss_equals_trl_on_the_same_peft_model(hf_model, tmp_path, loss_type, beta):
  hf = hf_model('llama_gqa', 'causal_lm')
  pre = auto.load_pretrained(hf.dir)
  lora = methods.get('lora', rank=4, alpha=8.0, model_type='llama',
                     target='.*/(q_proj|v_proj|o_proj|down_proj)')
  adapter = lora.init(jax.random.key(0), pre.params)
  leaves, treedef = jax.tree.flatten(adapter)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  adapter = jax.tree.unflatten(treedef, [x + 0.3 * jax.random.normal(k, x.shape)
                                         for x, k in zip(leaves, keys)])
  hf_format.save_adapter(tmp_path, lora, adapter, pre.config, task='causal_lm')
  peft_model = peft.PeftModel.from_pretrained(
      type(hf.torch_model).from_pretrained(hf.dir), tmp_path).eval()
  batch = _batch(pre.config.vocab_size)
  want, want_metrics = _trl_loss(peft_model, batch, loss_type, beta)

  config = types.SimpleNamespace(dpo=types.SimpleNamespace(
      beta=beta, loss_type=loss_type, label_smoothing=0.0, dropout=False))
  loss_fn = tasks.get('dpo').loss_fn(lora.apply(pre.module.apply), pre, config)
  loss, sums = jax.jit(loss_fn)(adapter, pre.params, jax.tree.map(jnp.asarray, batch), None)
  metrics = tasks.get('dpo').summarize(sums)
  # Measured: |diff| <= 2e-6 (loss) over float32 forwards in two frameworks.
  assert float(loss) == pytest.approx(want, rel=2e-5, abs=1e-6)
  assert metrics['loss'] == pytest.approx(want, rel=2e-5, abs=1e-6)
  for name in ('rewards/chosen', 'rewards/rejected', 'rewards/accuracies', 'rewards/margins',
               'logps/chosen', 'logps/rejected'):
    assert metrics[name] == pytest.approx(want_metrics[name], rel=2e-5, abs=2e-6), name
  assert abs(metrics['rewards/margins']) > 1e-3   # the adapter changed the policy


def test_cached_reference_equals_the_in_step_reference(hf_model):
  """``precompute_ref_log_probs``: the reference log-probs added as columns once give the same
  loss and metrics as the reference forward inside the step."""
  pre = auto.load_pretrained(hf_model('llama_gqa', 'causal_lm').dir)
  batch = _batch(pre.config.vocab_size, seed=3)
  rows = datasets.Dataset.from_dict({k: [list(map(int, r)) for r in v] for k, v in batch.items()
                                     if k != 'example_mask'})
  config = types.SimpleNamespace(
      dpo=types.SimpleNamespace(beta=0.1, loss_type='sigmoid', label_smoothing=0.0,
                                dropout=False, precompute_ref_log_probs=True),
      data=types.SimpleNamespace(eval_batch_size=8, max_length=10))
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  (cached,) = tasks.get('dpo').prepare(config, pre, pre.params, (rows,), mesh)
  assert cached.column_names[-2:] == ['ref_chosen_logps', 'ref_rejected_logps']
  lora = methods.get('lora', rank=2, model_type='llama')
  adapter = lora.init(jax.random.key(0), pre.params)
  loss_fn = jax.jit(tasks.get('dpo').loss_fn(lora.apply(pre.module.apply), pre, config))
  with_cache = {**batch, 'ref_chosen_logps': np.array(cached['ref_chosen_logps'][:], np.float32),
                'ref_rejected_logps': np.array(cached['ref_rejected_logps'][:], np.float32)}
  # LoRA B = 0: policy == reference, so the loss is log 2 either way
  assert float(loss_fn(adapter, pre.params, with_cache, None)[0]) == pytest.approx(np.log(2),
                                                                                   rel=1e-5)
  # a policy away from the reference (rewards apart, so `accuracies` does not hinge on a tie
  # broken by float32 rounding between the two compiled reference forwards)
  adapter = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape),
                         adapter)
  a_loss, a = loss_fn(adapter, pre.params, with_cache, None)
  b_loss, b = loss_fn(adapter, pre.params, batch, None)
  assert float(a_loss) == pytest.approx(float(b_loss), rel=1e-6)
  assert abs(float(b['rewards/margins'])) > 1e-3
  for k in b:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_runlocal_dpo_rewards_rise_and_reference_stays_frozen(tiny_pairs, tmp_path):
  final = loop.run(_dpo_config(*tiny_pairs), tmp_path)
  rows = _metrics(tmp_path)
  train = [l for l in rows if l['split'] == 'train']
  evals = [l for l in rows if l['split'] == 'eval']
  assert [l['step'] for l in evals] == [5, 10]
  # Step 1's metrics come before its update: policy == reference, so rewards are exactly 0.
  assert abs(train[0]['rewards/margins']) < 1e-6
  assert train[0]['loss'] == pytest.approx(np.log(2), rel=1e-6)
  # Measured (tiny llama, lr 1e-2): eval margins 0.069 -> 0.133, accuracies 0.8 -> 0.9; train
  # margins 0 -> 0.14 (step 10), accuracies 1.0 from step 4 on.
  assert evals[-1]['rewards/margins'] > evals[0]['rewards/margins'] > 0
  assert evals[-1]['rewards/accuracies'] >= evals[0]['rewards/accuracies']
  assert final['rewards/accuracies'] > 0.5 and final['loss'] < np.log(2)
  assert train[-1]['rewards/margins'] > train[1]['rewards/margins']
  # The reference is the base: its log-probs do not move while the policy's do.
  assert evals[0]['logps/ref_chosen'] == pytest.approx(evals[-1]['logps/ref_chosen'], rel=1e-6)
  assert evals[0]['logps/chosen'] != evals[-1]['logps/chosen']
  config = json.loads((tmp_path / 'adapter' / 'adapter_config.json').read_text())
  assert config['task_type'] == 'CAUSAL_LM' and config['peft_type'] == 'LORA'


def test_launch_resumes_dpo_after_sigkill_and_exports(tiny_pairs, tmp_path):
  """launch.py with the cached reference (recomputed on restart): killed after checkpoint 2, it
  resumes, logs no step twice and exports the adapter."""
  workdir = tmp_path / 'killed'
  cmd = [sys.executable, str(ROOT / 'launch.py'),
         f'--config={ROOT}/configs/dpo.py:method=lora,runlocal', f'--workdir={workdir}',
         f'--config.model.source={tiny_pairs[0]}', f'--config.data.source={tiny_pairs[1]}',
         '--config.data.max_length=16', '--config.data.batch_size=8',
         '--config.data.eval_batch_size=8', '--config.data.validation_fraction=0.25',
         '--config.train.steps=6', '--config.train.checkpoint_every=2',
         '--config.train.eval_every=3', '--config.train.log_every=1',
         '--config.dpo.precompute_ref_log_probs=True']
  kill_after_checkpoint_then_resume(cmd, workdir, step=2)
  steps = [(l['step'], l['split']) for l in _metrics(workdir)]
  assert steps == [(1, 'train'), (2, 'train'), (3, 'train'), (3, 'eval'), (4, 'train'),
                   (5, 'train'), (6, 'train'), (6, 'eval')]
  assert (workdir / 'adapter' / 'adapter_model.safetensors').exists()
