#!/usr/bin/env python
"""Soak a real linlens server: N clients for M minutes of mixed traffic, then account for every request.

    python scripts/soak.py --clients 8 --minutes 10 [--json out.json] [--markdown out.md]

It starts ``python -m linlens.server`` on free localhost ports (JSON logs to a file; or pass --target and
--metrics-url for a server that runs already, without the access-log accounting), and each client loops over a mix
of Generate, GenerateStream, Explain (attributions, and the full Jacobian), calls it cancels part-way, calls with
deadlines too short to finish, and streams whose channel it closes mid-stream (a client that disappears). Every call
carries its own ``x-request-id``.

It reports requests by outcome, p50/p95/p99 latency per method (successful calls), the server's resident memory at
the start and the end, requests in flight at the end (``linlens_inflight_requests`` after the clients stopped), and
**requests accepted but never answered**: calls the server admitted (an access-log line, or still in flight) that
never ended on the server (in flight at the end), calls whose client never saw them end, and calls the server
answered that have no access-log line or more than one. That number must be 0; the script exits 1 otherwise, or when
a call ended INTERNAL or UNKNOWN.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "client")]

from linlens.v1 import linlens_pb2 as pb  # noqa: E402
from linlens.v1 import linlens_pb2_grpc as pb_grpc  # noqa: E402

PROMPTS = (
    "The bridge out of Marin is the",
    "Once upon a time",
    "The capital of France is",
    "In 1969, the first person to walk on the moon was",
    "def fibonacci(n):",
)
#: Client-side ends that are not answers from the server: the client itself gave up or went away.
CLIENT_ENDED = ("disconnected", "cancelled_by_client")
#: (kind, weight): the mix each client draws from.
MIX = (
    ("generate", 30),
    ("stream", 22),
    ("explain_attributions", 15),
    ("explain_full", 5),
    ("cancel", 9),
    ("deadline", 9),
    ("disconnect", 10),
)


@dataclass
class Call:
    request_id: str
    kind: str
    method: str
    started: float
    seconds: float = 0.0
    outcome: str = ""  # a gRPC status name, or one of CLIENT_ENDED
    server_answered: bool = False  # the outcome came from the server (not a local deadline or our own cancel)
    server_saw: bool = False  # the server certainly admitted it (it answered, or streamed tokens before we left)


@dataclass
class Records:
    calls: list[Call] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, call: Call) -> None:
        with self.lock:
            self.calls.append(call)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def request_for(rng: random.Random, tokens: int) -> tuple[pb.Input, pb.SamplingParams]:
    return pb.Input(text=rng.choice(PROMPTS)), pb.SamplingParams(max_new_tokens=tokens, ignore_eos=True)


def run_call(
    target: str, channel: grpc.Channel, kind: str, rng: random.Random, request_id: str, records: Records
) -> None:
    stub = pb_grpc.LinlensServiceStub(channel)
    metadata = (("x-request-id", request_id),)
    method = {
        "generate": "Generate",
        "deadline": "Generate",
        "stream": "GenerateStream",
        "disconnect": "GenerateStream",
    }.get(kind, "Explain")
    call = Call(request_id, kind, method, time.monotonic())
    try:
        if kind == "generate":
            text, sampling = request_for(rng, rng.randint(1, 8))
            stub.Generate(pb.GenerateRequest(input=text, sampling=sampling), timeout=120, metadata=metadata)
        elif kind == "deadline":
            text, sampling = request_for(rng, 48)
            stub.Generate(pb.GenerateRequest(input=text, sampling=sampling), timeout=0.3, metadata=metadata)
        elif kind == "stream":
            text, sampling = request_for(rng, rng.randint(4, 16))
            for _ in stub.GenerateStream(
                pb.GenerateStreamRequest(input=text, sampling=sampling), timeout=120, metadata=metadata
            ):
                pass
        elif kind == "disconnect":
            # a client that disappears mid-stream: its own connection, closed after a couple of tokens
            own = grpc.insecure_channel(target)
            text, sampling = request_for(rng, 48)
            events = pb_grpc.LinlensServiceStub(own).GenerateStream(
                pb.GenerateStreamRequest(input=text, sampling=sampling), timeout=120, metadata=metadata
            )
            try:
                for seen, _ in enumerate(events, start=1):
                    if seen >= 2:
                        own.close()
                        call.outcome, call.server_saw = "disconnected", True
                        break
            finally:
                own.close()
        elif kind == "cancel":
            options = pb.ExplainOptions(top_k=1)
            future = stub.Explain.future(
                pb.ExplainRequest(input=pb.Input(text=rng.choice(PROMPTS)), options=options),
                timeout=120,
                metadata=metadata,
            )
            time.sleep(rng.uniform(0.05, 1.0))
            if future.cancel():
                call.outcome = "cancelled_by_client"
            else:
                future.result()
        else:
            options = pb.ExplainOptions(top_k=0 if kind == "explain_attributions" else 1)
            stub.Explain(
                pb.ExplainRequest(input=pb.Input(text=rng.choice(PROMPTS)), options=options),
                timeout=120,
                metadata=metadata,
            )
        if not call.outcome:
            call.outcome, call.server_answered = "OK", True
    except grpc.RpcError as error:
        code = error.code() if callable(getattr(error, "code", None)) else None
        if call.outcome == "":
            call.outcome = code.name if code is not None else "UNKNOWN"
            details = (error.details() or "") if callable(getattr(error, "details", None)) else ""
            local = details in ("Deadline Exceeded", "Locally cancelled by application!")
            call.server_answered = not local and code is not grpc.StatusCode.CANCELLED
    except grpc.FutureCancelledError:
        call.outcome = "cancelled_by_client"
    call.seconds = time.monotonic() - call.started
    records.add(call)


def client_loop(index: int, target: str, until: float, records: Records, seed: int) -> None:
    rng = random.Random(seed * 1000 + index)
    kinds = [k for k, w in MIX for _ in range(w)]
    with grpc.insecure_channel(target) as channel:
        number = 0
        while time.monotonic() < until:
            number += 1
            run_call(target, channel, rng.choice(kinds), rng, f"soak-{index}-{number}", records)


def scrape(url: str) -> dict[str, float]:
    """Sum of each sample name over its labels (enough for gauges and counters here)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    totals: dict[str, float] = collections.defaultdict(float)
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        with contextlib.suppress(ValueError):
            totals[name] += float(value)
    return dict(totals)


