"""The asyncio client: the same API as Client, with coroutines and async iterators (grpc.aio underneath)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Any, TypeVar, Unpack, cast

import grpc
import grpc.aio

from linlens import contract as lc
from linlens.client import _calls as calls
from linlens.client._base import USE_DEFAULT, ClientBase, MetadataLike
from linlens.client.errors import DeadlineExceededError, UnavailableError
from linlens.client.health import HealthStatus, OnWait, ReadinessWait
from linlens.client.retry import NO_RETRY, Attempts, RetryPolicy
from linlens.contract.wire import stream_event_from_proto

E = TypeVar("E")
R = TypeVar("R")


class AsyncServerStream(calls.StreamState[E], AsyncIterator[E]):
    """The decoded events of one server-streaming call: ``async for event in stream``. See ServerStream."""

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
                await asyncio.sleep(self._retry_wait(error))
                self._call = None
                continue
            if message is grpc.aio.EOF:
                self._finished = True
                raise StopAsyncIteration
            event = self._event(message)
            if event is not None:
                return event

    async def __aenter__(self) -> AsyncServerStream[E]:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cancel()


class AsyncGenerationStream(AsyncServerStream[lc.StreamEvent]):
    """The events of one GenerateStream call: ``async for event in stream``. See GenerationStream."""

    def __init__(self, start: Callable[[float | None], Any], attempts: Attempts) -> None:
        super().__init__(start, attempts, stream_event_from_proto)


class AsyncClient(ClientBase):
    """An asyncio linlens client; create it inside a running event loop and ``await close()`` it (or use
    ``async with``). Arguments and methods mean what they mean for Client."""

    _transport = grpc.aio

    async def _unary(
        self, call: calls.Call[R], timeout: float | None, metadata: MetadataLike | None, retry: RetryPolicy
    ) -> R:
        send, attempts = self._sender(call, timeout, metadata, retry)
        while True:
            try:
                return call.decode(await send())
            except grpc.RpcError as error:
                await asyncio.sleep(attempts.backoff_after(error))

    async def generate(
        self,
        prompt: str | None = None,
        *,
        timeout: float | None = USE_DEFAULT,
        metadata: MetadataLike | None = None,
        **kwargs: Unpack[lc.GenerateArgs],
    ) -> lc.Generation:
        """See Client.generate."""
        return await self._unary(calls.generate_call(prompt, kwargs), timeout, metadata, self.retry)

    def generate_stream(
        self,
        prompt: str | None = None,
        *,
        timeout: float | None = USE_DEFAULT,
        metadata: MetadataLike | None = None,
        **kwargs: Unpack[lc.GenerateArgs],
    ) -> AsyncGenerationStream:
        """See Client.generate_stream; iterate the result with ``async for``."""
        start = self._starter(calls.generate_stream_call(prompt, kwargs), metadata)
        return AsyncGenerationStream(start, self._attempts(timeout))

    async def explain(
        self,
        prompt: str | None = None,
        *,
        options: lc.ExplainOptions | None = None,
        on_progress: Callable[[lc.ExplanationProgress], None] | None = None,
        timeout: float | None = USE_DEFAULT,
        metadata: MetadataLike | None = None,
        **kwargs: Unpack[lc.InputArgs],
    ) -> lc.ExplainResult:
        """See Client.explain."""
        if on_progress is None:
            return await self._unary(calls.explain_call(prompt, options, kwargs), timeout, metadata, self.retry)
        call = calls.explain_stream_call(prompt, options, kwargs)
        async with AsyncServerStream(self._starter(call, metadata), self._attempts(timeout), call.decode) as events:
            async for event in events:
                if (result := calls.explain_outcome(event, on_progress)) is not None:
                    return result
        raise calls.stream_without_result()

    async def compute_concept(
        self,
        concept: lc.ConceptSpec | str,
        *,
        tokens_per_vector: int | None = None,
        model: str | None = None,
        timeout: float | None = USE_DEFAULT,
        metadata: MetadataLike | None = None,
    ) -> lc.ConceptVector:
        """See Client.compute_concept."""
        return await self._unary(calls.concept_call(concept, tokens_per_vector, model), timeout, metadata, self.retry)

    async def list_models(
        self, *, timeout: float | None = USE_DEFAULT, metadata: MetadataLike | None = None
    ) -> list[lc.ModelInfo]:
        """See Client.list_models."""
        return await self._unary(calls.list_models_call(), timeout, metadata, self.retry)

    async def get_model(
        self, name: str = "", *, timeout: float | None = USE_DEFAULT, metadata: MetadataLike | None = None
    ) -> lc.ModelInfo:
        """See Client.get_model."""
        return await self._get_model(name, timeout, metadata, self.retry)

    async def _get_model(
        self, name: str, timeout: float | None, metadata: MetadataLike | None, retry: RetryPolicy
    ) -> lc.ModelInfo:
        return await self._unary(calls.get_model_call(name), timeout, metadata, retry)

    async def health(
        self,
        model: str | None = None,
        *,
        service: str | None = None,
        timeout: float | None = USE_DEFAULT,
        metadata: MetadataLike | None = None,
    ) -> HealthStatus:
        """See Client.health."""
        return cast(HealthStatus, await self._unary(calls.health_call(model, service), timeout, metadata, NO_RETRY))

    async def wait_until_ready(
        self,
        timeout: float = 300.0,
        *,
        model: str | None = None,
        connect_timeout: float | None = None,
        on_wait: OnWait | None = None,
    ) -> lc.ModelInfo:
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
