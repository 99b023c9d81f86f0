#!/usr/bin/env bash
# Creates .venv (once) and installs peftjax with the given extras plus the bundled real assets.
# Idempotent: a second run only checks what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.peftjax-installed-$1
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q -U pip
  .venv/bin/python -m pip install -q -e ".[$1]"
  touch "$stamp"
fi
.venv/bin/python -m peftjax.assets install
