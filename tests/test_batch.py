"""Batch jobs without Ray: the ``linlens batch`` CLI in-process (CSV in, Parquet out, full results, a rerun that
skips every done row) and a fleet of two real servers, one of them stopped mid-job."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("pyarrow")

from conftest import free_port
from tiny_models import VOCAB, save_tiny_model

from linlens.batch import BatchJob, run_batch
from linlens.batch.table import read_output
from linlens.contract.options import ExplainOptions


def test_cli_in_process_csv_then_rerun_skips_done_rows(tmp_path: Path) -> None:
    model = save_tiny_model("llama", tmp_path / "tiny")
    source = tmp_path / "in.csv"
    source.write_text(f'id,prompt,token_ids\na,w5 w6 w7,\nb,,"[8, 9, 10, 11]"\nc,,"[8, {VOCAB + 1}]"\nd,,\n')
    output = tmp_path / "out"
    command = [sys.executable, "-m", "linlens.cli", "batch", str(source), "-o", str(output), "--model", str(model)]
    command += ["--top-k", "2", "--full-results"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "4 rows done (2 failed), 0 already done" in first.stderr
    assert "rows/s" in first.stderr and "ETA" in first.stderr
    rows = {row["id"]: row for row in read_output(output)}
    assert [rows[i]["status"] for i in "abcd"] == ["OK", "OK", "INVALID_ARGUMENT", "INVALID_ARGUMENT"]
    assert len(rows["b"]["attributions"]) == 4 and len(rows["b"]["singular_values"]) == 2
    assert (output / rows["a"]["result_file"]).is_file()
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "0 rows done (0 failed), 4 already done" in again.stderr
    assert len(read_output(output)) == 4


def explain_calls(metrics_port: int) -> float:
    """The Explain calls a server has answered OK, from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    pattern = r"^linlens_requests_total\{([^}]*)\} (\S+)$"
    return sum(
        float(value)
        for labels, value in re.findall(pattern, text, re.MULTILINE)
        if 'method="Explain"' in labels and 'code="OK"' in labels
    )


@pytest.fixture
def two_servers() -> Iterator[list[tuple[subprocess.Popen[bytes], str, int]]]:
    """Two real `linlens serve` processes (one torch thread each; separate processes, so separate metrics): their
    process, target and metrics port."""
    started = []
    for _ in range(2):
        port, metrics_port = free_port(), free_port()
        command = [sys.executable, "-m", "linlens.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
        command += ["--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port), "--torch-threads", "1"]
        # Warmed up (the twin built at load): a cold first call is slow enough under load for the other server to
        # finish the whole job around it, and then no server is stopped mid-job.
        command += ["--grace-period-s", "60"]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append((process, f"127.0.0.1:{port}", metrics_port))
    try:
        for _, target, _ in started:
            wait = subprocess.run([sys.executable, "-m", "linlens.cli", "wait", "--server", target, "--timeout", "300"])
            assert wait.returncode == 0
        yield started
    finally:
        for process, _, _ in started:
            process.kill()
            process.wait()


def test_fleet_of_two_servers_one_stopped_mid_job(
    two_servers: list[tuple[subprocess.Popen[bytes], str, int]], tmp_path: Path
) -> None:
    (first, _, first_metrics), (_, _, second_metrics) = two_servers
    prompts = ["The capital of France is", "One, two,", "Cats and", "The sky is", "Hello", "Water boils at", "Yes"] * 2
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    answered_before_stop: list[float] = []
    finished = threading.Event()

    def stop_first_after_it_answered() -> None:
        """Kill the first server (SIGKILL: its call in flight breaks off) once it has answered a call."""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not finished.is_set():
            calls = explain_calls(first_metrics)
            if calls >= 1 and not finished.is_set():
                answered_before_stop.append(calls)
                first.send_signal(signal.SIGKILL)
                return
            time.sleep(0.1)

    stopper = threading.Thread(target=stop_first_after_it_answered)
    stopper.start()
    job = BatchJob(source, tmp_path / "out", options=ExplainOptions(top_k=0))
    summary = run_batch(job, servers=[target for _, target, _ in two_servers], progress=None)
    finished.set()
    stopper.join()
    assert answered_before_stop, "the first server answered no call before the job ended"
    assert first.wait(timeout=30) == -signal.SIGKILL  # it really stopped
    assert explain_calls(second_metrics) >= 1
    assert answered_before_stop[0] + explain_calls(second_metrics) >= len(prompts)
    assert summary.done == len(prompts)
    rows = read_output(tmp_path / "out")
    assert Counter(row["id"] for row in rows) == Counter(f"p{i}" for i in range(len(prompts)))
    assert [row for row in rows if row["status"] != "OK"] == []
