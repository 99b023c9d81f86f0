"""Runs a sweep: every cell through `peftjax.train.loop.run` (launch.py's loop), resumably.

  python -m experiments.run e1_methods                 # configs/sweeps/e1_methods.py
  python -m experiments.run e1_methods --only 'method=(lora|dora)'   # a subset of the cells
  python -m experiments.run e2_rank --processes        # one process per cell
  python -m experiments.report runs/sweeps/e1_methods  # table + plot again, from results.jsonl

The sweep directory (``--workdir``, default ``runs/sweeps/NAME``) holds

- ``sweep.json``: the sweep's config, base overrides, report options and cells. A rerun may add
  cells; another config or base is refused (use another workdir).
- ``cells/<cell id>/``: each cell's launch.py workdir (checkpoints, metrics.jsonl, adapter).
- ``results.jsonl``: one row per finished or failed cell: overrides, final metrics, trainable
  parameters (count, % of the base), wall time, tokens/s, peak memory, loss curves, or the error.
- ``table.md`` and ``plot.png`` (`experiments.report`), rewritten after every cell.

Rerunning the same command skips the cells whose latest row is ``ok``, retries failed cells,
and resumes an interrupted cell from its latest checkpoint. A failing cell is recorded with
its error and the sweep goes on. One progress line per logged step names the cell, its step
and the sweep's ETA (seconds per step so far this session times the steps left).
"""
from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import os
import pathlib
import platform
import re
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback
import types

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from experiments import report, sweep as sweep_lib   # noqa: E402


# -- results.jsonl ------------------------------------------------------------------------------

def append_row(path: pathlib.Path, row: dict):
  """Appends one JSON row under an exclusive lock (cells in other processes append too)."""
  with open(path, 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    f.write(json.dumps(row, default=str) + '\n')
    f.flush()
    fcntl.flock(f, fcntl.LOCK_UN)


# -- measurements -------------------------------------------------------------------------------

def _reset_peak_rss() -> bool:
  try:
    with open('/proc/self/clear_refs', 'w') as f:   # resets VmHWM (Linux)
      f.write('5')
    return True
  except OSError:
    return False


def _peak_rss_mib(reset: bool) -> float:
  if reset:
    for line in open('/proc/self/status'):
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) / 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_device_mib():
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  return stats['peak_bytes_in_use'] / 2**20 if 'peak_bytes_in_use' in stats else None


def _read_metrics(cell_dir: pathlib.Path) -> list[dict]:
  path = cell_dir / 'metrics.jsonl'
  rows = []
  for line in (path.read_text().splitlines() if path.is_file() else []):
    try:
      rows.append(json.loads(line))
    except ValueError:
      pass   # a row being written
  return rows


def curves(metrics: list[dict]) -> dict:
  """``{'train/loss': [[step, value], ...], 'eval/<metric>': ...}`` from metrics.jsonl rows."""
  out = {}
  for r in metrics:
    keys = ('loss',) if r['split'] == 'train' else [k for k in r if k not in ('step', 'split')]
    for k in keys:
      if k in r:
        out.setdefault(f'{r["split"]}/{k}', []).append([r['step'], r[k]])
  return out


def tokens_per_s(metrics: list[dict]):
  """Median training throughput over the logged intervals after the first (compilation)."""
  rates = [r['tokens_per_s'] for r in metrics if r['split'] == 'train' and 'tokens_per_s' in r]
  return statistics.median(rates[1:] or rates) if rates else None


def param_counts(config) -> dict:
  """Trainable and total parameters of a cell's model and method, from shapes alone
  (`peftjax.methods.count`): nothing is loaded but the checkpoint's config."""
  from peftjax.methods import count
  from peftjax.models import checkpoint, registry
  from peftjax.train import loop, tasks
  task = tasks.get(config.task).model_task
  overrides = {'num_labels': config.model.num_labels} if task == 'classification' else {}
  model_config = registry.config_from_hf(checkpoint.open_checkpoint(config.model.source).config,
                                         **overrides)
  params = count.abstract_params(model_config, task)
  method = loop.build_method(config.peft, types.SimpleNamespace(config=model_config,
                                                                params=params))
  return count.counts(method, params)._asdict()


def machine() -> str:
  try:
    for line in subprocess.run(['lscpu'], capture_output=True, text=True).stdout.splitlines():
      if line.startswith('Model name:'):
        return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


# -- progress -----------------------------------------------------------------------------------

def _clock(seconds: float) -> str:
  return str(datetime.timedelta(seconds=int(seconds)))


