"""The blocking client."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, cast

import grpc

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


class GenerationStream(Iterator[StreamEvent]):
    """The events of one GenerateStream call, as they arrive.

    Iterate it (``for event in stream``); each event is a GeneratedToken, an Explanation or, last, a GenerationDone.
    ``cancel()`` (or leaving a ``with`` block) stops the server's work. A failure before the first event is retried
    like a unary call; after that it is raised, because repeating the call would repeat events already delivered.
    """

    def __init__(
        self,
        start: Callable[[float | None], Any],
        retry: RetryPolicy,
        deadline: float | None,
    ) -> None:
        self._start = start
        self._retry = retry
        self._deadline = deadline
        self._call: Any = None
        self._attempt = 0
        self._received = False
        self._finished = False
        self._open()

    def _open(self) -> None:
        self._attempt += 1
        remaining = None if self._deadline is None else max(0.0, self._deadline - time.monotonic())
        self._call = self._start(remaining)

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> StreamEvent:
        while True:
            if self._finished:
                raise StopIteration
            try:
                message = cast(pb.GenerateStreamResponse, next(self._call))
            except StopIteration:
                self._finished = True
                raise
            except grpc.RpcError as error:
                code = status_code_of(error)
                if not self._received and self._retry.should_retry(code, self._attempt):
                    wait = self._retry.backoff(self._attempt)
                    if self._deadline is None or time.monotonic() + wait < self._deadline:
                        time.sleep(wait)
                        self._open()
                        continue
                self._finished = True
                raise from_rpc_error(error) from error
            self._received = True
            event = stream_event_from_proto(message)
            if event is not None:
                return event

    def cancel(self) -> None:
        """Stop the stream; the server stops generating and explaining."""
        self._finished = True
        if self._call is not None:
            self._call.cancel()

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cancel()


class Client:
    """A blocking linlens client. Use it as a context manager, or call ``close()``.

    ``timeout`` is the default deadline per call in seconds (None: no deadline); every method takes its own
    ``timeout=``. ``retry`` is a RetryPolicy, a number of attempts, or None; only UNAVAILABLE and RESOURCE_EXHAUSTED
    are retried (they mean no work was done). ``metadata`` is sent with every call, merged with per-call metadata.
    TLS is used when ``tls`` is true, when any certificate material is given, or with explicit ``credentials``.
    """

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
            grpc.secure_channel(target, creds, options=opts)
            if creds is not None
            else grpc.insecure_channel(target, options=opts)
        )
        self._stub: Any = pb_grpc.LinlensServiceStub(self._channel)
        self._health: Any = self._channel.unary_unary(
            HEALTH_CHECK_METHOD, request_serializer=encode_health_request, response_deserializer=decode_health_response
        )

    # -- plumbing ---------------------------------------------------------------------------------------------

    def _deadline(self, timeout: float | None) -> float | None:
        effective = self.timeout if timeout is _USE_DEFAULT else timeout
        return None if effective is None else time.monotonic() + effective

    def _metadata(self, metadata: MetadataLike | None) -> tuple[tuple[str, str], ...]:
        return self.metadata + normalise_metadata(metadata)

    def _unary(
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
                return method(request, timeout=remaining, metadata=merged, wait_for_ready=self.wait_for_ready)
            except grpc.RpcError as error:
                code = status_code_of(error)
                if not policy.should_retry(code, attempt):
                    raise from_rpc_error(error) from error
                wait = policy.backoff(attempt)
                if deadline is not None and time.monotonic() + wait >= deadline:
                    raise from_rpc_error(error) from error
                time.sleep(wait)

    # -- API ----------------------------------------------------------------------------------------------------

    def generate(
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
        """Generate a continuation of exactly one of ``prompt``, ``token_ids`` or chat ``messages``.

        ``temperature`` 0/None is greedy decoding; ``explain=True`` explains the first generated token with default
        options, an ExplainOptions chooses steps and what to compute.
        """
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
        response = cast(pb.GenerateResponse, self._unary(self._stub.Generate, parts.unary(), timeout, metadata))
        return generation_from_proto(response)

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
    ) -> GenerationStream:
        """Like ``generate``, but yields each token and explanation as soon as the server has it, then a
        GenerationDone. The returned stream can be cancelled and used as a context manager."""
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

        return GenerationStream(start, self.retry, self._deadline(timeout))

    def explain(
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
        """Explain the model's next-token prediction after the input (no sampling, nothing generated)."""
        request = explain_request(
            prompt=prompt,
            token_ids=token_ids,
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            model=model,
            options=options,
        )
        response = cast(pb.ExplainResponse, self._unary(self._stub.Explain, request, timeout, metadata))
        return explain_result_from_proto(response)

    def list_models(
        self, *, timeout: float | None = _USE_DEFAULT, metadata: MetadataLike | None = None
    ) -> list[ModelInfo]:
        """Every model the server can serve; the default one has ``is_default`` set."""
        response = cast(
            pb.ListModelsResponse, self._unary(self._stub.ListModels, pb.ListModelsRequest(), timeout, metadata)
        )
        return [model_info_from_proto(m) for m in response.models]

    def get_model(
        self, name: str = "", *, timeout: float | None = _USE_DEFAULT, metadata: MetadataLike | None = None
    ) -> ModelInfo:
        """One model's description ("" = the default model); NotFoundError for an unknown name."""
        response = cast(
            pb.GetModelResponse, self._unary(self._stub.GetModel, pb.GetModelRequest(name=name), timeout, metadata)
        )
        return model_info_from_proto(response.model)

    def health(
        self,
        model: str | None = None,
        *,
        service: str | None = None,
        timeout: float | None = _USE_DEFAULT,
        metadata: MetadataLike | None = None,
    ) -> HealthStatus:
        """The grpc.health.v1 status of the server ("" service), of one model (its name), or of any ``service``.

        Not retried: a health probe should report the present, not wait for a better one.
        """
        name = service if service is not None else (model or "")
        return cast(HealthStatus, self._unary(self._health, name, timeout, metadata, retry=NO_RETRY))

    def wait_until_ready(self, timeout: float = 30.0) -> None:
        """Block until the channel is connected; UnavailableError when it is not within ``timeout`` seconds."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError as error:
            raise UnavailableError(
                grpc.StatusCode.UNAVAILABLE, f"{self.target} not ready after {timeout:g} s"
            ) from error

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


__all__ = ["Client", "GenerationStream"]
