"""End to end: a real server with the real SmolLM2 model, real gRPC calls, real scrapes of /metrics.

Each test takes a scrape before and after a few calls and checks that every series moved by exactly the amount the
calls imply (a counter by one per request, tokens by the number generated, ...) and that the series the calls must
not touch stayed put. The server runs with one worker so that queueing can be provoked deterministically.
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from prometheus_client.parser import text_string_to_metric_families

from linlens.client import Client, ExplainMethod, ExplainOptions, HealthStatus, InvalidArgumentError, NotFoundError
from linlens.server.app import RunningServer, start_server
from linlens.server.config import load_config

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
PROMPT = "The bridge out of Marin is the"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Scrape:
    """One parsed /metrics page: {(sample name, sorted labels): value}."""

    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]

    def get(self, name: str, **labels: str) -> float:
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def total(self, name: str, **labels: str) -> float:
        """Sum over every series of ``name`` whose labels include ``labels`` (e.g. over all models)."""
        want = set(labels.items())
        return sum(v for (n, lab), v in self.samples.items() if n == name and want <= set(lab))


def scrape(port: int) -> Scrape:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return Scrape(samples)


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    config = load_config(
        environ={},
        overrides={
            "host": "127.0.0.1",
            "port": 0,
            "metrics_host": "127.0.0.1",
            "metrics_port": free_port(),
            "models": [MODEL],
            "max_concurrent_jobs": 1,
            "max_queue": 4,
        },
    )
    running = start_server(config)
    try:
        assert running.wait_until_loaded(timeout=300), "model did not load"
        yield running
    finally:
        running.drain(grace=5)


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[Client]:
    # Generous deadline: explanations slow down many-fold when other processes share the CPU cores.
    with Client(server.target, timeout=600) as c:
        assert c.health() == HealthStatus.SERVING
        yield c


def port(server: RunningServer) -> int:
    assert server.metrics_port is not None
    return server.metrics_port


def test_model_load_and_memory_are_exported(server: RunningServer) -> None:
    s = scrape(port(server))
    assert s.get("linlens_model_load_duration_seconds", model=MODEL) > 0
    info = {k: v for (n, lab), _ in s.samples.items() if n == "linlens_model_info" for k, v in lab}
    assert info["model"] == MODEL and info["family"] == "llama"
    # SmolLM2-135M in float32 alone is about 540 MB of weights.
    assert s.get("linlens_process_resident_memory_bytes") > 400e6
    assert s.get("process_resident_memory_bytes") > 400e6


def test_explain_moves_request_phase_and_reconstruction_metrics(server: RunningServer, client: Client) -> None:
    before = scrape(port(server))
    result = client.explain(PROMPT, options=ExplainOptions(top_k=2, tokens_per_vector=3, method=ExplainMethod.FULL))
    after = scrape(port(server))
    assert result.explanation.predicted.text == " only"
    rel_error = result.explanation.reconstruction.relative_error_vs_model  # type: ignore[union-attr]

    def delta(name: str, **labels: str) -> float:
        return after.get(name, **labels) - before.get(name, **labels)

    assert delta("linlens_requests_total", method="Explain", model=MODEL, code="OK") == 1
    assert delta("linlens_request_duration_seconds_count", method="Explain", model=MODEL) == 1
    assert delta("linlens_queue_wait_seconds_count", model=MODEL) == 1
    assert delta("linlens_reconstruction_relative_error_count", model=MODEL) == 1
    assert delta("linlens_reconstruction_relative_error_sum", model=MODEL) == pytest.approx(rel_error, rel=1e-6)
    assert 0 < rel_error < 1e-5  # float32 floor, about 8e-7 for SmolLM2
    # The observation sits in the decade the client's own number belongs to, not above it.
    assert delta("linlens_reconstruction_relative_error_bucket", model=MODEL, le="1e-05") == 1
    phases = {
        lab[1][1]
        for (n, lab), v in after.samples.items()
        if n == "linlens_explanation_phase_duration_seconds_count" and v > before.get(n, **dict(lab))
    }
    assert {"jacobian", "svd", "decode", "reconstruction"} <= phases, phases
    assert delta("linlens_explanation_phase_duration_seconds_count", model=MODEL, phase="jacobian") == 1
    # An explanation generates nothing; the request latency covers the explanation phases.
    assert delta("linlens_generated_tokens_total", model=MODEL) == 0
    spent = delta("linlens_request_duration_seconds_sum", method="Explain", model=MODEL)
    jacobian = delta("linlens_explanation_phase_duration_seconds_sum", model=MODEL, phase="jacobian")
    assert 0 < jacobian <= spent
    assert after.get("linlens_inflight_requests", method="Explain") == 0


def test_generation_moves_token_and_first_token_metrics(server: RunningServer, client: Client) -> None:
    before = scrape(port(server))
    generation = client.generate(PROMPT, max_new_tokens=4)
    streamed_texts = []
    stream = client.generate_stream(PROMPT, max_new_tokens=3)
    inflight_during_stream = None
    for event in stream:
        if inflight_during_stream is None:
            inflight_during_stream = scrape(port(server)).get("linlens_inflight_requests", method="GenerateStream")
        streamed_texts.append(event)
    after = scrape(port(server))
    assert generation.text == " only one that can"
    assert inflight_during_stream == 1
    assert after.get("linlens_inflight_requests", method="GenerateStream") == 0

    def delta(name: str, **labels: str) -> float:
        return after.get(name, **labels) - before.get(name, **labels)

    assert delta("linlens_requests_total", method="Generate", model=MODEL, code="OK") == 1
    assert delta("linlens_requests_total", method="GenerateStream", model=MODEL, code="OK") == 1
    assert delta("linlens_generated_tokens_total", model=MODEL) == 4 + 3
    assert delta("linlens_time_to_first_token_seconds_count", model=MODEL) == 2
    assert delta("linlens_queue_wait_seconds_count", model=MODEL) == 2
    assert delta("linlens_reconstruction_relative_error_count", model=MODEL) == 0


def test_failed_requests_are_counted_by_status_code(server: RunningServer, client: Client) -> None:
    before = scrape(port(server))
    with pytest.raises(NotFoundError):
        client.explain(PROMPT, model="no-such-model")
    with pytest.raises(InvalidArgumentError):
        client.explain(PROMPT, options=ExplainOptions(top_k=10_000))
    client.list_models()
    after = scrape(port(server))

    def delta(name: str, **labels: str) -> float:
        return after.total(name, **labels) - before.total(name, **labels)

    assert delta("linlens_requests_total", method="Explain", code="NOT_FOUND") == 1
    assert delta("linlens_requests_total", method="Explain", code="INVALID_ARGUMENT") == 1
    assert delta("linlens_requests_total", method="ListModels", code="OK") == 1
    assert delta("linlens_requests_total", method="Explain", code="OK") == 0
    # Refused requests never reach the engine.
    assert delta("linlens_reconstruction_relative_error_count") == 0
    assert delta("linlens_explanation_phase_duration_seconds_count") == 0


def test_a_busy_worker_shows_as_queue_depth_and_queue_wait(server: RunningServer, client: Client) -> None:
    before = scrape(port(server))
    errors: list[BaseException] = []

    def explain() -> None:
        try:
            client.explain(PROMPT, options=ExplainOptions(top_k=1, tokens_per_vector=1))
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=explain) for _ in range(2)]
    threads[0].start()
    time.sleep(0.3)
    threads[1].start()
    max_queued = 0.0
    while any(t.is_alive() for t in threads):
        max_queued = max(max_queued, scrape(port(server)).get("linlens_queued_requests"))
        time.sleep(0.05)
    for t in threads:
        t.join()
    after = scrape(port(server))
    assert not errors, errors
    assert max_queued == 1, "the second explanation must wait while the single worker is busy"
    assert after.get("linlens_queued_requests") == 0
    assert (
        after.get("linlens_queue_wait_seconds_count", model=MODEL)
        - before.get("linlens_queue_wait_seconds_count", model=MODEL)
        == 2
    )
    # One of the two waited for most of the other's explanation (about a second or more on CPU).
    waited = after.get("linlens_queue_wait_seconds_sum", model=MODEL) - before.get(
        "linlens_queue_wait_seconds_sum", model=MODEL
    )
    assert waited > 0.2
