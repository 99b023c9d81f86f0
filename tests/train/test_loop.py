"""End-to-end runs of launch.py / train.loop on a tiny random BERT with an offline tokenizer:
runlocal smoke, SIGKILL + resume == uninterrupted (bit for bit), NaN stop, exports."""
import json
import pathlib
import shutil
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy
import tokenizers
import transformers
from tokenizers import models, pre_tokenizers, trainers

from peftjax.train import loop

ROOT = pathlib.Path(__file__).parents[2]
POSITIVE = ['good movie', 'i like it', 'fine thanks', 'great fun', 'so good', 'love it']
NEGATIVE = ['bad movie', 'i hate it', 'awful stuff', 'so bad', 'boring film', 'hate this']


PAIRS = [('hi there', 'hello friend'), ('how are you', 'fine thanks'), ('good movie', 'i like it'),
         ('bad movie', 'i hate it'), ('what is up', 'so good')]
# 'role content <|end|>' turns; the assistant header opens a reply.
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def _tokenizer():
  backend = tokenizers.Tokenizer(models.WordLevel(unk_token='[UNK]'))
  backend.pre_tokenizer = pre_tokenizers.Whitespace()
  specials = ['[PAD]', '[UNK]', '<|end|>', '<|user|>', '<|assistant|>']
  backend.train_from_iterator(POSITIVE + NEGATIVE + [' '.join(p) for p in PAIRS],
                              trainers.WordLevelTrainer(special_tokens=specials))
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token='[PAD]',
                                             eos_token='<|end|>')
  tok.chat_template = TEMPLATE
  return tok


@pytest.fixture(scope='module')
def tiny(hf_model, tmp_path_factory):
  """A tiny BERT checkpoint dir with a tokenizer, and a labelled CSV."""
  root = tmp_path_factory.mktemp('tiny_run')
  model_dir = root / 'bert'
  shutil.copytree(hf_model('bert', 'base').dir, model_dir)
  _tokenizer().save_pretrained(model_dir)
  rows = ['text,label'] + [f'{t},1' for t in POSITIVE] * 6 + [f'{t},0' for t in NEGATIVE] * 6
  (root / 'data.csv').write_text('\n'.join(rows) + '\n')
  return model_dir, root / 'data.csv'


@pytest.fixture(scope='module')
def tiny_lm(hf_model, tmp_path_factory):
  """A tiny tied llama checkpoint dir with a chat-template tokenizer, and prompt/response jsonl."""
  root = tmp_path_factory.mktemp('tiny_lm')
  shutil.copytree(hf_model('llama_tied', 'causal_lm').dir, root / 'llama')
  _tokenizer().save_pretrained(root / 'llama')
  rows = [json.dumps({'prompt': p, 'response': r}) for p, r in PAIRS * 8]
  (root / 'chat.jsonl').write_text('\n'.join(rows) + '\n')
  return root / 'llama', root / 'chat.jsonl'


@pytest.mark.parametrize('method', ['lora', 'dora', 'full'])
def test_sft_runlocal_lowers_the_response_loss(tiny_lm, tmp_path, method):
  from configs import sft
  c = sft.get_config(f'method={method},runlocal')
  c.model.source, c.data.source = str(tiny_lm[0]), str(tiny_lm[1])
  c.data.update(max_length=16, batch_size=8, eval_batch_size=8, validation_fraction=0.2,
                max_train_examples=0, max_eval_examples=0)
  c.optim.learning_rate = 1e-2 if method != 'full' else 1e-3
  c.train.update(steps=12, log_every=1, eval_every=6, checkpoint_every=6)
  final = loop.run(c, tmp_path)
  lines = _metrics(tmp_path)
  evals = [l for l in lines if l['split'] == 'eval']
  train = [l['loss'] for l in lines if l['split'] == 'train']
  assert [l['step'] for l in evals] == [6, 12] and final == {k: evals[-1][k] for k in final}
  assert final['perplexity'] == pytest.approx(np.exp(final['loss']), rel=1e-6)
  # Measured: step 1's loss (before its update) 4.62; eval loss at steps 6 -> 12: lora 3.91 ->
  # 3.65, dora 3.91 -> 3.66, full 3.52 -> 3.18.
  assert evals[-1]['loss'] < evals[0]['loss'] - 0.1
  assert evals[-1]['loss'] < train[0] - 0.5


