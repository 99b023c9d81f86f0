"""AdaLoRA against HF PEFT: the rank allocator step by step (HF's own ``update_and_allocate`` fed
the same weights and gradients), the budget schedule, the orthogonality penalty, ``ADALORA``
directories both ways with ``rank_pattern``, the plain-LoRA export, gradient accumulation,
bad input, and a runlocal sentiment run that resumes bit for bit."""
import copy
import json
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import peft
import pytest
import torch

from peftjax import errors, methods, sharding, tree
from peftjax.methods import adalora, hf_format
from peftjax.train import loop
from peftjax.train.state import TrainState, state_shardings
from peftjax.train.step import make_train_step

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE))                    # --import-mode=importlib: not on sys.path
sys.path.insert(0, str(HERE.parent / 'train'))
from test_hf_format import IDS, MASK, _hf_load, _max_diff, _torch_out  # noqa: E402
from test_loop import _config, _metrics, tiny  # noqa: E402,F401  (the tiny run's fixture)

ATOL = 1e-5
KEY = jax.random.key(0, impl='rbg')   # compiles in a fraction of threefry's time on XLA:CPU
# 2 layers x (q_proj, v_proj) = 4 matrices: init budget 24, target 8; masking at steps 2, 4, 6
# (cubic phase, deltaT=2), final mask at step 7 = total_step - tfinal, then the fixed mask.
SCHEDULE = dict(init_r=6, target_r=2, tinit=1, tfinal=3, deltaT=2, total_step=10)
HF_KEYS = ('init_r', 'target_r', 'tinit', 'tfinal', 'deltaT', 'total_step', 'beta1', 'beta2',
           'orth_reg_weight')


def _jax_out(method, adapter, fm):
  return np.asarray(jax.jit(method.apply(fm.module.apply))(adapter, fm.params, IDS,
                                                           attention_mask=MASK).logits)


def _hf_config(task='CAUSAL_LM', target_modules=('q_proj', 'v_proj'), **kw):
  return peft.AdaLoraConfig(task_type=task, target_modules=list(target_modules), **kw)


def _hf_name(module: str, layer: int) -> str:
  """peftjax scanned llama module path -> HF module name of ``layer``."""
  return module.replace('model/layers/', f'model.layers.{layer}.').replace('/', '.')


def _llama(flax_model, hf_model, scan=True):
  fm = flax_model('llama_gqa', 'causal_lm', scan_layers=scan)
  return fm, hf_model('llama_gqa', 'causal_lm').torch_model


def _to_hf(pm, adapter, grads=None):
  """Writes the (scanned) peftjax ``adapter`` (and ``grads``) into HF's AdaLoRA params."""
  named = dict(pm.base_model.model.named_parameters())
  flat, gflat = tree.flatten(adapter), tree.flatten(grads) if grads is not None else None
  for path, value in flat.items():
    module, _, leaf = path.rpartition('/')
    for layer in range(value.shape[0]):
      p = named[f'{_hf_name(module, layer)}.{leaf}.default']
      to = lambda x: torch.from_numpy(np.array(x[layer] if leaf == 'lora_E' else x[layer].T)
                                      ).reshape(p.shape)
      with torch.no_grad():
        p.copy_(to(value))
      if gflat is not None:
        p.grad = to(gflat[path])


def _from_hf(store: dict, module: str, leaf: str, layers=2):
  """HF per-layer tensors (by HF param name) stacked in peftjax layout."""
  out = [store[f'{_hf_name(module, l)}.{leaf}.default'].detach().numpy() for l in range(layers)]
  return np.stack([o.reshape(-1) if leaf == 'lora_E' else o.T for o in out])


def _hf_scores(allocator, module, layers=2):
  """HF's triplet scores from its averages, as its ``mask_to_budget`` combines them."""
  out = []
  for l in range(layers):
    n = f'{_hf_name(module, l)}.%s.default'
    ab = torch.cat([allocator._element_score(n % 'lora_A').mean(dim=1, keepdim=True),
                    allocator._element_score(n % 'lora_B').mean(dim=0).view(-1, 1)], dim=1)
    out.append(allocator._combine_ipt(allocator._element_score(n % 'lora_E'), ab).numpy())
  return np.stack(out)


