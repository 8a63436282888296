"""Batch jobs on a real Ray started locally (one start for the module), with 2 actors: the table equals the
in-process one bit for bit, bad rows are recorded as INVALID_ARGUMENT, a killed actor loses and duplicates no row,
and an interrupted job rerun completes every row exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("ray")
pytest.importorskip("pyarrow")

from tiny_models import VOCAB, save_tiny_model

from linlens.batch import BatchJob, run_batch
from linlens.batch.table import read_output
from linlens.contract.options import ExplainOptions

#: Columns that hold wall-clock times: they differ from run to run; every other column must be equal.
TIMING = {"forward_ms", "jacobian_ms", "attribution_ms", "svd_ms", "server_ms", "row_ms"}
ACTOR_CLASS = "MapWorker(MapBatches(RowExplainer))"


#: How many times the module tries to start Ray. Ray waits a fixed 30 s for its raylet to register; on a loaded
#: 2-core machine that has run out once (CI, stop 24), which says nothing about the batch jobs under test.
RAY_STARTS = 3


def start_ray() -> None:
    """``ray.init`` for a local cluster, tried again after a startup timeout with the half-started one stopped."""
    import ray

    for attempt in range(1, RAY_STARTS + 1):
        try:
            ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
            return
        except Exception as error:
            if "timed out during startup" not in str(error) or attempt == RAY_STARTS:
                raise
            print(f"Ray start {attempt} of {RAY_STARTS} timed out; stopping what it started and trying again")
            ray.shutdown()
            ray_cli = Path(sys.executable).with_name("ray")
            subprocess.run([str(ray_cli), "stop", "--force"], check=False, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    import ray

    start_ray()
    try:
        yield str(ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama")


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def tiny_rows(count: int) -> list[dict[str, Any]]:
    return [
        {"id": f"r{i}", "prompt": " ".join(f"w{4 + (i * 7 + j) % 90}" for j in range(3 + i % 5))} for i in range(count)
    ]


def by_id(output: Path) -> dict[str, dict[str, Any]]:
    rows = read_output(output)
    counts = Counter(row["id"] for row in rows)
    assert max(counts.values()) == 1, f"rows written twice: {[i for i, n in counts.items() if n > 1]}"
    return {row["id"]: {k: v for k, v in row.items() if k not in TIMING} for row in rows}


def assert_same(expected: dict[str, dict[str, Any]], got: dict[str, dict[str, Any]]) -> None:
    assert sorted(expected) == sorted(got)
    differ = [(rid, k) for rid, row in expected.items() for k, v in row.items() if got[rid][k] != v]
    assert not differ, [(rid, k, expected[rid][k], got[rid][k]) for rid, k in differ[:5]]


def in_process(job: BatchJob) -> None:
    """The in-process run of ``job``, with the torch threads of this test process restored afterwards."""
    threads = torch.get_num_threads()
    try:
        run_batch(job, progress=None)
    finally:
        torch.set_num_threads(threads)


def test_tiny_model_on_ray_equals_in_process_and_records_bad_rows(ray_address: str, tiny: Path, tmp_path: Path) -> None:
    rows = [
        *tiny_rows(6),
        {"id": "empty", "prompt": ""},
        {"id": "out-of-vocab", "token_ids": [5, VOCAB + 3]},
        {"id": "too-long", "prompt": " ".join(f"w{4 + j}" for j in range(40))},
        {"id": "target", "prompt": "w5 w6 w7", "target": 9, "contrast": 10},
    ]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    common = {"model": str(tiny), "max_prompt_tokens": 32, "torch_threads": 1, "full_results": True}
    in_process(BatchJob(source, tmp_path / "local", **common))
    summary = run_batch(BatchJob(source, tmp_path / "ray", **common), ray=ray_address, actors=2, progress=None)
    assert (summary.done, summary.failed) == (10, 3)
    local, on_ray = by_id(tmp_path / "local"), by_id(tmp_path / "ray")
    assert_same(local, on_ray)  # attributions, singular values, errors: bit for bit
    for bad in ("empty", "out-of-vocab", "too-long"):
        assert on_ray[bad]["status"] == "INVALID_ARGUMENT", on_ray[bad]
        assert on_ray[bad]["message"]
    good = [row for rid, row in on_ray.items() if rid not in ("empty", "out-of-vocab", "too-long")]
    assert all(row["status"] == "OK" and len(row["attributions"]) == len(row["input_tokens"]) for row in good)
    assert all(len(row["singular_values"]) == 3 and len(row["singular_tokens"][0]) == 8 for row in good)
    assert on_ray["target"]["attribution_label"] != on_ray["r0"]["attribution_label"]
    full = json.loads((tmp_path / "ray" / on_ray["r0"]["result_file"]).read_text())
    assert full["explanation"]["attributions"][0]["per_token"] == on_ray["r0"]["attributions"]


def test_smollm2_on_ray_equals_in_process_with_an_actor_killed_mid_job(ray_address: str, tmp_path: Path) -> None:
    import psutil

    prompts = ["The capital of France is", "One, two,", "Cats and", "The sky is", "Hello", "Water boils at"]
    source = write_jsonl(tmp_path / "in.jsonl", [{"id": f"p{i}", "prompt": p} for i, p in enumerate(prompts)])
    options = ExplainOptions(top_k=0)
    in_process(BatchJob(source, tmp_path / "local", options=options, torch_threads=1))
    killed: list[int] = []
    finished = threading.Event()

    def actor_pids() -> list[int]:
        """The pool's actor processes (Ray titles an actor's process ray::<class>[.<method>])."""
        return [p.pid for p in psutil.process_iter(["cmdline"]) if ACTOR_CLASS in " ".join(p.info["cmdline"] or [])]

    def kill_one_actor() -> None:
        """SIGKILL a pool actor half a second after the first one appears, while the job still runs."""
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not finished.is_set():
            if actor_pids():
                time.sleep(0.5)
                pids = actor_pids()
                if pids and not finished.is_set():
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_actor)
    killer.start()
    try:
        job = BatchJob(source, tmp_path / "ray", options=options, torch_threads=1)
        summary = run_batch(job, ray=ray_address, actors=2, progress=None)
    finally:
        finished.set()
        killer.join()
    assert killed, "no actor was killed while the job ran"
    assert summary.done == len(prompts)
    assert_same(by_id(tmp_path / "local"), by_id(tmp_path / "ray"))


def test_interrupted_job_rerun_completes_every_row_once(ray_address: str, tiny: Path, tmp_path: Path) -> None:
    rows = tiny_rows(80)
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    output = tmp_path / "out"
    command = [sys.executable, "-m", "linlens.cli", "batch", str(source), "-o", str(output), "--model", str(tiny)]
    command += ["--ray", ray_address, "--part-rows", "4", "--threads", "1", "--no-progress"]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    # Kill the driver once a part is complete (a part still being written is not a row done), then give Ray a
    # moment to reap the job's workers so that nothing more lands after the count.
    while time.monotonic() < deadline and first.poll() is None and not read_output(output):
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    time.sleep(3)
    written = len(read_output(output))
    assert 0 < written < len(rows), f"the first run was not interrupted mid-job ({written} rows written)"
    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert f"{written} already done" in second.stderr
    done = by_id(output)
    assert sorted(done) == sorted(row["id"] for row in rows)
    assert all(row["status"] == "OK" for row in done.values())
