"""Fixtures shared by the prompt-family tests (test_prompt.py, test_prefix.py): the model
families and tasks they compare against HF PEFT (``prompt_case``), and the helpers that run
both sides (``prompt_kit``)."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import methods, tree

# (zoo family, peftjax task, HF PEFT task_type)
PROMPT_CASES = [('llama_gqa', 'causal_lm', 'CAUSAL_LM'), ('gpt2', 'causal_lm', 'CAUSAL_LM'),
                ('bert', 'classification', 'SEQ_CLS')]


@pytest.fixture(params=PROMPT_CASES, ids=[c[0] for c in PROMPT_CASES])
def prompt_case(request):
  """``(name, task, task_type)``: each family the prompt-family parity tests cover."""
  return request.param


def with_head(method, m, task):
  """HF PEFT's SEQ_CLS adapters always hold the classification head (modules_to_save)."""
  if task != 'classification':
    return method
  heads = [p for p in tree.flatten(m.params) if p.startswith('classifier/')]
  return methods.compose(method, methods.modules_to_save(heads))


def compare(zoo, got, want, mask, task, virtual: int = 0) -> float:
  """Max |logit difference|: causal LMs at the real tokens (after ``virtual`` positions that
  HF PEFT keeps and are compared too), classifiers everywhere."""
  if task != 'causal_lm':
    return float(np.abs(np.asarray(got) - want).max())
  if virtual:
    mask = np.concatenate([np.ones((mask.shape[0], virtual), np.int32), mask], 1)
  return zoo.max_diff_at(got, want, mask)


def hf_encoder(model, rename) -> dict:
  """HF PEFT's trainable prompt encoder (``prompt_encoder.default.*``) as a peftjax encoder:
  ``embedding`` plus ``rename(torch name) -> (peftjax path, transpose)`` of the other weights."""
  enc = {}
  for k, v in model.named_parameters():
    if k.startswith('prompt_encoder.default.'):
      k = k.removeprefix('prompt_encoder.default.')
      path, transpose = ('embedding', False) if k == 'embedding.weight' else rename(k)
      enc[path] = jnp.asarray(v.detach().numpy().T if transpose else v.detach().numpy())
  return tree.unflatten(enc)


@pytest.fixture(scope='session')
def prompt_kit(zoo):
  """The helpers above, bound to ``zoo``: ``with_head``, ``compare``, ``hf_encoder``,
  ``torch_logits(model, ids, mask)``, and ``shapes(adapter)``."""
  return types.SimpleNamespace(
      with_head=with_head, hf_encoder=hf_encoder,
      compare=lambda *a, **kw: compare(zoo, *a, **kw),
      torch_logits=lambda model, ids, mask: zoo.torch_logits(model, input_ids=ids,
                                                            attention_mask=mask),
      shapes=lambda adapter: jax.tree.map(jnp.shape, adapter))
