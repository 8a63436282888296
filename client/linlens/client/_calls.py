"""Each RPC's request and response decoding, written once for the blocking and the asyncio client.

A method of either client builds a :class:`Call` here (which stub method, which request message, how the answer
becomes the SDK's type) and leaves only the transport (``method(...)`` or ``await method(...)``) to its own class.
Streams share :class:`StreamState`: when a failure may be retried and how a message becomes an event.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

import grpc

from linlens.client.errors import LinlensError, UnavailableError, from_rpc_error
from linlens.client.retry import Attempts
from linlens.contract.options import ConceptSpec, ExplainOptions
from linlens.contract.requests import (
    GenerateArgs,
    InputArgs,
    compute_concept_request,
    explain_request,
    explain_stream_request,
    generate_request,
    generate_stream_request,
)
from linlens.contract.results import (
    ConceptVector,
    ExplainResult,
    ExplanationProgress,
    Generation,
    ModelInfo,
    StreamEvent,
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

R = TypeVar("R")
E = TypeVar("E")

#: The name a Call gives for the grpc.health.v1 Check method (not on the LinlensService stub).
HEALTH = "health"


@dataclass(frozen=True)
class Call(Generic[R]):
    """One RPC: the stub method's name, its request message and how its response becomes the SDK type."""

    method: str
    request: object
    decode: Callable[[Any], R]


def _models(response: Any) -> list[ModelInfo]:
    return [model_info_from_proto(m) for m in cast(pb.ListModelsResponse, response).models]


def _model(response: Any) -> ModelInfo:
    return model_info_from_proto(cast(pb.GetModelResponse, response).model)


def generate_call(prompt: str | None, kwargs: GenerateArgs) -> Call[Generation]:
    """Generate: the request from the prompt and keywords, a Generation back."""
    return Call("Generate", generate_request(prompt, kwargs), generation_from_proto)


def generate_stream_call(prompt: str | None, kwargs: GenerateArgs) -> Call[StreamEvent | None]:
    """GenerateStream: each message becomes a StreamEvent (None for one this SDK does not know)."""
    return Call("GenerateStream", generate_stream_request(prompt, kwargs), stream_event_from_proto)


def explain_call(prompt: str | None, options: ExplainOptions | None, kwargs: InputArgs) -> Call[ExplainResult]:
    """Explain: one ExplainResult back."""
    return Call("Explain", explain_request(prompt, options, kwargs), explain_result_from_proto)


def explain_stream_call(
    prompt: str | None, options: ExplainOptions | None, kwargs: InputArgs
) -> Call[ExplanationProgress | ExplainResult | None]:
    """ExplainStream: progress events, then the ExplainResult."""
    return Call("ExplainStream", explain_stream_request(prompt, options, kwargs), explain_stream_event_from_proto)


def concept_call(concept: ConceptSpec | str, tokens_per_vector: int | None, model: str | None) -> Call[ConceptVector]:
    """ComputeConcept: a ConceptVector back."""
    request = compute_concept_request(concept, tokens_per_vector=tokens_per_vector, model=model)
    return Call("ComputeConcept", request, concept_vector_from_proto)


def list_models_call() -> Call[list[ModelInfo]]:
    """ListModels: every model's ModelInfo."""
    return Call("ListModels", pb.ListModelsRequest(), _models)


def get_model_call(name: str) -> Call[ModelInfo]:
    """GetModel: one model's ModelInfo ("" = the default model)."""
    return Call("GetModel", pb.GetModelRequest(name=name), _model)


def health_call(model: str | None, service: str | None) -> Call[Any]:
    """grpc.health.v1 Check of ``service``, else of ``model``, else of the server (""); decoded by the channel."""
    return Call(HEALTH, service if service is not None else (model or ""), lambda status: status)


def explain_outcome(event: object, on_progress: Callable[[ExplanationProgress], None]) -> ExplainResult | None:
    """The ExplainResult an explanation stream's ``event`` is, or None after handing progress to ``on_progress``."""
    if isinstance(event, ExplainResult):
        return event
    if isinstance(event, ExplanationProgress):
        on_progress(event)
    return None


def stream_without_result() -> UnavailableError:
    """What an explanation stream that ended without its ExplainResult raises."""
    return UnavailableError(grpc.StatusCode.UNAVAILABLE, "the explanation stream ended without its result")


class StreamState(Generic[E]):
    """What a blocking and an asyncio server stream share: the start function, the attempts, the decoding, and
    the rule that only a failure before the first event is retried (later, events would be delivered twice)."""

    def __init__(
        self, start: Callable[[float | None], Any], attempts: Attempts, decode: Callable[[Any], E | None]
    ) -> None:
        self._start = start
        self._decode = decode
        self._attempts = attempts
        self._call: Any = None
        self._received = False
        self._finished = False

    def _retry_wait(self, error: grpc.RpcError) -> float:
        """Seconds to wait before opening the stream again; raises the SDK error when it must not be retried."""
        try:
            if self._received:
                raise from_rpc_error(error) from error
            return self._attempts.backoff_after(error)
        except LinlensError:
            self._finished = True
            raise

    def _event(self, message: Any) -> E | None:
        """The event ``message`` decodes to (None for one to skip)."""
        self._received = True
        return self._decode(message)

    def cancel(self) -> None:
        """Stop the stream; the server stops generating and explaining."""
        self._finished = True
        if self._call is not None:
            self._call.cancel()


__all__ = [
    "HEALTH",
    "Call",
    "StreamState",
    "concept_call",
    "explain_call",
    "explain_outcome",
    "explain_stream_call",
    "generate_call",
    "generate_stream_call",
    "get_model_call",
    "health_call",
    "list_models_call",
    "stream_without_result",
]
