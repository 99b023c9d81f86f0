"""Reward models: a scalar head (HF ``*ForSequenceClassification``, ``num_labels=1``) trained by
any PEFT method with the head; exported merged and as base + HF PEFT adapter, transformers (and
``peft.PeftModel``) give the same scores; the task's loss equals TRL's ``compute_loss`` on the
same model and pairs; the configs/reward.py run trains, evaluates, resumes and exports."""
import collections
import json
import pathlib
import shutil
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import peft
import pytest
import tokenizers
import torch
import transformers
from tokenizers import models, pre_tokenizers, trainers
from trl.trainer.reward_trainer import RewardTrainer

from peftjax import data
from peftjax.methods import hf_format
from peftjax.models import auto
from peftjax.train import loop, reward_model, tasks

ROOT = pathlib.Path(__file__).parents[2]
# The checkpoint a reward model starts from: a causal LM (llama, gpt2) or a bare encoder (bert),
# as with TRL, whose head is created fresh.
BASES = {'llama_tied': 'causal_lm', 'llama_gqa': 'causal_lm', 'gpt2': 'causal_lm', 'bert': 'base'}


def perturbed(adapter, seed=1):
  leaves, treedef = jax.tree.flatten(adapter)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape)
                                      for x, k in zip(leaves, keys)])


def make_reward_model(hf_model, name, method='lora'):
  """(HF base dir, Pretrained reward model, method with the head trained, a trained-looking
  adapter)."""
  hf = hf_model(name, BASES[name])
  pre = auto.load_pretrained(hf.dir, task='classification', num_labels=1)
  peft_config = ml_collections.ConfigDict(dict(method=method, trainable_heads=True, rank=4,
                                               alpha=8.0, dropout=0.0))
  method = loop.build_method(peft_config, pre)
  adapter = perturbed(jax.tree.map(jnp.asarray, method.init(jax.random.key(0), pre.params)))
  return hf, pre, method, adapter


def pairs(vocab, pad_id, seed=0, b=3, t=9):
  """Right-padded chosen/rejected ids and masks; the pad id also occurs inside some rows and
  ends one (HF's rule then scores the token before it)."""
  rng = np.random.default_rng(seed)
  out = {}
  for k, lengths in (('chosen', (9, 6, 4)), ('rejected', (7, 9, 5))):
    ids = rng.integers(3, vocab, (b, t)).astype(np.int32)
    mask = (np.arange(t) < np.array(lengths)[:, None]).astype(np.int32)
    ids[0, 2] = ids[1, lengths[1] - 1] = pad_id
    out[f'{k}_input_ids'] = np.where(mask == 1, ids, pad_id).astype(np.int32)
    out[f'{k}_attention_mask'] = mask
  return out


def torch_scores(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=torch.as_tensor(ids).long(),
                 attention_mask=torch.as_tensor(mask).long()).logits[:, 0].numpy()


