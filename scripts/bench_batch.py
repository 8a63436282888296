"""Rows/s of one batch job run three ways on SmolLM2 (docs/batch.md): in-process (1 torch thread), a fleet of two
one-thread `linlens serve` processes, and a local Ray with two one-thread actors (ray.init timed apart).

    python scripts/bench_batch.py [--rows 12] [--top-k 0]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from linlens.batch import BatchJob, run_batch
from linlens.contract.options import ExplainOptions

PROMPTS = ["The capital of France is", "One, two, three,", "Cats and dogs are", "The sky is", "Water boils at"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=12)
    parser.add_argument("--top-k", type=int, default=0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    source = work / "in.jsonl"
    source.write_text(
        "".join(json.dumps({"id": f"r{i}", "prompt": PROMPTS[i % len(PROMPTS)]}) + "\n" for i in range(args.rows))
    )
    options = ExplainOptions(top_k=args.top_k)
    results: dict[str, float] = {}

    started = time.monotonic()
    summary = run_batch(BatchJob(source, work / "inprocess", options=options, torch_threads=1), progress=None)
    results["in-process (model load included)"] = time.monotonic() - started
    results["in-process rows/s"] = summary.rows_per_second

    servers = []
    for _ in range(2):
        port = free_port()
        command = [sys.executable, "-m", "linlens.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
        command += ["--metrics-port", "0", "--torch-threads", "1", "--no-warmup"]
        servers.append((subprocess.Popen(command, stderr=subprocess.DEVNULL), f"127.0.0.1:{port}"))
    try:
        for _, target in servers:
            subprocess.run([sys.executable, "-m", "linlens.cli", "wait", "--server", target], check=True)
        summary = run_batch(
            BatchJob(source, work / "fleet", options=options), servers=[t for _, t in servers], progress=None
        )
        results["fleet of 2 rows/s"] = summary.rows_per_second
    finally:
        for process, _ in servers:
            process.kill()

    import ray

    started = time.monotonic()
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    results["ray.init s"] = time.monotonic() - started
    summary = run_batch(
        BatchJob(source, work / "ray", options=options, torch_threads=1), ray=True, actors=2, progress=None
    )
    results["ray 2 actors rows/s (actor start included)"] = summary.rows_per_second
    results["ray job s"] = summary.seconds
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