def test_rank_allocator_equals_hf_step_by_step(flax_model, hf_model):
  """Ten steps of training a scanned llama: after each optimizer step HF's
  ``update_and_allocate(t)`` and ours see the same weights and gradients; the averages, the
  scores, the masked singular values and the masks agree, the kept count follows HF's budget at
  every masking step and ends at the target budget."""
  fm, torch_model = _llama(flax_model, hf_model)
  method = methods.get('adalora', model_type='llama', **SCHEDULE)
  pm = peft.get_peft_model(copy.deepcopy(torch_model), _hf_config(**SCHEDULE))
  allocator, hf_cfg = pm.base_model.rankallocator, pm.peft_config['default']
  adapter = method.init(KEY, fm.params)
  state = method.init_state(adapter)
  weights = np.random.default_rng(1).normal(size=(2, 7, 97)).astype(np.float32)
  apply = method.apply(fm.module.apply)
  tx = optax.adam(1e-2)

  @jax.jit
  def optimizer_step(adapter, opt):
    grads = jax.grad(lambda a: jnp.sum(apply(a, fm.params, IDS).logits * weights))(adapter)
    updates, opt = tx.update(grads, opt, adapter)
    return optax.apply_updates(adapter, updates), opt, grads

  update, scores = jax.jit(method.update), jax.jit(adalora.triplet_scores)
  opt = tx.init(adapter)
  modules = sorted({p.rpartition('/')[0] for p in tree.flatten(adapter)})
  score_diffs, kept_counts = [], {}
  final = SCHEDULE['total_step'] - SCHEDULE['tfinal']
  for t in range(1, SCHEDULE['total_step'] + 1):
    adapter, opt, grads = optimizer_step(adapter, opt)
    _to_hf(pm, adapter, grads)
    previous_pattern = hf_cfg.rank_pattern
    pm.base_model.update_and_allocate(t)
    state, adapter = update(state, adapter, grads, t)
    named = dict(pm.base_model.model.named_parameters())
    for m in modules:   # masked singular values: identical
      np.testing.assert_array_equal(tree.flatten(adapter)[f'{m}/lora_E'],
                                    _from_hf(named, m, 'lora_E'), err_msg=f'step {t} {m}')
    if t < final:
      for kind, hf_avg in (('ipt', allocator.exp_avg_ipt), ('unc', allocator.exp_avg_unc)):
        ours = tree.flatten(state[kind])
        for m in modules:
          for leaf in adalora.FACTORS:
            np.testing.assert_allclose(ours[f'{m}/{leaf}'], _from_hf(hf_avg, m, leaf),
                                       rtol=1e-6, atol=1e-12, err_msg=f'step {t} {kind} {m}')
      for m, s in scores(state).items():
        want = _hf_scores(allocator, m)
        score_diffs.append(float(np.max(np.abs(np.asarray(s) - want) / np.abs(want))))
    else:
      assert allocator.exp_avg_ipt == {} and all(
          not np.any(x) for x in jax.tree.leaves((state['ipt'], state['unc'])))
    if hf_cfg.rank_pattern is not previous_pattern and t <= final:   # HF masked at step t
      masks = tree.flatten(state['mask'])
      for m in modules:
        want = np.stack([hf_cfg.rank_pattern[f'{_hf_name(m, l)}.lora_E.default'] for l in (0, 1)])
        np.testing.assert_array_equal(masks[f'{m}/lora_E'], want, err_msg=f'step {t} {m}')
      kept_counts[t] = int(sum(np.sum(x) for x in masks.values()))
      assert kept_counts[t] == allocator.budget_schedule(t)[0]
  assert kept_counts == {2: 17, 4: 10, 6: 8, 7: 8}
  assert max(score_diffs) < 1e-6    # measured: 2.4e-7 relative
  assert sum(int(np.sum(k)) for k in adalora.kept(adapter).values()) == 2 * 4   # target_r * n