@pytest.mark.parametrize('name', ['llama_tied', 'llama_gqa', 'gpt2', 'bert'])
def test_exported_reward_model_scores_equal_in_transformers_and_peft(hf_model, name, tmp_path):
  hf, pre, method, adapter = make_reward_model(hf_model, name)
  batch = pairs(pre.config.vocab_size, pre.config.pad_token_id)
  ids = np.concatenate([batch['chosen_input_ids'], batch['rejected_input_ids']])
  mask = np.concatenate([batch['chosen_attention_mask'], batch['rejected_attention_mask']])
  ours = np.asarray(tasks.sequence_rewards(method.apply(pre.module.apply), adapter, pre.params,
                                           jnp.asarray(ids), jnp.asarray(mask)))
  assert np.ptp(ours) > 0.1

  hf_format.save_merged(tmp_path / 'merged', method, adapter, pre.params, pre.config,
                        task='classification')
  merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / 'merged')
  assert merged.config.num_labels == 1
  # measured max |diff|: llama_tied 4.3e-7, llama_gqa 1.5e-6, gpt2 4.5e-7, bert 1.2e-7
  np.testing.assert_allclose(torch_scores(merged.eval(), ids, mask), ours, atol=2e-6, rtol=1e-5)

  hf_format.save_adapter(tmp_path / 'adapter', method, adapter, pre.config, task='classification')
  config = json.loads((tmp_path / 'adapter' / 'adapter_config.json').read_text())
  assert config['task_type'] == 'SEQ_CLS'
  assert config['modules_to_save'] == ['classifier' if name == 'bert' else 'score']
  base = transformers.AutoModelForSequenceClassification.from_pretrained(hf.dir, num_labels=1)
  peft_model = peft.PeftModel.from_pretrained(base, tmp_path / 'adapter').eval()
  np.testing.assert_allclose(torch_scores(peft_model, ids, mask), ours, atol=2e-6, rtol=1e-5)

  # and back: the adapter directory loads onto the peftjax base with the same scores
  loaded_method, loaded = hf_format.load_adapter(tmp_path / 'adapter', pre.params, pre.config)
  again = tasks.sequence_rewards(loaded_method.apply(pre.module.apply), loaded, pre.params,
                                 jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_allclose(again, ours, atol=1e-6, rtol=1e-6)


def trl_compute_loss(model, batch, center=None):
  """TRL's RewardTrainer.compute_loss on a torch model (stub trainer: only what it reads)."""
  stub = types.SimpleNamespace(
      model=types.SimpleNamespace(training=False),
      args=types.SimpleNamespace(center_rewards_coefficient=center),
      accelerator=types.SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x),
      _metrics={'eval': collections.defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
  cat = lambda k: torch.as_tensor(np.concatenate([batch[f'chosen_{k}'],
                                                  batch[f'rejected_{k}']])).long()
  inputs = {'input_ids': cat('input_ids'), 'attention_mask': cat('attention_mask'),
            'margin': torch.as_tensor(batch['margin'])}
  with torch.no_grad():
    loss = RewardTrainer.compute_loss(stub, model, inputs)
  return float(loss), {k: v[-1] for k, v in stub._metrics['eval'].items()}


@pytest.mark.parametrize('name', ['llama_gqa', 'gpt2'])
def test_task_loss_equals_trl_compute_loss_on_the_same_model(hf_model, name, tmp_path):
  _, pre, method, adapter = make_reward_model(hf_model, name)
  batch = pairs(pre.config.vocab_size, pre.config.pad_token_id, seed=3)
  batch['margin'] = np.array([0.5, 0.0, 1.0], np.float32)
  batch['example_mask'] = np.ones(3, np.int32)
  hf_format.save_merged(tmp_path, method, adapter, pre.params, pre.config, task='classification')
  torch_model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
  config = ml_collections.ConfigDict({'reward': {'center_rewards_coefficient': 0.1}})
  loss_fn = tasks.get('reward').loss_fn(method.apply(pre.module.apply), pre, config)
  loss, sums = loss_fn(adapter, pre.params, jax.tree.map(jnp.asarray, batch), None)
  want, metrics = trl_compute_loss(torch_model, batch, center=0.1)
  np.testing.assert_allclose(float(loss), want, rtol=1e-6)   # measured 2.6e-7
  summary = tasks.get('reward').summarize(jax.device_get(sums))
  assert summary['accuracy'] == pytest.approx(metrics['accuracy'])
  assert summary['margin'] == pytest.approx(metrics['margin'], rel=1e-5, abs=1e-6)
  assert summary['mean_reward'] == pytest.approx(metrics['mean_reward'], rel=1e-5, abs=1e-6)


def test_reward_task_refuses_a_head_with_more_than_one_label(hf_model):
  pre = auto.load_pretrained(hf_model('gpt2', 'causal_lm').dir, task='classification',
                             num_labels=2)
  with pytest.raises(ValueError, match=r'num_labels=2 \(set config.model.num_labels=1\)'):
    tasks.get('reward').loss_fn(None, pre, None)


# --- configs/reward.py end to end on a tiny llama ------------------------------------------

WORDS = ['hi', 'there', 'hello', 'friend', 'how', 'are', 'you', 'fine', 'thanks', 'good', 'movie',
         'bad', 'great', 'awful', 'what', 'is', 'up', 'nothing', 'much']
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")


@pytest.fixture(scope='module')
def tiny_run(hf_model, tmp_path_factory):
  """A tiny tied llama with a chat-template tokenizer, and preference pairs (jsonl)."""
  root = tmp_path_factory.mktemp('tiny_reward')
  shutil.copytree(hf_model('llama_tied', 'causal_lm').dir, root / 'llama')
  backend = tokenizers.Tokenizer(models.WordLevel(unk_token='[UNK]'))
  backend.pre_tokenizer = pre_tokenizers.Whitespace()
  backend.train_from_iterator(WORDS, trainers.WordLevelTrainer(
      special_tokens=['[PAD]', '[UNK]', '<|end|>', '<|user|>', '<|assistant|>']))
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token='[PAD]',
                                             eos_token='<|end|>')
  tok.chat_template = TEMPLATE
  tok.save_pretrained(root / 'llama')
  rng = np.random.default_rng(0)
  rows = [{'prompt': ' '.join(rng.choice(WORDS, 3)), 'chosen': ' '.join(rng.choice(WORDS[:9], 2)),
           'rejected': ' '.join(rng.choice(WORDS[9:], 2))} for _ in range(40)]
  (root / 'pairs.jsonl').write_text('\n'.join(map(json.dumps, rows)) + '\n')
  return root / 'llama', root / 'pairs.jsonl'


OVERRIDES = {'data.batch_size': 8, 'data.eval_batch_size': 8, 'train.steps': 4,
             'model.scan_layers': False}


def _config(tiny_run):
  sys.path.insert(0, str(ROOT))
  from configs import reward
  c = reward.get_config('method=lora,runlocal,last_layers=0')
  c.model.source, c.data.source = str(tiny_run[0]), str(tiny_run[1])
  for key, value in OVERRIDES.items():
    group, name = key.split('.')
    c[group][name] = value
  return c


def _scores_of_export(workdir, pre, ids, mask):
  """Scores of the run's ``merged/`` in transformers, and of ``adapter/`` loaded onto the
  peftjax base."""
  merged = transformers.AutoModelForSequenceClassification.from_pretrained(workdir / 'merged')
  method, adapter = hf_format.load_adapter(workdir / 'adapter', pre.params, pre.config)
  ours = tasks.sequence_rewards(method.apply(pre.module.apply), adapter, pre.params,
                                jnp.asarray(ids), jnp.asarray(mask))
  return torch_scores(merged.eval(), ids, mask), np.asarray(ours)


def test_reward_config_trains_evaluates_resumes_and_exports(tiny_run, tmp_path):
  final = loop.run(_config(tiny_run), tmp_path / 'ref')
  assert set(final) == {'loss', 'accuracy', 'margin', 'mean_reward'}
  lines = [json.loads(l) for l in (tmp_path / 'ref' / 'metrics.jsonl').read_text().splitlines()]
  assert [l['step'] for l in lines if l['split'] == 'eval'] == [2, 4]

  # a run killed after checkpoint 2 (its later checkpoint and exports gone), resumed by launch.py
  resumed = tmp_path / 'resumed'
  shutil.copytree(tmp_path / 'ref', resumed, ignore=shutil.ignore_patterns('4', 'adapter', 'merged'))
  cmd = [sys.executable, str(ROOT / 'launch.py'), f'--workdir={resumed}',
         f'--config={ROOT}/configs/reward.py:method=lora,runlocal,last_layers=0',
         f'--config.model.source={tiny_run[0]}', f'--config.data.source={tiny_run[1]}'] + [
             f'--config.{k}={v}' for k, v in OVERRIDES.items()]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'resumed from step 2' in out.stdout
  for name in ('adapter_model.safetensors', 'adapter_config.json'):
    assert (resumed / 'adapter' / name).read_bytes() == \
        (tmp_path / 'ref' / 'adapter' / name).read_bytes()

  # both exports score like the trained model, in transformers too
  pre = auto.load_pretrained(tiny_run[0], task='classification', num_labels=1)
  batch = pairs(pre.config.vocab_size, pre.config.pad_token_id, seed=5)
  torch_merged, ours = _scores_of_export(resumed, pre, batch['chosen_input_ids'],
                                         batch['chosen_attention_mask'])
  np.testing.assert_allclose(torch_merged, ours, atol=2e-6, rtol=1e-5)

  # the judge: text rendered as in training, scored from merged/ or from adapter/ on the base
  prompts, replies = ['hi there', 'how are'], ['fine thanks', 'awful movie']   # equal lengths
  judge = reward_model.RewardModel.load(resumed)
  (resumed / 'merged').rename(tmp_path / 'merged_elsewhere')
  from_adapter = reward_model.RewardModel.load(resumed)
  assert judge.method is None and from_adapter.method is not None
  scores = judge.score(prompts, replies)
  np.testing.assert_allclose(from_adapter.score(prompts, replies), scores, atol=1e-6, rtol=1e-6)
  ids = [data.encode_chat(judge.tokenizer, data.pair_messages(p, r))[0]
         for p, r in zip(prompts, replies)]
  np.testing.assert_allclose(
      torch_scores(transformers.AutoModelForSequenceClassification.from_pretrained(
          tmp_path / 'ref' / 'merged').eval(), np.array(ids), np.ones((2, len(ids[0])))),
      scores, atol=2e-6, rtol=1e-5)
  other = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tokenizers.Tokenizer(models.WordLevel({'[PAD]': 0, 'hi': 1}, '[PAD]')),
      pad_token='[PAD]', name_or_path='other-policy')
  with pytest.raises(ValueError, match=r"reward model's tokenizer \(.*merged\) and the "
                                       r"policy's tokenizer \(other-policy\) differ"):
    judge.score_ids(np.array(ids), np.ones((2, len(ids[0]))), tokenizer=other)
