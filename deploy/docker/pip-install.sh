#!/bin/sh
# `pip install` as the image build needs it; used by deploy/Dockerfile through a bind mount of deploy/ (never copied
# into a layer). Arguments are passed to pip install unchanged.
#
# - A CA bundle given as the build secret `ca` (--secret id=ca,src=...) is trusted for this command only: the same
#   answer as behind a TLS-intercepting corporate proxy, and the certificate never lands in a layer.
# - Wheels in deploy/wheelhouse/ (filled by deploy/wheelhouse.sh) are preferred sources (--find-links).
# - PIP_OFFLINE=1 forbids every index (--no-index): the air-gapped build; a missing wheel fails the build loudly.
# - `--torch-index` as the first argument (the torch step): TORCH_INDEX_URL (the CPU wheels by default) becomes the
#   only index. Only an extra index would not do: pip takes the highest version from any index, and PyPI's torch
#   (the multi-GB CUDA build) is often newer than the CPU index's. Measured: with the CPU wheel 2.13.0+cpu in the
#   wheelhouse and PyPI reachable, pip chose PyPI's torch 2.15.0 and its CUDA dependencies.
set -eu

torch_step=0
if [ "${1:-}" = "--torch-index" ]; then
    torch_step=1
    shift
fi

if [ -s /run/secrets/ca ]; then
    export PIP_CERT=/run/secrets/ca
fi
wheelhouse=/ctx/deploy/wheelhouse
if ls "$wheelhouse"/*.whl >/dev/null 2>&1; then
    set -- --find-links "$wheelhouse" "$@"
fi
if [ "${PIP_OFFLINE:-0}" = 1 ]; then
    set -- --no-index "$@"
elif [ "$torch_step" = 1 ] && [ -n "${TORCH_INDEX_URL:-}" ]; then
    set -- --index-url "$TORCH_INDEX_URL" "$@"
fi
exec python -m pip install "$@"
