"""gRPC statuses: the failure a request ends with, and which status each kind of failure maps to.

Everything that can go wrong while serving a call ends here as an :class:`RpcFailure` (a status code plus a message
phrased so that the caller knows what to do), in one table: bad options and input are INVALID_ARGUMENT, a full queue
RESOURCE_EXHAUSTED, work stopped by the caller CANCELLED or DEADLINE_EXCEEDED, a drain UNAVAILABLE, an out-of-memory
RESOURCE_EXHAUSTED, anything else INTERNAL with the request id to report.
"""

from __future__ import annotations

import logging

import grpc

from linlens.contract import OptionError
from linlens.engine import ExplanationCancelled
from linlens.server.generation import GenerationStopped
from linlens.server.inputs import InputError
from linlens.server.scheduler import JobStopped, QueueFullError, SchedulerClosed, StopReason

_log = logging.getLogger(__name__)


class RpcFailure(Exception):
    """A request fails with this gRPC status and message (always phrased so that the caller knows what to do)."""

    def __init__(self, code: grpc.StatusCode, message: str, *, final: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        #: Repeating the same request cannot succeed on this server (a RESOURCE_EXHAUSTED about the request itself,
        #: not about the moment): sent as trailing metadata (linlens.contract.retry_hint) so clients do not retry.
        self.final = final


def invalid(message: str) -> RpcFailure:
    return RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, message)


SHUTTING_DOWN = RpcFailure(
    grpc.StatusCode.UNAVAILABLE,
    "the server is shutting down and takes no new requests; retry (another replica will answer)",
)


def stopped(reason: StopReason | None) -> RpcFailure:
    """The failure of work that was stopped before it finished, by the reason it was stopped."""
    if reason is StopReason.DEADLINE_EXCEEDED:
        return RpcFailure(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "the deadline passed before the work finished; the work was stopped. Allow a longer deadline, or ask "
            "for less (fewer tokens, top_k 0 for attributions only)",
        )
    if reason is StopReason.SHUTDOWN:
        return RpcFailure(grpc.StatusCode.UNAVAILABLE, "the server shut down before the request finished; retry it")
    return RpcFailure(grpc.StatusCode.CANCELLED, "the call was cancelled; its work was stopped")


#: How torch's CPU allocator says it is out of memory: a plain RuntimeError, not torch.OutOfMemoryError (torch 2.13).
_CPU_ALLOCATOR_FAILURES = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """Python's MemoryError (numpy too), torch.OutOfMemoryError (accelerators) or torch's CPU allocator failing."""
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, RuntimeError) and any(text in str(exc) for text in _CPU_ALLOCATOR_FAILURES):
        return True
    try:
        import torch

        return isinstance(exc, torch.OutOfMemoryError)
    except (ImportError, AttributeError):  # pragma: no cover - old torch
        return False


def failure_for(exc: BaseException, request_id: str, reason: StopReason | None = None) -> RpcFailure:
    """The status a request ends with when ``exc`` escapes its handling; ``reason`` is why the call's work was asked
    to stop, for work that stopped without saying (an engine cancellation)."""
    if isinstance(exc, RpcFailure):
        return exc
    if isinstance(exc, (JobStopped, GenerationStopped)):
        return stopped(exc.reason)
    if isinstance(exc, ExplanationCancelled):
        return stopped(reason)
    if isinstance(exc, QueueFullError):
        return RpcFailure(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    if isinstance(exc, SchedulerClosed):
        return SHUTTING_DOWN
    if isinstance(exc, (OptionError, InputError, ValueError)):
        return invalid(str(exc))
    if is_out_of_memory(exc):
        _log.warning("request %s ran out of memory: %s", request_id, exc)
        return RpcFailure(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "the server ran out of memory for this request; ask for less (fewer tokens, top_k, positions ALL "
            "or include_jacobians off) or retry later",
        )
    _log.exception("request %s failed", request_id, exc_info=exc)
    return RpcFailure(
        grpc.StatusCode.INTERNAL,
        f"internal error ({type(exc).__name__}); report request id {request_id} to the operator",
    )


__all__ = ["SHUTTING_DOWN", "RpcFailure", "failure_for", "invalid", "is_out_of_memory", "stopped"]
