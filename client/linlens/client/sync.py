"""The blocking client."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, TypeVar, Unpack, cast

import grpc

from linlens import contract as lc
from linlens.client import _calls as calls
from linlens.client._base import USE_DEFAULT, ClientBase, MetadataLike
from linlens.client.errors import DeadlineExceededError, UnavailableError
from linlens.client.health import HealthStatus, OnWait, ReadinessWait
from linlens.client.retry import NO_RETRY, Attempts, RetryPolicy
from linlens.contract.wire import stream_event_from_proto

E = TypeVar("E")
R = TypeVar("R")


class ServerStream(calls.StreamState[E], Iterator[E]):
    """The decoded events of one server-streaming call, as they arrive.

    ``cancel()`` (or leaving a ``with`` block) stops the server's work. A failure before the first event is retried
    like a unary call; after that it is raised, because repeating the call would repeat events already delivered.
    """

    def __init__(
        self, start: Callable[[float | None], Any], attempts: Attempts, decode: Callable[[Any], E | None]
    ) -> None:
        super().__init__(start, attempts, decode)
        self._open()

    def _open(self) -> None:
        self._call = self._start(self._attempts.remaining())

    def __iter__(self) -> ServerStream[E]:
        return self

    def __next__(self) -> E:
        while True:
            if self._finished:
                raise StopIteration
            try:
                message = next(self._call)
            except StopIteration:
                self._finished = True
                raise
            except grpc.RpcError as error:
                time.sleep(self._retry_wait(error))
                self._open()
                continue
            event = self._event(message)
            if event is not None:
                return event

    def __enter__(self) -> ServerStream[E]:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cancel()


class GenerationStream(ServerStream[lc.StreamEvent]):
    """The events of one GenerateStream call, as they arrive: GeneratedToken, Explanation, LayerAttributions and
    LayerResult (ExplainOptions.layers), ExplanationProgress while an explanation runs, and last GenerationDone."""

    def __init__(self, start: Callable[[float | None], Any], attempts: Attempts) -> None:
        super().__init__(start, attempts, stream_event_from_proto)


class Client(ClientBase):
    """A blocking linlens client. Use it as a context manager, or call ``close()``.

    ``Client()`` connects to ``$LINLENS_SERVER`` or localhost:50051; see ClientBase for the other settings.
    """

    def _unary(
        self, call: calls.Call[R], timeout: float | None, metadata: MetadataLike | None, retry: RetryPolicy
    ) -> R:
        send, attempts = self._sender(call, timeout, metadata, retry)
        while True:
            try:
                return call.decode(send())
            except grpc.RpcError as error:
                time.sleep(attempts.backoff_after(error))

    # -- API ----------------------------------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | None = None,
        *,
        timeout: float | None = USE_DEFAULT,
        metadata: MetadataLike | None = None,
        **kwargs: Unpack[lc.GenerateArgs],
    ) -> lc.Generation:
        """Generate a continuation of exactly one of ``prompt``, ``token_ids`` or chat ``messages``.

        ``temperature`` 0/None is greedy decoding; ``explain=True`` explains the first generated token with default
        options, an ExplainOptions chooses steps and what to compute. See GenerateArgs for every keyword.
        """
        return self._unary(calls.generate_call(prompt, kwargs), timeout, metadata, self.retry)

    def generate_stream(
        self,
        prompt: str | None = None,
        *,
        timeout: float | None = USE_DEFAULT,
        metadata: MetadataLike | None = None,
        **kwargs: Unpack[lc.GenerateArgs],
    ) -> GenerationStream:
        """Like ``generate``, but yields each token, explanation and layer result as soon as the server has it, then
        a GenerationDone. The stream can be cancelled and used as a context manager; ``collect_stream`` assembles it
        into the Generation ``generate`` would have returned."""
        start = self._starter(calls.generate_stream_call(prompt, kwargs), metadata)
        return GenerationStream(start, self._attempts(timeout))

    def explain(
        self,
        prompt: str | None = None,
        *,
        options: lc.ExplainOptions | None = None,
        on_progress: Callable[[lc.ExplanationProgress], None] | None = None,
        timeout: float | None = USE_DEFAULT,
        metadata: MetadataLike | None = None,
        **kwargs: Unpack[lc.InputArgs],
    ) -> lc.ExplainResult:
        """Explain the model's next-token prediction after the input (no sampling, nothing generated).

        With ``on_progress``, the call streams (ExplainStream) and reports how far the products have got as they go.
        """
        if on_progress is None:
            return self._unary(calls.explain_call(prompt, options, kwargs), timeout, metadata, self.retry)
        call = calls.explain_stream_call(prompt, options, kwargs)
        with ServerStream(self._starter(call, metadata), self._attempts(timeout), call.decode) as events:
            for event in events:
                if (result := calls.explain_outcome(event, on_progress)) is not None:
                    return result
        raise calls.stream_without_result()

    def compute_concept(
        self,
        concept: lc.ConceptSpec | str,
        *,
        tokens_per_vector: int | None = None,
        model: str | None = None,
        timeout: float | None = USE_DEFAULT,
        metadata: MetadataLike | None = None,
    ) -> lc.ConceptVector:
        """The concept vector ``concept`` names (a ConceptSpec, or the concept prompt's text for the top left
        singular vector of its output map), with its singular value and decoded tokens. Cache it and steer with
        ``generate(..., steering=Steering(vector=concept.vector))`` without computing it again."""
        return self._unary(calls.concept_call(concept, tokens_per_vector, model), timeout, metadata, self.retry)

    def list_models(
        self, *, timeout: float | None = USE_DEFAULT, metadata: MetadataLike | None = None
    ) -> list[lc.ModelInfo]:
        """Every model the server can serve, loaded or not; the default one has ``is_default`` set."""
        return self._unary(calls.list_models_call(), timeout, metadata, self.retry)

    def get_model(
        self, name: str = "", *, timeout: float | None = USE_DEFAULT, metadata: MetadataLike | None = None
    ) -> lc.ModelInfo:
        """One model's description ("" = the default model), also while it loads; NotFoundError for an unknown name."""
        return self._get_model(name, timeout, metadata, self.retry)

    def _get_model(
        self, name: str, timeout: float | None, metadata: MetadataLike | None, retry: RetryPolicy
    ) -> lc.ModelInfo:
        return self._unary(calls.get_model_call(name), timeout, metadata, retry)

    def health(
        self,
        model: str | None = None,
        *,
        service: str | None = None,
        timeout: float | None = USE_DEFAULT,
        metadata: MetadataLike | None = None,
    ) -> HealthStatus:
        """The grpc.health.v1 status of the server ("" service), of one model (its name), or of any ``service``.

        Not retried: a health probe should report the present, not wait for a better one.
        """
        return cast(HealthStatus, self._unary(calls.health_call(model, service), timeout, metadata, NO_RETRY))

    def wait_until_ready(
        self,
        timeout: float = 300.0,
        *,
        model: str | None = None,
        connect_timeout: float | None = None,
        on_wait: OnWait | None = None,
    ) -> lc.ModelInfo:
        """Block until ``model`` (default: the server's default model) can take requests, and return its ModelInfo.

        That is: the server answers, the model has loaded and its grpc.health.v1 entry says SERVING. A first start
        that converts a model can take a minute. ``on_wait`` is called whenever the server reports a new loading
        phase. Raises ServerUnreachableError when no server answers within ``connect_timeout`` seconds (default:
        ``timeout``), UnavailableError naming what it waited for after ``timeout`` seconds, FailedPreconditionError
        at once for a model that failed to load, and NotFoundError for a model the server does not have.
        """
        wait = ReadinessWait(self.target, model, timeout, on_wait)
        try:
            grpc.channel_ready_future(self._channel).result(timeout=wait.connect_within(connect_timeout))
        except grpc.FutureTimeoutError:
            raise wait.timed_out("connect", self._connection_error()) from None
        while True:
            remaining = wait.remaining()  # UnavailableError, saying what it waited for, once the time is up
            try:
                info = self._get_model(model or "", remaining, None, NO_RETRY)
                serving = info.loaded and self.health(info.name, timeout=remaining) is HealthStatus.SERVING
            except (UnavailableError, DeadlineExceededError) as error:
                wait.unanswered(error)
            else:
                if wait.observe(info, serving):
                    return info
            time.sleep(wait.pause())

    def _connection_error(self) -> str:
        """What gRPC says about the connection (a refused TLS handshake, nobody listening), from one quick call."""
        try:
            self._health("", timeout=1.0)
        except grpc.RpcError as error:
            return str(error.details() or "")
        return ""

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


__all__ = ["Client", "GenerationStream", "ServerStream"]
