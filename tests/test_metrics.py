"""Unit-level checks of linlens.server.metrics through a real HTTP scrape.

Every test starts the module's own ``/metrics`` endpoint on a free localhost port, exercises the public methods
and parses what an actual Prometheus would receive with prometheus-client's text parser. Nothing is read from the
registry object directly, so the tests also cover exposition (names, suffixes, label escaping).
"""

from __future__ import annotations

import itertools
import math
import socket
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from linlens.server.metrics import (
    DEFAULT_METRICS_PORT,
    EXPLANATION_PHASES,
    RECONSTRUCTION_ERROR_BUCKETS,
    Metrics,
)

MODEL = "smollm2-135m"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> tuple[Samples, dict[str, str]]:
    """Fetch /metrics and return ({(sample name, labels): value}, {family name: type})."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode("utf-8")
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    """The value of one sample, 0.0 when the series does not exist yet (a counter that never moved)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    m = Metrics()
    m.start_http_server(0, addr="127.0.0.1")
    try:
        yield m
    finally:
        m.stop_http_server()


def port_of(m: Metrics) -> int:
    assert m.http_port is not None
    return m.http_port


def test_requests_counter_and_latency_histogram(metrics: Metrics) -> None:
    metrics.observe_request("Explain", MODEL, "OK", 0.3)
    metrics.observe_request("Explain", MODEL, "OK", 4.0)
    metrics.observe_request("Explain", MODEL, "INVALID_ARGUMENT", 0.001)
    s, types = scrape(port_of(metrics))
    assert types["linlens_requests"] == "counter"
    assert value(s, "linlens_requests_total", method="Explain", model=MODEL, code="OK") == 2
    assert value(s, "linlens_requests_total", method="Explain", model=MODEL, code="INVALID_ARGUMENT") == 1
    assert types["linlens_request_duration_seconds"] == "histogram"
    h = "linlens_request_duration_seconds"
    assert value(s, f"{h}_count", method="Explain", model=MODEL) == 3
    assert value(s, f"{h}_sum", method="Explain", model=MODEL) == pytest.approx(4.301)
    assert value(s, f"{h}_bucket", method="Explain", model=MODEL, le="0.005") == 1
    assert value(s, f"{h}_bucket", method="Explain", model=MODEL, le="0.5") == 2
    assert value(s, f"{h}_bucket", method="Explain", model=MODEL, le="5.0") == 3
    assert value(s, f"{h}_bucket", method="Explain", model=MODEL, le="+Inf") == 3


def test_queue_ttft_tokens_and_queue_depth(metrics: Metrics) -> None:
    metrics.observe_queue_wait(MODEL, 0.02)
    metrics.observe_time_to_first_token(MODEL, 0.15)
    metrics.add_generated_tokens(MODEL, 9)
    metrics.add_generated_tokens(MODEL, 0)
    metrics.set_queue_depth(3)
    s, types = scrape(port_of(metrics))
    assert value(s, "linlens_queue_wait_seconds_count", model=MODEL) == 1
    assert value(s, "linlens_queue_wait_seconds_sum", model=MODEL) == pytest.approx(0.02)
    assert value(s, "linlens_time_to_first_token_seconds_count", model=MODEL) == 1
    assert value(s, "linlens_time_to_first_token_seconds_bucket", model=MODEL, le="0.1") == 0
    assert value(s, "linlens_time_to_first_token_seconds_bucket", model=MODEL, le="0.25") == 1
    assert types["linlens_generated_tokens"] == "counter"
    assert value(s, "linlens_generated_tokens_total", model=MODEL) == 9
    assert value(s, "linlens_queued_requests") == 3
    metrics.set_queue_depth(0)
    s, _ = scrape(port_of(metrics))
    assert value(s, "linlens_queued_requests") == 0
    with pytest.raises(ValueError):
        metrics.add_generated_tokens(MODEL, -1)


def test_explanation_phases_and_unknown_phase(metrics: Metrics) -> None:
    for i, phase in enumerate(sorted(EXPLANATION_PHASES)):
        metrics.observe_explanation_phase(MODEL, phase, 0.01 * (i + 1))
    metrics.observe_explanation_phase(MODEL, "made-up phase", 1.0)
    s, _ = scrape(port_of(metrics))
    h = "linlens_explanation_phase_duration_seconds"
    for i, phase in enumerate(sorted(EXPLANATION_PHASES)):
        assert value(s, f"{h}_count", model=MODEL, phase=phase) == 1
        assert value(s, f"{h}_sum", model=MODEL, phase=phase) == pytest.approx(0.01 * (i + 1))
    assert value(s, f"{h}_count", model=MODEL, phase="other") == 1
    assert not any(dict(labels).get("phase") == "made-up phase" for _, labels in s)


