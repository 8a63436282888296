"""What the sync and async clients share: channel settings, metadata, request construction and health encoding.

The transport differs (grpc vs grpc.aio), everything else must not, so it lives here once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple, TypeAlias

import grpc

from linlens.client.convert import (
    MessageLike,
    build_input,
    build_sampling,
    explain_options_to_proto,
    resolve_explain,
)
from linlens.client.retry import RetryPolicy
from linlens.client.types import ExplainOptions, HealthStatus
from linlens.v1 import linlens_pb2 as pb

#: Metadata as callers may pass it: a mapping or (key, value) pairs.
MetadataLike: TypeAlias = Mapping[str, str] | Sequence[tuple[str, str]]

DEFAULT_TARGET = "localhost:50051"
#: Default per-call deadline in seconds. Explaining many steps of a long generation on CPU takes minutes.
DEFAULT_TIMEOUT = 300.0
#: Jacobians are n x d x d floats (8 tokens of a 576-wide model are already 10 MiB), far above gRPC's 4 MiB default.
DEFAULT_MAX_MESSAGE_BYTES = 512 * 1024 * 1024

HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"
_HEALTH_STATUSES = {
    0: HealthStatus.UNKNOWN,
    1: HealthStatus.SERVING,
    2: HealthStatus.NOT_SERVING,
    3: HealthStatus.SERVICE_UNKNOWN,
}


def normalise_metadata(metadata: MetadataLike | None) -> tuple[tuple[str, str], ...]:
    """Metadata as gRPC wants it: (lower-case key, value) pairs."""
    if metadata is None:
        return ()
    pairs = metadata.items() if isinstance(metadata, Mapping) else metadata
    return tuple((str(key).lower(), str(value)) for key, value in pairs)


def make_credentials(
    *,
    tls: bool,
    root_certificates: bytes | None,
    private_key: bytes | None,
    certificate_chain: bytes | None,
    credentials: grpc.ChannelCredentials | None,
) -> grpc.ChannelCredentials | None:
    """Channel credentials, or None for a plaintext channel. Any certificate material implies TLS."""
    if credentials is not None:
        return credentials
    if tls or root_certificates is not None or private_key is not None or certificate_chain is not None:
        return grpc.ssl_channel_credentials(
            root_certificates=root_certificates, private_key=private_key, certificate_chain=certificate_chain
        )
    return None


def channel_options(
    max_message_bytes: int, extra: Sequence[tuple[str, int | str]] | None
) -> list[tuple[str, int | str]]:
    options: list[tuple[str, int | str]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    options.extend(extra or ())
    return options


def resolve_retry(retry: RetryPolicy | int | None) -> RetryPolicy:
    """``retry=`` accepts a policy, an attempt count, or None (no retries)."""
    if retry is None:
        return RetryPolicy(max_attempts=1)
    if isinstance(retry, RetryPolicy):
        return retry
    if isinstance(retry, int) and not isinstance(retry, bool):
        return RetryPolicy(max_attempts=retry)
    raise TypeError(f"retry must be a RetryPolicy, an attempt count or None, not {type(retry).__name__}")


class GenerateParts(NamedTuple):
    """The fields GenerateRequest and GenerateStreamRequest share (they are the same by contract)."""

    model: str
    input: pb.Input
    sampling: pb.SamplingParams
    explain: pb.ExplainOptions | None

    def unary(self) -> pb.GenerateRequest:
        request = pb.GenerateRequest(model=self.model, input=self.input, sampling=self.sampling)
        if self.explain is not None:
            request.explain.CopyFrom(self.explain)
        return request

    def stream(self) -> pb.GenerateStreamRequest:
        request = pb.GenerateStreamRequest(model=self.model, input=self.input, sampling=self.sampling)
        if self.explain is not None:
            request.explain.CopyFrom(self.explain)
        return request


def generate_parts(
    *,
    prompt: str | None,
    token_ids: Sequence[int] | None,
    messages: Sequence[MessageLike] | None,
    add_generation_prompt: bool,
    model: str | None,
    max_new_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
    stop: str | Sequence[str] | None,
    ignore_eos: bool,
    explain: ExplainOptions | bool | None,
) -> GenerateParts:
    """Validate generate()'s keyword arguments and build the request fields."""
    options = resolve_explain(explain)
    return GenerateParts(
        model=model or "",
        input=build_input(prompt, token_ids, messages, add_generation_prompt=add_generation_prompt),
        sampling=build_sampling(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            ignore_eos=ignore_eos,
        ),
        explain=None if options is None else explain_options_to_proto(options),
    )


def explain_request(
    *,
    prompt: str | None,
    token_ids: Sequence[int] | None,
    messages: Sequence[MessageLike] | None,
    add_generation_prompt: bool,
    model: str | None,
    options: ExplainOptions | None,
) -> pb.ExplainRequest:
    request = pb.ExplainRequest(
        model=model or "",
        input=build_input(prompt, token_ids, messages, add_generation_prompt=add_generation_prompt),
    )
    if options is not None:
        request.options.CopyFrom(explain_options_to_proto(options))
    return request


# ----------------------------------------------------------------------------------------------------------------
# grpc.health.v1 without a dependency on grpcio-health-checking
# ----------------------------------------------------------------------------------------------------------------
# HealthCheckRequest is {string service = 1} and HealthCheckResponse is {ServingStatus status = 1}. Encoding those two
# fields by hand lets the base client (grpcio + protobuf only) probe health; the test suite checks the encoding
# against the real grpc_health servicer.


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
    return _HEALTH_STATUSES.get(status, HealthStatus.UNKNOWN)
