#!/usr/bin/env bash
# Sets up the environment and runs the quickstart on the bundled real assets.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
exec .venv/bin/python -m peftjax.quickstart "$@"
