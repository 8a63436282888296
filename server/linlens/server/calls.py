"""What every linlens call gets, whatever its method: a request id, admission, one status, metrics, one log line.

:class:`CallInterceptor` is a gRPC server interceptor around the methods of ``linlens.v1.LinlensService`` (health
and reflection pass untouched, so probes work during a drain and stay out of the access log). For each call it

1. takes the caller's ``x-request-id`` (or makes one) and sends it back as initial metadata;
2. refuses the call with UNAVAILABLE once a drain has begun, else counts it in flight (what a drain waits for);
   refuses a request above ``max_request_bytes`` (RESOURCE_EXHAUSTED), bytes that are not the method's request
   message (INVALID_ARGUMENT; gRPC alone would answer INTERNAL) and a GenerateStream beyond
   ``max_concurrent_streams`` (RESOURCE_EXHAUSTED);
3. makes the call's :class:`CallRecord` available to the servicer (:func:`current_call`), which notes the model,
   token counts and durations on it;
4. maps whatever escapes the servicer to a status (:func:`linlens.server.status.failure_for`);
5. writes one access-log line and the request metrics when the call ends, whatever the outcome.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from linlens.contract.retry_hint import NO_RETRY_KEY, NO_RETRY_VALUE
from linlens.server.logs import log_request
from linlens.server.metrics import Metrics
from linlens.server.status import SHUTTING_DOWN, RpcFailure, failure_for, invalid

_log = logging.getLogger(__name__)

#: The service the interceptor covers.
SERVICE_NAME = "linlens.v1.LinlensService"


@dataclass
class CallRecord:
    """What the access log and the request metrics say about one call."""

    method: str
    request_id: str
    started: float = field(default_factory=time.monotonic)
    model: str = ""
    code: grpc.StatusCode = grpc.StatusCode.OK
    queue_s: float = 0.0
    generation_s: float = 0.0
    explain_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    explained_steps: int = 0
    prompt_text: str | None = None
    error: str = ""
    #: The label of the caller's API token (linlens.server.auth), when tokens are required.
    client: str = ""

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "request_id": self.request_id,
            "method": self.method,
            "model": self.model,
            "code": self.code.name,
            "total_ms": round((time.monotonic() - self.started) * 1000.0, 1),
            "queue_ms": round(self.queue_s * 1000.0, 1),
            "generation_ms": round(self.generation_s * 1000.0, 1),
            "explain_ms": round(self.explain_s * 1000.0, 1),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "explained_steps": self.explained_steps,
        }
        if self.error:
            out["error"] = self.error
        if self.client:
            out["client"] = self.client
        if self.prompt_text is not None:
            out["prompt"] = self.prompt_text
        return out


_CURRENT: contextvars.ContextVar[CallRecord | None] = contextvars.ContextVar("linlens_call", default=None)


def current_call() -> CallRecord:
    """The record of the call the current gRPC thread is serving (inside a LinlensService method)."""
    record = _CURRENT.get()
    if record is None:
        raise RuntimeError("current_call() outside a linlens call")
    return record


class Lifecycle:
    """Whether the server takes new calls, and how many are in flight (what a drain waits for)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._inflight = 0
        self.draining = False

    def enter(self) -> None:
        with self._cond:
            if self.draining:
                raise SHUTTING_DOWN
            self._inflight += 1

    def leave(self) -> None:
        with self._cond:
            self._inflight -= 1
            self._cond.notify_all()

    def start_draining(self) -> None:
        with self._cond:
            self.draining = True

    @property
    def inflight(self) -> int:
        with self._cond:
            return self._inflight

    def wait_idle(self, timeout: float | None) -> bool:
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._inflight:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            return True


@dataclass(frozen=True)
class RefusedRequest:
    """What the guarded deserializer hands on instead of a request it refuses (the handler raises its failure)."""

    failure: RpcFailure


def guarded_deserializer(deserialize: Callable[[bytes], Any], max_bytes: int) -> Callable[[bytes], Any]:
    """``deserialize`` that never raises: a request above ``max_bytes`` (0: no limit) or bytes that do not decode
    become a :class:`RefusedRequest`, which the call then ends with, counted and logged like any other failure."""
    descriptor = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    message = getattr(descriptor, "full_name", "request")

    def guarded(data: bytes) -> Any:
        if max_bytes and len(data) > max_bytes:
            return RefusedRequest(
                RpcFailure(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the request is {len(data)} bytes, above this server's limit of {max_bytes} "
                    "(max_request_bytes); send a shorter input",
                    final=True,
                )
            )
        try:
            return deserialize(data)
        except Exception as exc:
            return RefusedRequest(
                invalid(f"the request ({len(data)} bytes) is not a valid {message} message: {type(exc).__name__}")
            )

    return guarded


