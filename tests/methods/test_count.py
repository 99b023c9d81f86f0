"""Parameter counts from the papers' own model configs, by `jax.eval_shape` (no weights), against
the papers' numbers and PyTorch models built on the meta device (no memory either)."""
import pytest
import torch
import transformers

from peftjax import methods
from peftjax.methods import count
from peftjax.models import registry

# Published sizes (Hugging Face's roberta-base and bert-large-uncased config.json).
ROBERTA_BASE = transformers.RobertaConfig(vocab_size=50265, max_position_embeddings=514,
                                          type_vocab_size=1, pad_token_id=1)
BERT_LARGE = transformers.BertConfig(hidden_size=1024, num_hidden_layers=24,
                                     num_attention_heads=16, intermediate_size=4096)


def _meta_model(hf_config):
  with torch.device('meta'):
    return transformers.AutoModel.from_config(hf_config)


def _params(hf_config):
  return count.abstract_params(registry.config_from_hf(hf_config.to_dict()), 'base')


def test_lora_r8_on_query_value_of_roberta_base_is_294912():
  """LoRA paper, Table 2: RoBERTa-base LoRA 0.3M trainable parameters (r=8 on W_q, W_v)."""
  c = count.counts(methods.get('lora', rank=8, model_type='roberta'), _params(ROBERTA_BASE))
  assert c.trainable == 294_912 == 12 * 2 * (768 * 8 + 8 * 768)
  assert c.total == sum(p.numel() for p in _meta_model(ROBERTA_BASE).parameters()) == 124_645_632
  assert c.percent == pytest.approx(0.2366, abs=1e-4)


def test_bitfit_on_bert_large_is_008_percent():
  """BitFit paper: 0.08% of BERT-large's parameters, every bias term (linear layers and
  LayerNorm); the linear-layer biases alone would be 0.066%."""
  params = _params(BERT_LARGE)
  torch_model = _meta_model(BERT_LARGE)
  c = count.counts(methods.get('bitfit', include_norm=True), params)
  assert c.total == sum(p.numel() for p in torch_model.parameters()) == 335_141_888
  assert c.trainable == sum(p.numel() for n, p in torch_model.named_parameters()
                            if n.endswith('bias')) == 272_384
  assert round(c.percent, 2) == 0.08
  assert count.counts(methods.get('bitfit'), params).percent == pytest.approx(0.0663, abs=1e-4)


def test_counts_need_no_weights():
  """Shapes in, shapes through: nothing of BERT-large's 1.3 GB is materialised."""
  params = _params(BERT_LARGE)
  leaf = params['bert']['encoder']['layer_0']['attention']['self']['query']['kernel']
  assert type(leaf).__name__ == 'ShapeDtypeStruct' and leaf.shape == (1024, 1024)
