"""Responses, both ways: generations and their stream events, explain results, model information."""

from __future__ import annotations

from linlens.contract.options import (
    OptionError,
)
from linlens.contract.results import (
    ExplainResult,
    Explanation,
    ExplanationProgress,
    FinishReason,
    GeneratedToken,
    Generation,
    GenerationDone,
    LayerAttributions,
    LayerResult,
    ModelInfo,
    ModelState,
    StreamEvent,
    Usage,
)
from linlens.contract.wire.enums import (
    _FINISH,
    _MODEL_STATE,
)
from linlens.contract.wire.results import (
    explanation_from_proto,
    explanation_to_proto,
    layer_attributions_from_proto,
    layer_attributions_to_proto,
    layer_result_from_proto,
    layer_result_to_proto,
    timings_from_proto,
    timings_to_proto,
)
from linlens.v1 import linlens_pb2 as pb

# ----------------------------------------------------------------------------------------------------------------
# Responses
# ----------------------------------------------------------------------------------------------------------------


def generated_token_to_proto(t: GeneratedToken) -> pb.GeneratedToken:
    return pb.GeneratedToken(index=t.index, token_id=t.token_id, text=t.text, logprob=t.logprob)


def generated_token_from_proto(message: pb.GeneratedToken) -> GeneratedToken:
    return GeneratedToken(index=message.index, token_id=message.token_id, text=message.text, logprob=message.logprob)


def _usage_to_proto(u: Usage) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, explained_steps=u.explained_steps
    )


def _usage_from_proto(message: pb.Usage) -> Usage:
    return Usage(
        prompt_tokens=message.prompt_tokens,
        completion_tokens=message.completion_tokens,
        explained_steps=message.explained_steps,
    )


def finish_reason_from_proto(value: int) -> FinishReason:
    try:
        return _FINISH.from_pb(value, "finish_reason")
    except OptionError:  # a newer server's reason: report it as unspecified rather than fail the call
        return FinishReason.UNSPECIFIED


def generation_to_proto(g: Generation) -> pb.GenerateResponse:
    message = pb.GenerateResponse(
        model=g.model,
        text=g.text,
        tokens=[generated_token_to_proto(t) for t in g.tokens],
        finish_reason=_FINISH.to_pb(g.finish_reason),
        usage=_usage_to_proto(g.usage),
        explanations=[explanation_to_proto(e) for e in g.explanations],
        timings=timings_to_proto(g.timings),
        prompt_text=g.prompt_text,
    )
    if g.seed is not None:
        message.seed = g.seed
    return message


def generation_from_proto(message: pb.GenerateResponse) -> Generation:
    return Generation(
        model=message.model,
        text=message.text,
        tokens=tuple(generated_token_from_proto(t) for t in message.tokens),
        finish_reason=finish_reason_from_proto(message.finish_reason),
        usage=_usage_from_proto(message.usage),
        explanations=tuple(explanation_from_proto(e) for e in message.explanations),
        timings=timings_from_proto(message.timings),
        prompt_text=message.prompt_text,
        seed=message.seed if message.HasField("seed") else None,
    )


def progress_to_proto(progress: ExplanationProgress) -> pb.ExplanationProgress:
    return pb.ExplanationProgress(step=progress.step, phase=progress.phase, done=progress.done, total=progress.total)


def progress_from_proto(message: pb.ExplanationProgress) -> ExplanationProgress:
    return ExplanationProgress(phase=message.phase, done=message.done, total=message.total, step=message.step)


def stream_event_to_proto(event: StreamEvent) -> pb.GenerateStreamResponse:
    if isinstance(event, ExplanationProgress):
        return pb.GenerateStreamResponse(progress=progress_to_proto(event))
    if isinstance(event, GeneratedToken):
        return pb.GenerateStreamResponse(token=generated_token_to_proto(event))
    if isinstance(event, Explanation):
        return pb.GenerateStreamResponse(explanation=explanation_to_proto(event))
    if isinstance(event, LayerAttributions):
        return pb.GenerateStreamResponse(layer_attributions=layer_attributions_to_proto(event))
    if isinstance(event, LayerResult):
        return pb.GenerateStreamResponse(layer=layer_result_to_proto(event))
    done = pb.GenerateDone(
        model=event.model,
        text=event.text,
        finish_reason=_FINISH.to_pb(event.finish_reason),
        usage=_usage_to_proto(event.usage),
        timings=timings_to_proto(event.timings),
        prompt_text=event.prompt_text,
    )
    if event.seed is not None:
        done.seed = event.seed
    return pb.GenerateStreamResponse(done=done)


def stream_event_from_proto(message: pb.GenerateStreamResponse) -> StreamEvent | None:
    """The event a stream message carries; None for an empty message (a newer server's unknown event kind)."""
    kind = message.WhichOneof("event")
    if kind == "token":
        return generated_token_from_proto(message.token)
    if kind == "explanation":
        return explanation_from_proto(message.explanation)
    if kind == "layer_attributions":
        return layer_attributions_from_proto(message.layer_attributions)
    if kind == "layer":
        return layer_result_from_proto(message.layer)
    if kind == "progress":
        return progress_from_proto(message.progress)
    if kind == "done":
        done = message.done
        return GenerationDone(
            model=done.model,
            text=done.text,
            finish_reason=finish_reason_from_proto(done.finish_reason),
            usage=_usage_from_proto(done.usage),
            timings=timings_from_proto(done.timings),
            prompt_text=done.prompt_text,
            seed=done.seed if done.HasField("seed") else None,
        )
    return None


def explain_result_to_proto(result: ExplainResult) -> pb.ExplainResponse:
    return pb.ExplainResponse(
        model=result.model, explanation=explanation_to_proto(result.explanation), prompt_text=result.prompt_text
    )


def explain_stream_event_from_proto(message: pb.ExplainStreamResponse) -> ExplanationProgress | ExplainResult | None:
    """The event an ExplainStream message carries; None for an empty message (a newer server's unknown kind)."""
    kind = message.WhichOneof("event")
    if kind == "progress":
        return progress_from_proto(message.progress)
    if kind == "result":
        return explain_result_from_proto(message.result)
    return None


def explain_result_from_proto(message: pb.ExplainResponse) -> ExplainResult:
    return ExplainResult(
        model=message.model,
        prompt_text=message.prompt_text,
        explanation=explanation_from_proto(message.explanation),
    )


def model_info_to_proto(info: ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(
        name=info.name,
        family=info.family,
        architecture=info.architecture,
        hidden_size=info.hidden_size,
        num_layers=info.num_layers,
        vocab_size=info.vocab_size,
        dtype=info.dtype,
        device=info.device,
        load_seconds=info.load_seconds,
        max_positions=info.max_positions,
        source=info.source,
        is_default=info.is_default,
        loaded=info.loaded,
        state=_MODEL_STATE.to_pb(info.state),
        state_detail=info.state_detail,
    )


def model_info_from_proto(message: pb.ModelInfo) -> ModelInfo:
    try:
        state = _MODEL_STATE.from_pb(message.state, "state")
    except OptionError:  # a newer server's state
        state = ModelState.UNSPECIFIED
    return ModelInfo(
        name=message.name,
        family=message.family,
        architecture=message.architecture,
        hidden_size=message.hidden_size,
        num_layers=message.num_layers,
        vocab_size=message.vocab_size,
        dtype=message.dtype,
        device=message.device,
        load_seconds=message.load_seconds,
        max_positions=message.max_positions,
        source=message.source,
        is_default=message.is_default,
        loaded=message.loaded,
        state=state,
        state_detail=message.state_detail,
    )
