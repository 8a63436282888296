"""The blocking client."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, TypeVar, Unpack, cast

import grpc

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


class ServerStream(Iterator[E]):
    """The decoded events of one server-streaming call, as they arrive.

    ``cancel()`` (or leaving a ``with`` block) stops the server's work. A failure before the first event is retried
    like a unary call; after that it is raised, because repeating the call would repeat events already delivered.
    """

    def __init__(
        self, start: Callable[[float | None], Any], attempts: Attempts, decode: Callable[[Any], E | None]
    ) -> None:
        self._start = start
        self._decode = decode
        self._attempts = attempts
        self._call: Any = None
        self._received = False
        self._finished = False
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
                try:
                    if self._received:
                        raise from_rpc_error(error) from error
                    wait = self._attempts.backoff_after(error)
                except LinlensError:
                    self._finished = True
                    raise
                time.sleep(wait)
                self._open()
                continue
            self._received = True
            event = self._decode(message)
            if event is not None:
                return event

    def cancel(self) -> None:
        """Stop the stream; the server stops generating and explaining."""
        self._finished = True
        if self._call is not None:
            self._call.cancel()

    def __enter__(self) -> ServerStream[E]:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cancel()


class GenerationStream(ServerStream[StreamEvent]):
    """The events of one GenerateStream call, as they arrive: GeneratedToken, Explanation, LayerAttributions and
    LayerResult (ExplainOptions.layers), ExplanationProgress while an explanation runs, and last GenerationDone."""

    def __init__(self, start: Callable[[float | None], Any], attempts: Attempts) -> None:
        super().__init__(start, attempts, stream_event_from_proto)


class Client(ClientBase):
    """A blocking linlens client. Use it as a context manager, or call ``close()``.

    ``Client()`` connects to ``$LINLENS_SERVER`` or localhost:50051; see ClientBase for the other settings.
    """

    def _open_channel(self, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, int | str]]) -> Any:
        if credentials is not None:
            channel = grpc.secure_channel(self.target, credentials, options=options)
        else:
            channel = grpc.insecure_channel(self.target, options=options)
        self._stub: Any = pb_grpc.LinlensServiceStub(channel)
        self._health: Any = channel.unary_unary(
            HEALTH_CHECK_METHOD, request_serializer=encode_health_request, response_deserializer=decode_health_response
        )
        return channel

    def _unary(
        self, method: Any, request: object, timeout: float | None, metadata: MetadataLike | None, retry: RetryPolicy
    ) -> Any:
        attempts = Attempts(retry, self._deadline(timeout))
        merged = self._metadata(metadata)
        while True:
            try:
                return method(
                    request, timeout=attempts.remaining(), metadata=merged, wait_for_ready=self.wait_for_ready
                )
            except grpc.RpcError as error:
                time.sleep(attempts.backoff_after(error))

    # -- API ----------------------------------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | None = None,
        *,
        timeout: float | None = USE_DEFAULT,
        metadata: MetadataLike | None = None,
        **kwargs: Unpack[GenerateArgs],
    ) -> Generation:
        """Generate a continuation of exactly one of ``prompt``, ``token_ids`` or chat ``messages``.

        ``temperature`` 0/None is greedy decoding; ``explain=True`` explains the first generated token with default
        options, an ExplainOptions chooses steps and what to compute. See GenerateArgs for every keyword.
        """
        request = generate_request(prompt, kwargs)
        return generation_from_proto(self._unary(self._stub.Generate, request, timeout, metadata, self.retry))

    def generate_stream(
        self,
        prompt: str | None = None,
        *,
        timeout: float | None = USE_DEFAULT,
        metadata: MetadataLike | None = None,
        **kwargs: Unpack[GenerateArgs],
    ) -> GenerationStream:
        """Like ``generate``, but yields each token, explanation and layer result as soon as the server has it, then
        a GenerationDone. The stream can be cancelled and used as a context manager; ``collect_stream`` assembles it
        into the Generation ``generate`` would have returned."""
        request = generate_stream_request(prompt, kwargs)
        merged = self._metadata(metadata)

        def start(remaining: float | None) -> Any:
            return self._stub.GenerateStream(
                request, timeout=remaining, metadata=merged, wait_for_ready=self.wait_for_ready
            )

        return GenerationStream(start, Attempts(self.retry, self._deadline(timeout)))

    def explain(
        self,
        prompt: str | None = None,
        *,
        options: ExplainOptions | None = None,
        on_progress: Callable[[ExplanationProgress], None] | None = None,
        timeout: float | None = USE_DEFAULT,
        metadata: MetadataLike | None = None,
        **kwargs: Unpack[InputArgs],
    ) -> ExplainResult:
        """Explain the model's next-token prediction after the input (no sampling, nothing generated).

        With ``on_progress``, the call streams (ExplainStream) and reports how far the products have got as they go.
        """
        if on_progress is None:
            request = explain_request(prompt, options, kwargs)
            return explain_result_from_proto(self._unary(self._stub.Explain, request, timeout, metadata, self.retry))
        stream_request = explain_stream_request(prompt, options, kwargs)
        merged = self._metadata(metadata)

        def start(remaining: float | None) -> Any:
            return self._stub.ExplainStream(
                stream_request, timeout=remaining, metadata=merged, wait_for_ready=self.wait_for_ready
            )

        attempts = Attempts(self.retry, self._deadline(timeout))
        stream: ServerStream[ExplanationProgress | ExplainResult] = ServerStream(
            start, attempts, explain_stream_event_from_proto
        )
        with stream as events:
            for event in events:
                if isinstance(event, ExplanationProgress):
                    on_progress(event)
                else:
                    return event
        raise UnavailableError(grpc.StatusCode.UNAVAILABLE, "the explanation stream ended without its result")

    def compute_concept(
        self,
        concept: ConceptSpec | str,
        *,
        tokens_per_vector: int | None = None,
        model: str | None = None,
        timeout: float | None = USE_DEFAULT,
        metadata: MetadataLike | None = None,
    ) -> ConceptVector:
        """The concept vector ``concept`` names (a ConceptSpec, or the concept prompt's text for the top left
        singular vector of its output map), with its singular value and decoded tokens. Cache it and steer with
        ``generate(..., steering=Steering(vector=concept.vector))`` without computing it again."""
        request = compute_concept_request(concept, tokens_per_vector=tokens_per_vector, model=model)
        return concept_vector_from_proto(self._unary(self._stub.ComputeConcept, request, timeout, metadata, self.retry))

    def list_models(
        self, *, timeout: float | None = USE_DEFAULT, metadata: MetadataLike | None = None
    ) -> list[ModelInfo]:
        """Every model the server can serve, loaded or not; the default one has ``is_default`` set."""
        response = self._unary(self._stub.ListModels, pb.ListModelsRequest(), timeout, metadata, self.retry)
        return [model_info_from_proto(m) for m in cast(pb.ListModelsResponse, response).models]

    def get_model(
        self, name: str = "", *, timeout: float | None = USE_DEFAULT, metadata: MetadataLike | None = None
    ) -> ModelInfo:
        """One model's description ("" = the default model), also while it loads; NotFoundError for an unknown name."""
        return self._get_model(name, timeout, metadata, self.retry)

    def _get_model(
        self, name: str, timeout: float | None, metadata: MetadataLike | None, retry: RetryPolicy
    ) -> ModelInfo:
        response = self._unary(self._stub.GetModel, pb.GetModelRequest(name=name), timeout, metadata, retry)
        return model_info_from_proto(cast(pb.GetModelResponse, response).model)

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
        name = service if service is not None else (model or "")
        return cast(HealthStatus, self._unary(self._health, name, timeout, metadata, NO_RETRY))

    def wait_until_ready(
        self,
        timeout: float = 300.0,
        *,
        model: str | None = None,
        connect_timeout: float | None = None,
        on_wait: OnWait | None = None,
    ) -> ModelInfo:
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
