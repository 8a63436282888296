"""The server process: gRPC server, health, reflection, metrics endpoint, model loading and graceful shutdown.

Health (grpc.health.v1) reports three kinds of service name:

- ``""`` (the whole server) and ``linlens.v1.LinlensService``: SERVING once loading has finished and the default
  model is ready (see :mod:`linlens.server.hosting`); NOT_SERVING while it loads, when it failed to load, and from
  the moment a drain starts. This is what start-up, readiness and liveness probes and load balancers ask;
- each model's name (e.g. ``smollm2-135m``): SERVING when that model can take requests.

Security (see :mod:`linlens.server.auth` and ``ServerConfig``): TLS from certificate and key files, mutual TLS with
a client CA, bearer tokens checked inside the call interceptor (health stays open), reflection that can be switched
off, and an optional plaintext port that serves health only, for probes that cannot speak TLS.

A drain (SIGTERM or SIGINT, or :meth:`RunningServer.drain`) turns every health status to NOT_SERVING, refuses new
calls with UNAVAILABLE, lets calls in flight finish within the grace period, then cancels what is left and stops. A
second signal during a drain cancels the remaining work at once.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import FrameType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from linlens.contract import ModelState
from linlens.models import LoadedModel
from linlens.server.auth import AuthInterceptor, TokenFile, TokenFileError
from linlens.server.calls import SERVICE_NAME, CallInterceptor, Lifecycle
from linlens.server.config import ServerConfig, build_config
from linlens.server.hosting import ModelHost, ModelSlot, model_labels
from linlens.server.jobs import JobRunner
from linlens.server.logs import setup_logging
from linlens.server.metrics import Metrics
from linlens.server.scheduler import Lanes, Scheduler, StopReason
from linlens.server.service import LinlensServicer
from linlens.server.tls import ReloadingCertificates
from linlens.v1 import linlens_pb2_grpc as pb_grpc

_log = logging.getLogger(__name__)

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

#: gRPC reads at most this many times ``max_request_bytes`` of a message into memory; between the two the call
#: interceptor refuses the request with a message that names the setting, above it gRPC refuses it on its own.
_RECEIVE_HEADROOM = 2


@dataclass
class RunningServer:
    """A started server and the handles to watch and stop it."""

    config: ServerConfig
    server: grpc.Server
    port: int
    host: ModelHost
    #: The explanation workers and the generation lane, seen as one (running, queued, drain).
    scheduler: Lanes
    metrics: Metrics
    health: health.HealthServicer
    lifecycle: Lifecycle
    servicer: LinlensServicer
    #: The plaintext health-only server on ``config.health_port`` (None when that is off).
    health_server: grpc.Server | None = None
    health_port: int | None = None
    loaded_event: threading.Event = field(default_factory=threading.Event)
    stopped_event: threading.Event = field(default_factory=threading.Event)
    _drain_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def target(self) -> str:
        """A ``host:port`` a client on this machine can connect to."""
        host = self.config.host
        if host in ("0.0.0.0", "::", "[::]", ""):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    @property
    def metrics_port(self) -> int | None:
        return self.metrics.http_port

    def wait_until_loaded(self, timeout: float | None = None) -> bool:
        """Wait until model loading has finished (successfully or not); True if it finished in time."""
        return self.loaded_event.wait(timeout)

    def drain(self, grace: float | None = None) -> bool:
        """Stop taking calls, give calls in flight ``grace`` seconds (default: the config's), then stop.

        Returns True when every call finished within the grace period. Safe to call more than once.
        """
        grace = self.config.grace_period_s if grace is None else grace
        with self._drain_lock:
            if self.stopped_event.is_set():
                return True
            started = time.monotonic()
            inflight = self.lifecycle.inflight
            _log.info("draining: %d call(s) in flight, grace period %.1f s", inflight, grace)
            self.lifecycle.start_draining()
            self.health.enter_graceful_shutdown()
            self.scheduler.close()
            finished = self.lifecycle.wait_idle(grace)
            if not finished:
                _log.warning("grace period over with %d call(s) in flight; cancelling them", self.lifecycle.inflight)
            # Also stops jobs whose callers left already and which have not reached a check point yet, so that no
            # model work is still running when the process exits.
            self.scheduler.cancel_all(StopReason.SHUTDOWN)
            self.lifecycle.wait_idle(5.0)
            self.scheduler.wait_idle(10.0)
            if not self.servicer.close_batches(5.0):  # the decode threads: none may run the model while we exit
                _log.warning("a decode thread is still running after the drain")
            self.server.stop(grace=1.0).wait(5.0)
            if self.health_server is not None:
                self.health_server.stop(grace=None)
            self.metrics.stop_http_server()
            self.stopped_event.set()
            _log.info("stopped after %.1f s of draining", time.monotonic() - started)
            return finished

    def force_stop(self) -> None:
        """Cancel all queued and running work now (a second signal during a drain)."""
        self.scheduler.cancel_all(StopReason.SHUTDOWN)

    def stop(self) -> None:
        """Stop at once, cancelling work in flight (tests, errors)."""
        self.drain(grace=0.0)

    def wait(self, timeout: float | None = None) -> bool:
        return self.stopped_event.wait(timeout)


def _apply_torch_threads(config: ServerConfig) -> None:
    if config.torch_threads:
        import torch

        torch.set_num_threads(config.torch_threads)


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the configured files (None: plaintext); mutual TLS when a client CA is configured. The
    files are watched: a renewed certificate is used for new connections without a restart (linlens.server.tls)."""
    if not config.tls:
        return None
    return ReloadingCertificates(
        config.tls_key_file, config.tls_cert_file, config.tls_client_ca_file or None
    ).credentials()


def start_server(
    config: ServerConfig,
    *,
    models: Sequence[LoadedModel] = (),
    metrics: Metrics | None = None,
    load_in_background: bool = True,
) -> RunningServer:
    """Start serving ``config`` and return at once; models load on a background thread.

    ``models`` are already loaded :class:`linlens.models.LoadedModel` objects to serve instead of loading them again
    (each must be one of ``config.models``). Until a model is ready, calls for it fail with UNAVAILABLE and its
    health is NOT_SERVING. With ``load_in_background=False`` this returns only once loading is over.
    """
    _apply_torch_threads(config)
    metrics = metrics or Metrics()
    host = ModelHost(config)
    lifecycle = Lifecycle()
    depths = [0, 0]  # waiting jobs of the two lanes; the queue-depth gauge shows their sum

    def depth_of(lane: int) -> Callable[[int], None]:
        def report(n: int) -> None:
            depths[lane] = n
            metrics.set_queue_depth(sum(depths))

        return report

    explanations = Scheduler(config.max_concurrent_jobs, config.max_queue, on_queue_depth=depth_of(0))
    # the generation lane: plain generations, one worker per batch row, each waiting on its row of the decode batch
    generations = Scheduler(config.max_batch_size, config.max_queue, on_queue_depth=depth_of(1), name="linlens-gen")
    scheduler = Lanes(explanations, generations)
    servicer = LinlensServicer(config, host, JobRunner(explanations), metrics, JobRunner(generations))

    credentials = server_credentials(config)  # before anything starts: a missing file stops start-up
    interceptors: list[grpc.ServerInterceptor] = [
        CallInterceptor(
            metrics,
            lifecycle,
            max_request_bytes=config.max_request_bytes,
            max_streams=config.max_concurrent_streams,
        )
    ]
    if config.auth_token_file:
        interceptors.append(AuthInterceptor(TokenFile(config.auth_token_file)))  # inside: refusals are logged
    server = grpc.server(
        ThreadPoolExecutor(max_workers=config.grpc_threads, thread_name_prefix="linlens-grpc"),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", _RECEIVE_HEADROOM * config.max_request_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),
        ],
    )
    pb_grpc.add_LinlensServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if config.reflection:
        service_names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(service_names, server)

    for name in ("", SERVICE_NAME, *host.slots):
        health_servicer.set(name, _NOT_SERVING)

    def on_model_change(slot: ModelSlot) -> None:
        health_servicer.set(slot.name, _SERVING if slot.state is ModelState.READY else _NOT_SERVING)
        overall = _SERVING if host.serving else _NOT_SERVING
        health_servicer.set("", overall)
        health_servicer.set(SERVICE_NAME, overall)

    host.on_change(on_model_change)
    for loaded in models:
        host.adopt(loaded)
        metrics.observe_model_load(loaded.name, loaded.load_seconds, model_labels(loaded))

    address = f"{config.host}:{config.port}"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:  # pragma: no cover - older grpc returns 0 instead of raising
        raise OSError(f"cannot listen on {address}: the port is taken or the address is not local")
    health_server, health_port = None, None
    if config.health_port:
        health_server = grpc.server(ThreadPoolExecutor(max_workers=2, thread_name_prefix="linlens-health"))
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        health_port = health_server.add_insecure_port(f"{config.host}:{config.health_port}")
    if config.metrics_port:
        metrics.start_http_server(config.metrics_port, config.metrics_host)
    server.start()
    if health_server is not None:
        health_server.start()
    running = RunningServer(
        config=config,
        server=server,
        port=port,
        host=host,
        scheduler=scheduler,
        metrics=metrics,
        health=health_servicer,
        lifecycle=lifecycle,
        servicer=servicer,
        health_server=health_server,
        health_port=health_port,
    )
    _log.info(
        "linlens listening on %s:%d (%s; tokens %s; models: %s; default %s; metrics port %s; health-only port %s)",
        config.host,
        port,
        ("mutual TLS" if config.tls_client_ca_file else "TLS") if config.tls else "plaintext",
        "required" if config.auth_token_file else "off",
        ", ".join(host.slots),
        host.default_name,
        running.metrics_port or "off",
        health_port or "off",
    )

    def load() -> None:
        try:
            host.load_all(metrics)
        finally:
            running.loaded_event.set()

    if load_in_background:
        threading.Thread(target=load, name="linlens-model-loader", daemon=True).start()
    else:
        load()
    return running


