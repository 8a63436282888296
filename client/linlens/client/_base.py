"""What the sync and async clients share: where to connect, credentials, channel options, metadata and deadlines.

The two clients differ only in their transport (grpc vs grpc.aio) and in ``def`` vs ``async def``. Everything else
lives once: request messages come from :mod:`linlens.contract.requests`, responses are decoded by
:mod:`linlens.contract.wire`, retries follow :class:`~linlens.client.retry.Attempts`, and waiting for a model
follows :class:`~linlens.client.health.ReadinessWait`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

import grpc

from linlens.client._calls import HEALTH, Call
from linlens.client.health import HEALTH_CHECK_METHOD, decode_health_response, encode_health_request
from linlens.client.retry import DEFAULT_RETRY, Attempts, RetryPolicy
from linlens.v1 import linlens_pb2_grpc as pb_grpc

#: Metadata as callers may pass it: a mapping or (key, value) pairs.
MetadataLike: TypeAlias = Mapping[str, str] | Sequence[tuple[str, str]]

#: Where a client connects when given no target and ``$LINLENS_SERVER`` is unset.
DEFAULT_TARGET = "localhost:50051"
#: The environment variable that names the server when a client is given no target (the CLI honours it too).
SERVER_ENV = "LINLENS_SERVER"
#: The environment variable a client takes its API token from when given no ``api_key`` (as OpenAI-style SDKs do).
API_KEY_ENV = "LINLENS_API_KEY"
#: Default per-call deadline in seconds. Explaining many steps of a long generation on CPU takes minutes.
DEFAULT_TIMEOUT = 300.0
#: Jacobians are n x d x d floats (8 tokens of a 576-wide model are already 10 MiB), far above gRPC's 4 MiB default.
DEFAULT_MAX_MESSAGE_BYTES = 512 * 1024 * 1024

#: Marks "use the client's default timeout" in per-call ``timeout=`` arguments (None means no deadline).
USE_DEFAULT: Any = object()


def resolve_target(target: str | None) -> str:
    """The target to connect to: the argument, else ``$LINLENS_SERVER``, else localhost:50051."""
    return target or os.environ.get(SERVER_ENV) or DEFAULT_TARGET


def normalise_metadata(metadata: MetadataLike | None) -> tuple[tuple[str, str], ...]:
    """Metadata as gRPC wants it: (lower-case key, value) pairs."""
    if metadata is None:
        return ()
    pairs = metadata.items() if isinstance(metadata, Mapping) else metadata
    return tuple((str(key).lower(), str(value)) for key, value in pairs)


def resolve_api_key(api_key: str | None) -> str | None:
    """The token to send: ``api_key``, else ``$LINLENS_API_KEY``; ``""`` sends none. Checked to be one printable
    word (gRPC metadata cannot carry line breaks); the error never repeats the token."""
    key = os.environ.get(API_KEY_ENV, "") if api_key is None else api_key
    key = key.strip()
    if not key:
        return None
    if any(c.isspace() or not c.isprintable() for c in key):
        raise ValueError(f"the API key (api_key or ${API_KEY_ENV}) must be one word of printable characters")
    return key


def resolve_retry(retry: RetryPolicy | int | None) -> RetryPolicy:
    """``retry=`` accepts a policy, an attempt count, or None (no retries)."""
    if retry is None:
        return RetryPolicy(max_attempts=1)
    if isinstance(retry, RetryPolicy):
        return retry
    if isinstance(retry, int) and not isinstance(retry, bool):
        return RetryPolicy(max_attempts=retry)
    raise TypeError(f"retry must be a RetryPolicy, an attempt count or None, not {type(retry).__name__}")


class ClientBase:
    """Settings and helpers of a linlens client; subclasses open the channel their way (``_open_channel``).

    ``target`` defaults to ``$LINLENS_SERVER`` or localhost:50051. ``timeout`` is the default deadline per call in
    seconds (None: no deadline); every method takes its own ``timeout=``. ``retry`` is a RetryPolicy, a number of
    attempts, or None; only UNAVAILABLE and RESOURCE_EXHAUSTED are retried (they mean no work was done).
    ``metadata`` is sent with every call, merged with per-call metadata. TLS is used when ``tls`` is true, when any
    certificate material is given, or with explicit ``credentials``; ``private_key`` and ``certificate_chain`` (PEM)
    are the client certificate a server with mutual TLS asks for. ``api_key`` (default ``$LINLENS_API_KEY``; ``""``
    for none) is sent as ``authorization: Bearer <api_key>`` with every call: use TLS when it crosses a network.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        api_key: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        retry: RetryPolicy | int | None = DEFAULT_RETRY,
        metadata: MetadataLike | None = None,
        wait_for_ready: bool = False,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        options: Sequence[tuple[str, int | str]] | None = None,
    ) -> None:
        self.target = resolve_target(target)
        self.timeout = timeout
        self.retry = resolve_retry(retry)
        self.metadata = normalise_metadata(metadata)
        key = resolve_api_key(api_key)
        if key is not None and not any(name == "authorization" for name, _ in self.metadata):
            self.metadata += (("authorization", f"Bearer {key}"),)
        self.wait_for_ready = wait_for_ready
        if credentials is None and (
            tls or root_certificates is not None or private_key is not None or certificate_chain is not None
        ):
            credentials = grpc.ssl_channel_credentials(
                root_certificates=root_certificates, private_key=private_key, certificate_chain=certificate_chain
            )
        channel_options: list[tuple[str, int | str]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            *(options or ()),
        ]
        self._channel: Any = self._open_channel(credentials, channel_options)

    #: The transport module (grpc or grpc.aio): the one thing, besides ``async def``, the two clients differ in.
    _transport: Any = grpc

    def _open_channel(self, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, int | str]]) -> Any:
        if credentials is not None:
            channel = self._transport.secure_channel(self.target, credentials, options=options)
        else:
            channel = self._transport.insecure_channel(self.target, options=options)
        self._stub: Any = pb_grpc.LinlensServiceStub(channel)
        self._health: Any = channel.unary_unary(
            HEALTH_CHECK_METHOD, request_serializer=encode_health_request, response_deserializer=decode_health_response
        )
        return channel

    def _rpc(self, call: Call[Any]) -> Any:
        """The channel's callable for ``call``'s method."""
        return self._health if call.method == HEALTH else getattr(self._stub, call.method)

    def _attempts(self, timeout: float | None, retry: RetryPolicy | None = None) -> Attempts:
        """The attempts of one call given ``timeout`` (or USE_DEFAULT), under ``retry`` (default: the client's)."""
        return Attempts(self.retry if retry is None else retry, self._deadline(timeout))

    def _sender(
        self, call: Call[Any], timeout: float | None, metadata: MetadataLike | None, retry: RetryPolicy
    ) -> tuple[Callable[[], Any], Attempts]:
        """A function that sends ``call`` once with the time left, and the attempts that pace its retries."""
        method, attempts, merged = self._rpc(call), self._attempts(timeout, retry), self._metadata(metadata)

        def send() -> Any:
            return method(
                call.request, timeout=attempts.remaining(), metadata=merged, wait_for_ready=self.wait_for_ready
            )

        return send, attempts

    def _starter(self, call: Call[Any], metadata: MetadataLike | None) -> Callable[[float | None], Any]:
        """A function that opens ``call``'s server stream with the time left (what a stream retries with)."""
        method = self._rpc(call)
        merged = self._metadata(metadata)

        def start(remaining: float | None) -> Any:
            return method(call.request, timeout=remaining, metadata=merged, wait_for_ready=self.wait_for_ready)

        return start

    def _deadline(self, timeout: float | None) -> float | None:
        """The monotonic time a call given ``timeout`` (or USE_DEFAULT) must finish by, or None."""
        effective = self.timeout if timeout is USE_DEFAULT else timeout
        return None if effective is None else time.monotonic() + effective

    def _metadata(self, metadata: MetadataLike | None) -> tuple[tuple[str, str], ...]:
        return self.metadata + normalise_metadata(metadata)


__all__ = [
    "API_KEY_ENV",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_TARGET",
    "DEFAULT_TIMEOUT",
    "SERVER_ENV",
    "USE_DEFAULT",
    "ClientBase",
    "MetadataLike",
    "normalise_metadata",
    "resolve_api_key",
    "resolve_retry",
    "resolve_target",
]
