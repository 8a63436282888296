"""Faults provoked for real, each followed by proof that the server still serves: a client that disappears
mid-stream, an out-of-memory inside a job (a real allocation over an address-space limit), a corrupted model cache,
a configured model that fails to load next to one that loads, and a full disk while a model is being cached.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import free_port
from disks import small_disk

from linlens.client import (
    NO_RETRY,
    Client,
    ExplainOptions,
    FailedPreconditionError,
    HealthStatus,
    ModelState,
    ResourceExhaustedError,
)
from linlens.models import REGISTRY
from linlens.models.gguf_cache import cache_folder, problem_with
from linlens.server.logs import ACCESS_LOGGER
from linlens.v1 import linlens_pb2 as pb
from linlens.v1 import linlens_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PROMPT = "The bridge out of Marin is the"
REPO = Path(__file__).resolve().parents[1]
GGUF = REGISTRY["smollm2-135m"].locate()


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def model_info(client: Client, name: str) -> Any:
    return {m.name: m for m in client.list_models()}[name]


# --- a client that disappears ------------------------------------------------------------------------------------


def test_a_client_disconnecting_mid_stream_frees_its_worker_within_a_second(
    server: Any, target: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    channel = grpc.insecure_channel(target)
    stub = pb_grpc.LinlensServiceStub(channel)
    request = pb.GenerateStreamRequest(
        input=pb.Input(text=PROMPT), sampling=pb.SamplingParams(max_new_tokens=64, ignore_eos=True)
    )
    events = stub.GenerateStream(request, timeout=120, metadata=(("x-request-id", "gone-1"),))
    for seen, _ in enumerate(events, start=1):
        if seen == 2:
            break
    assert server.scheduler.running == 1
    channel.close()  # the connection goes away: no cancel message, just a closed socket
    gone = time.monotonic()
    wait_for(lambda: server.scheduler.running == 0, 10, "the worker to be free")
    freed = time.monotonic() - gone
    assert freed < 1.0, f"the worker was busy {freed:.2f} s after the client left"
    wait_for(lambda: any(getattr(r, "fields", {}).get("request_id") == "gone-1" for r in caplog.records), 10, "log")
    (record,) = [r.fields for r in caplog.records if getattr(r, "fields", {}).get("request_id") == "gone-1"]  # type: ignore[attr-defined]
    assert record["code"] == "CANCELLED" and record["completion_tokens"] < 64
    assert server.lifecycle.inflight == 0
    with Client(target, retry=NO_RETRY, timeout=60) as client:
        assert client.generate(PROMPT, max_new_tokens=1).text == " only"


# --- out of memory -----------------------------------------------------------------------------------------------

#: A real server in a process of its own whose address space is capped once its model is loaded: an explanation of a
#: long input then needs more memory than the process may map, and its allocation fails for real.
OOM_SERVER = """
import resource, sys
from linlens.server.app import start_server
from linlens.server.config import ServerConfig
from linlens.server.logs import setup_logging

setup_logging("json", "info")
config = ServerConfig(host="127.0.0.1", port=int(sys.argv[1]), metrics_port=0, max_prompt_tokens=0,
                      max_explanation_memory_mb=1 << 20, max_queue=4, grpc_threads=8)
running = start_server(config, load_in_background=False)
with open("/proc/self/status") as status:
    vm = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + int(sys.argv[2]) * 2**20, resource.RLIM_INFINITY))
