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
mypy --strict client/linlens/client client/linlens/contract client/linlens/report client/linlens/batch
echo "== buf"
buf lint protos
echo "== pytest"
# The container test (build the image with podman, run it, call it) runs wherever podman is installed; it takes a few
# minutes. LINLENS_CONTAINER_TESTS=0 turns it off. The wheelhouse takes the same CPU torch the venv has, from pip's
# configured index or find-links (TORCH_INDEX_URL set but empty), unless the caller says otherwise.
if [ -z "${LINLENS_CONTAINER_TESTS:-}" ] && command -v podman >/dev/null; then
    export LINLENS_CONTAINER_TESTS=1
    export TORCH_INDEX_URL="${TORCH_INDEX_URL-}"
    export TORCH_SPEC="${TORCH_SPEC:-torch==$(python -c 'import torch; print(torch.__version__.split("+")[0])')}"
fi
python -m pytest -q -p no:cacheprovider --durations=15 "$@"