def test_budget_follows_hf_schedule_at_every_masking_step(flax_model, hf_model):
  """30 steps with random weights and gradients (deltaT=3): at every step HF's
  ``budget_schedule`` says to mask, the mask keeps exactly that budget; E is masked only then
  (and every step after the final allocation); the end keeps target_r per matrix on average."""
  fm, torch_model = _llama(flax_model, hf_model)
  h = dict(init_r=5, target_r=3, tinit=5, tfinal=8, deltaT=3, total_step=30)
  method = adalora.adalora(target='.*/(q_proj|v_proj)', **h)
  allocator = peft.get_peft_model(copy.deepcopy(torch_model), _hf_config(**h)
                                  ).base_model.rankallocator
  adapter = method.init(KEY, fm.params)
  state = method.init_state(adapter)
  update = jax.jit(method.update)
  rng = np.random.default_rng(0)
  noise = lambda: jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), adapter)
  budgets, steps = [], []
  for t in range(1, h['total_step'] + 1):   # random weight changes and gradients
    adapter = jax.tree.map(lambda a, n: a + 0.01 * n, adapter, noise())
    state, adapter = update(state, adapter, noise(), t)
    budget, masking = allocator.budget_schedule(t)
    final = t == h['total_step'] - h['tfinal']
    e_zero = sum(int(np.sum(~k)) for k in adalora.kept(adapter).values())
    if masking or final:
      steps.append(t)
      budgets.append(budget)
      assert 20 - e_zero == budget, f'step {t}'
    else:
      assert e_zero == 0, f'step {t}: E masked off schedule'
  assert steps == [6, 9, 12, 15, 18, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30]
  assert budgets[:3] == [18, 15, 13] and budgets[-1] == 12 == h['target_r'] * 4


def test_orthogonality_penalty_equals_hf(flax_model, hf_model):
  """HF adds ``orth_reg_weight * mean ||P P^T - I||_F`` to its loss; ours is the same number."""
  fm, torch_model = _llama(flax_model, hf_model, scan=False)
  method = methods.get('adalora', model_type='llama', orth_reg_weight=0.3, **SCHEDULE)
  pm = peft.get_peft_model(copy.deepcopy(torch_model), _hf_config(orth_reg_weight=0.3, **SCHEDULE))
  state = {k: v for k, v in pm.state_dict().items() if 'lora_' in k}
  adapter = tree.flatten(method.init(KEY, fm.params))
  for path in adapter:   # HF's own random init, in peftjax layout
    module, _, leaf = path.rpartition('/')
    v = state[f'base_model.model.{module.replace("/layers_", ".layers.").replace("/", ".")}.'
              f'{leaf}.default'].numpy()
    adapter[path] = v.reshape(-1) if leaf == 'lora_E' else v.T
  ids = torch.as_tensor(IDS).long()
  with torch.no_grad():
    with_penalty = pm(input_ids=ids, labels=ids).loss.item()
    plain = pm.base_model.model(input_ids=ids, labels=ids).loss.item()
  penalty = float(method.regularizer(tree.unflatten(adapter)))
  assert penalty > 0.1
  assert penalty == pytest.approx(with_penalty - plain, rel=1e-6)    # measured: 2.5e-7


def _hf_masked(torch_model, rank_pattern, seed=0, **kw):
  """A HF AdaLoRA model with random factors, E zeroed where ``rank_pattern`` says, and that
  pattern set as HF's allocator sets it."""
  torch.manual_seed(seed)
  pm = peft.get_peft_model(copy.deepcopy(torch_model), _hf_config(**kw)).eval()
  with torch.no_grad():
    for n, p in pm.base_model.model.named_parameters():
      if 'lora_' in n:
        p.copy_(torch.randn(p.shape) * 0.3)
      if n in rank_pattern:
        p.masked_fill_(~torch.tensor(rank_pattern[n])[:, None], 0.0)
  pm.peft_config['default'].rank_pattern = rank_pattern
  return pm