# The tiny run's overrides, applied in-process (`_config`) and as launch.py flags (`_flags`)
# from this one table, so the killed and the reference runs cannot drift apart.
_OVERRIDES = {
    'data': dict(max_length=8, batch_size=8, eval_batch_size=8, max_train_examples=0,
                 max_eval_examples=0, validation_fraction=0.25),
    'train': dict(steps=8, log_every=1, eval_every=4, checkpoint_every=2, keep=10),
}


def _config(tiny, method='lora', **train):
  from configs import sentiment
  c = sentiment.get_config(f'method={method},runlocal')
  c.model.source, c.data.source = str(tiny[0]), str(tiny[1])
  c.data.update(_OVERRIDES['data'])
  c.train.update({**_OVERRIDES['train'], **train})
  return c


def _flags(tiny, workdir):
  return [f'--config={ROOT}/configs/sentiment.py:method=lora,runlocal', f'--workdir={workdir}',
          f'--config.model.source={tiny[0]}', f'--config.data.source={tiny[1]}'] + [
              f'--config.{group}.{k}={v}' for group, kv in _OVERRIDES.items()
              for k, v in kv.items()]


def _metrics(workdir) -> list[dict]:
  return [json.loads(l) for l in (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()]


def _tb_scalars(logdir) -> dict:
  """``{(tag, step): value}`` read back from the TensorBoard event files: TFRecord framing
  (u64 length, u32 crc, payload, u32 crc) around ``Event`` protos."""
  from tensorboardX.proto import event_pb2
  out = {}
  for f in sorted(pathlib.Path(logdir).glob('events.out.tfevents.*')):
    buf, i = f.read_bytes(), 0
    while i < len(buf):
      (n,) = struct.unpack('<Q', buf[i:i + 8])
      event = event_pb2.Event.FromString(buf[i + 12:i + 12 + n])
      i += 12 + n + 4
      out.update({(v.tag, event.step): v.simple_value for v in event.summary.value})
  return out


def _jsonl_scalars(workdir) -> dict:
  return {(f"{l['split']}/{k}", l['step']): v for l in _metrics(workdir)
          for k, v in l.items() if k not in ('step', 'split')}


def _adapter(workdir):
  return safetensors.numpy.load_file(str(pathlib.Path(workdir) / 'adapter' /
                                         'adapter_model.safetensors'))


@pytest.fixture(autouse=True)
def _configs_importable(monkeypatch):
  monkeypatch.syspath_prepend(str(ROOT))


@pytest.mark.parametrize('method', ['lora', 'bitfit', 'ia3', 'houlsby', 'ptuning', 'prefix'])
def test_runlocal_trains_evaluates_and_exports(tiny, tmp_path, method):
  c = _config(tiny, method)
  c.export.merged = True
  final = loop.run(c, tmp_path)
  assert set(final) == {'loss', 'accuracy', 'f1_macro'}
  if method in ('houlsby', 'ptuning', 'prefix'):   # added layers / virtual tokens: no merge
    assert not (tmp_path / 'merged').exists()
  else:
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / 'merged')
    assert merged.config.num_labels == 2
  lines = _metrics(tmp_path)
  assert [l['step'] for l in lines if l['split'] == 'train'] == list(range(1, 9))
  assert [l['step'] for l in lines if l['split'] == 'eval'] == [4, 8]
  assert final == {k: v for k, v in lines[-1].items() if k not in ('step', 'split')}
  # TensorBoard holds every logged scalar (float32) at its step
  assert _tb_scalars(tmp_path / 'tb') == pytest.approx(_jsonl_scalars(tmp_path), rel=1e-6)
  exported = sorted(p.name for p in (tmp_path / 'adapter').iterdir())
  hf_files = ['adapter_config.json', 'adapter_model.safetensors']
  assert exported == {'lora': hf_files + ['peftjax_base.json'], 'ia3': hf_files + ['peftjax_base.json'],
                      'ptuning': hf_files, 'prefix': hf_files}.get(
                          method, ['peftjax_adapter.safetensors'])
  if method == 'ptuning':   # the folded P-tuning prompts load in HF PEFT, head included
    hf = json.loads((tmp_path / 'adapter' / 'adapter_config.json').read_text())
    assert (hf['peft_type'], hf['task_type'], hf['modules_to_save']) == \
        ('P_TUNING', 'SEQ_CLS', ['classifier'])
  if method in ('lora', 'ia3'):   # the base it was trained on: 2 BERT layers, param shapes hashed
    base = json.loads((tmp_path / 'adapter' / 'peftjax_base.json').read_text())
    assert (base['model_type'], base['num_layers'], len(base['param_shapes_sha256'])) == \
        ('bert', 2, 64)


