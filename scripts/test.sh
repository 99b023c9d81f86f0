#!/usr/bin/env bash
# Sets up the environment and runs the whole test suite (slow real-weight tests included) and the
# docstring examples of peftjax/ (--doctest-modules, set in setup.cfg).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
exec .venv/bin/python -m pytest -q tests peftjax "$@"