class Progress:
  """Prints one line per cell start/end and per logged step of a running cell, with the
  sweep's ETA: seconds per step so far this session times the steps left."""

  def __init__(self, name: str, todo: list, steps: dict, total: int, out=sys.stdout):
    self.name, self.total, self.out = name, total, out
    self.steps = steps                      # cell id -> config.train.steps
    self.pending = {c.id for c in todo}     # not finished this session
    self.current = {}                       # cell id -> (cell, dir, start step, last seen step)
    self.start, self.done_steps = time.perf_counter(), 0
    self.done = self.failed = 0
    self._lock = threading.Lock()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._poll, daemon=True)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()

  def _say(self, cell, text: str):
    label = f'[{self.name}] cell {cell.index + 1}/{self.total} {cell.id}'
    print(f'{label}: {text}', file=self.out, flush=True)

  def eta(self) -> str:
    left = sum(self.steps[c] - self.current[c][3] if c in self.current else self.steps[c]
               for c in self.pending)
    elapsed = time.perf_counter() - self.start
    if not self.done_steps:
      return 'sweep ETA unknown'
    return f'sweep ETA {_clock(elapsed / self.done_steps * left)} ({_clock(elapsed)} so far)'

  def begin(self, cell, cell_dir: pathlib.Path):
    from peftjax.train import rundir
    steps = rundir.RunDir(cell_dir).checkpoint_steps() if cell_dir.is_dir() else []
    start = steps[-1] if steps else 0
    with self._lock:
      self.current[cell.id] = (cell, cell_dir, start, start)
      self._say(cell, f'start{f" (resuming from step {start})" if start else ""}; {self.eta()}')

  def end(self, cell, row: dict):
    with self._lock:
      self._update(cell.id)
      _, _, _, seen = self.current.pop(cell.id)
      self.done_steps += self.steps[cell.id] - seen
      self.pending.discard(cell.id)
      ok = row['status'] == 'ok'
      self.done += ok
      self.failed += not ok
      what = (', '.join(f'{k} {v:.4g}' for k, v in row['metrics'].items()) if ok
              else f'FAILED: {row["error"].splitlines()[0][:200]}')
      self._say(cell, f'{row["status"]} in {_clock(row["wall_s"])} ({what}); {self.done} ok, '
                      f'{self.failed} failed, {len(self.pending)} to go; {self.eta()}')

  def _update(self, cid: str):
    cell, cell_dir, start, seen = self.current[cid]
    rows = [r for r in _read_metrics(cell_dir) if r['split'] == 'train' and r['step'] > seen]
    for r in rows:
      self.done_steps += r['step'] - seen
      seen = r['step']
      self.current[cid] = (cell, cell_dir, start, seen)
      self._say(cell, f'step {seen}/{self.steps[cid]} loss {r["loss"]:.4f}; {self.eta()}')

  def _poll(self):
    while not self._stop.wait(2.0):
      with self._lock:
        for cid in list(self.current):
          self._update(cid)


# -- one cell -----------------------------------------------------------------------------------