def test_reconstruction_error_buckets_are_log_spaced_and_exact_at_decades(metrics: Metrics) -> None:
    assert RECONSTRUCTION_ERROR_BUCKETS[0] == pytest.approx(1e-16)
    assert RECONSTRUCTION_ERROR_BUCKETS[-1] == 1.0
    ratios = [b / a for a, b in itertools.pairwise(RECONSTRUCTION_ERROR_BUCKETS)]
    assert all(r == pytest.approx(10.0) for r in ratios)

    metrics.observe_reconstruction_error(MODEL, 7.9e-7)  # SmolLM2 in float32
    metrics.observe_reconstruction_error(MODEL, 1.7e-15)  # SmolLM2 in float64
    metrics.observe_reconstruction_error(MODEL, 0.5)  # a broken model
    metrics.observe_reconstruction_error(MODEL, math.nan)
    metrics.observe_reconstruction_error(MODEL, math.inf)
    s, _ = scrape(port_of(metrics))
    h = "linlens_reconstruction_relative_error"
    bucket = {le: value(s, f"{h}_bucket", model=MODEL, le=le) for le in ("1e-15", "1e-14", "1e-07", "1e-06", "1.0")}
    assert bucket == {"1e-15": 0, "1e-14": 1, "1e-07": 1, "1e-06": 2, "1.0": 3}
    assert value(s, f"{h}_count", model=MODEL) == 3
    assert value(s, f"{h}_sum", model=MODEL) == pytest.approx(0.5 + 7.9e-7 + 1.7e-15)
    assert value(s, "linlens_reconstruction_nonfinite_total", model=MODEL) == 2


def test_inflight_gauge_counts_only_inside_the_block_even_on_error(metrics: Metrics) -> None:
    port = port_of(metrics)
    with metrics.inflight("Explain"), metrics.inflight("Explain"), metrics.inflight("Generate"):
        s, _ = scrape(port)
        assert value(s, "linlens_inflight_requests", method="Explain") == 2
        assert value(s, "linlens_inflight_requests", method="Generate") == 1
    with pytest.raises(RuntimeError), metrics.inflight("Explain"):
        raise RuntimeError("handler failed")
    s, _ = scrape(port)
    assert value(s, "linlens_inflight_requests", method="Explain") == 0
    assert value(s, "linlens_inflight_requests", method="Generate") == 0


def test_model_load_duration_and_info(metrics: Metrics) -> None:
    metrics.observe_model_load(
        MODEL,
        3.25,
        {"family": "llama", "dtype": "float32", "device": "cpu", "hidden_size": 576, "layers": 30, "model": "x"},
    )
    s, types = scrape(port_of(metrics))
    assert value(s, "linlens_model_load_duration_seconds", model=MODEL) == 3.25
    assert types["linlens_model_info"] == "gauge"  # the text format has no info type; Info exposes a gauge of 1
    info = {
        "model": MODEL,
        "family": "llama",
        "dtype": "float32",
        "device": "cpu",
        "hidden_size": "576",
        "layers": "30",
    }
    assert value(s, "linlens_model_info", **info) == 1


def test_process_memory_is_exported_under_both_names(metrics: Metrics) -> None:
    s, _ = scrape(port_of(metrics))
    standard = value(s, "process_resident_memory_bytes")
    ours = value(s, "linlens_process_resident_memory_bytes")
    peak = value(s, "linlens_process_peak_resident_memory_bytes")
    assert standard > 10e6 and ours > 10e6  # a Python process with prometheus-client holds well over 10 MB
    assert peak >= ours * 0.9  # the peak is taken a moment apart from the current value
    assert value(s, "process_cpu_seconds_total") > 0
    assert any(name == "python_info" for name, _ in s)


def test_naming_conventions_hold_for_every_linlens_family(metrics: Metrics) -> None:
    """One prefix, snake_case, base units, _total on counters: checked on what is actually exposed."""
    metrics.observe_request("Generate", MODEL, "OK", 0.1)
    metrics.add_generated_tokens(MODEL, 1)
    metrics.observe_reconstruction_error(MODEL, math.nan)
    s, types = scrape(port_of(metrics))
    ours = {name: kind for name, kind in types.items() if name.startswith("linlens_")}
    assert len(ours) >= 14
    for name, kind in ours.items():
        assert name == name.lower() and " " not in name and "-" not in name, name
        assert not name.endswith(("_ms", "_milliseconds", "_kb", "_mb")), name
        if kind == "counter":
            assert any(sample == f"{name}_total" for sample, _ in s), name
    foreign = {name for name in types if not name.startswith(("linlens_", "process_", "python_"))}
    assert foreign == set(), foreign


def test_two_instances_do_not_share_values() -> None:
    a, b = Metrics(), Metrics()
    a.start_http_server(0, addr="127.0.0.1")
    b.start_http_server(0, addr="127.0.0.1")
    try:
        a.observe_request("Explain", MODEL, "OK", 1.0)
        sa, _ = scrape(port_of(a))
        sb, _ = scrape(port_of(b))
        assert value(sa, "linlens_requests_total", method="Explain", model=MODEL, code="OK") == 1
        assert value(sb, "linlens_requests_total", method="Explain", model=MODEL, code="OK") == 0
    finally:
        a.stop_http_server()
        b.stop_http_server()


def test_http_server_lifecycle_on_an_explicit_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    m = Metrics()
    m.start_http_server(port, addr="127.0.0.1")
    try:
        assert m.http_port == port
        with pytest.raises(RuntimeError):
            m.start_http_server(port, addr="127.0.0.1")
        other = Metrics()
        with pytest.raises(OSError):
            other.start_http_server(port, addr="127.0.0.1")
        scrape(port)
    finally:
        m.stop_http_server()
    assert m.http_port is None
    m.stop_http_server()  # idempotent
    with pytest.raises(OSError):
        scrape(port)


def test_default_metrics_port_is_a_valid_unprivileged_port() -> None:
    assert 1024 < DEFAULT_METRICS_PORT < 65536