@pytest.mark.parametrize('scan', [False, True])
def test_hf_adalora_directory_loads_with_equal_logits(flax_model, hf_model, tmp_path, scan):
  """HF PEFT saves an AdaLoRA adapter truncated to its rank_pattern; peftjax loads it back to
  init_r slots (masked ones zero) and computes the same logits."""
  fm, torch_model = _llama(flax_model, hf_model, scan)
  h = dict(init_r=4, target_r=2, total_step=10, lora_alpha=16)
  keeps = [[True, False, True, True], [False, True, False, False], [True, True, True, True],
           [False, False, False, False]]
  names = [f'model.layers.{l}.self_attn.{m}.lora_E.default' for l in (0, 1)
           for m in ('q_proj', 'v_proj')]
  pm = _hf_masked(torch_model, dict(zip(names, keeps)), **h)
  pm.save_pretrained(tmp_path)
  saved = json.loads((tmp_path / hf_format.CONFIG_FILE).read_text())
  assert saved['peft_type'] == 'ADALORA' and len(saved['rank_pattern']) == 4
  method, adapter = hf_format.load_adapter(tmp_path, fm.params, fm.config, rng=KEY)
  assert method.spec.name == 'adalora' and method.spec.hparams['alpha'] == 16
  kept = adalora.kept(adapter)
  if scan:
    assert [k.tolist() for k in kept.values()] == [[keeps[0], keeps[2]], [keeps[1], keeps[3]]]
  diff = _max_diff(_torch_out(pm, 'causal_lm'), _jax_out(method, adapter, fm))
  assert diff < ATOL    # measured: 1.0e-6


def test_peftjax_export_loads_in_hf_with_rank_pattern(flax_model, hf_model, tmp_path):
  """A scanned peftjax AdaLoRA adapter with masked singular values is written as HF does
  (tensors truncated, rank_pattern); HF PEFT loads it strictly with equal logits, and peftjax
  reads it back to the same adapter. An unmasked adapter is written whole."""
  fm, torch_model = _llama(flax_model, hf_model)
  method = adalora.adalora(init_r=4, target_r=2, total_step=10, alpha=16.0,
                           target='.*/(q_proj|v_proj)')
  adapter = tree.flatten(method.init(KEY, fm.params))
  rng = np.random.default_rng(0)
  for p, v in adapter.items():
    v = rng.normal(size=v.shape).astype(np.float32) * 0.3
    adapter[p] = np.where(rng.random(v.shape) < 0.4, 0.0, v) if p.endswith('lora_E') else v
  adapter = tree.unflatten(adapter)
  hf_format.save_adapter(tmp_path, method, adapter, fm.config)
  cfg = hf_format.read_config(tmp_path)
  kept = adalora.kept(adapter)
  want = {f'{_hf_name(m, l)}.lora_E': kept[m][l].tolist() for m in kept for l in (0, 1)}
  assert cfg['rank_pattern'] == want and any(not all(k) for k in want.values())
  assert all(cfg[k] == method.spec.hparams[k] for k in HF_KEYS)
  loaded = _hf_load(copy.deepcopy(torch_model), tmp_path)
  for name, keep in want.items():
    assert loaded.base_model.model.get_submodule(name[:-len('.lora_E')]).lora_A[
        'default'].shape[0] == sum(keep)
  diff = _max_diff(_torch_out(loaded, 'causal_lm'), _jax_out(method, adapter, fm))
  assert diff < ATOL    # measured: 7.2e-7
  again, back = hf_format.load_adapter(tmp_path, fm.params, fm.config, rng=KEY)
  assert {**again.spec.hparams, 'target': None} == {**method.spec.hparams, 'target': None}
  for m, keep in kept.items():   # the dropped singular values' vectors are not in the file
    where = {'lora_A': keep[..., None, :], 'lora_E': keep, 'lora_B': keep[..., :, None]}
    for leaf, k in where.items():
      np.testing.assert_array_equal(tree.flatten(back)[f'{m}/{leaf}'],
                                    np.where(k, tree.flatten(adapter)[f'{m}/{leaf}'], 0.0))
  whole = tmp_path / 'whole'
  hf_format.save_adapter(whole, method, method.init(KEY, fm.params), fm.config)
  assert hf_format.read_config(whole)['rank_pattern'] is None