print("READY", flush=True)
sys.stdin.read()  # until the test closes our stdin
running.stop()
"""


@pytest.fixture
def capped_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    port = free_port()
    log = tmp_path / "server.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "client"), str(REPO / "server"), env.get("PYTHONPATH", "")])
    env["LINLENS_CONFIG"] = ""
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", OOM_SERVER, str(port), "2048"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "READY", log.read_text()[-3000:]
        yield f"127.0.0.1:{port}", log
    finally:
        assert process.stdin is not None
        process.stdin.close()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


def test_out_of_memory_inside_a_job_is_resource_exhausted_and_the_server_keeps_serving(
    capped_server: tuple[str, Path],
) -> None:
    target, log = capped_server
    try:
        with Client(target, retry=NO_RETRY, timeout=300) as client:
            # 1,200 tokens with the raw Jacobians: after a forward graph of well under 1 GiB, the engine allocates
            # J (576 x 1,200 x 576 floats, 1.6 GB) in one piece, more than the 2 GiB the process may map can still
            # hold. The request fails on that one allocation, away from the cap. A request that crept up to the cap
            # instead would leave every other allocation in the process to fail with it: gRPC's C core aborts when
            # one of its own fails, and a new thread's stack cannot be mapped (seen in CI and here).
            with pytest.raises(ResourceExhaustedError, match="ran out of memory") as caught:
                client.explain(
                    token_ids=[504] * 1200,
                    options=ExplainOptions(top_k=1, include_jacobians=True),
                    metadata={"x-request-id": "oom-1"},
                )
            assert "fewer tokens" in caught.value.details
            assert client.health() is HealthStatus.SERVING
            assert client.generate(PROMPT, max_new_tokens=1).text == " only"
            assert client.explain(PROMPT, options=ExplainOptions(top_k=0)).explanation.predicted.text == " only"
    except (Exception, pytest.fail.Exception) as error:  # the server's own account, in the failure's report
        raise AssertionError(f"{error}\nthe server's log ends with:\n{log.read_text()[-4000:]}") from error
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    (access,) = [e for e in lines if e.get("logger") == ACCESS_LOGGER and e.get("request_id") == "oom-1"]
    assert access["code"] == "RESOURCE_EXHAUSTED"
    warning = [e for e in lines if "ran out of memory" in e["msg"]]
    assert warning and "can't allocate memory" in warning[0]["msg"]  # the allocator's own words: a real failure


# --- model loading -----------------------------------------------------------------------------------------------


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, smollm2: Any) -> Path:
    """An empty LINLENS_CACHE_DIR for this test (``smollm2`` first: the session's model comes from the usual cache)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("LINLENS_CACHE_DIR", str(folder))
    return folder


def test_a_corrupted_model_cache_is_detected_and_rebuilt(
    make_server: Callable[..., Any], cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A truncated weights file in the cache (a disk error, a copy cut short): the server converts again and serves."""
    with pytest.MonkeyPatch.context() as usual:
        usual.delenv("LINLENS_CACHE_DIR")
        good = cache_folder(GGUF)  # the session's converted model, from the usual cache
    assert problem_with(good) is None
    damaged = cache_folder(GGUF)
    shutil.copytree(good, damaged)
    weights = next(damaged.glob("*.safetensors"))
    size = weights.stat().st_size
    with open(weights, "r+b") as handle:
        handle.truncate(size // 3)
    caplog.set_level(logging.INFO)
    server = make_server(models=("smollm2-135m", str(GGUF)))
    with Client(server.target, retry=NO_RETRY, timeout=300) as client:
        info = client.wait_until_ready(300, model=GGUF.stem)
        assert info.state is ModelState.READY
        assert client.generate(PROMPT, model=GGUF.stem, max_new_tokens=1).text == " only"
    assert weights.stat().st_size == size and problem_with(damaged) is None
    said = " ".join(r.getMessage() for r in caplog.records)
    assert f"discarding the cached conversion {damaged}" in said and "the manifest says" in said


def test_a_secondary_model_that_fails_to_load_leaves_the_default_serving(
    make_server: Callable[..., Any], tmp_path: Path, cache: Path
) -> None:
    """A truncated GGUF file as the second model: its load fails for real, the first model serves on."""
    broken = tmp_path / "broken-model.gguf"
    with open(GGUF, "rb") as source:
        broken.write_bytes(source.read(4 * 2**20))
    server = make_server(models=("smollm2-135m", str(broken)))
    assert server.wait_until_loaded(120)
    with Client(server.target, retry=NO_RETRY, timeout=60) as client:
        info = model_info(client, "broken-model")
        assert info.state is ModelState.FAILED and info.state_detail, info
        assert client.health() is HealthStatus.SERVING  # the server stays in rotation
        assert client.health("broken-model") is HealthStatus.NOT_SERVING
        with pytest.raises(FailedPreconditionError, match="'broken-model' failed to load"):
            client.generate(PROMPT, model="broken-model", max_new_tokens=1)
        assert client.generate(PROMPT, max_new_tokens=1).text == " only"


def test_a_full_disk_while_caching_is_the_models_failed_state_with_a_clear_detail(
    make_server: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, smollm2: Any
) -> None:
    with small_disk(tmp_path / "small", 64) as disk:
        monkeypatch.setenv("LINLENS_CACHE_DIR", str(disk))
        server = make_server(models=("smollm2-135m", str(GGUF)))
        assert server.wait_until_loaded(300)
        with Client(server.target, retry=NO_RETRY, timeout=60) as client:
            info = model_info(client, GGUF.stem)
            assert info.state is ModelState.FAILED
            assert info.state_detail.startswith("ModelCacheError: ")
            assert f"no space left on the device of {disk}" in info.state_detail
            assert "MB are needed" in info.state_detail and "LINLENS_CACHE_DIR" in info.state_detail
            with pytest.raises(FailedPreconditionError, match="no space left"):
                client.generate(PROMPT, model=GGUF.stem, max_new_tokens=1)
            assert client.generate(PROMPT, max_new_tokens=1).text == " only"
        server.stop()
