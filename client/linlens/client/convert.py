"""Mapping between the contract's protobuf messages and the client's dataclasses.

Kept apart from the transport so that the sync and async clients share one implementation, and so that it can be
tested without a server. Request builders validate what the client can know locally (exactly one input form, sane
sampling values) and raise ValueError/TypeError; everything model-dependent is the server's to reject.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TypeAlias

import numpy as np

from linlens.client.tensors import array_from_tensor, tensor_from_array
from linlens.client.types import (
    Attribution,
    AttributionTarget,
    ChatMessage,
    ComponentContribution,
    ExplainOptions,
    ExplainResult,
    Explanation,
    FinishReason,
    FloatArray,
    GateMode,
    GeneratedToken,
    Generation,
    GenerationDone,
    LayerAnalysisOptions,
    LayerAttributions,
    LayerResult,
    LinearMapSpectrum,
    ModelInfo,
    OrdinaryContrast,
    PositionSelection,
    PositionSpectrum,
    Precision,
    PredictedToken,
    Reconstruction,
    SingularComponent,
    StreamEvent,
    Timings,
    TokenScore,
    Usage,
)
from linlens.v1 import linlens_pb2 as pb

#: What ``messages=`` accepts: ChatMessage objects, {"role": ..., "content": ...} mappings or (role, content) pairs.
MessageLike: TypeAlias = ChatMessage | Mapping[str, str] | tuple[str, str]

_PRECISION_TO_PB = {
    Precision.FLOAT32: pb.PRECISION_FLOAT32,
    Precision.FLOAT64: pb.PRECISION_FLOAT64,
    Precision.BFLOAT16: pb.PRECISION_BFLOAT16,
}
_PRECISION_FROM_PB: dict[int, Precision] = {value: key for key, value in _PRECISION_TO_PB.items()}
_GATE_TO_PB = {GateMode.FREEZE_GATE: pb.GATE_MODE_FREEZE_GATE, GateMode.FREEZE_UP: pb.GATE_MODE_FREEZE_UP}
_GATE_FROM_PB: dict[int, GateMode] = {value: key for key, value in _GATE_TO_PB.items()}
_POSITIONS_TO_PB = {
    PositionSelection.LAST: pb.POSITION_SELECTION_LAST,
    PositionSelection.ALL: pb.POSITION_SELECTION_ALL,
}
_FINISH_FROM_PB: dict[int, FinishReason] = {
    pb.FINISH_REASON_UNSPECIFIED: FinishReason.UNSPECIFIED,
    pb.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    pb.FINISH_REASON_STOP_SEQUENCE: FinishReason.STOP_SEQUENCE,
    pb.FINISH_REASON_EOS: FinishReason.EOS,
    pb.FINISH_REASON_CONTEXT_LENGTH: FinishReason.CONTEXT_LENGTH,
    pb.FINISH_REASON_CANCELLED: FinishReason.CANCELLED,
}


# ----------------------------------------------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------------------------------------------


def _chat_message(message: MessageLike) -> pb.ChatMessage:
    if isinstance(message, ChatMessage):
        return pb.ChatMessage(role=message.role, content=message.content)
    if isinstance(message, Mapping):
        try:
            return pb.ChatMessage(role=str(message["role"]), content=str(message["content"]))
        except KeyError as exc:
            raise ValueError(f"chat message mapping needs 'role' and 'content', got keys {sorted(message)}") from exc
    if isinstance(message, tuple) and len(message) == 2:
        return pb.ChatMessage(role=str(message[0]), content=str(message[1]))
    raise TypeError(f"cannot use {message!r} as a chat message")


def build_input(
    prompt: str | None = None,
    token_ids: Sequence[int] | None = None,
    messages: Sequence[MessageLike] | None = None,
    *,
    add_generation_prompt: bool = True,
) -> pb.Input:
    """The Input message for exactly one of prompt text, token ids or chat messages."""
    given = [
        name
        for name, value in (("prompt", prompt), ("token_ids", token_ids), ("messages", messages))
        if value is not None
    ]
    if len(given) != 1:
        raise ValueError(f"pass exactly one of prompt, token_ids or messages (got {', '.join(given) or 'none'})")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, not {type(prompt).__name__}")
        return pb.Input(text=prompt)
    if token_ids is not None:
        if isinstance(token_ids, (str, bytes)):
            raise TypeError("token_ids must be a sequence of ints")
        return pb.Input(token_ids=pb.TokenIds(ids=[int(i) for i in token_ids]))
    assert messages is not None
    if isinstance(messages, (str, bytes)):
        raise TypeError("messages must be a sequence of chat messages")
    return pb.Input(
        chat=pb.ChatConversation(
            messages=[_chat_message(m) for m in messages], omit_generation_prompt=not add_generation_prompt
        )
    )


def build_sampling(
    *,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    ignore_eos: bool = False,
) -> pb.SamplingParams:
    """SamplingParams from keyword arguments; None leaves the server default (greedy decoding, 16 tokens)."""
    sampling = pb.SamplingParams(ignore_eos=ignore_eos)
    if max_new_tokens is not None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        sampling.max_new_tokens = max_new_tokens
    if temperature is not None:
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        sampling.temperature = temperature
    if top_p is not None:
        if not 0 <= top_p <= 1:
            raise ValueError(f"top_p must lie in [0, 1], got {top_p}")
        sampling.top_p = top_p
    if top_k is not None:
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        sampling.top_k = top_k
    if seed is not None:
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        sampling.seed = seed
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else list(stop)
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        sampling.stop_sequences.extend(stops)
    return sampling


def explain_options_to_proto(options: ExplainOptions) -> pb.ExplainOptions:
    """The ExplainOptions message for the client-side options."""
    message = pb.ExplainOptions(
        positions=_POSITIONS_TO_PB[options.positions],
        include_jacobians=options.include_jacobians,
        precision=_PRECISION_TO_PB[options.precision],
        ordinary_contrast=options.ordinary_contrast,
        gate_mode=_GATE_TO_PB[options.gate_mode],
    )
    if options.steps == "first":
        message.steps = pb.EXPLAIN_STEPS_FIRST
    elif options.steps == "all":
        message.steps = pb.EXPLAIN_STEPS_ALL
    else:
        message.steps = pb.EXPLAIN_STEPS_LIST
        message.step_indices.extend(options.steps)
    if options.top_k is not None:
        message.top_k = options.top_k
    if options.tokens_per_vector is not None:
        message.tokens_per_vector = options.tokens_per_vector
    if options.explained_token_id is not None:
        message.explained_token_id = options.explained_token_id
    if options.vjp_chunk_size is not None:
        message.vjp_chunk_size = options.vjp_chunk_size
    for target in options.attribution_targets:
        entry = message.targets.add(token_id=target.token_id)
        if target.contrast_token_id is not None:
            entry.contrast_token_id = target.contrast_token_id
    if options.layers is not None:
        message.layers.CopyFrom(layer_options_to_proto(options.layers))
    return message


def layer_options_to_proto(options: LayerAnalysisOptions) -> pb.LayerAnalysisOptions:
    """The LayerAnalysisOptions message (explicit layers, every k-th, or all when neither is set)."""
    message = pb.LayerAnalysisOptions(
        up_to_layer=options.up_to_layer,
        layer_alone=options.layer_alone,
        component_spectra=options.component_spectra,
    )
    if options.layers != "all":
        message.layers.extend(options.layers)
    if options.every is not None:
        message.every = options.every
    if options.top_k is not None:
        message.top_k = options.top_k
    if options.tokens_per_vector is not None:
        message.tokens_per_vector = options.tokens_per_vector
    return message


def resolve_explain(explain: ExplainOptions | bool | None) -> ExplainOptions | None:
    """``explain=`` accepts options, True (all defaults) or False/None (no explanation)."""
    if explain is None or explain is False:
        return None
    if explain is True:
        return ExplainOptions()
    if isinstance(explain, ExplainOptions):
        return explain
    raise TypeError(f"explain must be ExplainOptions or a bool, not {type(explain).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# Responses
# ----------------------------------------------------------------------------------------------------------------


def _array(message: pb.Tensor) -> FloatArray:
    return array_from_tensor(message)


def timings_from_proto(message: pb.Timings) -> Timings:
    return Timings(
        queue_ms=message.queue_ms,
        generation_ms=message.generation_ms,
        forward_ms=message.forward_ms,
        jacobian_ms=message.jacobian_ms,
        attribution_ms=message.attribution_ms,
        svd_ms=message.svd_ms,
        decode_ms=message.decode_ms,
        ordinary_ms=message.ordinary_ms,
        total_ms=message.total_ms,
    )


def _token_score(message: pb.TokenScore) -> TokenScore:
    return TokenScore(token_id=message.token_id, text=message.text, score=message.score)


def _predicted(message: pb.PredictedToken) -> PredictedToken:
    return PredictedToken(
        token_id=message.token_id, text=message.text, logit=message.logit, probability=message.probability
    )


def _target(message: pb.AttributionTarget) -> AttributionTarget:
    contrast = message.contrast_token_id if message.HasField("contrast_token_id") else None
    return AttributionTarget(token_id=message.token_id, contrast_token_id=contrast)


def _attribution(message: pb.Attribution) -> Attribution:
    # The wire carries doubles; keep them (float64) rather than guess the precision the server computed in.
    per_token: FloatArray = np.array(message.per_token, dtype=np.float64)
    per_token.flags.writeable = False
    return Attribution(
        target=_target(message.target),
        label=message.label,
        per_token=per_token,
        constant=message.constant,
        total=message.total,
        completeness_error=message.completeness_error,
    )


def _component(message: pb.SingularComponent) -> SingularComponent:
    return SingularComponent(
        rank=message.rank,
        value=message.value,
        left=_array(message.left),
        right=_array(message.right),
        left_tokens=tuple(_token_score(t) for t in message.left_tokens),
        right_tokens=tuple(_token_score(t) for t in message.right_tokens),
    )


def _spectrum(message: pb.PositionSpectrum) -> PositionSpectrum:
    return PositionSpectrum(
        position=message.position,
        token_id=message.token_id,
        token_text=message.token_text,
        components=tuple(_component(c) for c in message.components),
        singular_values=_array(message.singular_values),
        captured_share=tuple(message.captured_share),
        stable_rank=message.stable_rank,
        term_norm=message.term_norm,
    )


def _doubles(values: Sequence[float]) -> FloatArray:
    array: FloatArray = np.array(values, dtype=np.float64)
    array.flags.writeable = False
    return array


def linear_map_from_proto(message: pb.LinearMapSpectrum) -> LinearMapSpectrum:
    return LinearMapSpectrum(
        components=tuple(_component(c) for c in message.components),
        singular_values=_array(message.singular_values),
        captured_share=tuple(message.captured_share),
        stable_rank=message.stable_rank,
        term_norm=message.term_norm,
        reconstruction_error=message.reconstruction_error,
    )


_LAYER_COMPONENT_FROM_PB: dict[int, str] = {pb.LAYER_COMPONENT_ATTENTION: "attention", pb.LAYER_COMPONENT_MLP: "mlp"}


def component_contribution_from_proto(message: pb.ComponentContribution) -> ComponentContribution:
    return ComponentContribution(
        layer=message.layer,
        component=_LAYER_COMPONENT_FROM_PB.get(message.component, "unspecified"),
        logit=message.logit,
        per_token=_doubles(message.per_token),
        constant=message.constant,
        y_norm=message.y_norm,
        y_share=message.y_share,
        spectrum=linear_map_from_proto(message.spectrum) if message.HasField("spectrum") else None,
    )


def layer_attributions_from_proto(message: pb.LayerAttributions) -> LayerAttributions:
    """The layers x tokens matrix (tensors decoded to read-only numpy arrays)."""
    return LayerAttributions(
        step=message.step,
        explained=_predicted(message.explained),
        input_tokens=tuple(message.input_tokens),
        attention=_array(message.attention),
        mlp=_array(message.mlp),
        per_layer=_array(message.per_layer),
        direct=_array(message.direct),
        attention_logits=_array(message.attention_logits),
        mlp_logits=_array(message.mlp_logits),
        logit=message.logit,
        completeness_error=message.completeness_error,
        decomposition_error=message.decomposition_error,
    )


def layer_result_from_proto(message: pb.LayerResult) -> LayerResult:
    return LayerResult(
        step=message.step,
        layer=message.layer,
        up_to_layer=linear_map_from_proto(message.up_to_layer) if message.HasField("up_to_layer") else None,
        layer_alone=linear_map_from_proto(message.layer_alone) if message.HasField("layer_alone") else None,
        attention=component_contribution_from_proto(message.attention),
        mlp=component_contribution_from_proto(message.mlp),
        duration_ms=message.duration_ms,
        vjp_count=message.vjp_count,
    )


def explanation_from_proto(message: pb.Explanation) -> Explanation:
    """The client-side Explanation for an Explanation message (tensors decoded to read-only numpy arrays)."""
    precision = _PRECISION_FROM_PB.get(message.precision, Precision.FLOAT32)
    reconstruction = None
    if message.HasField("reconstruction"):
        r = message.reconstruction
        reconstruction = Reconstruction(
            relative_error_vs_model=r.relative_error_vs_model,
            relative_error_vs_detached=r.relative_error_vs_detached,
            max_abs_logit_error=r.max_abs_logit_error,
            predicts_same_token=r.predicts_same_token,
            linear_token_id=r.linear_token_id,
        )
    ordinary = None
    if message.HasField("ordinary"):
        ordinary = OrdinaryContrast(
            relative_error_vs_model=message.ordinary.relative_error_vs_model,
            predicts_same_token=message.ordinary.predicts_same_token,
        )
    return Explanation(
        step=message.step,
        input_ids=tuple(message.input_ids),
        input_tokens=tuple(message.input_tokens),
        predicted=_predicted(message.predicted),
        explained=_predicted(message.explained),
        y=_array(message.y),
        constant=_array(message.constant),
        has_bias=message.has_bias,
        reconstruction=reconstruction,
        attributions=tuple(_attribution(a) for a in message.attributions),
        spectra=tuple(_spectrum(s) for s in message.spectra),
        truncated_relative_error=tuple(message.truncated_relative_error),
        jacobians=_array(message.jacobians) if message.HasField("jacobians") else None,
        ordinary=ordinary,
        precision=precision,
        gate_mode=_GATE_FROM_PB.get(message.gate_mode, GateMode.FREEZE_GATE),
        timings=timings_from_proto(message.timings),
        vjp_count=message.vjp_count,
        layer_attributions=(
            layer_attributions_from_proto(message.layer_attributions)
            if message.HasField("layer_attributions")
            else None
        ),
        layers=tuple(layer_result_from_proto(r) for r in message.layers),
    )


def _usage(message: pb.Usage) -> Usage:
    return Usage(
        prompt_tokens=message.prompt_tokens,
        completion_tokens=message.completion_tokens,
        explained_steps=message.explained_steps,
    )


def generated_token_from_proto(message: pb.GeneratedToken) -> GeneratedToken:
    return GeneratedToken(index=message.index, token_id=message.token_id, text=message.text, logprob=message.logprob)


def finish_reason_from_proto(value: int) -> FinishReason:
    return _FINISH_FROM_PB.get(value, FinishReason.UNSPECIFIED)


def generation_from_proto(message: pb.GenerateResponse) -> Generation:
    return Generation(
        model=message.model,
        text=message.text,
        tokens=tuple(generated_token_from_proto(t) for t in message.tokens),
        finish_reason=finish_reason_from_proto(message.finish_reason),
        usage=_usage(message.usage),
        explanations=tuple(explanation_from_proto(e) for e in message.explanations),
        timings=timings_from_proto(message.timings),
        prompt_text=message.prompt_text,
    )


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
    if kind == "done":
        done = message.done
        return GenerationDone(
            model=done.model,
            text=done.text,
            finish_reason=finish_reason_from_proto(done.finish_reason),
            usage=_usage(done.usage),
            timings=timings_from_proto(done.timings),
            prompt_text=done.prompt_text,
        )
    return None


def explain_result_from_proto(message: pb.ExplainResponse) -> ExplainResult:
    """The ExplainResult; a layer analysis (carried beside the explanation on the wire) is attached to it."""
    explanation = explanation_from_proto(message.explanation)
    if message.HasField("layer_attributions") or message.layers:
        explanation = dataclasses.replace(
            explanation,
            layer_attributions=(
                layer_attributions_from_proto(message.layer_attributions)
                if message.HasField("layer_attributions")
                else explanation.layer_attributions
            ),
            layers=tuple(layer_result_from_proto(r) for r in message.layers) or explanation.layers,
        )
    return ExplainResult(model=message.model, prompt_text=message.prompt_text, explanation=explanation)


def model_info_from_proto(message: pb.ModelInfo) -> ModelInfo:
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
    )


__all__ = [
    "MessageLike",
    "build_input",
    "build_sampling",
    "component_contribution_from_proto",
    "explain_options_to_proto",
    "explain_result_from_proto",
    "explanation_from_proto",
    "finish_reason_from_proto",
    "generated_token_from_proto",
    "generation_from_proto",
    "layer_attributions_from_proto",
    "layer_options_to_proto",
    "layer_result_from_proto",
    "linear_map_from_proto",
    "model_info_from_proto",
    "resolve_explain",
    "stream_event_from_proto",
    "tensor_from_array",
    "timings_from_proto",
]
