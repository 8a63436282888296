#!/usr/bin/env bash
# Lint, type-check and run every test. Expects scripts/setup.sh to have run. Any failing step fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff"
ruff check .
ruff format --check .
echo "== mypy"
mypy server/linlens client/linlens
mypy --strict client/linlens/client
echo "== buf"
buf lint protos
echo "== pytest"
python -m pytest -q -p no:cacheprovider --durations=15 "$@"