def _abort(context: grpc.ServicerContext, failure: RpcFailure) -> None:
    """End the call with ``failure``'s status; a final one says in trailing metadata that retrying cannot help."""
    if failure.final:
        context.set_trailing_metadata(((NO_RETRY_KEY, NO_RETRY_VALUE),))
    context.abort(failure.code, failure.message)


class CallInterceptor(grpc.ServerInterceptor):
    """See the module docstring. ``max_request_bytes`` and ``max_streams`` of 0 mean no limit."""

    #: The server-streaming methods whose open calls ``max_streams`` counts.
    STREAMS = ("GenerateStream",)

    def __init__(
        self, metrics: Metrics, lifecycle: Lifecycle, *, max_request_bytes: int = 0, max_streams: int = 0
    ) -> None:
        self.metrics = metrics
        self.lifecycle = lifecycle
        self.max_request_bytes = max_request_bytes
        self.max_streams = max_streams
        self._streams = threading.BoundedSemaphore(max_streams) if max_streams else None

    def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        prefix = f"/{SERVICE_NAME}/"
        if handler is None or not handler_call_details.method.startswith(prefix):
            return handler
        method = handler_call_details.method.removeprefix(prefix)
        deserializer = guarded_deserializer(handler.request_deserializer, self.max_request_bytes)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(method, handler.unary_stream),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # pragma: no cover - the service has no client-streaming methods

    # -- the two call shapes -----------------------------------------------------------------------------------

    def _unary(self, method: str, behavior: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        def handle(request: Any, context: grpc.ServicerContext) -> Any:
            record = self._begin(method, context)
            failure: RpcFailure | None = None
            current = _CURRENT.set(record)
            try:
                with self._admitted(method):
                    if isinstance(request, RefusedRequest):
                        raise request.failure
                    return behavior(request, context)
            except Exception as exc:
                failure = failure_for(exc, record.request_id)
            finally:
                _CURRENT.reset(current)
                self._finish(record, failure)
            _abort(context, failure)

        return handle

    def _stream(
        self, method: str, behavior: Callable[[Any, Any], Iterator[Any]]
    ) -> Callable[[Any, Any], Iterator[Any]]:
        def handle(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            record = self._begin(method, context)
            failure: RpcFailure | None = None
            responses: Iterator[Any] | None = None
            try:
                with self._admitted(method):
                    if isinstance(request, RefusedRequest):
                        raise request.failure
                    while True:
                        current = _CURRENT.set(record)
                        try:
                            if responses is None:
                                responses = behavior(request, context)
                            response = next(responses)
                        except StopIteration:
                            break
                        finally:
                            _CURRENT.reset(current)
                        yield response
            except GeneratorExit:  # the caller went away: gRPC (or the garbage collector) closed the stream
                record.code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:
                failure = failure_for(exc, record.request_id)
            finally:
                if responses is not None and hasattr(responses, "close"):
                    responses.close()  # lets the servicer withdraw its job
                self._finish(record, failure)
            if failure is not None:
                _abort(context, failure)

        return handle

    # -- bookkeeping -------------------------------------------------------------------------------------------

    def _begin(self, method: str, context: grpc.ServicerContext) -> CallRecord:
        metadata = dict(context.invocation_metadata() or ())
        request_id = str(metadata.get("x-request-id") or uuid.uuid4().hex[:16])
        with contextlib.suppress(Exception):  # the call may already be gone; the id is a courtesy
            context.send_initial_metadata((("x-request-id", request_id),))
        return CallRecord(method=method, request_id=request_id)

    @contextlib.contextmanager
    def _admitted(self, method: str) -> Iterator[None]:
        with self.metrics.inflight(method):
            self.lifecycle.enter()
            try:
                with self._stream_slot(method):
                    yield
            finally:
                self.lifecycle.leave()

    @contextlib.contextmanager
    def _stream_slot(self, method: str) -> Iterator[None]:
        """One of ``max_streams`` slots for a streaming call (RESOURCE_EXHAUSTED when none is free)."""
        if self._streams is None or method not in self.STREAMS:
            yield
            return
        if not self._streams.acquire(blocking=False):
            raise RpcFailure(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.max_streams} {method} calls are open, this server's limit (max_concurrent_streams); "
                "retry with backoff",
            )
        try:
            yield
        finally:
            self._streams.release()

    def _finish(self, record: CallRecord, failure: RpcFailure | None) -> None:
        if failure is not None:
            record.code, record.error = failure.code, failure.message
        try:
            self.metrics.observe_request(
                record.method, record.model, record.code.name, time.monotonic() - record.started
            )
        except Exception:  # metrics must never fail a call
            _log.exception("request metrics failed")
        log_request(record.fields())


__all__ = [
    "SERVICE_NAME",
    "CallInterceptor",
    "CallRecord",
    "Lifecycle",
    "RefusedRequest",
    "current_call",
    "guarded_deserializer",
]