def test_plain_lora_export_of_the_final_ranks(flax_model, hf_model, tmp_path):
  """``to_lora``: per-module ranks = kept singular values (a scanned module: its layers' largest),
  equal logits in peftjax and as a HF PEFT LORA directory; an unscanned model gets each layer's
  exact rank."""
  for scan in (True, False):
    fm, torch_model = _llama(flax_model, hf_model, scan)
    method = adalora.adalora(init_r=4, target_r=2, total_step=10, target='.*/(q_proj|v_proj)')
    adapter = tree.flatten(method.init(KEY, fm.params))
    rng = np.random.default_rng(0)
    for p, v in adapter.items():
      v = rng.normal(size=v.shape).astype(np.float32) * 0.3
      if p.endswith('lora_E'):
        v[..., 1:] *= rng.random(v[..., 1:].shape) < 0.5
      adapter[p] = v
    adapter = tree.unflatten(adapter)
    kept = {m: k.sum(-1) for m, k in adalora.kept(adapter).items()}
    plain, lora_adapter = adalora.to_lora(method, adapter)
    ours = _jax_out(method, adapter, fm)
    assert _max_diff(_jax_out(plain, lora_adapter, fm), ours) < ATOL    # measured: 6.9e-7
    directory = tmp_path / f'scan{scan}'
    hf_format.save_adapter(directory, plain, lora_adapter, fm.config)
    cfg = hf_format.read_config(directory)
    assert cfg['peft_type'] == 'LORA'
    if scan:   # a scanned module: its layers' largest count, for every layer
      want = {_hf_name(m, l): int(k.max()) for m, k in kept.items() for l in (0, 1)}
      assert len(set(np.concatenate(list(kept.values())))) > 1
    else:
      want = {m.replace('/layers_', '.layers.').replace('/', '.'): int(k) for m, k in kept.items()}
    assert cfg['r'] == max(want.values()) and len(set(want.values())) > 1
    assert {n: r for n, r in want.items() if r != cfg['r']} == {
        n.replace('\\', ''): r for n, r in cfg['rank_pattern'].items()}
    loaded = _hf_load(copy.deepcopy(torch_model), directory)
    assert _max_diff(_torch_out(loaded, 'causal_lm'), ours) < ATOL    # measured: 1.0e-6


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(8, name='v_proj')(jnp.tanh(nn.Dense(8, name='q_proj')(x)))


def test_gradient_accumulation_updates_once_per_optimizer_step():
  """With optax.MultiSteps(k=2) the allocator runs on the second micro-batch only, with the mean
  gradient: two half batches give the state and adapter of one step on the whole batch."""
  method = adalora.adalora(init_r=4, target_r=2, tinit=0, tfinal=1, total_step=4,
                           target='.*_proj')
  apply = method.apply(MLP().apply)
  loss = lambda a, p, b, rng: (jnp.mean((apply(a, p, b['x']) - b['y']) ** 2), {})
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  rep = sharding.replicated(mesh)
  rng = np.random.default_rng(0)
  x, y = (rng.normal(size=(4, 8)).astype(np.float32) for _ in range(2))
  params = MLP().init(KEY, x)['params']

  def run(tx, batches):
    state = TrainState.create(method.init(KEY, params), tx, jax.random.key(2),
                              init_state=method.init_state)
    step = make_train_step(loss, tx, state_shardings=state_shardings(
        state, jax.tree.map(lambda _: rep, state.adapter), mesh), base_shardings=rep,
        batch_sharding=rep, donate=False, regularizer=method.regularizer, update=method.update)
    states = [state]
    for b in batches:
      states.append(step(states[-1], params, b)[0])
    return states

  accumulated = run(optax.MultiSteps(optax.adam(1e-2), 2).gradient_transformation(),
                    [{'x': x[:2], 'y': y[:2]}, {'x': x[2:], 'y': y[2:]}])
  whole = run(optax.adam(1e-2), [{'x': x, 'y': y}])
  jax.tree.map(np.testing.assert_array_equal, accumulated[1].method_state,
               accumulated[0].method_state)   # micro-batch 1: no update
  masks = [tree.flatten(s.method_state['mask']) for s in (accumulated[2], whole[1])]
  jax.tree.map(np.testing.assert_array_equal, *masks)
  # step 1 masks to budget int((8 - 4) * (1 - 1/3) ** 3 + 4) = 5 of 8
  assert sum(int(np.sum(m)) for m in masks[0].values()) == 5
  for a, b in ((accumulated[2].method_state, whole[1].method_state),
               (accumulated[2].adapter, whole[1].adapter)):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-7), a, b)


