#!/usr/bin/env python
"""Serving throughput under concurrent load: a real linlens server, 1/2/4/8/16 clients, against plain transformers.

    python scripts/bench_serving.py [--model smollm2-135m] [--new-tokens 32] [--clients 1,2,4,8,16] [--markdown out.md]

It starts ``python -m linlens.server`` on a free localhost port (default settings, or ``--server-arg`` extras), and
for each client count N runs max(8, N) GenerateStream requests (8 different prompts in turn, ``--new-tokens`` greedy
tokens each, ignore_eos so every request makes the same number) from N threads, each taking the next request when
its last one ends. It reports tokens/s (all tokens over the wall time of the level), time to first token p50/p95 and
inter-token latency p50/p95 (gaps between a stream's tokens). Then, with the server stopped, in this process:
transformers ``generate`` on the same 8 prompts one at a time, and as one left-padded batch.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "client"), str(ROOT / "server")]

PROMPTS = [
    "The bridge out of Marin is the",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "The capital of France is",
    "Photosynthesis is the process by which plants",
    "In 1969, the first humans to walk on the Moon were",
    "def fibonacci(n):",
    "The three most important things to know about the ocean are",
    "A good recipe for bread starts with",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def start_server(model: str, extra: list[str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "client"), str(ROOT / "server"), env.get("PYTHONPATH", "")])
    env.update(LINLENS_CONFIG="")
    args = [sys.executable, "-m", "linlens.server", "--host", "127.0.0.1", "--port", str(port), "--model", model]
    args += ["--metrics-port", "0", *extra]
    with open(log, "wb") as stderr:
        process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    target = f"127.0.0.1:{port}"
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + 600
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if process.poll() is not None:
                raise SystemExit(f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(grpc.RpcError):
                if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1:
                    break
            if time.monotonic() > deadline:
                raise SystemExit("the server did not become SERVING within 10 minutes")
            time.sleep(0.5)
    return process, target


def run_level(target: str, clients: int, new_tokens: int) -> dict[str, float]:
    from linlens.client import Client
    from linlens.client.retry import NO_RETRY
    from linlens.contract import GeneratedToken

    total = max(len(PROMPTS), clients)
    lock = threading.Lock()
    next_index = [0]
    ttfts: list[float] = []
    gaps: list[float] = []
    tokens = [0]

    def client_loop() -> None:
        with Client(target, timeout=600, retry=NO_RETRY) as client:
            while True:
                with lock:
                    i = next_index[0]
                    next_index[0] += 1
                if i >= total:
                    return
                sent = time.monotonic()
                last = None
                mine = 0
                for event in client.generate_stream(
                    PROMPTS[i % len(PROMPTS)], max_new_tokens=new_tokens, ignore_eos=True
                ):
                    if isinstance(event, GeneratedToken):
                        now = time.monotonic()
                        with lock:
                            if last is None:
                                ttfts.append(now - sent)
                            else:
                                gaps.append(now - last)
                        last = now
                        mine += 1
                with lock:
                    tokens[0] += mine

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    return {
        "requests": total,
        "tokens": tokens[0],
        "seconds": wall,
        "tokens_per_s": tokens[0] / wall,
        "ttft_p50": percentile(ttfts, 50),
        "ttft_p95": percentile(ttfts, 95),
        "itl_p50": percentile(gaps, 50),
        "itl_p95": percentile(gaps, 95),
    }


def transformers_baseline(model_name: str, new_tokens: int) -> dict[str, float]:
    import torch

    from linlens.models import load_model

    loaded = load_model(model_name)
    model, tokenizer = loaded.model, loaded.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    common = {"do_sample": False, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "pad_token_id": pad}
    with torch.inference_mode():
        model.generate(**tokenizer(PROMPTS[0], return_tensors="pt"), **common)  # warm up
        started = time.monotonic()
        for prompt in PROMPTS:
            model.generate(**tokenizer(prompt, return_tensors="pt"), **common)
        alone = time.monotonic() - started
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
        started = time.monotonic()
        model.generate(**batch, **common)
        together = time.monotonic() - started
    n = len(PROMPTS) * new_tokens
    return {"alone_tokens_per_s": n / alone, "batch_tokens_per_s": n / together}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--clients", default="1,2,4,8,16")
    parser.add_argument("--server-arg", action="append", default=[], help="an extra server argument (repeatable)")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]

    rows: list[tuple[int, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        process, target = start_server(args.model, args.server_arg, Path(tmp) / "server.log")
        try:
            run_level(target, 1, 4)  # warm up
            for clients in levels:
                rows.append((clients, run_level(target, clients, args.new_tokens)))
                print(f"{clients} clients: {rows[-1]}", file=sys.stderr, flush=True)
        finally:
            process.terminate()
            process.wait(60)
    base = transformers_baseline(args.model, args.new_tokens)
    one = rows[0][1]["tokens_per_s"] if rows and rows[0][0] == 1 else float("nan")
    lines = [
        f"{args.model}, {args.new_tokens} greedy tokens per request, {len(PROMPTS)} prompts; {os.cpu_count()} CPUs",
        "",
        "| run | requests | tokens/s | x 1 client | TTFT p50 (s) | TTFT p95 (s) | inter-token p50 (ms) "
        "| inter-token p95 (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for clients, r in rows:
        lines.append(
            f"| linlens, {clients} client(s) | {int(r['requests'])} | {r['tokens_per_s']:.1f} | "
            f"{r['tokens_per_s'] / one:.2f} | {r['ttft_p50']:.2f} | {r['ttft_p95']:.2f} | "
            f"{r['itl_p50'] * 1000:.0f} | {r['itl_p95'] * 1000:.0f} |"
        )
    lines.append(
        f"| transformers generate, one at a time | {len(PROMPTS)} | {base['alone_tokens_per_s']:.1f} | "
        f"{base['alone_tokens_per_s'] / one:.2f} | | | | |"
    )
    lines.append(
        f"| transformers generate, one left-padded batch | {len(PROMPTS)} | {base['batch_tokens_per_s']:.1f} | "
        f"{base['batch_tokens_per_s'] / one:.2f} | | | | |"
    )
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")


if __name__ == "__main__":
    main()
