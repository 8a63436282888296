#!/usr/bin/env bash
# The main job: start the server on the default model (smollm2-135m), wait until it is SERVING, then call it with
# the client to show an explanation. The server keeps running afterwards (Ctrl-C stops it); pass --exit to stop.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
PORT=${LINLENS_PORT:-50051}
linlens serve --port "$PORT" --metrics-port "${LINLENS_METRICS_PORT:-9464}" &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER' EXIT
python - "$PORT" <<'PY'
import sys
from linlens.client import Client
with Client(f"localhost:{sys.argv[1]}") as client:
    client.wait_until_ready(timeout=300)
PY
echo "== linlens explain --server localhost:$PORT 'The bridge out of Marin is the'"
linlens explain --server "localhost:$PORT" "The bridge out of Marin is the" --top-k 3
echo "== linlens explain --server localhost:$PORT 'The bridge out of Marin is the' --top-k 0 --layers every:10"
linlens explain --server "localhost:$PORT" "The bridge out of Marin is the" --top-k 0 --layers every:10 --layer-top-k 1
echo "== linlens generate --server localhost:$PORT 'The bridge out of Marin is the' --max-new-tokens 8"
linlens generate --server "localhost:$PORT" "The bridge out of Marin is the" --max-new-tokens 8
if [ "${1:-}" = "--exit" ]; then exit 0; fi
echo "server running on localhost:$PORT (metrics on :${LINLENS_METRICS_PORT:-9464}/metrics); Ctrl-C to stop"
wait $SERVER
