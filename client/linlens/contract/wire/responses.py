"""Responses, both ways: generations and their stream events, explain results, model information.

Every field travels by name (``codec.Codec``); the streams' oneofs pick their member by the event's type
(``codec.oneof_to_proto`` / ``oneof_from_proto``), so a new event kind needs the proto and its dataclass only.
"""

from __future__ import annotations

from typing import cast

from linlens.contract.results import (
    ExplainResult,
    ExplanationProgress,
    FinishReason,
    GeneratedToken,
    Generation,
    GenerationDone,
    ModelInfo,
    StreamEvent,
    Usage,
)
from linlens.contract.wire.codec import Codec, oneof_from_proto, oneof_to_proto, same_names
from linlens.contract.wire.enums import _FINISH
from linlens.v1 import linlens_pb2 as pb

_GENERATED_TOKEN = Codec(GeneratedToken, pb.GeneratedToken)
same_names(Usage)  # reached only inside others
_GENERATION = Codec(Generation, pb.GenerateResponse)
_DONE = Codec(GenerationDone, pb.GenerateDone)
_PROGRESS = Codec(ExplanationProgress, pb.ExplanationProgress)
_EXPLAIN_RESULT = Codec(ExplainResult, pb.ExplainResponse)
_MODEL_INFO = Codec(ModelInfo, pb.ModelInfo)


generated_token_to_proto, generated_token_from_proto = _GENERATED_TOKEN.to_proto, _GENERATED_TOKEN.from_proto


def finish_reason_from_proto(value: int) -> FinishReason:
    """A newer server's reason reads as unspecified rather than failing the call."""
    return _FINISH.from_pb(value, "finish_reason")


generation_to_proto, generation_from_proto = _GENERATION.to_proto, _GENERATION.from_proto
progress_to_proto, progress_from_proto = _PROGRESS.to_proto, _PROGRESS.from_proto


def stream_event_to_proto(event: StreamEvent) -> pb.GenerateStreamResponse:
    return oneof_to_proto(pb.GenerateStreamResponse, "event", event)


def stream_event_from_proto(message: pb.GenerateStreamResponse) -> StreamEvent | None:
    """The event a stream message carries; None for an empty message (a newer server's unknown event kind)."""
    return cast("StreamEvent | None", oneof_from_proto(message, "event"))


explain_result_to_proto = _EXPLAIN_RESULT.to_proto


def explain_stream_event_from_proto(message: pb.ExplainStreamResponse) -> ExplanationProgress | ExplainResult | None:
    """The event an ExplainStream message carries; None for an empty message (a newer server's unknown kind)."""
    return cast("ExplanationProgress | ExplainResult | None", oneof_from_proto(message, "event"))


explain_result_from_proto = _EXPLAIN_RESULT.from_proto
model_info_to_proto, model_info_from_proto = _MODEL_INFO.to_proto, _MODEL_INFO.from_proto