def kill_after_checkpoint_then_resume(cmd, workdir, step: int = 4):
  """Runs ``cmd``, SIGKILLs it once checkpoint ``step`` exists (before the run's end), then runs
  it again to completion; asserts that the second run resumed."""
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 300
  while not (workdir / 'checkpoints' / str(step)).exists():
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    assert time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert not (workdir / 'adapter').exists()       # it really died before the end
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'resumed from step' in out.stdout


def test_sigkill_then_resume_equals_uninterrupted(tiny, tmp_path):
  """A real SIGKILL of launch.py after a checkpoint; the resumed run's final adapter equals an
  uninterrupted run's bit for bit."""
  loop.run(_config(tiny), tmp_path / 'ref')
  workdir = tmp_path / 'killed'
  cmd = [sys.executable, str(ROOT / 'launch.py')] + _flags(tiny, workdir)
  kill_after_checkpoint_then_resume(cmd, workdir)
  ref, resumed = _adapter(tmp_path / 'ref'), _adapter(workdir)
  assert ref.keys() == resumed.keys()
  for k in ref:
    np.testing.assert_array_equal(resumed[k], ref[k], err_msg=k)
  # rows the killed run logged after checkpoint 4 were dropped, not logged twice
  assert [(l['step'], l['split']) for l in _metrics(workdir)] == \
      [(l['step'], l['split']) for l in _metrics(tmp_path / 'ref')]


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tiny, tmp_path):
  """Step 1 (lr 1e30) makes every weight ~1e30: finite, saved; step 2's loss overflows."""
  c = _config(tiny, 'full', checkpoint_every=1)
  c.optim.update(learning_rate=1e30, clip_norm=0.0, warmup_steps=0, schedule='constant')
  with pytest.raises(FloatingPointError, match=r'non-finite .*loss.* at step 2; the last good '
                     r'checkpoint \(step 1\)'):
    loop.run(c, tmp_path)
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['1']
  restored = ocp.PyTreeCheckpointer().restore(tmp_path / 'checkpoints' / '1' / 'default')
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored['adapter']))
  assert not (tmp_path / 'adapter').exists()


@pytest.mark.parametrize('checkpoint_every, kept', [
    (1, r'the last good checkpoint \(step 1\) in .* is kept; nothing after step 1 was saved'),
    (5, r'no checkpoint exists in .*checkpoints; nothing after step 1 was saved')])
