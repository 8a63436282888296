"""The server under pressure and at its end, with the real model: a full queue, deadlines and cancellations in the
middle of an explanation, draining (in-process and through SIGTERM to a real ``python -m linlens.server``), and the
access log. Every test checks that the server still serves afterwards.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import free_port

from linlens.client import (
    NO_RETRY,
    CancelledError,
    Client,
    DeadlineExceededError,
    ExplainOptions,
    FailedPreconditionError,
    GeneratedToken,
    GenerationDone,
    HealthStatus,
    InvalidArgumentError,
    ModelInfo,
    ModelState,
    ResourceExhaustedError,
    UnavailableError,
)
from linlens.server.logs import ACCESS_LOGGER, JsonFormatter
from linlens.v1 import linlens_pb2 as pb
from linlens.v1 import linlens_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PROMPT = "The bridge out of Marin is the"
REPO = Path(__file__).resolve().parents[1]


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def access_records(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [dict(r.fields) for r in caplog.records if r.name == ACCESS_LOGGER]  # type: ignore[attr-defined]


def record_for(caplog: pytest.LogCaptureFixture, request_id: str, timeout: float = 30) -> dict[str, Any]:
    """The access-log fields of one request, waiting for the call to finish on the server."""
    found: list[dict[str, Any]] = []

    def present() -> bool:
        found[:] = [r for r in access_records(caplog) if r["request_id"] == request_id]
        return bool(found)

    wait_for(present, timeout, f"the access-log line of {request_id}")
    return found[0]


@pytest.fixture
def access_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    yield caplog


def full_explain_request() -> pb.ExplainRequest:
    """A request whose full Jacobian takes seconds on a CPU: long enough to be interrupted."""
    return pb.ExplainRequest(input=pb.Input(text=PROMPT), options=pb.ExplainOptions(top_k=3))


# --- queue, deadlines, cancellation ----------------------------------------------------------------------------------


def test_full_queue_is_resource_exhausted_and_clears(make_server: Callable[..., Any]) -> None:
    server = make_server(max_concurrent_jobs=1, max_queue=0, max_batch_size=1)  # one generation at a time
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.LinlensServiceStub(channel)
        long = pb.GenerateRequest(
            input=pb.Input(text=PROMPT), sampling=pb.SamplingParams(max_new_tokens=64, ignore_eos=True)
        )
        busy = stub.Generate.future(long, timeout=120)
        wait_for(lambda: server.scheduler.running == 1, 30, "the long generation to start")
        with Client(server.target, retry=NO_RETRY, timeout=30) as client:
            with pytest.raises(ResourceExhaustedError, match="queue limit"):
                client.generate(PROMPT, max_new_tokens=1)
            busy.cancel()
            wait_for(lambda: server.scheduler.running == 0, 30, "the cancelled generation to stop")
            assert client.generate(PROMPT, max_new_tokens=1).text == " only"


def test_deadline_during_an_explanation_stops_the_work(
    server: Any, target: str, access_log: pytest.LogCaptureFixture
) -> None:
    with Client(target, retry=NO_RETRY) as client:
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            client.explain(PROMPT, options=ExplainOptions(top_k=3), timeout=0.5, metadata={"x-request-id": "dl-1"})
        assert time.monotonic() - started < 5
        record = record_for(access_log, "dl-1")
        # the server saw the deadline in the middle of the work and stopped it (a finished job would log OK)
        assert record["code"] == "DEADLINE_EXCEEDED" and record["method"] == "Explain"
        wait_for(lambda: server.scheduler.running == 0, 30, "the worker to be free")
        assert client.generate(PROMPT, max_new_tokens=1, timeout=60).text == " only"


def test_cancelled_explanation_frees_its_worker_for_the_next_request(
    server: Any, target: str, access_log: pytest.LogCaptureFixture
) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.LinlensServiceStub(channel)
        call = stub.Explain.future(full_explain_request(), timeout=120, metadata=(("x-request-id", "cx-1"),))
        wait_for(lambda: server.scheduler.running == 1, 30, "the explanation to start")
        time.sleep(0.3)
        assert call.cancel()
        # the next request gets the (only) worker as soon as the explanation notices the cancellation
        follow_up = stub.Generate(
            pb.GenerateRequest(input=pb.Input(text=PROMPT), sampling=pb.SamplingParams(max_new_tokens=1)),
            timeout=120,
        )
        assert follow_up.text == " only"
        # CANCELLED (not OK) in the server's own log means the job raised at a check point instead of finishing:
        # a job that ran to the end would be logged OK even though its caller had left
        record = record_for(access_log, "cx-1")
        assert record["code"] == "CANCELLED" and record["explained_steps"] == 0


def test_cancelled_stream_stops_generating(server: Any, target: str, access_log: pytest.LogCaptureFixture) -> None:
    with Client(target, retry=NO_RETRY, timeout=120) as client:
        stream = client.generate_stream(PROMPT, max_new_tokens=64, ignore_eos=True, metadata={"x-request-id": "cs-1"})
        seen = 0
        # the SDK may end the iteration quietly or raise CancelledError on the next read: both are fine here
        with contextlib.suppress(CancelledError):
            for event in stream:
                if isinstance(event, GeneratedToken):
                    seen += 1
                    if seen == 2:
                        stream.cancel()
        record = record_for(access_log, "cs-1")
        assert record["code"] == "CANCELLED" and record["completion_tokens"] < 64
        wait_for(lambda: server.scheduler.running == 0, 30, "the worker to be free")


# --- draining --------------------------------------------------------------------------------------------------------


def test_draining_refuses_new_calls_and_finishes_the_ones_in_flight(make_server: Callable[..., Any]) -> None:
    server = make_server(grace_period_s=60)
    events: list[Any] = []

    def stream() -> None:
        with Client(server.target, retry=NO_RETRY, timeout=120) as c:
            events.extend(c.generate_stream(PROMPT, max_new_tokens=40, ignore_eos=True))

    in_flight = threading.Thread(target=stream)
    in_flight.start()
    wait_for(lambda: server.scheduler.running == 1, 30, "the generation to start")
    drained: list[bool] = []
    drainer = threading.Thread(target=lambda: drained.append(server.drain()))
    drainer.start()
    wait_for(lambda: server.lifecycle.draining, 10, "the drain to start")
    with Client(server.target, retry=NO_RETRY, timeout=30) as client:
        assert client.health() is HealthStatus.NOT_SERVING
        with pytest.raises(UnavailableError, match="shutting down"):
            client.generate(PROMPT, max_new_tokens=1)
    in_flight.join(120)
    drainer.join(120)
    assert drained == [True]
    assert sum(isinstance(e, GeneratedToken) for e in events) == 40
    assert isinstance(events[-1], GenerationDone)


def test_sigterm_drains_a_real_server_process(tmp_path: Path) -> None:
    port = free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "client"), str(REPO / "server"), env.get("PYTHONPATH", "")])
    env["LINLENS_LOG_FORMAT"] = "json"
    stderr_path = tmp_path / "server.log"
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "linlens.server", "--host", "127.0.0.1", "--port", str(port)),
                *("--metrics-port", "0", "--grace-period-s", "60", "--max-queue", "4"),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        target = f"127.0.0.1:{port}"
        with Client(target, retry=NO_RETRY, timeout=5) as client:

            def serving() -> bool:
                assert proc.poll() is None, stderr_path.read_text()
                try:
                    return client.health() is HealthStatus.SERVING
                except UnavailableError:
                    return False

            wait_for(serving, 240, "the server to load its model")
            events: list[Any] = []
            first_token = threading.Event()

            def stream() -> None:
                with Client(target, retry=NO_RETRY, timeout=120) as c:
                    for event in c.generate_stream(PROMPT, max_new_tokens=32, ignore_eos=True):
                        events.append(event)
                        first_token.set()

            in_flight = threading.Thread(target=stream)
            in_flight.start()
            assert first_token.wait(60)
            proc.send_signal(signal.SIGTERM)
            wait_for(lambda: client.health() is not HealthStatus.SERVING, 10, "health to leave SERVING")
            with pytest.raises(UnavailableError):
                client.generate(PROMPT, max_new_tokens=1)
            in_flight.join(120)
            assert proc.wait(60) == 0
        assert sum(isinstance(e, GeneratedToken) for e in events) == 32
        assert isinstance(events[-1], GenerationDone)
        lines = [json.loads(line) for line in stderr_path.read_text().splitlines() if line.startswith("{")]
        access = [entry for entry in lines if entry["logger"] == ACCESS_LOGGER]
        assert any(e["method"] == "GenerateStream" and e["code"] == "OK" for e in access)
        assert any(e["method"] == "Generate" and e["code"] == "UNAVAILABLE" for e in access)
        assert any("SIGTERM" in entry["msg"] for entry in lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# --- access log ------------------------------------------------------------------------------------------------------


def test_access_log_line_per_request_without_prompt_text(target: str, access_log: pytest.LogCaptureFixture) -> None:
    with Client(target, retry=NO_RETRY, timeout=60) as client:
        client.generate(PROMPT, max_new_tokens=2, metadata={"x-request-id": "log-1"})
        with pytest.raises(InvalidArgumentError):
            client.generate("", max_new_tokens=2, metadata={"x-request-id": "log-2"})
    ok = record_for(access_log, "log-1")
    assert ok["method"] == "Generate" and ok["model"] == "smollm2-135m" and ok["code"] == "OK"
    assert ok["prompt_tokens"] == 7 and ok["completion_tokens"] == 2 and ok["total_ms"] > 0
    assert "prompt" not in ok
    bad = record_for(access_log, "log-2")
    assert bad["code"] == "INVALID_ARGUMENT" and "input.text is empty" in bad["error"]
    lines = [r for r in access_log.records if r.name == ACCESS_LOGGER]
    assert PROMPT not in "\n".join(r.getMessage() + json.dumps(r.fields) for r in lines)  # type: ignore[attr-defined]
    entry = json.loads(JsonFormatter().format(lines[-1]))
    assert entry["logger"] == ACCESS_LOGGER and entry["request_id"] in ("log-1", "log-2")


def test_prompts_are_logged_only_when_enabled(
    make_server: Callable[..., Any], access_log: pytest.LogCaptureFixture
) -> None:
    server = make_server(log_prompts=True)
    with Client(server.target, retry=NO_RETRY, timeout=60) as client:
        client.generate(PROMPT, max_new_tokens=1, metadata={"x-request-id": "log-3"})
    assert record_for(access_log, "log-3")["prompt"] == PROMPT


# --- loading ---------------------------------------------------------------------------------------------------------


def test_unavailable_while_loading_and_for_a_model_that_failed(tmp_path: Path) -> None:
    """A server loading its models answers at once, with UNAVAILABLE and NOT_SERVING, then serves what loaded."""
    from conftest import server_config

    from linlens.server.app import start_server

    missing = tmp_path / "missing-model.gguf"
    server = start_server(server_config(models=("smollm2-135m", str(missing))))
    try:
        with Client(server.target, retry=NO_RETRY, timeout=30) as client:
            assert client.health() is HealthStatus.NOT_SERVING
            assert client.health("smollm2-135m") is HealthStatus.NOT_SERVING
            with pytest.raises(UnavailableError, match="still loading"):
                client.generate(PROMPT, max_new_tokens=1)
            # The SDK waits for the model it will use (the default one): loaded and SERVING, seeing each phase.
            phases: list[ModelInfo] = []
            info = client.wait_until_ready(240, on_wait=phases.append)
            assert info.name == "smollm2-135m" and info.state is ModelState.READY
            assert phases and all(p.state is ModelState.LOADING and p.state_detail for p in phases), [
                (p.state, p.state_detail) for p in phases
            ]
            assert client.generate(PROMPT, max_new_tokens=1).text == " only"
            assert client.health("smollm2-135m") is HealthStatus.SERVING
            # Waiting for the broken model ends as soon as its load fails (or at once if it did already).
            started = time.monotonic()
            with pytest.raises(FailedPreconditionError, match="'missing-model' failed to load"):
                client.wait_until_ready(60, model="missing-model")
            assert time.monotonic() - started < 30
            assert server.wait_until_loaded(10)
            assert client.health("missing-model") is HealthStatus.NOT_SERVING
            # Loading is over and the default model serves: the server is in rotation; the broken model is not.
            assert client.health() is HealthStatus.SERVING
            with pytest.raises(FailedPreconditionError, match=r"failed to load .*no GGUF file at"):
                client.generate(PROMPT, model="missing-model", max_new_tokens=1)
            infos = {m.name: m for m in client.list_models()}
            assert infos["smollm2-135m"].loaded and infos["smollm2-135m"].state is ModelState.READY
            assert not infos["missing-model"].loaded and infos["missing-model"].state is ModelState.FAILED
            assert "no GGUF file at" in infos["missing-model"].state_detail
    finally:
        server.stop()


def test_successful_polls_stay_out_of_the_info_access_log(target: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=ACCESS_LOGGER)
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.LinlensServiceStub(channel)
        stub.GetModel(pb.GetModelRequest(), metadata=(("x-request-id", "poll-1"),), timeout=30)
        stub.ListModels(pb.ListModelsRequest(), metadata=(("x-request-id", "poll-2"),), timeout=30)
        with pytest.raises(grpc.RpcError):
            stub.GetModel(pb.GetModelRequest(name="no-such-model"), metadata=(("x-request-id", "poll-3"),), timeout=30)
    for request_id in ("poll-1", "poll-2", "poll-3"):
        record_for(caplog, request_id)
    levels = {r.fields["request_id"]: r.levelno for r in caplog.records if r.name == ACCESS_LOGGER}  # type: ignore[attr-defined]
    # a readiness poll every second must not bury the log; a failed one is worth seeing
    assert (levels["poll-1"], levels["poll-2"], levels["poll-3"]) == (logging.DEBUG, logging.DEBUG, logging.INFO)
