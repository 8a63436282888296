"""Prometheus metrics of the linlens server.

Operators need three answers at a glance: is the service healthy (requests by status code, in-flight and queued
work, memory), is it fast (latency, queue wait, time to first token, time per explanation phase) and is it exact
(the reconstruction relative error ||sum_i J_i x_i - y|| / ||y|| of every explanation). The last one is what makes
this service different from an ordinary inference server: the detached-Jacobian decomposition is exact by
construction, so its error sits at the floating-point floor (about 1e-7 in float32, 1e-15 in float64) and a drift
upwards means a broken model conversion or engine, not load. Its histogram therefore has log-spaced buckets from
1e-16 to 1.

All metrics live in one :class:`~prometheus_client.CollectorRegistry` owned by a :class:`Metrics` object (not the
global default registry), so that tests and several servers in one process never share counters. Every series the
service defines carries the common prefix ``linlens_`` and follows Prometheus naming conventions: snake_case, base
units (``_seconds``, ``_bytes``), ``_total`` for counters. The standard process collector is registered too
(``process_resident_memory_bytes``, ``process_cpu_seconds_total``, ...), and the service additionally exports its
own ``linlens_process_resident_memory_bytes`` and ``linlens_process_peak_resident_memory_bytes`` so that dashboards
filtering on the prefix see memory without knowing about the standard names.

Metrics are served on their own HTTP port (``/metrics``), separate from the gRPC port: scraping keeps working while
the gRPC port is saturated, and the metrics port can be kept off the client-facing Service.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Generic, TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from linlens.contract.results import EXPLANATION_PHASES as TIMED_PHASES

__all__ = [
    "DEFAULT_METRICS_PORT",
    "EXPLANATION_PHASES",
    "METRIC_PREFIX",
    "RECONSTRUCTION_ERROR_BUCKETS",
    "Metrics",
]

_log = logging.getLogger(__name__)

#: The prefix every linlens-defined series starts with.
METRIC_PREFIX = "linlens"

#: Port of the ``/metrics`` endpoint unless configured otherwise. deploy/ (compose, Prometheus, Kubernetes) assumes
#: this value; tests/test_deploy.py checks that they agree.
DEFAULT_METRICS_PORT = 9464

#: Phases of an explanation whose durations are recorded (the ``<phase>_ms`` fields of the contract's ``Timings``):
#: ``forward`` the detached forward pass, ``jacobian`` the vector-Jacobian products, ``attribution`` the per-token
#: attributions, ``svd`` the singular-value decompositions, ``decode`` mapping singular vectors to tokens,
#: ``ordinary`` the optional contrast with the ordinary (not detached) Jacobian, ``layers`` the whole layer-by-layer
#: analysis of one step (ExplainOptions.layers: the layers x tokens matrix and every selected layer's Jacobians).
EXPLANATION_PHASES: frozenset[str] = frozenset(TIMED_PHASES)

#: Label value used for a phase outside :data:`EXPLANATION_PHASES`, so that a typo cannot explode label cardinality.
OTHER_PHASE = "other"

#: One bucket per decade from 1e-16 (below float64's epsilon) to 1 (a reconstruction no better than zero).
RECONSTRUCTION_ERROR_BUCKETS: tuple[float, ...] = tuple(10.0**e for e in range(-16, 1))

# Latency buckets in seconds. An explanation of a few tokens takes seconds on a CPU, a long generation minutes,
# so the request buckets reach 10 minutes; the queue and first-token buckets start at a millisecond.
_M = TypeVar("_M", Counter, Histogram, Gauge, Info)


class _Declare(Generic[_M]):
    """Declares metrics of one kind: each named under the prefix and registered in the Metrics object's own registry
    (one rule for all of them, so that a declaration says only what differs: name, help, labels, buckets)."""

    def __init__(self, kind: type[_M], prefix: str, registry: CollectorRegistry) -> None:
        self.kind: type[_M] = kind
        self.prefix = prefix
        self.registry = registry

    def __call__(self, name: str, documentation: str, labels: Sequence[str] = (), **options: Any) -> _M:
        return self.kind(f"{self.prefix}_{name}", documentation, labels, registry=self.registry, **options)


_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_PHASE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _ResidentMemoryCollector(Collector):
    """Current and peak resident memory of this process, and the accelerator's peak memory when torch uses one.

    The standard process collector already exports ``process_resident_memory_bytes``; these prefixed copies exist so
    that the service's own dashboards and alerts need only the ``linlens_`` namespace. The peak (``ru_maxrss``) is
    what a Kubernetes memory limit has to cover. Torch is never imported here: the accelerator gauge appears only
    once the server itself has imported torch and initialised CUDA.
    """

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix

    def collect(self) -> Iterable[Metric]:
        rss = _current_rss_bytes()
        if rss is not None:
            yield GaugeMetricFamily(
                f"{self._prefix}_process_resident_memory_bytes",
                "Resident set size of the server process.",
                value=rss,
            )
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # Linux reports kilobytes, macOS bytes.
        peak_bytes = peak if sys.platform == "darwin" else peak * 1024
        yield GaugeMetricFamily(
            f"{self._prefix}_process_peak_resident_memory_bytes",
            "Largest resident set size the server process has had since it started.",
            value=peak_bytes,
        )
        accel = _accelerator_peak_bytes()
        if accel:
            family = GaugeMetricFamily(
                f"{self._prefix}_accelerator_peak_memory_bytes",
                "Peak memory torch has allocated on each accelerator since the process started.",
                labels=["device"],
            )
            for device, value in accel.items():
                family.add_metric([device], value)
            yield family


def _current_rss_bytes() -> float | None:
    """Resident memory from /proc (Linux); None elsewhere, where only the peak is known."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return float(pages * os.sysconf("SC_PAGE_SIZE"))