def run_cell(s: sweep_lib.Sweep, cell: sweep_lib.Cell, workdir: pathlib.Path) -> dict:
  """Runs one cell in this process (resuming its checkpoint) and returns its results row;
  an exception becomes a ``failed`` row with the error."""
  from peftjax.train import loop
  cell_dir = workdir / 'cells' / cell.id
  start = time.perf_counter()
  reset = _reset_peak_rss()
  row = {'sweep': s.name, 'cell': cell.id, 'index': cell.index, 'overrides': cell.overrides,
         'status': 'ok', 'error': None, 'metrics': {}, 'params': None}
  try:
    config = s.build_config(cell.overrides)
    row['steps'] = config.train.steps
    row['params'] = param_counts(config)
    row['metrics'] = loop.run(config, cell_dir)
  except Exception as err:   # recorded; the sweep goes on
    row.update(status='failed', error=f'{type(err).__name__}: {err}\n'
               + ''.join(traceback.format_exception(err)[-6:]))
  metrics = _read_metrics(cell_dir)
  row.update(wall_s=time.perf_counter() - start, tokens_per_s=tokens_per_s(metrics),
             peak_rss_mib=_peak_rss_mib(reset), peak_device_mib=_peak_device_mib(),
             curves=curves(metrics), host=socket.gethostname(), machine=machine(),
             finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'))
  return row


def _cell_process(spec: str, workdir: pathlib.Path, cell: sweep_lib.Cell):
  cell_dir = workdir / 'cells' / cell.id
  cell_dir.mkdir(parents=True, exist_ok=True)
  log = open(cell_dir / 'process.log', 'ab')
  cmd = [sys.executable, '-m', 'experiments.run', spec, '--workdir', str(workdir),
         '--cell', cell.id]
  return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log


def _lost_process_row(s, cell, workdir, code: int, seconds: float) -> dict:
  log = workdir / 'cells' / cell.id / 'process.log'
  tail = log.read_text(errors='replace')[-2000:] if log.is_file() else ''
  return {'sweep': s.name, 'cell': cell.id, 'index': cell.index, 'overrides': cell.overrides,
          'status': 'failed', 'metrics': {}, 'params': None, 'wall_s': seconds,
          'error': f'cell process exited with code {code} without a row; log tail:\n{tail}'}


# -- the sweep ----------------------------------------------------------------------------------

def pin(s: sweep_lib.Sweep, workdir: pathlib.Path):
  """Writes ``sweep.json``; refuses a directory that holds a sweep with another config/base."""
  path = workdir / 'sweep.json'
  if path.is_file():
    old = json.loads(path.read_text())
    new = json.loads(json.dumps(s.pinned(), default=str))
    diff = [k for k in new if old.get(k) != new[k]]
    if diff:
      raise ValueError(f'{workdir} holds sweep results of another definition ('
                       + '; '.join(f'{k}: {old.get(k)!r} -> {new[k]!r}' for k in diff)
                       + '); use another --workdir')
  cells = [{'cell': c.id, 'overrides': c.overrides} for c in s.cells]
  path.write_text(json.dumps({**s.pinned(), 'report': s.report, 'cells': cells}, indent=2,
                             default=str))


def run_sweep(s: sweep_lib.Sweep, workdir, *, spec: str | None = None, processes: bool = False,
              jobs: int = 1, only: str | None = None, out=sys.stdout) -> list[dict]:
  """Runs the cells of ``s`` not yet finished in ``workdir``; returns the new rows. With
  ``processes``, each cell runs in its own process (``spec``: how to load the sweep there),
  ``jobs`` at a time."""
  from peftjax.train import rundir
  workdir = pathlib.Path(workdir)
  lock = rundir.RunDir(workdir).lock()   # one runner per sweep directory
  try:
    pin(s, workdir)
    results = workdir / 'results.jsonl'
    latest = {r['cell']: r for r in report.load_rows(results)} if results.is_file() else {}
    cells = [c for c in s.cells if not only or re.search(only, c.id)]
    todo = [c for c in cells if latest.get(c.id, {}).get('status') != 'ok']
    print(f'[{s.name}] {len(s.cells)} cells, {len(cells) - len(todo)} finished (skipped), '
          f'{len(todo)} to run; results in {results}', file=out, flush=True)
    steps = {c.id: s.build_config(c.overrides).train.steps for c in todo}
    rows = []
    with Progress(s.name, todo, steps, len(s.cells), out) as progress:
      if processes:
        rows = _run_processes(s, todo, workdir, spec, jobs, progress)
      else:
        for cell in todo:
          progress.begin(cell, workdir / 'cells' / cell.id)
          row = run_cell(s, cell, workdir)
          append_row(results, row)
          rows.append(row)
          progress.end(cell, row)
          report.write(workdir, **s.report)
    if results.is_file():
      print(f'[{s.name}] report: {", ".join(map(str, report.write(workdir, **s.report)))}',
            file=out, flush=True)
    return rows
  finally:
    lock.release()


def _run_processes(s, todo, workdir, spec, jobs, progress) -> list[dict]:
  if spec is None:
    raise ValueError('processes=True needs the sweep spec (a name or file path) to load it '
                     'in each cell process')
  results = workdir / 'results.jsonl'
  queue, running, rows = list(todo), {}, []
  while queue or running:
    while queue and len(running) < max(1, jobs):
      cell = queue.pop(0)
      progress.begin(cell, workdir / 'cells' / cell.id)
      running[cell.id] = (cell, *_cell_process(spec, workdir, cell), time.perf_counter())
    time.sleep(1.0)
    for cid, (cell, proc, log, started) in list(running.items()):
      if proc.poll() is None:
        continue
      log.close()
      del running[cid]
      mine = [r for r in report.load_rows(results, latest=False)
              if r['cell'] == cid and r.get('pid') == proc.pid] if results.is_file() else []
      row = mine[-1] if mine else _lost_process_row(s, cell, workdir, proc.returncode,
                                                    time.perf_counter() - started)
      if not mine:
        append_row(results, row)
      rows.append(row)
      progress.end(cell, row)
      report.write(workdir, **s.report)
  return rows


def load_spec(spec: str) -> sweep_lib.Sweep:
  """A sweep by name (``configs/sweeps/NAME.py``, ``NAME:ARG``) or by file path (``x.py[:ARG]``)."""
  path, _, arg = spec.partition(':')
  if path.endswith('.py'):
    import importlib.util
    module_spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return sweep_lib.load(module, arg or None)
  return sweep_lib.load(spec)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('sweep', help='NAME[:ARG] of configs/sweeps/NAME.py, or a sweep file path')
  p.add_argument('--workdir', help='sweep directory (default runs/sweeps/NAME)')
  p.add_argument('--only', help='run only the cells whose id matches this regex (re.search)')
  p.add_argument('--processes', action='store_true', help='one process per cell')
  p.add_argument('--jobs', type=int, default=1, help='with --processes: cells at once')
  p.add_argument('--list', action='store_true', help='print the cells and exit')
  p.add_argument('--cell', help=argparse.SUPPRESS)   # internal: run this one cell, append its row
  args = p.parse_args(argv)
  s = load_spec(args.sweep)
  workdir = pathlib.Path(args.workdir or ROOT / 'runs' / 'sweeps' / s.name)
  if args.list:
    for c in s.cells:
      print(f'{c.index:4d}  {c.id}')
    return
  if args.cell:
    (cell,) = [c for c in s.cells if c.id == args.cell]
    row = run_cell(s, cell, workdir)
    append_row(workdir / 'results.jsonl', {**row, 'pid': os.getpid()})
    return
  run_sweep(s, workdir, spec=args.sweep, processes=args.processes, jobs=args.jobs,
            only=args.only)


if __name__ == '__main__':
  main()