def rss_mib(pid: int | None, metrics: dict[str, float]) -> float:
    if pid is not None:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return metrics.get("linlens_process_resident_memory_bytes", 0.0) / 2**20


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[rank]


def start_server(folder: Path) -> tuple[subprocess.Popen[bytes], str, str, Path]:
    port, metrics_port = free_port(), free_port()
    log = folder / "server.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "client"), str(ROOT / "server"), env.get("PYTHONPATH", "")])
    env.update(LINLENS_LOG_FORMAT="json", LINLENS_CONFIG="")
    args = [sys.executable, "-m", "linlens.server", "--host", "127.0.0.1", "--port", str(port)]
    args += ["--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port), "--grace-period-s", "30"]
    with open(log, "wb") as stderr:
        process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    target, metrics_url = f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics"
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
    return process, target, metrics_url, log


def access_log(path: Path) -> collections.Counter[str]:
    """Access-log lines per request id."""
    lines: collections.Counter[str] = collections.Counter()
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                entry = json.loads(line)
                if entry.get("logger") == "linlens.access":
                    lines[entry["request_id"]] += 1
    return lines


def report(records: list[Call], summary: dict[str, Any]) -> str:
    outcomes = collections.Counter((c.kind, c.outcome) for c in records)
    kinds = [k for k, _ in MIX]
    names = sorted({c.outcome for c in records})
    out = ["| call kind | " + " | ".join(names) + " | total |", "|---|" + "---|" * (len(names) + 1)]
    for kind in kinds:
        row = [str(outcomes.get((kind, n), 0)) for n in names]
        out.append(f"| {kind} | " + " | ".join(row) + f" | {sum(int(v) for v in row)} |")
    out += ["", "| method (OK calls) | count | p50 s | p95 s | p99 s |", "|---|---|---|---|---|"]
    for method in ("Generate", "GenerateStream", "Explain"):
        for kind in kinds:
            seconds = [c.seconds for c in records if c.kind == kind and c.method == method and c.outcome == "OK"]
            if seconds:
                p50, p95, p99 = (percentile(seconds, q) for q in (50, 95, 99))
                out.append(f"| {method} ({kind}) | {len(seconds)} | {p50:.2f} | {p95:.2f} | {p99:.2f} |")
    out += ["", "| measure | value |", "|---|---|"]
    out += [f"| {key} | {value} |" for key, value in summary.items()]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=None)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", help="an already running server (no access-log accounting)")
    parser.add_argument("--metrics-url", help="its /metrics URL (with --target)")
    parser.add_argument("--json", type=Path, help="write the records' summary as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the tables here")
    args = parser.parse_args(argv)
    seconds = args.minutes * 60 if args.minutes is not None else args.seconds

    folder = Path(tempfile.mkdtemp(prefix="linlens-soak-"))
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    if args.target:
        if not args.metrics_url:
            parser.error("--target needs --metrics-url")
        target, metrics_url = args.target, args.metrics_url
    else:
        process, target, metrics_url, log = start_server(folder)
    pid = process.pid if process is not None else None
    try:
        start_metrics = scrape(metrics_url)
        rss_start = rss_mib(pid, start_metrics)
        records = Records()
        until = time.monotonic() + seconds
        threads = [
            threading.Thread(target=client_loop, args=(i, target, until, records, args.seed), daemon=True)
            for i in range(args.clients)
        ]
        started = time.monotonic()
        for t in threads:
            t.start()
        hung = 0
        for t in threads:
            t.join(max(1.0, until - time.monotonic()) + 180)  # every call has a deadline of at most 120 s
            hung += t.is_alive()
        wall = time.monotonic() - started
        # the server finishes what it was doing for calls that ended on the client's side (cancel, disconnect)
        settle = time.monotonic() + 60
        while True:
            end_metrics = scrape(metrics_url)
            inflight = int(end_metrics.get("linlens_inflight_requests", 0))
            if inflight == 0 or time.monotonic() > settle:
                break
            time.sleep(0.5)
        rss_end = rss_mib(pid, end_metrics)
        calls = list(records.calls)
        unlogged = duplicated = 0
        if log is not None:
            time.sleep(1.0)
            lines = access_log(log)
            # every call the server admitted ends there with exactly one line, also when its client went away
            unlogged = sum(1 for c in calls if (c.server_answered or c.server_saw) and lines[c.request_id] == 0)
            duplicated = sum(1 for c in calls if lines[c.request_id] > 1)
        lost = inflight + hung + unlogged + duplicated
        failed = sum(1 for c in calls if c.outcome in ("INTERNAL", "UNKNOWN"))
        summary: dict[str, Any] = {
            "clients": args.clients,
            "duration_s": round(wall, 1),
            "requests": len(calls),
            "requests_per_s": round(len(calls) / max(wall, 1e-9), 2),
            "rss_start_mib": round(rss_start, 1),
            "rss_end_mib": round(rss_end, 1),
            "inflight_at_end": inflight,
            "client_calls_that_never_ended": hung,
            "server_answers_without_an_access_log_line": unlogged,
            "access_log_lines_repeated": duplicated,
            "accepted_but_never_answered": lost,
            "internal_or_unknown": failed,
        }
        text = report(calls, summary)
        print(text)
        if args.markdown:
            args.markdown.write_text(text + "\n")
        if args.json:
            outcomes = collections.Counter(c.outcome for c in calls)
            args.json.write_text(json.dumps({**summary, "outcomes": outcomes}, indent=2))
        return 1 if lost or failed else 0
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()


if __name__ == "__main__":
    sys.exit(main())