@pytest.mark.parametrize('kwargs, message', [
    (dict(init_r=4, target_r=6),
     r'target_r=6 must be an int in \[0, init_r=4\] \(target_r > init_r\)'),
    (dict(tinit=5, tfinal=5),
     r'tinit \+ tfinal = 5 \+ 5 >= total_step=10 leaves no budgeting phase'),
    (dict(total_step=None), r'needs total_step \(the number of optimizer steps\) > 0, got None'),
    (dict(beta1=1.0), r'beta1=1.0 must be in \(0, 1\)'),
], ids=['target_r > init_r', 'tinit + tfinal >= total_step', 'no total_step', 'beta1'])
def test_bad_hyper_parameters_are_refused(kwargs, message):
  with pytest.raises(ValueError, match=message):
    methods.get('adalora', **{'total_step': 10, **kwargs})


def test_rank_pattern_naming_a_module_the_base_lacks_is_refused(flax_model, hf_model, tmp_path):
  fm, torch_model = _llama(flax_model, hf_model, scan=False)
  pm = _hf_masked(torch_model, {'model.layers.0.self_attn.q_proj.lora_E.default':
                                [True, False, True, True]}, init_r=4, target_r=2, total_step=10)
  pm.save_pretrained(tmp_path)
  cfg = json.loads((tmp_path / hf_format.CONFIG_FILE).read_text())
  cfg['rank_pattern']['model.layers.7.self_attn.q_proj.lora_E'] = [True] * 4
  (tmp_path / hf_format.CONFIG_FILE).write_text(json.dumps(cfg))
  with pytest.raises(errors.CheckpointError,
                     match=r'rank_pattern names module model\.layers\.7\.self_attn\.q_proj '
                           r'\(model\.layers\.7\.self_attn\.q_proj\.lora_E\), which the base '
                           'model lacks'):
    hf_format.load_adapter(tmp_path, fm.params, fm.config)


@pytest.fixture
def compilation_cache(tmp_path):
  """A persistent compilation cache for one test: its runs compile the same programs."""
  from jax.experimental.compilation_cache import compilation_cache as cc
  keys = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs')
  saved = {k: getattr(jax.config, k) for k in keys}
  jax.config.update(keys[0], str(tmp_path / 'xla_cache'))
  jax.config.update(keys[1], 0)
  cc.reset_cache()
  yield
  for k, v in saved.items():
    jax.config.update(k, v)
  cc.reset_cache()


def test_runlocal_sentiment_trains_and_resumes_bit_for_bit(tiny, tmp_path, compilation_cache):
  """configs/sentiment.py with method=adalora through train.loop: the run masks down to the
  target budget and exports an ADALORA directory; stopping at step 4 (a checkpoint) and resuming
  to 8 ends with the checkpoint (adapter, optimizer, importance averages, mask) of an
  uninterrupted run, bit for bit."""
  def config(steps):
    c = _config(tiny, 'adalora', steps=steps)
    c.optim.update(schedule='constant', warmup_steps=0)   # the learning rate ignores train.steps
    c.peft.update(total_step=8, tinit=1, tfinal=2, deltaT=2, init_r=4, target_r=2)
    return c

  assert config(8).peft.to_dict()['total_step'] == 8
  final = loop.run(config(8), tmp_path / 'ref')
  loop.run(config(4), tmp_path / 'resumed')
  loop.run(config(8), tmp_path / 'resumed')
  ref, resumed = (ocp.PyTreeCheckpointer().restore(tmp_path / d / 'checkpoints' / '8' / 'default')
                  for d in ('ref', 'resumed'))
  assert jax.tree.structure(ref) == jax.tree.structure(resumed)
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(ref), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(got, want, err_msg=jax.tree_util.keystr(path))
  masks = jax.tree.leaves(ref['method_state'][0]['mask'])   # (adalora, modules_to_save head)
  assert len(masks) == 4 and sum(int(np.sum(m)) for m in masks) == 2 * 4   # query, value x 2
  cfg = hf_format.read_config(tmp_path / 'ref' / 'adapter')
  assert cfg['peft_type'] == 'ADALORA' and sum(map(sum, cfg['rank_pattern'].values())) == 8
  assert 0 <= final['accuracy'] <= 1
  assert all(l['regularizer'] > 0 for l in _metrics(tmp_path / 'ref') if l['split'] == 'train')
