"""Sweeps end to end (experiments.run / report): a runlocal sentiment sweep on a tiny random
BERT with MiniLM's tokenizer and the bundled tweets: rows, resume, failure, reports from
results.jsonl alone, one process per cell; and the sweep definition's bad inputs."""
import doctest
import io
import pathlib
import shutil
import sys
import types

import jax
import pytest
import safetensors.numpy

ROOT = pathlib.Path(__file__).parents[2]
sys.path.insert(0, str(ROOT))

from experiments import report, run, sweep  # noqa: E402
from peftjax.train import loop  # noqa: E402

CONFIG = 'configs/sentiment.py:runlocal'


def _module(minilm_bert, cells, **extra) -> types.ModuleType:
  m = types.ModuleType('tiny_sweep')
  m.CONFIG = CONFIG
  m.BASE = {'model.source': str(minilm_bert), 'data.max_train_examples': 64,
            'data.max_eval_examples': 32, 'data.eval_batch_size': 16, 'data.max_length': 16,
            'train.steps': 4, 'train.log_every': 1, 'train.eval_every': 2,
            'train.checkpoint_every': 2}
  m.get_sweep = lambda arg=None: cells
  for k, v in extra.items():
    setattr(m, k, v)
  return m


CELLS = [{'arg.method': 'lora', 'data.batch_size': 12},   # fails: not divisible by 8 devices
         {'arg.method': 'lora', 'seed': 0}, {'arg.method': 'lora', 'seed': 1}]


@pytest.fixture(scope='module', autouse=True)
def compilation_cache(tmp_path_factory):
  """A persistent compilation cache for this module: the cells differ only in their seed (and
  the interrupted run in its step count), so most programs compile once."""
  from jax.experimental.compilation_cache import compilation_cache as cc
  saved = {k: getattr(jax.config, k) for k in ('jax_compilation_cache_dir',
                                               'jax_persistent_cache_min_compile_time_secs')}
  jax.config.update('jax_compilation_cache_dir', str(tmp_path_factory.mktemp('xla_cache')))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  cc.reset_cache()
  yield
  for k, v in saved.items():
    jax.config.update(k, v)
  cc.reset_cache()


@pytest.fixture(scope='module')
def ran(minilm_bert, tmp_path_factory):
  """The three-cell sweep run twice; cell 'method=lora,seed=0' was interrupted at step 2."""
  workdir = tmp_path_factory.mktemp('sweep')
  s = sweep.load(_module(minilm_bert, CELLS))
  lora = s.cells[1]
  partial = s.build_config(lora.overrides)
  partial.train.steps = 2                           # an interrupted cell: checkpoint at step 2
  loop.run(partial, workdir / 'cells' / lora.id)
  first, second = io.StringIO(), io.StringIO()
  rows = run.run_sweep(s, workdir, out=first)
  again = run.run_sweep(s, workdir, out=second)
  return types.SimpleNamespace(workdir=workdir, sweep=s, rows=rows, again=again,
                               first=first.getvalue(), second=second.getvalue())


def test_rows_hold_overrides_metrics_params_time_throughput_memory(ran):
  failed, lora, lora1 = ran.rows
  assert [r['status'] for r in ran.rows] == ['failed', 'ok', 'ok']
  for r in (lora, lora1):
    assert set(r['metrics']) == {'loss', 'accuracy', 'f1_macro'}
    assert r['wall_s'] > 0 and r['tokens_per_s'] > 0 and r['peak_rss_mib'] > 0
    assert 0 < r['params']['percent'] < 100
    assert r['params']['trainable'] < r['params']['total']
    assert [s for s, _ in r['curves']['eval/accuracy']] == [2, 4]
  assert lora['overrides'] == {'arg.method': 'lora', 'seed': 0}
  assert lora['cell'] == 'method=lora,seed=0' and lora['params'] == lora1['params']
  assert lora['metrics'] != lora1['metrics']
  # the count from shapes alone is what was trained and exported: LoRA A and B on query and
  # value of 2 layers (rank 8, width 16) and the fresh classifier (16 x 2 + 2)
  exported = safetensors.numpy.load_file(
      str(ran.workdir / 'cells' / 'method=lora,seed=0' / 'adapter' / 'adapter_model.safetensors'))
  assert lora['params']['trainable'] == sum(v.size for v in exported.values()) == 2 * 2 * 2 * 16 * 8 + 34
  rows = report.load_rows(ran.workdir / 'results.jsonl')
  assert [r['cell'] for r in rows] == [c.id for c in ran.sweep.cells]


def test_a_failing_cell_is_recorded_and_the_sweep_goes_on(ran):
  failed = ran.rows[0]
  assert failed['cell'] == 'method=lora,data.batch_size=12'
  assert failed['error'].startswith('ValueError: config.data.batch_size=12 is not divisible by '
                                    "the mesh's data x fsdp = 8")
  assert 'FAILED: ValueError: config.data.batch_size=12' in ran.first
  assert '1 ok, 1 failed, 1 to go' in ran.first


