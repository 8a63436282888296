"""The SDK's API on a model loaded in this process, without a server: for the CLI and notebooks.

``InProcessClient`` has the methods of :class:`linlens.client.Client` (explain, generate, generate_stream,
list_models, get_model, wait_until_ready) and returns the same types. It runs the server's own request path, minus
the network: the same request messages (:mod:`linlens.contract.requests`), the same admission and limits
(:mod:`linlens.server.admission`), the same model work (:mod:`linlens.server.work`), and the results go through the
same wire mapping both ways, so a result here is exactly what a server would have sent. Failures raise the SDK's
exception classes (InvalidArgumentError, ...), as a server's status would.

    from linlens.server.inprocess import InProcessClient

    with InProcessClient("smollm2-135m") as client:
        result = client.explain("The bridge out of Marin is the")
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, TypeVar, Unpack

from linlens.client.errors import LinlensError, error_for_code
from linlens.contract import (
    ConceptSpec,
    ConceptVector,
    ExplainOptions,
    ExplainResult,
    Generation,
    ModelInfo,
    StreamEvent,
)
from linlens.contract.requests import (
    GenerateArgs,
    InputArgs,
    compute_concept_request,
    explain_request,
    generate_request,
)
from linlens.contract.wire import (
    concept_vector_from_proto,
    concept_vector_to_proto,
    explain_result_from_proto,
    explain_result_to_proto,
    generation_from_proto,
    generation_to_proto,
    model_info_from_proto,
    model_info_to_proto,
    stream_event_from_proto,
    stream_event_to_proto,
)
from linlens.models import DEFAULT_MODEL
from linlens.server.admission import GenerationWork, prepare_concept, prepare_explain, prepare_generation
from linlens.server.config import ServerConfig
from linlens.server.hosting import ModelHost
from linlens.server.scheduler import CancelToken
from linlens.server.status import RpcFailure, failure_for
from linlens.server.work import Emit, OnProgress, run_concept, run_explain, run_generation

T = TypeVar("T")


def _sdk_error(exc: BaseException) -> LinlensError:
    """The SDK exception a server's status would have raised for ``exc``."""
    if isinstance(exc, LinlensError):
        return exc
    failure = exc if isinstance(exc, RpcFailure) else failure_for(exc, "in-process")
    return error_for_code(failure.code, failure.message)


def _rethrown(call: Callable[[], T]) -> T:
    """Run ``call``; a failure becomes the SDK exception a server's status would have raised."""
    try:
        return call()
    except LinlensError:
        raise
    except Exception as exc:
        raise _sdk_error(exc) from exc


def _run_generation(
    work: GenerationWork, token: CancelToken, emit: Emit | None = None, on_progress: OnProgress | None = None
) -> Generation:
    """Run a prepared generation from now, stopped by ``token`` (its deadline or a cancel), as the server would."""
    return run_generation(
        work,
        arrived=time.monotonic(),
        should_stop=token.should_stop,
        stop_reason=lambda: token.reason,
        emit=emit,
        on_progress=on_progress,
    )