def _accelerator_peak_bytes() -> dict[str, float]:
    """torch.cuda.max_memory_allocated per device, only if torch is already imported and CUDA is initialised."""
    torch = sys.modules.get("torch")
    if torch is None:
        return {}
    try:
        cuda = torch.cuda
        if not cuda.is_initialized():
            return {}
        return {f"cuda:{i}": float(cuda.max_memory_allocated(i)) for i in range(cuda.device_count())}
    except Exception:  # a metrics scrape must never fail because of an accelerator query
        return {}


class Metrics:
    """The server's metrics, bound to one registry, plus the HTTP endpoint that serves them.

    Every method is thread-safe (prometheus-client guards its values with locks) and cheap enough to call on each
    request. Label values are strings chosen by the server: ``method`` is the gRPC method name (``Generate``,
    ``Explain``, ...), ``model`` the registry name of the model, ``code`` the gRPC status code name (``OK``,
    ``INVALID_ARGUMENT``, ...).
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, prefix: str = METRIC_PREFIX) -> None:
        """Create the metrics in ``registry``.

        With ``registry=None`` a fresh registry is created and the standard process, platform and garbage-collector
        collectors are added to it, so that one scrape has everything an operator needs. A caller passing its own
        registry decides itself which of those it wants (they may only be registered once per registry).
        """
        if registry is None:
            registry = CollectorRegistry(auto_describe=True)
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        self.registry = registry
        self.prefix = prefix
        self._http_server: WSGIServer | None = None
        self._http_thread: threading.Thread | None = None
        self._unknown_phases_logged: set[str] = set()
        p = prefix
        counter, histogram = _Declare(Counter, p, registry), _Declare(Histogram, p, registry)
        gauge, info = _Declare(Gauge, p, registry), _Declare(Info, p, registry)
        self._requests = counter(
            "requests", "Finished gRPC requests by method, model and gRPC status code.", ["method", "model", "code"]
        )
        self._request_duration = histogram(
            "request_duration_seconds",
            "Wall time of a gRPC request from arrival to its last response message, queue wait included.",
            ["method", "model"],
            buckets=_REQUEST_BUCKETS,
        )
        self._queue_wait = histogram(
            "queue_wait_seconds",
            "Time a request waited in the scheduler queue before a worker started it.",
            ["model"],
            buckets=_QUEUE_BUCKETS,
        )
        self._batch_size = histogram(
            "generation_batch_size",
            "Requests decoded together in one batched generation step (observed once per step).",
            ["model"],
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
        )
        self._join_wait = histogram(
            "batch_join_wait_seconds",
            "Time a generation request waited for a token boundary to join its model's decode batch.",
            ["model"],
            buckets=_QUEUE_BUCKETS,
        )
        self._ttft = histogram(
            "time_to_first_token_seconds",
            "Time from a request's arrival to its first generated token.",
            ["model"],
            buckets=_TTFT_BUCKETS,
        )
        self._generated_tokens = counter(
            "generated_tokens", "Tokens generated (sampled or greedy) across all requests.", ["model"]
        )
        self._phase_duration = histogram(
            "explanation_phase_duration_seconds",
            "Time spent in each explanation phase (forward, jacobian, attribution, svd, decode, ordinary, layers).",
            ["model", "phase"],
            buckets=_PHASE_BUCKETS,
        )
        self._reconstruction_error = histogram(
            "reconstruction_relative_error",
            "Relative reconstruction error ||sum_i J_i x_i - y|| / ||y|| of each explanation; sits at the float "
            "floor (~1e-7 float32, ~1e-15 float64) and only drifts up when a model or the engine is broken.",
            ["model"],
            buckets=RECONSTRUCTION_ERROR_BUCKETS,
        )
        self._reconstruction_nonfinite = counter(
            "reconstruction_nonfinite",
            "Explanations whose reconstruction error was NaN or infinite (kept out of the histogram, whose sum a "
            "single NaN would poison for the life of the process).",
            ["model"],
        )
        self._inflight = gauge("inflight_requests", "gRPC requests currently being handled, by method.", ["method"])
        self._queued = gauge("queued_requests", "Requests waiting in the scheduler queue for a worker.")
        self._model_load_duration = gauge(
            "model_load_duration_seconds",
            "Seconds the last load of each model took (conversion, weights, tokenizer).",
            ["model"],
        )
        self._model_info = info(
            "model",
            "Static facts about each loaded model (family, dtype, device, hidden size, layers, ...).",
            ["model"],
        )
        registry.register(_ResidentMemoryCollector(p))

    # ----------------------------------------------------------------------------------------------- HTTP endpoint

    def start_http_server(self, port: int, addr: str = "0.0.0.0") -> None:
        """Serve ``/metrics`` (any path, in fact) from a daemon thread on ``addr:port``.

        ``port=0`` binds a free port; :attr:`http_port` then tells which. Raises ``RuntimeError`` when this object
        already serves, and ``OSError`` when the port is taken, so that a misconfiguration stops start-up loudly.
        """
        if self._http_server is not None:
            raise RuntimeError(f"metrics HTTP server already running on port {self.http_port}")
        server, thread = start_http_server(port, addr=addr, registry=self.registry)
        self._http_server, self._http_thread = server, thread
        _log.info("metrics endpoint listening on %s:%d", addr, server.server_port)

    @property
    def http_port(self) -> int | None:
        """The port the metrics endpoint is bound to, or None when it is not running."""
        return None if self._http_server is None else int(self._http_server.server_port)

    def stop_http_server(self) -> None:
        """Stop the endpoint and free its port (idempotent); part of a graceful shutdown."""
        server, thread = self._http_server, self._http_thread
        self._http_server = self._http_thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    # ------------------------------------------------------------------------------------------------- observations

    def observe_request(self, method: str, model: str, code: str, seconds: float) -> None:
        """Count one finished request and record its latency."""
        self._requests.labels(method, model, code).inc()
        self._request_duration.labels(method, model).observe(max(0.0, seconds))

    def observe_queue_wait(self, model: str, seconds: float) -> None:
        """Record how long a request waited for a worker."""
        self._queue_wait.labels(model).observe(max(0.0, seconds))

    def observe_batch_size(self, model: str, size: int) -> None:
        """Record the number of requests one batched decode step ran for."""
        self._batch_size.labels(model).observe(size)

    def observe_batch_join_wait(self, model: str, seconds: float) -> None:
        """Record how long a generation request waited to join its model's decode batch."""
        self._join_wait.labels(model).observe(max(0.0, seconds))

    def observe_time_to_first_token(self, model: str, seconds: float) -> None:
        """Record the time from a request's arrival to its first token."""
        self._ttft.labels(model).observe(max(0.0, seconds))

    def add_generated_tokens(self, model: str, n: int) -> None:
        """Add ``n`` generated tokens; zero is allowed (a request stopped before its first token)."""
        if n < 0:
            raise ValueError(f"generated token count must be >= 0, got {n}")
        self._generated_tokens.labels(model).inc(n)

    def observe_explanation_phase(self, model: str, phase: str, seconds: float) -> None:
        """Record the duration of one explanation phase.

        A phase outside :data:`EXPLANATION_PHASES` is recorded as ``other`` (and logged once) rather than rejected:
        a metrics call must never fail a request, and an unbounded ``phase`` label must never reach Prometheus.
        """
        if phase not in EXPLANATION_PHASES:
            if phase not in self._unknown_phases_logged:
                self._unknown_phases_logged.add(phase)
                _log.warning("unknown explanation phase %r recorded as %r", phase, OTHER_PHASE)
            phase = OTHER_PHASE
        self._phase_duration.labels(model, phase).observe(max(0.0, seconds))

    def observe_reconstruction_error(self, model: str, rel_error: float) -> None:
        """Record one explanation's relative reconstruction error.

        Non-finite values go to ``linlens_reconstruction_nonfinite_total`` instead of the histogram.
        """
        if not math.isfinite(rel_error):
            self._reconstruction_nonfinite.labels(model).inc()
            return
        self._reconstruction_error.labels(model).observe(abs(rel_error))

    def inflight(self, method: str) -> AbstractContextManager[None]:
        """Context manager that counts a request as in flight for the duration of the ``with`` block."""
        return self._track(self._inflight.labels(method))

    @staticmethod
    @contextmanager
    def _track(gauge: Gauge) -> Iterator[None]:
        gauge.inc()
        try:
            yield
        finally:
            gauge.dec()

    def set_queue_depth(self, n: int) -> None:
        """Set the number of requests waiting for a worker."""
        self._queued.set(max(0, n))

    def observe_model_load(self, model: str, seconds: float, info: Mapping[str, object]) -> None:
        """Record a model load: its duration and the info metric ``linlens_model_info{model=..., ...} 1``.

        ``info`` values are turned into strings (``hidden_size=576`` becomes ``"576"``); a key named ``model`` is
        ignored because that label already identifies the series.
        """
        self._model_load_duration.labels(model).set(max(0.0, seconds))
        labels = {_label_name(k): str(v) for k, v in info.items() if k != "model"}
        self._model_info.labels(model).info(labels)


def _label_name(key: str) -> str:
    """A Prometheus-valid label name for an info key (``hidden-size`` -> ``hidden_size``)."""
    cleaned = "".join(c if c.isalnum() or c == "_" else "_" for c in key)
    if not cleaned or cleaned[0].isdigit():
        cleaned = "_" + cleaned
    if cleaned.startswith("__"):
        cleaned = "x" + cleaned  # names starting with "__" are reserved by Prometheus
    return cleaned
