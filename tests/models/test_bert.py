"""BERT / RoBERTa encoders == transformers: hidden states, pooler, classifiers, scan, prefix."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from peftjax import assets
from peftjax.models import auto

# float32 vs transformers on the tiny encoders: measured max |diff| 9.5e-7 (hidden states, scan).
TOL = 3e-6
ENCODERS = ['bert', 'roberta']


def batch(m, zoo):
  return zoo.right_padded_batch(pad_id=m.config.pad_token_id)


@pytest.mark.parametrize('name', ENCODERS)
@pytest.mark.parametrize('scan', [False, True])
def test_hidden_states_match_transformers_with_right_padding(name, scan, hf_model, flax_model,
                                                             zoo):
  m = flax_model(name, 'base', scan_layers=scan)
  ids, mask = batch(m, zoo)
  out = m.apply({'params': m.params}, ids, attention_mask=mask)
  hf = hf_model(name, 'base').torch_model
  with torch.no_grad():
    want = hf(input_ids=torch.as_tensor(ids).long(), attention_mask=torch.as_tensor(mask).long())
  assert zoo.max_diff_at(out.hidden, want.last_hidden_state.numpy(), mask) < TOL
  assert np.abs(out.pooled - want.pooler_output.numpy()).max() < TOL


@pytest.mark.parametrize('name', ENCODERS)
def test_classification_matches_transformers(name, hf_model, flax_model, zoo):
  m = flax_model(name, 'classification')
  ids, mask = batch(m, zoo)
  got = m.apply({'params': m.params}, ids, attention_mask=mask).logits
  want = zoo.torch_logits(hf_model(name, 'classification').torch_model, input_ids=ids,
                          attention_mask=mask)
  assert got.shape == (3, 3)
  assert np.abs(got - want).max() < TOL


def test_roberta_positions_skip_padding_idx(flax_model, zoo):
  m = flax_model('roberta', 'base')
  ids, mask = batch(m, zoo)
  embeds = m.params['roberta']['embeddings']['word_embeddings']['embedding'][ids]
  a = m.apply({'params': m.params}, ids, attention_mask=mask).hidden
  b = m.apply({'params': m.params}, inputs_embeds=embeds, attention_mask=mask).hidden
  assert zoo.max_diff_at(a, b, mask) < 1e-6     # measured 0.0


def test_masked_prefix_is_a_no_op(flax_model, zoo):
  m = flax_model('bert', 'classification')
  ids, mask = batch(m, zoo)
  cfg = m.config
  shape = (cfg.num_layers, 3, 4, cfg.num_heads, cfg.head_dim)
  prefix = (jnp.ones(shape), jnp.ones(shape))
  v = {'params': m.params}
  base = m.apply(v, ids, attention_mask=mask).logits
  hidden = m.apply(v, ids, attention_mask=mask, prefix_kv=prefix, prefix_mask=jnp.zeros((3, 4)))
  seen = m.apply(v, ids, attention_mask=mask, prefix_kv=prefix, prefix_mask=jnp.ones((3, 4)))
  assert np.abs(hidden.logits - base).max() < 1e-6     # measured 0.0
  assert np.abs(seen.logits - base).max() > 1e-4


@pytest.mark.parametrize('name', ENCODERS)
def test_save_pretrained_loads_in_transformers(name, flax_model, zoo, tmp_path):
  m = flax_model(name, 'classification', scan_layers=True)
  ids, mask = batch(m, zoo)
  auto.save_pretrained(tmp_path, m.config, m.params)
  reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(
      tmp_path, dtype=torch.float32).eval()
  got = m.apply({'params': m.params}, ids, attention_mask=mask).logits
  want = zoo.torch_logits(reloaded, input_ids=ids, attention_mask=mask)
  assert np.abs(got - want).max() < TOL


@pytest.mark.slow
def test_all_minilm_checkpoint_matches_transformers():
  """The real all-MiniLM-L6-v2 (keys without the ``bert.`` prefix) through load_pretrained."""
  directory = assets.path('all-minilm-l6-v2')     # bundled: a missing asset fails
  pre = auto.load_pretrained(directory, task='base', scan_layers=True)
  batch = pre.tokenizer(['a tiny test', 'padding on the right of a longer sentence'],
                        padding=True, return_tensors='np')
  out = pre.module.apply({'params': pre.params}, batch['input_ids'],
                         attention_mask=batch['attention_mask'],
                         token_type_ids=batch['token_type_ids'])
  hf = transformers.AutoModel.from_pretrained(directory, dtype=torch.float32).eval()
  with torch.no_grad():
    want = hf(**{k: torch.as_tensor(v) for k, v in batch.items()}).last_hidden_state.numpy()
  mask = batch['attention_mask']
  # 6 real layers in float32: measured max |diff| 1.5e-6
  assert np.abs(np.asarray(out.hidden)[mask == 1] - want[mask == 1]).max() < 5e-6
