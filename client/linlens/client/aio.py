"""The asyncio client: the same API as Client, with coroutines and async iterators (grpc.aio underneath)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from types import TracebackType
from typing import Any, cast

import grpc
import grpc.aio

from linlens.client._base import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT,
    HEALTH_CHECK_METHOD,
    MetadataLike,
    channel_options,
    decode_health_response,
    encode_health_request,
    explain_request,
    generate_parts,
    make_credentials,
    normalise_metadata,
    resolve_retry,
)
from linlens.client.convert import (
    MessageLike,
    explain_result_from_proto,
    generation_from_proto,
    model_info_from_proto,
    stream_event_from_proto,
)
from linlens.client.errors import DeadlineExceededError, UnavailableError, from_rpc_error, status_code_of
from linlens.client.retry import DEFAULT_RETRY, NO_RETRY, RetryPolicy
from linlens.client.types import ExplainOptions, ExplainResult, Generation, HealthStatus, ModelInfo, StreamEvent
from linlens.v1 import linlens_pb2 as pb
from linlens.v1 import linlens_pb2_grpc as pb_grpc

_USE_DEFAULT: Any = object()


class AsyncGenerationStream(AsyncIterator[StreamEvent]):
    """The events of one GenerateStream call: ``async for event in stream``.

    Events are GeneratedToken, Explanation and, last, GenerationDone. ``cancel()`` (or leaving an ``async with``
    block) stops the server's work. A failure before the first event is retried like a unary call; later failures are
    raised, since a retry would repeat events already delivered.
    """

    def __init__(self, start: Callable[[float | None], Any], retry: RetryPolicy, deadline: float | None) -> None:
        self._start = start
        self._retry = retry
        self._deadline = deadline
        self._call: Any = None
        self._attempt = 0
        self._received = False
        self._finished = False

    def _open(self) -> None:
        self._attempt += 1
        remaining = None if self._deadline is None else max(0.0, self._deadline - time.monotonic())
        self._call = self._start(remaining)

    def __aiter__(self) -> AsyncGenerationStream:
        return self

    async def __anext__(self) -> StreamEvent:
        while True:
            if self._finished:
                raise StopAsyncIteration
            if self._call is None:
                self._open()
            try:
                message = await self._call.read()
            except grpc.RpcError as error:
                code = status_code_of(error)
                if not self._received and self._retry.should_retry(code, self._attempt):
                    wait = self._retry.backoff(self._attempt)
                    if self._deadline is None or time.monotonic() + wait < self._deadline:
                        await asyncio.sleep(wait)
                        self._call = None
                        continue
                self._finished = True
                raise from_rpc_error(error) from error
            if message is grpc.aio.EOF:
                self._finished = True
                raise StopAsyncIteration
            self._received = True
            event = stream_event_from_proto(cast(pb.GenerateStreamResponse, message))
            if event is not None:
                return event

    def cancel(self) -> None:
        """Stop the stream; the server stops generating and explaining."""
        self._finished = True
        if self._call is not None:
            self._call.cancel()

    async def __aenter__(self) -> AsyncGenerationStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cancel()


class AsyncClient:
    """An asyncio linlens client; create it inside a running event loop and ``await close()`` it (or use
    ``async with``). Arguments mean what they mean for Client."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        retry: RetryPolicy | int | None = DEFAULT_RETRY,
        metadata: MetadataLike | None = None,
        wait_for_ready: bool = False,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        options: Sequence[tuple[str, int | str]] | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.retry = resolve_retry(retry)
        self.metadata = normalise_metadata(metadata)
        self.wait_for_ready = wait_for_ready
        creds = make_credentials(
            tls=tls,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
            credentials=credentials,
        )
        opts = channel_options(max_message_bytes, options)
        self._channel: Any = (
            grpc.aio.secure_channel(target, creds, options=opts)
            if creds is not None
            else grpc.aio.insecure_channel(target, options=opts)
        )
        self._stub: Any = pb_grpc.LinlensServiceStub(self._channel)
        self._health: Any = self._channel.unary_unary(
            HEALTH_CHECK_METHOD, request_serializer=encode_health_request, response_deserializer=decode_health_response
        )

    def _deadline(self, timeout: float | None) -> float | None:
        effective = self.timeout if timeout is _USE_DEFAULT else timeout
        return None if effective is None else time.monotonic() + effective

    def _metadata(self, metadata: MetadataLike | None) -> tuple[tuple[str, str], ...]:
        return self.metadata + normalise_metadata(metadata)

    async def _unary(
        self,
        method: Any,
        request: object,
        timeout: float | None,
        metadata: MetadataLike | None,
        retry: RetryPolicy | None = None,
    ) -> Any:
        policy = retry or self.retry
        deadline = self._deadline(timeout)
        merged = self._metadata(metadata)
        attempt = 0
        while True:
            attempt += 1
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceededError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed between retries")
            try:
                return await method(request, timeout=remaining, metadata=merged, wait_for_ready=self.wait_for_ready)
            except grpc.RpcError as error:
                code = status_code_of(error)
                if not policy.should_retry(code, attempt):
                    raise from_rpc_error(error) from error
                wait = policy.backoff(attempt)
                if deadline is not None and time.monotonic() + wait >= deadline:
                    raise from_rpc_error(error) from error
                await asyncio.sleep(wait)

    async def generate(
        self,
        prompt: str | None = None,
        *,
        token_ids: Sequence[int] | None = None,
        messages: Sequence[MessageLike] | None = None,
        add_generation_prompt: bool = True,
        model: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        ignore_eos: bool = False,
        explain: ExplainOptions | bool = False,
        timeout: float | None = _USE_DEFAULT,
        metadata: MetadataLike | None = None,
    ) -> Generation:
        """See Client.generate."""
        parts = generate_parts(
            prompt=prompt,
            token_ids=token_ids,
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            model=model,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            ignore_eos=ignore_eos,
            explain=explain,
        )
        response = await self._unary(self._stub.Generate, parts.unary(), timeout, metadata)
        return generation_from_proto(cast(pb.GenerateResponse, response))

    def generate_stream(
        self,
        prompt: str | None = None,
        *,
        token_ids: Sequence[int] | None = None,
        messages: Sequence[MessageLike] | None = None,
        add_generation_prompt: bool = True,
        model: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        ignore_eos: bool = False,
        explain: ExplainOptions | bool = False,
        timeout: float | None = _USE_DEFAULT,
        metadata: MetadataLike | None = None,
    ) -> AsyncGenerationStream:
        """See Client.generate_stream; iterate the result with ``async for``. The call starts on first iteration."""
        parts = generate_parts(
            prompt=prompt,
            token_ids=token_ids,
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            model=model,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            ignore_eos=ignore_eos,
            explain=explain,
        )
        request = parts.stream()
        merged = self._metadata(metadata)

        def start(remaining: float | None) -> Any:
            return self._stub.GenerateStream(
                request, timeout=remaining, metadata=merged, wait_for_ready=self.wait_for_ready
            )

        return AsyncGenerationStream(start, self.retry, self._deadline(timeout))

    async def explain(
        self,
        prompt: str | None = None,
        *,
        token_ids: Sequence[int] | None = None,
        messages: Sequence[MessageLike] | None = None,
        add_generation_prompt: bool = True,
        model: str | None = None,
        options: ExplainOptions | None = None,
        timeout: float | None = _USE_DEFAULT,
        metadata: MetadataLike | None = None,
    ) -> ExplainResult:
        """See Client.explain."""
        request = explain_request(
            prompt=prompt,
            token_ids=token_ids,
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            model=model,
            options=options,
        )
        response = await self._unary(self._stub.Explain, request, timeout, metadata)
        return explain_result_from_proto(cast(pb.ExplainResponse, response))

    async def list_models(
        self, *, timeout: float | None = _USE_DEFAULT, metadata: MetadataLike | None = None
    ) -> list[ModelInfo]:
        """See Client.list_models."""
        response = await self._unary(self._stub.ListModels, pb.ListModelsRequest(), timeout, metadata)
        return [model_info_from_proto(m) for m in cast(pb.ListModelsResponse, response).models]

    async def get_model(
        self, name: str = "", *, timeout: float | None = _USE_DEFAULT, metadata: MetadataLike | None = None
    ) -> ModelInfo:
        """See Client.get_model."""
        response = await self._unary(self._stub.GetModel, pb.GetModelRequest(name=name), timeout, metadata)
        return model_info_from_proto(cast(pb.GetModelResponse, response).model)

    async def health(
        self,
        model: str | None = None,
        *,
        service: str | None = None,
        timeout: float | None = _USE_DEFAULT,
        metadata: MetadataLike | None = None,
    ) -> HealthStatus:
        """See Client.health."""
        name = service if service is not None else (model or "")
        return cast(HealthStatus, await self._unary(self._health, name, timeout, metadata, retry=NO_RETRY))

    async def wait_until_ready(self, timeout: float = 30.0) -> None:
        """Wait until the channel is connected; UnavailableError when it is not within ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except TimeoutError as error:
            raise UnavailableError(
                grpc.StatusCode.UNAVAILABLE, f"{self.target} not ready after {timeout:g} s"
            ) from error

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


__all__ = ["AsyncClient", "AsyncGenerationStream"]
