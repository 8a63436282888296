#!/usr/bin/env bash
# The main job: start the server on the default model (smollm2-135m), wait until that model is loaded and SERVING,
# then call it with the client to show explanations. A first start converts the model once (about a minute; the
# server logs its progress every few seconds) and caches it in $LINLENS_CACHE_DIR. The server keeps running
# afterwards; Ctrl-C stops it (exit status 0). Pass --exit to stop it right after the calls.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
PORT=${LINLENS_PORT:-50051}
METRICS_PORT=${LINLENS_METRICS_PORT:-9464}
export LINLENS_SERVER="localhost:$PORT"  # the CLI and the SDK call this server

linlens serve --port "$PORT" --metrics-port "$METRICS_PORT" &
SERVER=$!
stop_server() {
    kill -TERM "$SERVER" 2>/dev/null || true
    wait "$SERVER" 2>/dev/null || true
}
trap stop_server EXIT
trap 'echo; echo "stopping the server"; exit 0' INT TERM

# Wait for the model, not just the port; give up at once if the server exits (it logs why).
linlens wait --timeout 900 &
WAITER=$!
wait -n "$SERVER" "$WAITER" || true
if ! kill -0 "$SERVER" 2>/dev/null; then
    echo "demo: the server stopped before its model was ready (its log above says why)" >&2
    exit 1
fi
wait "$WAITER"

echo "== linlens explain 'The bridge out of Marin is the' --top-k 3"
linlens explain "The bridge out of Marin is the" --top-k 3
echo "== linlens explain 'The bridge out of Marin is the' --top-k 0 --layers every:10 --layer-top-k 1"
linlens explain "The bridge out of Marin is the" --top-k 0 --layers every:10 --layer-top-k 1
echo "== linlens generate 'The bridge out of Marin is the' --max-new-tokens 8"
linlens generate "The bridge out of Marin is the" --max-new-tokens 8
if [ "${1:-}" = "--exit" ]; then exit 0; fi
echo "server running on localhost:$PORT (metrics on :$METRICS_PORT/metrics); Ctrl-C to stop"
wait "$SERVER"
