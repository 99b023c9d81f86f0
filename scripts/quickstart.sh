#!/usr/bin/env bash
# Sets up the environment, then fine-tunes all-MiniLM-L6-v2 with LoRA on the bundled sentiment
# tweets and prints the validation accuracy. Re-running resumes (or re-reports) the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
exec .venv/bin/python launch.py --config=configs/sentiment.py:method=lora \
  --workdir="${WORKDIR:-runs/quickstart}" "$@"
