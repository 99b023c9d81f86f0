"""Sweeps: grids of config overrides, defined beside the configs (big_vision's manner).

A sweep module ``configs/sweeps/NAME.py`` holds::

  CONFIG = 'configs/sentiment.py:runlocal'   # the config file[:argument], as launch.py's --config
  BASE = {'train.steps': 100}                # optional: overrides of every cell
  REPORT = {'metrics': ['accuracy']}         # optional: how `experiments.report` presents it
  def get_sweep(arg=None):                   # one dict of overrides per cell
    return sweep.product(sweep.sweep('arg.method', ['lora', 'dora']), sweep.seeds(3))

Keys are config field paths (``'peft.rank'``, ``'seed'``) or, prefixed ``arg.``, arguments of
the config file (``{'arg.method': 'dora'}`` means ``configs/sentiment.py:runlocal,method=dora``).

>>> product(sweep('arg.method', ['lora', 'dora']), seeds(2))   # doctest: +NORMALIZE_WHITESPACE
[{'arg.method': 'lora', 'seed': 0}, {'arg.method': 'lora', 'seed': 1},
 {'arg.method': 'dora', 'seed': 0}, {'arg.method': 'dora', 'seed': 1}]
>>> zipit(sweep('peft.rank', [4, 16]), sweep('peft.alpha', [8, 32]))
[{'peft.rank': 4, 'peft.alpha': 8}, {'peft.rank': 16, 'peft.alpha': 32}]
>>> chain(fixed({'arg.method': 'full'}), sweep('arg.method', ['lora']))
[{'arg.method': 'full'}, {'arg.method': 'lora'}]
>>> cell_id({'arg.method': 'bitfit', 'peft.target': 'classifier', 'seed': 0})
'method=bitfit,peft.target=classifier,seed=0'
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import importlib.util
import itertools
import json
import pathlib
import re
import sys
import types
from typing import Any, Iterable

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARG = 'arg.'


# -- grid helpers ------------------------------------------------------------------------------

def sweep(key: str, values: Iterable) -> list[dict]:
  """One cell per value of ``key``."""
  return [{key: v} for v in values]


def fixed(overrides: dict) -> list[dict]:
  """A single cell (to combine with ``product``/``chain``)."""
  return [dict(overrides)]


def seeds(n: int, key: str = 'seed') -> list[dict]:
  """Seeds 0 .. n-1."""
  return sweep(key, range(n))


def product(*grids: list[dict]) -> list[dict]:
  """Every combination, the first grid varying slowest; a key in two grids is refused."""
  out = []
  for combo in itertools.product(*grids):
    cell = {}
    for part in combo:
      for k in part:
        if k in cell:
          raise ValueError(f'product: key {k!r} is set by two of the grids')
      cell.update(part)
    out.append(cell)
  return out


def zipit(*grids: list[dict]) -> list[dict]:
  """Cells merged position by position; the grids must have the same length."""
  lengths = [len(g) for g in grids]
  if len(set(lengths)) > 1:
    raise ValueError(f'zipit: grids of different lengths {lengths}')
  return [product(*([part] for part in row))[0] for row in zip(*grids)]


def chain(*grids: list[dict]) -> list[dict]:
  """The grids one after another."""
  return [dict(c) for g in grids for c in g]


# -- cells -------------------------------------------------------------------------------------

def cell_id(overrides: dict) -> str:
  """A readable, file-name-safe id from the overrides (``arg.`` dropped); long or lossy ids
  end with a hash of the overrides, so distinct overrides never share an id."""
  text = ','.join(f'{k[len(ARG):] if k.startswith(ARG) else k}={_text(v)}'
                  for k, v in overrides.items())
  safe = re.sub(r'[^A-Za-z0-9=.,_+-]', '_', text) or 'base'
  if safe != text or len(safe) > 100:
    digest = hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]
    safe = f'{safe[:90]}-{digest}'
  return safe


def _text(v) -> str:
  return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


@dataclasses.dataclass(frozen=True)
class Cell:
  index: int
  id: str
  overrides: dict


@dataclasses.dataclass(frozen=True)
class Sweep:
  name: str
  config: str          # config file[:argument]
  base: dict           # overrides of every cell
  cells: tuple         # Cell, ...
  report: dict         # presentation options for experiments.report

  def pinned(self) -> dict:
    """What a sweep directory pins (cells may be added later; these may not change)."""
    return {'name': self.name, 'config': self.config, 'base': self.base}

  def build_config(self, overrides: dict):
    """The resolved ml-collections config of one cell."""
    return build_config(self.config, {**self.base, **overrides})


def load(spec: str | types.ModuleType, arg: str | None = None) -> Sweep:
  """The sweep ``configs/sweeps/NAME.py`` for ``NAME[:ARG]`` (or a module object), checked:
  every key is a config field or argument, and no two cells have the same overrides."""
  if isinstance(spec, types.ModuleType):
    module, name = spec, spec.__name__.rsplit('.', 1)[-1]
  else:
    name, _, arg_ = spec.partition(':')
    arg = arg_ or arg
    if str(ROOT) not in sys.path:
      sys.path.insert(0, str(ROOT))
    try:
      module = importlib.import_module(f'configs.sweeps.{name}')
    except ModuleNotFoundError as err:
      known = sorted(p.stem for p in (ROOT / 'configs' / 'sweeps').glob('[!_]*.py'))
      raise ValueError(f'no sweep {name!r} (configs/sweeps/{name}.py); known: '
                       f'{", ".join(known)}') from err
  cells = module.get_sweep(arg)
  out = Sweep(name, module.CONFIG, dict(getattr(module, 'BASE', {})),
              tuple(Cell(i, cell_id(c), dict(c)) for i, c in enumerate(cells)),
              dict(getattr(module, 'REPORT', {})))
  check(out)
  return out


def check(s: Sweep):
  """Refuses identical cells and keys that are no config field (or argument), naming them."""
  seen = {}
  for cell in s.cells:
    if not isinstance(cell.overrides, dict):
      raise TypeError(f'sweep {s.name}: cell {cell.index} is {cell.overrides!r}, not a dict')
    key = json.dumps(cell.overrides, sort_keys=True, default=repr)
    if key in seen:
      raise ValueError(f'sweep {s.name}: cells {seen[key]} and {cell.index} have identical '
                       f'overrides {cell.overrides}; each cell must differ')
    seen[key] = cell.index
  ids = {}
  for cell in s.cells:
    if cell.id in ids:   # e.g. 'seed': 1 vs 'seed': '1'
      raise ValueError(f'sweep {s.name}: cells {ids[cell.id]} and {cell.index} map to the same '
                       f'directory {cell.id!r}; make their overrides differ in value')
    ids[cell.id] = cell.index
  for cell in s.cells:
    try:
      s.build_config(cell.overrides)
    except (TypeError, ValueError) as err:
      raise type(err)(f'sweep {s.name}: cell {cell.index} {cell.overrides}: '
                      f'{err.args[0] if err.args else err}') from None


# -- configs -----------------------------------------------------------------------------------

def _config_module(path: str):
  file = pathlib.Path(path)
  file = file if file.is_absolute() else ROOT / file
  if not file.is_file():
    raise ValueError(f'config file {path!r} does not exist')
  spec = importlib.util.spec_from_file_location(f'_sweep_config_{file.stem}', file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _arg_string(base: str, args: dict) -> str:
  items = {}
  for item in filter(None, base.split(',')):
    k, sep, v = item.partition('=')
    items[k] = v if sep else True
  items.update(args)
  return ','.join(k if v is True else f'{k}={v}' for k, v in items.items())


def field_paths(config, prefix: str = '') -> list[str]:
  """Dotted paths of every field of an ml-collections config."""
  out = []
  for k, v in config.items():
    path = f'{prefix}{k}'
    out += field_paths(v, path + '.') if hasattr(v, 'items') else [path]
  return out


def build_config(config: str, overrides: dict):
  """``get_config`` of the config file (``path[:argument]``) with the ``arg.`` overrides in its
  argument, then the field overrides set; an unknown field raises ValueError naming it."""
  path, _, base_arg = config.partition(':')
  args = {k[len(ARG):]: v for k, v in overrides.items() if k.startswith(ARG)}
  c = _config_module(path).get_config(_arg_string(base_arg, args) or None)
  for key, value in overrides.items():
    if not key.startswith(ARG):
      set_field(c, key, value, what=path)
  return c


def set_field(config, key: str, value: Any, what: str = 'the config'):
  *parents, leaf = key.split('.')
  node = config
  for p in parents:
    node = node[p] if hasattr(node, 'items') and p in node else None
    if node is None:
      break
  if node is None or not hasattr(node, 'items') or leaf not in node or hasattr(node[leaf], 'items'):
    near = difflib.get_close_matches(key, field_paths(config), n=3)
    near = f' (nearest: {", ".join(near)})' if near else ''
    raise ValueError(f'{key!r} is not a config field of {what}{near}; config arguments take '
                   f'the prefix {ARG!r}')
  try:
    node[leaf] = value
  except TypeError as err:
    raise TypeError(f'{key}={value!r}: {err}') from None
