"""Formula parity with HF PEFT (torch) for LoRA, rsLoRA, DoRA and IA3 on a tiny nn.Linear model."""
import flax.linen as nn
import jax
import numpy as np
import peft
import pytest
import torch

from peftjax import methods, tree

D_IN, D_FF = 12, 20
TARGETS = ('q_proj', 'v_proj', 'down_proj')


class TorchNet(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.q_proj = torch.nn.Linear(D_IN, D_IN)
    self.v_proj = torch.nn.Linear(D_IN, D_IN, bias=False)
    self.up_proj = torch.nn.Linear(D_IN, D_FF)
    self.down_proj = torch.nn.Linear(D_FF, D_IN)

  def forward(self, x):
    h = self.q_proj(x) * self.v_proj(x)
    return self.down_proj(torch.relu(self.up_proj(h)))


class FlaxNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(D_IN, name='q_proj')(x) * nn.Dense(D_IN, use_bias=False, name='v_proj')(x)
    return nn.Dense(D_IN, name='down_proj')(nn.relu(nn.Dense(D_FF, name='up_proj')(h)))


def _to_numpy(t):
  return t.detach().numpy().copy()


def _flax_params(torch_model):
  flat = {}
  for name, p in torch_model.named_parameters():
    module, leaf = name.rsplit('.', 1)
    flat[f'{module}/{"kernel" if leaf == "weight" else "bias"}'] = (
        _to_numpy(p).T if leaf == 'weight' else _to_numpy(p))
  return tree.unflatten(flat)


def _hf_adapter_as_flax(peft_model):
  """HF PEFT adapter weights -> our adapter tree (torch (r, in) / (out, r) transposed)."""
  flat = {}
  for name, p in peft_model.named_parameters():
    if not p.requires_grad:
      continue
    path = name.removeprefix('base_model.model.').replace('.default', '').replace('.weight', '')
    leaf = path.rsplit('.', 1)[-1]
    value = _to_numpy(p).T if leaf in ('lora_A', 'lora_B') else _to_numpy(p)
    flat[path.replace('.', '/')] = value
  return tree.unflatten(flat)


def _perturb_torch(peft_model):
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for _, p in peft_model.named_parameters():
      if p.requires_grad:
        p.add_(0.1 * torch.randn(p.shape, generator=gen))


_lora_config = lambda **kw: peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS), **kw)
CONFIGS = {
    'lora': (_lora_config, lambda: methods.lora(rank=4, alpha=8, target='|'.join(TARGETS))),
    'rslora': (lambda: _lora_config(use_rslora=True),
               lambda: methods.get('rslora', rank=4, alpha=8, target='|'.join(TARGETS))),
    'dora': (lambda: _lora_config(use_dora=True),
             lambda: methods.get('dora', rank=4, alpha=8, target='|'.join(TARGETS))),
    'ia3': (lambda: peft.IA3Config(target_modules=list(TARGETS), feedforward_modules=['down_proj']),
            lambda: methods.ia3(target='|'.join(TARGETS), feedforward='down_proj')),
}


@pytest.mark.parametrize('name', list(CONFIGS))
def test_outputs_and_init_match_hf_peft(name):
  hf_config, ours = CONFIGS[name]
  torch.manual_seed(0)
  torch_model = TorchNet()
  params = _flax_params(torch_model)
  peft_model = peft.get_peft_model(torch_model, hf_config())
  method = ours()
  adapter = method.init(jax.random.key(0), params)

  # Same leaves, shapes and deterministic inits (B = 0, DoRA m = |W|, IA3 ones) as HF PEFT.
  hf_init = _hf_adapter_as_flax(peft_model)
  assert jax.tree.map(np.shape, adapter) == jax.tree.map(np.shape, hf_init)
  for path, leaf in tree.flatten(adapter).items():
    if path.endswith('lora_A'):  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))
      bound = 1 / np.sqrt(leaf.shape[0])
      assert 0.7 * bound < np.abs(leaf).max() <= bound
      assert 0.7 * bound < np.abs(tree.flatten(hf_init)[path]).max() <= bound
    else:
      np.testing.assert_allclose(leaf, tree.flatten(hf_init)[path], atol=1e-6, rtol=0,
                                 err_msg=path)   # measured 0.0
  assert peft_model.get_nb_trainable_parameters()[0] == tree.count(adapter)

  _perturb_torch(peft_model)
  x = np.random.default_rng(0).normal(size=(3, 5, D_IN)).astype(np.float32)
  peft_model.eval()
  with torch.no_grad():
    expected = _to_numpy(peft_model(torch.from_numpy(x)))
  got = method.apply(FlaxNet().apply)(_hf_adapter_as_flax(peft_model), params, x)
  np.testing.assert_allclose(got, expected, atol=5e-7, rtol=0)   # measured 1.2e-7 (rslora)
  assert np.abs(got - FlaxNet().apply({'params': params}, x)).max() > 1e-2  # adapter acts


def test_dora_with_dropout_matches_hf_peft_given_the_same_masks(monkeypatch):
  """In training with dropout HF PEFT rescales ``dropout(x) W`` (not ``x W``); same masks both sides."""
  p = 0.3
  rng = np.random.default_rng(1)
  masks = {}
  mask_for = lambda shape: masks.setdefault(tuple(shape), rng.random(shape) > p)

  class FixedDropout(torch.nn.Module):
    def forward(self, t):
      return t * torch.from_numpy(mask_for(t.shape).astype(np.float32)) / (1 - p)

  torch.manual_seed(0)
  torch_model = TorchNet()
  params = _flax_params(torch_model)
  peft_model = peft.get_peft_model(torch_model, _lora_config(use_dora=True, lora_dropout=p))
  _perturb_torch(peft_model)
  for name in TARGETS:
    getattr(peft_model.base_model.model, name).lora_dropout['default'] = FixedDropout()
  x = rng.normal(size=(3, 5, D_IN)).astype(np.float32)
  peft_model.train()
  with torch.no_grad():
    expected = _to_numpy(peft_model(torch.from_numpy(x)))
  monkeypatch.setattr(jax.random, 'bernoulli', lambda key, keep, shape: jax.numpy.asarray(mask_for(shape)))
  method = methods.get('dora', rank=4, alpha=8, target='|'.join(TARGETS), dropout=p)
  adapter = _hf_adapter_as_flax(peft_model)
  got = method.apply(FlaxNet().apply)(adapter, params, x, rngs={'dropout': jax.random.key(0)})
  np.testing.assert_allclose(got, expected, atol=5e-7, rtol=0)   # measured 6e-8
  evaluated = method.apply(FlaxNet().apply)(adapter, params, x)
  assert np.abs(got - evaluated).max() > 1e-2  # the masks act