class InProcessClient:
    """The SDK's API on models loaded here (see the module docstring).

    ``models`` are registry names, folders or .gguf paths (the first is the default), loaded at once, in order.
    ``config`` sets the limits (default: a server's defaults, without warm-up). ``on_progress`` sees an
    ExplanationProgress after each batch of products (e.g. for a progress bar); ``explain`` also takes its own.
    """

    def __init__(
        self,
        *models: str,
        config: ServerConfig | None = None,
        on_progress: OnProgress | None = None,
        timeout: float | None = None,
    ) -> None:
        base = config or ServerConfig(warmup=False)
        self.config = dataclasses.replace(base, models=tuple(models) or base.models or (DEFAULT_MODEL,))
        self.host = ModelHost(self.config)
        self.host.load_all()
        self.on_progress = on_progress
        self.timeout = timeout
        self.target = "in-process"

    # -- API ----------------------------------------------------------------------------------------------------

    def explain(
        self,
        prompt: str | None = None,
        *,
        options: ExplainOptions | None = None,
        on_progress: OnProgress | None = None,
        timeout: float | None = None,
        **kwargs: Unpack[InputArgs],
    ) -> ExplainResult:
        """Explain the model's next-token prediction after the input (see Client.explain)."""
        request = explain_request(prompt, options, kwargs)

        def call() -> ExplainResult:
            work = prepare_explain(request, self.host, self.config)
            token = self._token(timeout)
            result = run_explain(work, should_stop=token.should_stop, on_progress=on_progress or self.on_progress)
            return explain_result_from_proto(explain_result_to_proto(result))

        return _rethrown(call)

    def generate(
        self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Unpack[GenerateArgs]
    ) -> Generation:
        """Generate (and explain) like Client.generate."""
        request = generate_request(prompt, kwargs)

        def call() -> Generation:
            work = prepare_generation(request, self.host, self.config)
            token = self._token(timeout)
            generation = _run_generation(work, token, on_progress=self.on_progress)
            return generation_from_proto(generation_to_proto(generation))

        return _rethrown(call)

    def generate_stream(
        self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Unpack[GenerateArgs]
    ) -> InProcessStream:
        """Like generate, but an iterator of events as they happen (see Client.generate_stream)."""
        request = generate_request(prompt, kwargs)
        work = _rethrown(lambda: prepare_generation(request, self.host, self.config))
        token = self._token(timeout)

        def produce(emit: Callable[[StreamEvent], None]) -> Generation:
            return _run_generation(work, token, emit=emit, on_progress=emit)

        return InProcessStream(produce, token)

    def compute_concept(
        self,
        concept: ConceptSpec | str,
        *,
        tokens_per_vector: int | None = None,
        model: str | None = None,
        timeout: float | None = None,
    ) -> ConceptVector:
        """A concept vector (see Client.compute_concept)."""
        request = compute_concept_request(concept, tokens_per_vector=tokens_per_vector, model=model)

        def call() -> ConceptVector:
            work = prepare_concept(request, self.host, self.config)
            concept = run_concept(work, should_stop=self._token(timeout).should_stop)
            return concept_vector_from_proto(concept_vector_to_proto(concept))

        return _rethrown(call)

    def list_models(self) -> list[ModelInfo]:
        """The configured models (see Client.list_models)."""
        return [model_info_from_proto(model_info_to_proto(self.host.info(s))) for s in self.host.slots.values()]

    def get_model(self, name: str = "") -> ModelInfo:
        """One model ("" = the default one)."""
        return _rethrown(lambda: model_info_from_proto(model_info_to_proto(self.host.info(self.host.resolve(name)))))

    def wait_until_ready(self, timeout: float = 0.0, *, model: str | None = None, **_: Any) -> ModelInfo:
        """The model's ModelInfo: in-process models are loaded when the client is made (a failed one raises)."""
        return _rethrown(lambda: self._ready_info(model or ""))

    def _ready_info(self, name: str) -> ModelInfo:
        self.host.ready(name)
        return self.get_model(name)

    def close(self) -> None:
        """Nothing to release beyond the models, which go with the object."""

    def __enter__(self) -> InProcessClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _token(self, timeout: float | None) -> CancelToken:
        return CancelToken.with_timeout(timeout if timeout is not None else self.timeout)


class InProcessStream(Iterator[StreamEvent]):
    """The events of an in-process generation as they happen (the work runs on its own thread); ``cancel()`` stops
    it, as closing a server stream would."""

    _END = object()

    def __init__(self, produce: Callable[[Callable[[StreamEvent], None]], Generation], token: CancelToken) -> None:
        self._token = token
        self._events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._finished = False
        self._thread = threading.Thread(target=self._run, args=(produce,), name="linlens-inprocess", daemon=True)
        self._thread.start()

    def _run(self, produce: Callable[[Callable[[StreamEvent], None]], Generation]) -> None:
        try:
            generation = produce(lambda event: self._events.put(stream_event_to_proto(event)))
            self._events.put(stream_event_to_proto(generation.done()))
        except BaseException as exc:  # handed to the consumer, which raises it
            self._events.put(exc)
        self._events.put(self._END)

    def __iter__(self) -> InProcessStream:
        return self

    def __next__(self) -> StreamEvent:
        while not self._finished:
            item = self._events.get()
            if item is self._END:
                self._finished = True
                break
            if isinstance(item, BaseException):
                self._finished = True
                raise _sdk_error(item) from item
            event = stream_event_from_proto(item)
            if event is not None:
                return event
        raise StopIteration

    def cancel(self) -> None:
        """Stop the generation at its next check point."""
        self._token.cancel()
        self._finished = True

    def __enter__(self) -> InProcessStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cancel()


__all__ = ["InProcessClient", "InProcessStream"]