def test_the_interrupted_cell_resumes_and_a_rerun_skips_finished_cells(ran):
  assert 'cell 2/3 method=lora,seed=0: start (resuming from step 2)' in ran.first
  lora = ran.rows[1]
  # resumed at step 2: steps 3 and 4 trained in the sweep, the step-1 and 2 rows are the
  # interrupted run's
  assert [s for s, _ in lora['curves']['train/loss']] == [1, 2, 3, 4]
  assert 'cell 2/3 method=lora,seed=0: step 3/4 loss' in ran.first
  assert 'cell 3/3 method=lora,seed=1: start; sweep ETA' in ran.first
  assert 'sweep ETA' in ran.first
  # the rerun skips both finished cells and retries the failed one only
  assert '3 cells, 2 finished (skipped), 1 to run' in ran.second
  assert [r['cell'] for r in ran.again] == ['method=lora,data.batch_size=12']


def test_table_and_plot_from_results_jsonl_alone(ran, tmp_path):
  shutil.copy(ran.workdir / 'results.jsonl', tmp_path / 'results.jsonl')
  report.main([str(tmp_path)])                      # no sweep.json, no cells
  text = (tmp_path / 'table.md').read_text()
  head, rule, *body = text.splitlines()
  # columns: the keys that vary (the method does not), then the summary
  assert head.split(' | ')[:3] == ['| data.batch_size', 'seeds', 'trainable']
  assert 'accuracy' in head and 'f1_macro' in head and 'peak RSS (MiB)' in head
  assert body[0].startswith('| 12 | 0/1 | 1,058 | 0.2141 | — |')   # the failed cell's latest row
  assert body[1].startswith('| — | 2 | 1,058 | 0.2141 | ') and ' ± ' in body[1]   # 2 seeds
  assert 'Failed cells (1):' in text and '`method=lora,data.batch_size=12`: ValueError' in text
  png = (tmp_path / 'plot.png').read_bytes()
  assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 10_000
  assert (ran.workdir / 'table.md').read_text() == text   # the runner wrote the same table


def test_one_process_per_cell(minilm_bert, tmp_path):
  """The cell runs in a child process that appends its own row (a fast-failing cell)."""
  module = tmp_path / 'one_cell.py'
  base = _module(minilm_bert, []).BASE
  module.write_text(f'CONFIG = {CONFIG!r}\nBASE = {base!r}\n'
                    f'def get_sweep(arg=None):\n  return [{CELLS[0]!r}]\n')
  out = io.StringIO()
  s = run.load_spec(str(module))
  rows = run.run_sweep(s, tmp_path / 'sweep', spec=str(module), processes=True, out=out)
  assert len(rows) == 1 and rows[0]['status'] == 'failed' and rows[0]['pid'] > 0
  assert 'is not divisible by' in rows[0]['error']
  assert (tmp_path / 'sweep' / 'cells' / rows[0]['cell'] / 'process.log').is_file()


def test_a_key_that_is_no_config_field_is_named(minilm_bert):
  with pytest.raises(ValueError, match=r"cell 1 \{'peft.rnak': 4\}: 'peft.rnak' is not a config "
                     r'field of configs/sentiment.py \(nearest: peft.rank'):
    sweep.load(_module(minilm_bert, [{'peft.rank': 4}, {'peft.rnak': 4}]))
  with pytest.raises(ValueError, match=r"cell 0 \{'arg.methd': 'dora'\}: unknown config argument "
                     r"'methd'"):
    sweep.load(_module(minilm_bert, [{'arg.methd': 'dora'}]))
  with pytest.raises(ValueError, match=r"'train' is not a config field"):
    sweep.load(_module(minilm_bert, [{'train': 3}]))
  with pytest.raises(TypeError, match=r"cell 0 .*: train.steps='many'"):
    sweep.load(_module(minilm_bert, [{'train.steps': 'many'}]))


def test_identical_cells_are_refused(minilm_bert):
  cells = sweep.product(sweep.sweep('arg.method', ['lora', 'dora', 'lora']), sweep.seeds(1))
  with pytest.raises(ValueError, match=r"cells 0 and 2 have identical overrides "
                     r"\{'arg.method': 'lora', 'seed': 0\}"):
    sweep.load(_module(minilm_bert, cells))
  with pytest.raises(ValueError, match=r"cells 0 and 1 map to the same directory 'seed=1'"):
    sweep.load(_module(minilm_bert, [{'seed': 1}, {'seed': '1'}]))
  with pytest.raises(ValueError, match=r"product: key 'seed' is set by two of the grids"):
    sweep.product(sweep.seeds(2), sweep.seeds(2))
  with pytest.raises(ValueError, match=r'zipit: grids of different lengths \[2, 3\]'):
    sweep.zipit(sweep.seeds(2), sweep.sweep('peft.rank', [1, 2, 3]))


def test_a_directory_of_another_sweep_definition_is_refused(minilm_bert, tmp_path):
  run.pin(sweep.load(_module(minilm_bert, [{'seed': 0}])), tmp_path)
  run.pin(sweep.load(_module(minilm_bert, [{'seed': 0}, {'seed': 1}])), tmp_path)  # cells added
  other = _module(minilm_bert, [{'seed': 0}])
  other.BASE = {**other.BASE, 'train.steps': 5}
  with pytest.raises(ValueError, match=r"holds sweep results of another definition \(base: .*"
                     r"'train.steps': 4.* -> .*'train.steps': 5"):
    run.pin(sweep.load(other), tmp_path)


@pytest.mark.parametrize('name', ['e1_methods', 'e2_rank', 'e3_layerwise'])
def test_committed_sweeps_load(name):
  s = sweep.load(name)
  assert len(s.cells) > 1


def test_docstring_examples():
  for module in (sweep, report):
    assert doctest.testmod(module, optionflags=doctest.ELLIPSIS).failed == 0
