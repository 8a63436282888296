"""The asyncio client: the same API as Client, with coroutines and async iterators (grpc.aio underneath)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Any, TypeVar, Unpack, cast

import grpc
import grpc.aio

from linlens.client._base import USE_DEFAULT, ClientBase, MetadataLike
from linlens.client.errors import DeadlineExceededError, LinlensError, UnavailableError, from_rpc_error
from linlens.client.health import (
    HEALTH_CHECK_METHOD,
    HealthStatus,
    OnWait,
    ReadinessWait,
    decode_health_response,
    encode_health_request,
)
from linlens.client.retry import NO_RETRY, Attempts, RetryPolicy
from linlens.contract import (
    ConceptSpec,
    ConceptVector,
    ExplainOptions,
    ExplainResult,
    ExplanationProgress,
    Generation,
    ModelInfo,
    StreamEvent,
)
from linlens.contract.requests import (
    GenerateArgs,
    InputArgs,
    compute_concept_request,
    explain_request,
    explain_stream_request,
    generate_request,
    generate_stream_request,
)
from linlens.contract.wire import (
    concept_vector_from_proto,
    explain_result_from_proto,
    explain_stream_event_from_proto,
    generation_from_proto,
    model_info_from_proto,
    stream_event_from_proto,
)
from linlens.v1 import linlens_pb2 as pb
from linlens.v1 import linlens_pb2_grpc as pb_grpc

E = TypeVar("E")


class AsyncServerStream(AsyncIterator[E]):
    """The decoded events of one server-streaming call: ``async for event in stream``. See ServerStream."""

    def __init__(
        self, start: Callable[[float | None], Any], attempts: Attempts, decode: Callable[[Any], E | None]
    ) -> None:
        self._start = start
        self._decode = decode
        self._attempts = attempts
        self._call: Any = None
        self._received = False
        self._finished = False

    def __aiter__(self) -> AsyncServerStream[E]:
        return self

    async def __anext__(self) -> E:
        while True:
            if self._finished:
                raise StopAsyncIteration
            if self._call is None:
                self._call = self._start(self._attempts.remaining())
            try:
                message = await self._call.read()
            except grpc.RpcError as error:
                try:
                    if self._received:
                        raise from_rpc_error(error) from error
                    wait = self._attempts.backoff_after(error)
                except LinlensError:
                    self._finished = True
                    raise
                await asyncio.sleep(wait)
                self._call = None
                continue
            if message is grpc.aio.EOF:
                self._finished = True
                raise StopAsyncIteration
            self._received = True
            event = self._decode(message)
            if event is not None:
                return event

    def cancel(self) -> None:
        """Stop the stream; the server stops generating and explaining."""
        self._finished = True
        if self._call is not None:
            self._call.cancel()

    async def __aenter__(self) -> AsyncServerStream[E]:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cancel()


class AsyncGenerationStream(AsyncServerStream[StreamEvent]):
    """The events of one GenerateStream call: ``async for event in stream``. See GenerationStream."""

    def __init__(self, start: Callable[[float | None], Any], attempts: Attempts) -> None:
        super().__init__(start, attempts, stream_event_from_proto)


class AsyncClient(ClientBase):
    """An asyncio linlens client; create it inside a running event loop and ``await close()`` it (or use
    ``async with``). Arguments and methods mean what they mean for Client."""

    def _open_channel(self, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, int | str]]) -> Any:
        if credentials is not None:
            channel = grpc.aio.secure_channel(self.target, credentials, options=options)
        else:
            channel = grpc.aio.insecure_channel(self.target, options=options)
        self._stub: Any = pb_grpc.LinlensServiceStub(channel)
        self._health: Any = channel.unary_unary(
            HEALTH_CHECK_METHOD, request_serializer=encode_health_request, response_deserializer=decode_health_response
        )
        return channel

    async def _unary(
        self, method: Any, request: object, timeout: float | None, metadata: MetadataLike | None, retry: RetryPolicy
    ) -> Any:
        attempts = Attempts(retry, self._deadline(timeout))
        merged = self._metadata(metadata)
        while True:
            try:
                return await method(
                    request, timeout=attempts.remaining(), metadata=merged, wait_for_ready=self.wait_for_ready
                )
            except grpc.RpcError as error:
                await asyncio.sleep(attempts.backoff_after(error))

    async def generate(
        self,
        prompt: str | None = None,
        *,
        timeout: float | None = USE_DEFAULT,
        metadata: MetadataLike | None = None,
        **kwargs: Unpack[GenerateArgs],
    ) -> Generation:
        """See Client.generate."""
        request = generate_request(prompt, kwargs)
        return generation_from_proto(await self._unary(self._stub.Generate, request, timeout, metadata, self.retry))

    def generate_stream(
        self,
        prompt: str | None = None,
        *,
        timeout: float | None = USE_DEFAULT,
        metadata: MetadataLike | None = None,
        **kwargs: Unpack[GenerateArgs],
    ) -> AsyncGenerationStream:
        """See Client.generate_stream; iterate the result with ``async for``."""
        request = generate_stream_request(prompt, kwargs)
        merged = self._metadata(metadata)

        def start(remaining: float | None) -> Any:
            return self._stub.GenerateStream(
                request, timeout=remaining, metadata=merged, wait_for_ready=self.wait_for_ready
            )

        return AsyncGenerationStream(start, Attempts(self.retry, self._deadline(timeout)))

    async def explain(
        self,
        prompt: str | None = None,
        *,
        options: ExplainOptions | None = None,
        on_progress: Callable[[ExplanationProgress], None] | None = None,
        timeout: float | None = USE_DEFAULT,
        metadata: MetadataLike | None = None,
        **kwargs: Unpack[InputArgs],
    ) -> ExplainResult:
        """See Client.explain."""
        if on_progress is None:
            request = explain_request(prompt, options, kwargs)
            response = await self._unary(self._stub.Explain, request, timeout, metadata, self.retry)
            return explain_result_from_proto(response)
        stream_request = explain_stream_request(prompt, options, kwargs)
        merged = self._metadata(metadata)

        def start(remaining: float | None) -> Any:
            return self._stub.ExplainStream(
                stream_request, timeout=remaining, metadata=merged, wait_for_ready=self.wait_for_ready
            )

        attempts = Attempts(self.retry, self._deadline(timeout))
        stream: AsyncServerStream[ExplanationProgress | ExplainResult] = AsyncServerStream(
            start, attempts, explain_stream_event_from_proto
        )
        async with stream as events:
            async for event in events:
                if isinstance(event, ExplanationProgress):
                    on_progress(event)
                else:
                    return event
        raise UnavailableError(grpc.StatusCode.UNAVAILABLE, "the explanation stream ended without its result")

    async def compute_concept(
        self,
        concept: ConceptSpec | str,
        *,
        tokens_per_vector: int | None = None,
        model: str | None = None,
        timeout: float | None = USE_DEFAULT,
        metadata: MetadataLike | None = None,
    ) -> ConceptVector:
        """See Client.compute_concept."""
        request = compute_concept_request(concept, tokens_per_vector=tokens_per_vector, model=model)
        response = await self._unary(self._stub.ComputeConcept, request, timeout, metadata, self.retry)
        return concept_vector_from_proto(response)

    async def list_models(
        self, *, timeout: float | None = USE_DEFAULT, metadata: MetadataLike | None = None
    ) -> list[ModelInfo]:
        """See Client.list_models."""
        response = await self._unary(self._stub.ListModels, pb.ListModelsRequest(), timeout, metadata, self.retry)
        return [model_info_from_proto(m) for m in cast(pb.ListModelsResponse, response).models]

    async def get_model(
        self, name: str = "", *, timeout: float | None = USE_DEFAULT, metadata: MetadataLike | None = None
    ) -> ModelInfo:
        """See Client.get_model."""
        return await self._get_model(name, timeout, metadata, self.retry)

    async def _get_model(
        self, name: str, timeout: float | None, metadata: MetadataLike | None, retry: RetryPolicy
    ) -> ModelInfo:
        response = await self._unary(self._stub.GetModel, pb.GetModelRequest(name=name), timeout, metadata, retry)
        return model_info_from_proto(cast(pb.GetModelResponse, response).model)

    async def health(
        self,
        model: str | None = None,
        *,
        service: str | None = None,
        timeout: float | None = USE_DEFAULT,
        metadata: MetadataLike | None = None,
    ) -> HealthStatus:
        """See Client.health."""
        name = service if service is not None else (model or "")
        return cast(HealthStatus, await self._unary(self._health, name, timeout, metadata, NO_RETRY))

    async def wait_until_ready(
        self,
        timeout: float = 300.0,
        *,
        model: str | None = None,
        connect_timeout: float | None = None,
        on_wait: OnWait | None = None,
    ) -> ModelInfo:
        """See Client.wait_until_ready."""
        wait = ReadinessWait(self.target, model, timeout, on_wait)
        try:
            await asyncio.wait_for(self._channel.channel_ready(), wait.connect_within(connect_timeout))
        except TimeoutError:
            raise wait.timed_out("connect", await self._connection_error()) from None
        while True:
            remaining = wait.remaining()  # UnavailableError, saying what it waited for, once the time is up
            try:
                info = await self._get_model(model or "", remaining, None, NO_RETRY)
                serving = info.loaded and await self.health(info.name, timeout=remaining) is HealthStatus.SERVING
            except (UnavailableError, DeadlineExceededError) as error:
                wait.unanswered(error)
            else:
                if wait.observe(info, serving):
                    return info
            await asyncio.sleep(wait.pause())

    async def _connection_error(self) -> str:
        """See Client._connection_error."""
        try:
            await self._health("", timeout=1.0)
        except grpc.RpcError as error:
            return str(error.details() or "")
        return ""

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


__all__ = ["AsyncClient", "AsyncGenerationStream", "AsyncServerStream"]
