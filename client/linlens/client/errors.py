"""Exceptions the client raises, one per family of gRPC status codes.

Callers should not have to import grpc to tell "your input is wrong" from "try again later", so every failed call
surfaces as a LinlensError subclass that keeps the status code and the server's message.
"""

from __future__ import annotations

from typing import Any

import grpc


class LinlensError(Exception):
    """A call failed. ``code`` is the gRPC status code and ``details`` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}" if details else code.name)
        self.code = code
        self.details = details


class InvalidArgumentError(LinlensError):
    """The request was malformed (INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE): fix it, do not retry."""


class FailedPreconditionError(InvalidArgumentError):
    """The server cannot do this in its present state (FAILED_PRECONDITION), e.g. the model failed to load: do not
    retry until an operator has fixed the server."""


class NotFoundError(LinlensError):
    """The named model (or other entity) does not exist (NOT_FOUND)."""


class ResourceExhaustedError(LinlensError):
    """The server's queue is full or a size limit was hit (RESOURCE_EXHAUSTED): back off and retry."""


class DeadlineExceededError(LinlensError):
    """The call's deadline passed before it finished (DEADLINE_EXCEEDED)."""


class CancelledError(LinlensError):
    """The call was cancelled, by this client or the server (CANCELLED)."""


class UnavailableError(LinlensError):
    """The server cannot be reached or is shutting down (UNAVAILABLE): retry later."""


class ServerUnreachableError(UnavailableError):
    """No server answered at the target at all (nothing listening, wrong address, blocked network)."""


class UnauthenticatedError(LinlensError):
    """The server needs an API token and got none or a wrong one (UNAUTHENTICATED), or the token may not do this
    (PERMISSION_DENIED): pass ``api_key=`` or set $LINLENS_API_KEY; do not retry with the same token."""


class InternalError(LinlensError):
    """The server failed (INTERNAL, UNKNOWN, DATA_LOSS): a bug or a broken model, not your input."""


_BY_CODE: dict[grpc.StatusCode, type[LinlensError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: UnauthenticatedError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNKNOWN: InternalError,
    grpc.StatusCode.DATA_LOSS: InternalError,
}


def error_for_code(code: grpc.StatusCode, details: str) -> LinlensError:
    """The LinlensError subclass instance for a status code (plain LinlensError for codes without a family)."""
    return _BY_CODE.get(code, LinlensError)(code, details)


def status_code_of(error: BaseException) -> grpc.StatusCode | None:
    """The status code carried by a grpc.RpcError (sync or aio), or None when it carries none."""
    code_method: Any = getattr(error, "code", None)
    if not callable(code_method):
        return None
    code = code_method()
    return code if isinstance(code, grpc.StatusCode) else None


def from_rpc_error(error: grpc.RpcError) -> LinlensError:
    """Translate a failed call's grpc.RpcError into the matching LinlensError."""
    code = status_code_of(error) or grpc.StatusCode.UNKNOWN
    details_method: Any = getattr(error, "details", None)
    details = details_method() if callable(details_method) else None
    return error_for_code(code, str(details) if details else "")
