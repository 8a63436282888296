"""Running a batch job in-process (the default) or on a fleet of linlens servers; Ray is in ``linlens.batch.ray``."""

from __future__ import annotations

import importlib
import json
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TextIO

from linlens.batch.job import OK, BatchJob, BatchSummary, process_row, row_id
from linlens.batch.table import done_ids, read_rows, write_part


class Progress:
    """A one-line progress bar on a stream: rows done of the total, failed, rows/s and the time left."""

    def __init__(self, total: int, stream: TextIO | None) -> None:
        self.total = total
        self.stream = stream
        self.done = 0
        self.failed = 0
        self.started = time.monotonic()
        self._lock = threading.Lock()

    def add(self, ok: bool) -> None:
        with self._lock:
            self.done += 1
            self.failed += 0 if ok else 1
            if self.stream is None:
                return
            elapsed = time.monotonic() - self.started
            rate = self.done / elapsed if elapsed > 0 else 0.0
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            left = f"{eta:.0f}s" if eta != float("inf") else "?"
            end = "\n" if self.done == self.total else ""
            self.stream.write(
                f"\r{self.done}/{self.total} rows ({self.failed} failed)  {rate:.2f} rows/s  ETA {left}   {end}"
            )
            self.stream.flush()


def fleet_target(servers: Sequence[str]) -> str:
    """The gRPC target for a fleet: several host:port become one ``ipv4:``/``ipv6:`` list; one name is resolved by
    DNS (a headless Service's name gives every pod)."""
    if len(servers) == 1:
        server = servers[0]
        return server if "://" in server or server.startswith(("dns:", "ipv4:", "ipv6:")) else f"dns:///{server}"
    scheme = "ipv6" if any(s.startswith("[") for s in servers) else "ipv4"
    return f"{scheme}:{','.join(servers)}"


def fleet_client(servers: Sequence[str], **client_args: Any) -> Any:
    """A Client that spreads calls over every server with round_robin and retries UNAVAILABLE on another one."""
    from linlens.client import Client
    from linlens.client.retry import RetryPolicy

    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    client_args.setdefault("retry", RetryPolicy(max_attempts=8))
    client_args.setdefault("timeout", None)
    return Client(fleet_target(servers), options=[("grpc.service_config", json.dumps(config))], **client_args)


def inprocess_client(job: BatchJob) -> Any:
    """An InProcessClient for the job's model and limits (needs the server extra; imported by name, so that the client
    package does not depend on the server's at type-check time either)."""
    config_module = importlib.import_module("linlens.server.config")
    inprocess = importlib.import_module("linlens.server.inprocess")
    if job.torch_threads:  # as ``linlens serve`` does (InProcessClient leaves the process's threads alone)
        importlib.import_module("torch").set_num_threads(job.torch_threads)
    overrides: dict[str, Any] = {"warmup": False, "torch_threads": job.torch_threads}
    if job.max_prompt_tokens:
        overrides["max_prompt_tokens"] = job.max_prompt_tokens
    config = config_module.ServerConfig(**overrides)
    return inprocess.InProcessClient(*([job.model] if job.model else []), config=config)


def pending_rows(job: BatchJob) -> tuple[list[tuple[int, dict[str, Any]]], int]:
    """The rows not yet in the output table (with their index), and how many were skipped as done."""
    rows = read_rows(job.source)
    ids = [row_id(row, i) for i, row in enumerate(rows)]
    if len(set(ids)) != len(ids):
        raise ValueError("row ids must be unique (resuming finds done rows by id)")
    done = done_ids(Path(job.output))
    pending = [(i, row) for i, row in enumerate(rows) if ids[i] not in done]
    return pending, len(rows) - len(pending)


def run_batch(
    job: BatchJob,
    *,
    servers: Sequence[str] = (),
    ray: str | bool | None = None,
    actors: int = 2,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    workers: int | None = None,
    client: Any = None,
    progress: TextIO | None = sys.stderr,
) -> BatchSummary:
    """Run ``job``: in-process by default, on ``servers`` (a fleet), or on Ray (``ray=True`` for a local Ray started on
    demand, or a cluster address). Rows already in the output table are skipped; failed rows are recorded.

    ``workers`` is how many rows are in flight at once (default: 1 in-process, 2 per server on a fleet). ``client``
    runs on an existing client (an InProcessClient or Client) instead of making one.
    """
    if ray:
        from linlens.batch.ray import run_on_ray

        return run_on_ray(
            job,
            address=None if ray is True else str(ray),
            actors=actors,
            cpus_per_actor=cpus_per_actor,
            gpus_per_actor=gpus_per_actor,
            progress=progress,
        )
    started = time.monotonic()
    pending, skipped = pending_rows(job)
    owned = client is None
    if client is None:
        client = fleet_client(servers) if servers else inprocess_client(job)
    if workers is None:
        workers = 2 * len(servers) if servers else 1
    bar = Progress(len(pending), progress)
    failed = 0
    output = Path(job.output)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for start in range(0, len(pending), job.part_rows):
                part = pending[start : start + job.part_rows]
                futures = [pool.submit(process_row, job, client, row, index) for index, row in part]
                records = []
                for future in futures:
                    record = future.result()
                    bar.add(record["status"] == OK)
                    records.append(record)
                failed += sum(1 for r in records if r["status"] != OK)
                write_part(output, records)
    finally:
        if owned:
            client.close()
    summary = BatchSummary(len(pending), failed, skipped, time.monotonic() - started, output)
    if progress is not None:
        progress.write(summary.line() + "\n")
    return summary