def serve(config: ServerConfig, *, install_signal_handlers: bool = True) -> int:
    """Run a server until SIGTERM or SIGINT, then drain it. Returns the process exit status.

    Exit status 0 after a drain (whether or not every call finished within the grace period: the orchestrator
    asked us to stop, and we did), 1 when the ports cannot be bound or the default model could not be loaded (a
    server that cannot serve requests that name no model should fail visibly rather than sit NOT_SERVING forever).
    Signal handlers are only installed from the main thread (Python allows no other).
    """
    stop_requested = threading.Event()
    try:
        running = start_server(config)
    except (OSError, RuntimeError, TokenFileError) as exc:  # a taken port, a missing certificate or token file
        _log.error("cannot start: %s", exc)
        return 1

    def on_signal(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if stop_requested.is_set():
            _log.warning("%s again: cancelling the remaining work", name)
            running.force_stop()
            return
        _log.info("%s received: draining (grace period %.1f s)", name, config.grace_period_s)
        stop_requested.set()

    if install_signal_handlers and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    status = 0
    default = running.host.slots[running.host.default_name]
    while not stop_requested.wait(0.5):
        if default.state is ModelState.FAILED:
            _log.error("the default model %s could not be loaded (%s); stopping", default.name, default.detail)
            status = 1
            break
    running.drain()
    return status


def serve_configured(configure: Callable[[], ServerConfig]) -> int:
    """Build the configuration (a ConfigError is exit status 2, said on stderr), set up logging, serve.

    The one start of ``python -m linlens.server`` and ``linlens serve``, which differ only in how they read flags.
    """
    from linlens.server.config import ConfigError

    try:
        config = configure()
    except ConfigError as exc:
        print(f"linlens: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_format, config.log_level)
    return serve(config)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m linlens.server [flags]``: parse the configuration, set up logging, serve."""
    return serve_configured(lambda: build_config(argv))


__all__ = [
    "RunningServer",
    "build_config",
    "main",
    "serve",
    "serve_configured",
    "server_credentials",
    "start_server",
]