def test_divergence_between_log_steps_stops_before_the_next_save(tiny, tmp_path, checkpoint_every,
                                                                 kept):
  """log_every=10 > steps: no log step checks step 2's overflowing loss; the on-device flag is
  read before the next save, eval or log (step 2; step 4, the eval, with no checkpoint yet)
  and stops the run."""
  c = _config(tiny, 'full', checkpoint_every=checkpoint_every, log_every=10)
  c.optim.update(learning_rate=1e30, clip_norm=0.0, warmup_steps=0, schedule='constant')
  with pytest.raises(FloatingPointError, match=r'non-finite loss or gradient norm at step 2; '
                     + kept):
    loop.run(c, tmp_path)
  saved = sorted(p.name for p in (tmp_path / 'checkpoints').iterdir())
  assert saved == (['1'] if checkpoint_every == 1 else [])
  assert not (tmp_path / 'metrics.jsonl').read_text()


def test_unknown_names_are_listed(tiny, tmp_path):
  c = _config(tiny)
  c.task = 'translate'
  with pytest.raises(ValueError, match="unknown task 'translate'; valid tasks: classification, dpo, reward, sft"):
    loop.run(c, tmp_path)
  c = _config(tiny)
  c.data.batch_size = 6
  with pytest.raises(ValueError, match=r'config.data.batch_size=6 is not divisible by the '
                     r"mesh's data x fsdp = 8"):
    loop.run(c, tmp_path)
  c = _config(tiny)
  c.peft.method = 'loha'
  with pytest.raises(ValueError, match="unknown PEFT method 'loha'"):
    loop.run(c, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['sentiment', 'sft'])
def test_runlocal_on_bundled_real_assets(name, tmp_path):
  """The configs' own runlocal variants on the real MiniLM / SmolLM2 and the bundled data."""
  import importlib
  c = importlib.import_module(f'configs.{name}').get_config('method=lora,runlocal')
  c.data.update(batch_size=8, eval_batch_size=8)   # the tests run on 8 fake devices
  final = loop.run(c, tmp_path)
  lines = _metrics(tmp_path)
  evals = [l for l in lines if l['split'] == 'eval']
  train = [l['loss'] for l in lines if l['split'] == 'train']
  assert [l['step'] for l in evals] == [3, 6] and final == {k: evals[-1][k] for k in final}
  assert len(train) == 3 and train[-1] < train[0]
  assert _tb_scalars(tmp_path / 'tb') == pytest.approx(_jsonl_scalars(tmp_path), rel=1e-6)
  # Measured eval loss at steps 3 -> 6: sentiment 0.6869 -> 0.6824, sft 3.826 -> 3.591.
  assert evals[-1]['loss'] < evals[0]['loss'] - (1e-3 if name == 'sentiment' else 0.1)
  if name == 'sft':
    assert final['perplexity'] == pytest.approx(np.exp(final['loss']), rel=1e-6)
  hf = json.loads((tmp_path / 'adapter' / 'adapter_config.json').read_text())
  assert (hf['r'], hf['lora_alpha']) == (c.peft.rank, c.peft.alpha)
  # lora_A and lora_B per target per layer (MiniLM 6 layers, SmolLM2 30), plus the sentiment
  # classifier's kernel and bias (modules_to_save)
  layers, heads = (6, 2) if name == 'sentiment' else (30, 0)
  assert len(_adapter(tmp_path)) == layers * len(hf['target_modules']) * 2 + heads


def test_target_override_turns_bitfit_into_a_linear_probe(tiny):
  """``--config.peft.target=classifier`` with BitFit: only the head (bias, plus its kernel as a
  fresh head) is trained; the frozen-encoder linear-probe baseline of the docs."""
  import jax
  from peftjax import tree
  from peftjax.models import auto
  c = _config(tiny, 'bitfit')
  c.peft.target = 'classifier'
  pre = auto.load_pretrained(c.model.source, task='classification', num_labels=2)
  method = loop.build_method(c.peft, pre)
  adapter = jax.eval_shape(method.init, jax.random.key(0), pre.params)
  assert sorted(tree.flatten(adapter)) == ['classifier/bias', 'classifier/kernel']
