"""Bearer-token authentication: who may call, checked before any work, with nothing secret kept or logged.

Tokens live in a file the operator controls (``auth_token_file``; a mounted Kubernetes Secret), **hashed**: one
SHA-256 hex digest per line, optionally followed by a label that names the caller in the access log. A leaked file
therefore gives nobody a usable token. A caller sends ``authorization: Bearer <token>``; the token's digest is
compared with every stored digest by :func:`hmac.compare_digest` (constant time, no early exit), so the time an
answer takes says nothing about how close a guess was.

:class:`AuthInterceptor` sits *inside* :class:`~linlens.server.calls.CallInterceptor`: a refused linlens call is
still counted, and logged once, as UNAUTHENTICATED (with its request id, never its token). grpc.health.v1 stays
open, so probes and load balancers need no token; everything else (reflection too) needs one.

The file is re-read when it changes (checked at most once a second), so tokens are rotated by editing the Secret,
without a restart. A file that cannot be read keeps the last good set and is logged; a server whose file is broken
at start-up does not start.

A token file line for a token: ``printf %s "$TOKEN" | sha256sum | cut -d' ' -f1`` (or :func:`token_digest`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from linlens.server.calls import SERVICE_NAME, current_call
from linlens.server.status import RpcFailure

_log = logging.getLogger(__name__)

#: Services that answer without a token: health, so that probes and load balancers work unchanged.
OPEN_SERVICES = frozenset({"grpc.health.v1.Health"})

_DIGEST = re.compile(r"^[0-9a-fA-F]{64}$")
_BEARER = re.compile(r"^\s*bearer\s+(\S+)\s*$", re.IGNORECASE)

MISSING = (
    "this server needs an API token: send the metadata 'authorization: Bearer <token>' "
    "(SDK: api_key= or $LINLENS_API_KEY; CLI: --api-key)"
)
REJECTED = "the API token was not accepted; check it with the server's operator"


class TokenFileError(ValueError):
    """The token file cannot be read or holds a line that is not a SHA-256 hex digest (the message names it)."""


def token_digest(token: str) -> str:
    """The line to put in a token file for ``token`` (its SHA-256 hex digest)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """A fresh random token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class TokenEntry:
    digest: bytes
    label: str


def parse_token_file(text: str, origin: str) -> tuple[TokenEntry, ...]:
    """The entries of a token file: ``<sha256 hex> [label]`` per line; blank lines and ``#`` comments are skipped."""
    entries: list[TokenEntry] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        digest, _, label = line.partition(" ")
        if not _DIGEST.match(digest):
            # never echo the line: it may be a plain token someone pasted by mistake
            raise TokenFileError(
                f"{origin}, line {number}: not a SHA-256 hex digest (64 hex digits); store tokens hashed, e.g. "
                'printf %s "$TOKEN" | sha256sum'
            )
        entries.append(TokenEntry(bytes.fromhex(digest), label.strip() or f"token-{number}"))
    return tuple(entries)


class TokenFile:
    """The accepted tokens, from a file, re-read when the file changes."""

    #: Seconds between checks of the file's modification time.
    RECHECK_S = 1.0

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._entries = self._read()  # raises at start-up: a server with a broken token file must not start
        self._checked = time.monotonic()
        if not self._entries:
            _log.warning("token file %s holds no token: every call but health will be refused", self.path)

    def _stat(self) -> tuple[int, int, int]:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise TokenFileError(f"token file {self.path}: {exc.strerror or exc}") from None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read(self) -> tuple[TokenEntry, ...]:
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenFileError(f"token file {self.path}: {getattr(exc, 'strerror', None) or exc}") from None
        return parse_token_file(text, f"token file {self.path}")

    def entries(self) -> tuple[TokenEntry, ...]:
        """The current entries, re-reading the file when it changed since the last check."""
        now = time.monotonic()
        with self._lock:
            if now - self._checked < self.RECHECK_S:
                return self._entries
            self._checked = now
            try:
                stamp = self._stat()
                if stamp != self._stamp:
                    self._entries, self._stamp = self._read(), stamp
                    _log.info("token file %s re-read: %d token(s)", self.path, len(self._entries))
            except TokenFileError as exc:
                _log.error("%s; keeping the %d token(s) read before", exc, len(self._entries))
            return self._entries

    def authenticate(self, token: str) -> str | None:
        """The label of ``token`` when it is accepted, else None. Compares with every entry in constant time."""
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        found: str | None = None
        for entry in self.entries():
            if hmac.compare_digest(digest, entry.digest):
                found = entry.label  # no break: the time taken does not depend on where (or whether) it matched
        return found


def bearer_token(metadata: Any) -> str | None:
    """The token of the call's ``authorization: Bearer <token>`` metadata, or None when there is none."""
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
            match = _BEARER.match(text)
            return match.group(1) if match else ""
    return None


class AuthInterceptor(grpc.ServerInterceptor):
    """Refuses calls without an accepted token with UNAUTHENTICATED; see the module docstring."""

    def __init__(self, tokens: TokenFile) -> None:
        self.tokens = tokens

    def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        method: str = handler_call_details.method
        service = method.lstrip("/").split("/", 1)[0]
        if handler is None or service in OPEN_SERVICES:
            return handler
        token = bearer_token(handler_call_details.invocation_metadata)
        label = self.tokens.authenticate(token) if token else None
        if label is not None:
            return _noting_client(handler, label) if service == SERVICE_NAME else handler
        return _refusing(handler, MISSING if token is None else REJECTED, inside_calls=service == SERVICE_NAME)


def _refusing(handler: Any, message: str, *, inside_calls: bool) -> Any:
    """A handler of the same shape that refuses the call. Inside the call interceptor it raises RpcFailure (so that
    the call is counted and logged there); elsewhere (reflection) it aborts the call itself."""

    def refuse(request: Any, context: grpc.ServicerContext) -> Any:
        if inside_calls:
            raise RpcFailure(grpc.StatusCode.UNAUTHENTICATED, message)
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    def refuse_stream(request: Any, context: grpc.ServicerContext) -> Any:
        refuse(request, context)
        yield from ()

    return _same_shape(handler, refuse, refuse_stream)


def _noting_client(handler: Any, label: str) -> Any:
    """The handler, noting the caller's token label on the call's record (the access log's ``client``)."""

    def note(behavior: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            current_call().client = label
            return behavior(request, context)

        return wrapped

    unary = handler.unary_unary or handler.stream_unary
    stream = handler.unary_stream or handler.stream_stream
    return _same_shape(handler, note(unary) if unary else None, note(stream) if stream else None)


def _same_shape(handler: Any, unary: Any, stream: Any) -> Any:
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream, **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary, **kwargs)
    return grpc.stream_stream_rpc_method_handler(stream, **kwargs)


__all__ = [
    "MISSING",
    "OPEN_SERVICES",
    "REJECTED",
    "AuthInterceptor",
    "TokenFile",
    "TokenFileError",
    "bearer_token",
    "new_token",
    "parse_token_file",
    "token_digest",
]
