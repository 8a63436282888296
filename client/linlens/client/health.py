"""grpc.health.v1 for the SDK: the status enum, the two messages encoded by hand, and waiting for a model.

Encoding HealthCheckRequest ({string service = 1}) and HealthCheckResponse ({ServingStatus status = 1}) by hand lets
the base client (grpcio and protobuf only) probe health without grpcio-health-checking; the test suite checks the
encoding against the real grpc_health servicer.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

import grpc

from linlens.client.errors import FailedPreconditionError, LinlensError, ServerUnreachableError, UnavailableError
from linlens.contract import ModelInfo, ModelState

HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"


class HealthStatus(str, enum.Enum):
    """A grpc.health.v1 serving status."""

    UNKNOWN = "UNKNOWN"
    SERVING = "SERVING"
    NOT_SERVING = "NOT_SERVING"
    SERVICE_UNKNOWN = "SERVICE_UNKNOWN"


_STATUSES = {
    0: HealthStatus.UNKNOWN,
    1: HealthStatus.SERVING,
    2: HealthStatus.NOT_SERVING,
    3: HealthStatus.SERVICE_UNKNOWN,
}


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint in health response")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def encode_health_request(service: str) -> bytes:
    """Serialise a grpc.health.v1.HealthCheckRequest."""
    raw = service.encode()
    return b"\x0a" + _varint(len(raw)) + raw if raw else b""


def decode_health_response(data: bytes) -> HealthStatus:
    """Parse a grpc.health.v1.HealthCheckResponse, skipping fields a newer version may add."""
    pos, status = 0, 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _read_varint(data, pos)
            if number == 1:
                status = value
        elif wire_type == 2:
            length, pos = _read_varint(data, pos)
            pos += length
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire_type} in health response")
    return _STATUSES.get(status, HealthStatus.UNKNOWN)


#: Called while waiting, each time what the server says about the model changes (e.g. a new loading phase).
OnWait = Callable[[ModelInfo], None]


class ReadinessWait:
    """Waiting until a server's model can take requests, without I/O (the sync and async clients drive it).

    Ready means: the model's state is READY and its grpc.health.v1 entry (the model's name) says SERVING. A model
    that failed to load ends the wait at once with FailedPreconditionError; a timeout raises UnavailableError that
    says what was being waited for and what the server said last.
    """

    #: Seconds between polls, growing from the first to the last value.
    POLL = (0.1, 0.25, 0.5, 1.0)

    def __init__(self, target: str, model: str | None, timeout: float, on_wait: OnWait | None) -> None:
        self.target = target
        self.model = model or ""
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.on_wait = on_wait
        self.connect_s = timeout
        self._polls = 0
        self._last: ModelInfo | None = None
        self._last_error = ""

    @property
    def what(self) -> str:
        name = self._last.name if self._last is not None else self.model
        return f"model {name!r}" if name else "the server's default model"

    def remaining(self) -> float:
        """Seconds left for the next step; UnavailableError once the timeout has passed."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self.timed_out()
        return left

    def connect_within(self, connect_timeout: float | None) -> float:
        """Seconds to wait for the server to answer at all (ServerUnreachableError after them)."""
        self.connect_s = self.timeout if connect_timeout is None else min(self.timeout, connect_timeout)
        return self.connect_s

    def timed_out(self, step: str = "ready", why: str = "") -> UnavailableError:
        """The error a wait ends with; for ``step`` "connect", ``why`` is gRPC's last word on the connection (a
        refused TLS handshake reads very differently from nobody listening)."""
        if step == "connect":
            said = f"; {why}" if why else ""
            return ServerUnreachableError(
                grpc.StatusCode.UNAVAILABLE,
                f"no linlens server answers at {self.target} (waited {self.connect_s:g} s{said})",
            )
        if self._last is not None:
            detail = f": {self._last.state_detail}" if self._last.state_detail else ""
            said = f"it was still {self._last.state.value}{detail}"
        else:
            said = self._last_error or "no answer"
        return UnavailableError(
            grpc.StatusCode.UNAVAILABLE,
            f"{self.target}: {self.what} was not ready after {self.timeout:g} s ({said})",
        )

    def unanswered(self, error: LinlensError) -> None:
        """The server did not answer this poll (still starting, draining, or too slowly): keep waiting."""
        self._last_error = error.details or error.code.name

    def observe(self, info: ModelInfo, serving: bool) -> bool:
        """True when ``info`` (and the model's health, ``serving``) say the model is ready."""
        if info.state is ModelState.FAILED:
            raise FailedPreconditionError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{self.target}: model {info.name!r} failed to load ({info.state_detail}); the server's operator "
                "must fix its model setting",
            )
        ready = (info.state is ModelState.READY or (info.state is ModelState.UNSPECIFIED and info.loaded)) and serving
        if (
            not ready
            and info.state is not ModelState.READY  # loaded, its health an instant behind: not a loading phase
            and self.on_wait is not None
            and (self._last is None or (info.state, info.state_detail) != (self._last.state, self._last.state_detail))
        ):
            self.on_wait(info)
        self._last = info
        return ready

    def pause(self) -> float:
        """Seconds to sleep before the next poll (never past the deadline)."""
        wait = self.POLL[min(self._polls, len(self.POLL) - 1)]
        self._polls += 1
        return max(0.0, min(wait, self.deadline - time.monotonic()))


__all__ = [
    "HEALTH_CHECK_METHOD",
    "HealthStatus",
    "OnWait",
    "ReadinessWait",
    "decode_health_response",
    "encode_health_request",
]
