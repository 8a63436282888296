"""The one mapping between the contract's dataclasses and its protobuf messages, in both directions.

The server encodes what the engine returns with the ``*_to_proto`` functions and decodes requests with the
``*_from_proto`` ones; the SDK does the opposite with the same functions. Each enum has one table here, and an
option left unset on the wire takes the dataclass default (``linlens.contract.options``), so defaults have one home
too. Decoding a request raises :class:`~linlens.contract.options.OptionError` for values the dataclasses refuse.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

import numpy as np

from linlens.contract.options import (
    AttributionTarget,
    ConceptMap,
    ConceptSpec,
    ExplainMethod,
    ExplainOptions,
    GateMode,
    LayerAnalysisOptions,
    OptionError,
    PositionSelection,
    Precision,
    SingularSide,
    Steering,
    SteeringPositions,
)
from linlens.contract.results import (
    Attribution,
    ComponentContribution,
    ConceptVector,
    ExplainResult,
    Explanation,
    ExplanationProgress,
    FinishReason,
    FloatArray,
    GeneratedToken,
    Generation,
    GenerationDone,
    LayerAttributions,
    LayerResult,
    LinearMapSpectrum,
    ModelInfo,
    ModelState,
    OrdinaryContrast,
    PositionSpectrum,
    PredictedToken,
    Reconstruction,
    SingularComponent,
    StreamEvent,
    Timings,
    TokenScore,
    Usage,
)
from linlens.contract.tensors import array_from_tensor, tensor_from_array
from linlens.v1 import linlens_pb2 as pb

E = TypeVar("E", bound=enum.Enum)


class _EnumTable(Generic[E]):
    """A Python enum and its protobuf enum, both ways. Unspecified (0) decodes to ``default``."""

    def __init__(self, name: str, pairs: dict[E, int], default: E) -> None:
        self.name = name
        self._to_pb = pairs
        self._from_pb = {number: member for member, number in pairs.items()}
        self._default = default

    def to_pb(self, member: E) -> Any:
        return self._to_pb[member]

    def from_pb(self, number: int, field: str) -> E:
        if number == 0:
            return self._default
        try:
            return self._from_pb[number]
        except KeyError:
            raise OptionError(field, f"{number} is not a known {self.name} value") from None


_PRECISION = _EnumTable(
    "Precision",
    {
        Precision.FLOAT32: pb.PRECISION_FLOAT32,
        Precision.FLOAT64: pb.PRECISION_FLOAT64,
        Precision.BFLOAT16: pb.PRECISION_BFLOAT16,
    },
    Precision.FLOAT32,
)
_GATE_MODE = _EnumTable(
    "GateMode",
    {GateMode.FREEZE_GATE: pb.GATE_MODE_FREEZE_GATE, GateMode.FREEZE_UP: pb.GATE_MODE_FREEZE_UP},
    GateMode.FREEZE_GATE,
)
_POSITIONS = _EnumTable(
    "PositionSelection",
    {
        PositionSelection.LAST: pb.POSITION_SELECTION_LAST,
        PositionSelection.ALL: pb.POSITION_SELECTION_ALL,
        PositionSelection.LIST: pb.POSITION_SELECTION_LIST,
    },
    PositionSelection.LAST,
)
_METHOD = _EnumTable(
    "ExplainMethod",
    {
        ExplainMethod.AUTO: pb.EXPLAIN_METHOD_AUTO,
        ExplainMethod.FULL: pb.EXPLAIN_METHOD_FULL,
        ExplainMethod.MATRIX_FREE: pb.EXPLAIN_METHOD_MATRIX_FREE,
    },
    ExplainMethod.AUTO,
)
_FINISH = _EnumTable(
    "FinishReason",
    {
        FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
        FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
        FinishReason.EOS: pb.FINISH_REASON_EOS,
        FinishReason.CONTEXT_LENGTH: pb.FINISH_REASON_CONTEXT_LENGTH,
        FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
        FinishReason.UNSPECIFIED: pb.FINISH_REASON_UNSPECIFIED,
    },
    FinishReason.UNSPECIFIED,
)
_MODEL_STATE = _EnumTable(
    "ModelState",
    {
        ModelState.LOADING: pb.MODEL_STATE_LOADING,
        ModelState.READY: pb.MODEL_STATE_READY,
        ModelState.FAILED: pb.MODEL_STATE_FAILED,
        ModelState.UNSPECIFIED: pb.MODEL_STATE_UNSPECIFIED,
    },
    ModelState.UNSPECIFIED,
)
_CONCEPT_MAP = _EnumTable(
    "ConceptMap", {ConceptMap.OUTPUT: pb.CONCEPT_MAP_OUTPUT, ConceptMap.LAYER: pb.CONCEPT_MAP_LAYER}, ConceptMap.OUTPUT
)
_SIDE = _EnumTable(
    "SingularSide",
    {SingularSide.LEFT: pb.SINGULAR_SIDE_LEFT, SingularSide.RIGHT: pb.SINGULAR_SIDE_RIGHT},
    SingularSide.LEFT,
)
_STEERING_POSITIONS = _EnumTable(
    "SteeringPositions",
    {
        SteeringPositions.PROMPT: pb.STEERING_POSITIONS_PROMPT,
        SteeringPositions.GENERATED: pb.STEERING_POSITIONS_GENERATED,
        SteeringPositions.ALL: pb.STEERING_POSITIONS_ALL,
    },
    SteeringPositions.ALL,
)
_COMPONENT = {"attention": pb.LAYER_COMPONENT_ATTENTION, "mlp": pb.LAYER_COMPONENT_MLP}
_COMPONENT_FROM_PB = {number: name for name, number in _COMPONENT.items()}
_STEPS = {"first": pb.EXPLAIN_STEPS_FIRST, "all": pb.EXPLAIN_STEPS_ALL}


def _unsigned(field: str, value: int) -> int:
    """A value for an unsigned wire field; negative ones get a message naming the field, not protobuf's."""
    if value < 0:
        raise OptionError(field, f"must be >= 0 (it is unsigned on the wire), got {value}")
    return int(value)


def _doubles(values: Sequence[float]) -> FloatArray:
    array: FloatArray = np.array(values, dtype=np.float64)
    array.flags.writeable = False
    return array


def _double_list(values: Any) -> list[float]:
    return [float(v) for v in np.asarray(values).ravel()]


# ----------------------------------------------------------------------------------------------------------------
# Request options
# ----------------------------------------------------------------------------------------------------------------


def layer_options_to_proto(options: LayerAnalysisOptions) -> pb.LayerAnalysisOptions:
    message = pb.LayerAnalysisOptions(
        up_to_layer=options.up_to_layer,
        layer_alone=options.layer_alone,
        component_spectra=options.component_spectra,
        top_k=_unsigned("layers.top_k", options.top_k),
        tokens_per_vector=_unsigned("layers.tokens_per_vector", options.tokens_per_vector),
    )
    if options.layers != "all":
        message.layers.extend(options.layers)
    if options.every is not None:
        message.every = options.every
    return message


def layer_options_from_proto(message: pb.LayerAnalysisOptions) -> LayerAnalysisOptions:
    """Unset fields take the dataclass defaults; an empty ``layers`` and ``every`` 0 mean "all"."""
    fields: dict[str, Any] = {
        "layer_alone": message.layer_alone,
        "component_spectra": message.component_spectra,
    }
    if message.layers:
        fields["layers"] = tuple(message.layers)
    if message.every:
        fields["every"] = message.every
    for name in ("up_to_layer", "top_k", "tokens_per_vector"):
        if message.HasField(name):
            fields[name] = getattr(message, name)
    try:
        return LayerAnalysisOptions(**fields)
    except OptionError as error:
        raise error.under("layers") from None


def explain_options_to_proto(options: ExplainOptions) -> pb.ExplainOptions:
    message = pb.ExplainOptions(
        top_k=_unsigned("top_k", options.top_k),
        tokens_per_vector=_unsigned("tokens_per_vector", options.tokens_per_vector),
        positions=_POSITIONS.to_pb(options.positions),
        include_jacobians=options.include_jacobians,
        precision=_PRECISION.to_pb(options.precision),
        ordinary_contrast=options.ordinary_contrast,
        gate_mode=_GATE_MODE.to_pb(options.gate_mode),
        method=_METHOD.to_pb(options.method),
        position_indices=list(options.position_indices),
        prompt_spectrum=options.prompt_spectrum,
    )
    if isinstance(options.steps, str):
        message.steps = _STEPS[options.steps]
    else:
        message.steps = pb.EXPLAIN_STEPS_LIST
        message.step_indices.extend(options.steps)
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


def explain_options_from_proto(message: pb.ExplainOptions) -> ExplainOptions:
    """The options a request asked for; unset fields take the dataclass defaults. Raises OptionError."""
    steps: Any
    if message.steps in (pb.EXPLAIN_STEPS_UNSPECIFIED, pb.EXPLAIN_STEPS_FIRST):
        steps = "first"
    elif message.steps == pb.EXPLAIN_STEPS_ALL:
        steps = "all"
    elif message.steps == pb.EXPLAIN_STEPS_LIST:
        steps = tuple(message.step_indices)
    else:
        raise OptionError("steps", f"{message.steps} is not a known ExplainSteps value")
    fields: dict[str, Any] = {
        "steps": steps,
        "positions": _POSITIONS.from_pb(message.positions, "positions"),
        "include_jacobians": message.include_jacobians,
        "precision": _PRECISION.from_pb(message.precision, "precision"),
        "ordinary_contrast": message.ordinary_contrast,
        "gate_mode": _GATE_MODE.from_pb(message.gate_mode, "gate_mode"),
        "method": _METHOD.from_pb(message.method, "method"),
        "position_indices": tuple(message.position_indices),
        "prompt_spectrum": message.prompt_spectrum,
        "targets": tuple(
            (t.token_id, t.contrast_token_id if t.HasField("contrast_token_id") else None) for t in message.targets
        ),
    }
    for name in ("top_k", "tokens_per_vector", "explained_token_id", "vjp_chunk_size"):
        if message.HasField(name):
            fields[name] = getattr(message, name)
    if message.HasField("layers"):
        fields["layers"] = layer_options_from_proto(message.layers)
    return ExplainOptions(**fields)


def concept_spec_to_proto(spec: ConceptSpec) -> pb.ConceptSpec:
    message = pb.ConceptSpec(map=_CONCEPT_MAP.to_pb(spec.map), side=_SIDE.to_pb(spec.side), rank=spec.rank)
    if isinstance(spec.prompt, str):
        message.prompt.text = spec.prompt
    else:
        message.prompt.token_ids.ids.extend(spec.prompt)
    if spec.layer is not None:
        message.layer = spec.layer
    return message


def concept_spec_from_proto(message: pb.ConceptSpec) -> ConceptSpec:
    """The spec a request asked for (unset fields take the dataclass defaults). Raises OptionError."""
    kind = message.prompt.WhichOneof("kind")
    prompt: str | tuple[int, ...]
    if kind == "text":
        prompt = message.prompt.text
    elif kind == "token_ids":
        prompt = tuple(message.prompt.token_ids.ids)
    elif kind == "chat":
        raise OptionError("prompt", "is a chat: give the concept prompt as text or token ids")
    else:
        raise OptionError("prompt", "is missing: give the concept prompt as text or token ids")
    fields: dict[str, Any] = {
        "prompt": prompt,
        "map": _CONCEPT_MAP.from_pb(message.map, "map"),
        "side": _SIDE.from_pb(message.side, "side"),
    }
    for name in ("layer", "rank"):
        if message.HasField(name):
            fields[name] = getattr(message, name)
    return ConceptSpec(**fields)


def steering_to_proto(steering: Steering) -> pb.Steering:
    message = pb.Steering(strength=steering.strength, positions=_STEERING_POSITIONS.to_pb(steering.positions))
    if steering.concept is not None:
        message.concept_prompt.CopyFrom(concept_spec_to_proto(steering.concept))
    else:
        message.vector.CopyFrom(tensor_from_array(np.asarray(steering.vector, dtype=np.float32)))
    if steering.layer is not None:
        message.layer = steering.layer
    return message


def steering_from_proto(message: pb.Steering) -> Steering:
    """The steering a request asked for; OptionError names the field below ``steering`` (e.g. ``vector``)."""
    fields: dict[str, Any] = {"positions": _STEERING_POSITIONS.from_pb(message.positions, "positions")}
    kind = message.WhichOneof("concept")
    if kind == "concept_prompt":
        try:
            fields["concept"] = concept_spec_from_proto(message.concept_prompt)
        except OptionError as error:
            raise error.under("concept_prompt") from None
    elif kind == "vector":
        try:
            fields["vector"] = array_from_tensor(message.vector)
        except ValueError as error:
            raise OptionError("vector", f"is not a valid tensor: {error}") from None
    else:
        raise OptionError("concept", "is missing: set concept_prompt or vector")
    if message.HasField("layer"):
        fields["layer"] = message.layer
    if message.HasField("strength"):
        fields["strength"] = message.strength
    return Steering(**fields)


def concept_vector_to_proto(concept: ConceptVector) -> pb.ComputeConceptResponse:
    message = pb.ComputeConceptResponse(
        model=concept.model,
        vector=tensor_from_array(concept.vector),
        singular_value=concept.singular_value,
        tokens=[_token_score_to_proto(t) for t in concept.tokens],
        map=_CONCEPT_MAP.to_pb(concept.map),
        rank=concept.rank,
        side=_SIDE.to_pb(concept.side),
        prompt_text=concept.prompt_text,
    )
    if concept.layer is not None:
        message.layer = concept.layer
    return message


def concept_vector_from_proto(message: pb.ComputeConceptResponse) -> ConceptVector:
    return ConceptVector(
        model=message.model,
        vector=array_from_tensor(message.vector),
        singular_value=message.singular_value,
        tokens=tuple(_token_score_from_proto(t) for t in message.tokens),
        map=_CONCEPT_MAP.from_pb(message.map, "map"),
        layer=message.layer if message.HasField("layer") else None,
        rank=message.rank,
        side=_SIDE.from_pb(message.side, "side"),
        prompt_text=message.prompt_text,
    )


# ----------------------------------------------------------------------------------------------------------------
# Explanations
# ----------------------------------------------------------------------------------------------------------------


def timings_to_proto(timings: Timings) -> pb.Timings:
    return pb.Timings(**{name: getattr(timings, name) for name in pb.Timings.DESCRIPTOR.fields_by_name})


def timings_from_proto(message: pb.Timings) -> Timings:
    return Timings(**{name: getattr(message, name) for name in pb.Timings.DESCRIPTOR.fields_by_name})


def _token_score_to_proto(score: TokenScore) -> pb.TokenScore:
    return pb.TokenScore(token_id=score.token_id, text=score.text, score=score.score)


def _token_score_from_proto(message: pb.TokenScore) -> TokenScore:
    return TokenScore(token_id=message.token_id, text=message.text, score=message.score)


def predicted_to_proto(token: PredictedToken) -> pb.PredictedToken:
    return pb.PredictedToken(token_id=token.token_id, text=token.text, logit=token.logit, probability=token.probability)


def predicted_from_proto(message: pb.PredictedToken) -> PredictedToken:
    return PredictedToken(
        token_id=message.token_id, text=message.text, logit=message.logit, probability=message.probability
    )


def _target_to_proto(target: AttributionTarget) -> pb.AttributionTarget:
    message = pb.AttributionTarget(token_id=target.token_id)
    if target.contrast_token_id is not None:
        message.contrast_token_id = target.contrast_token_id
    return message


def _target_from_proto(message: pb.AttributionTarget) -> AttributionTarget:
    contrast = message.contrast_token_id if message.HasField("contrast_token_id") else None
    return AttributionTarget(token_id=message.token_id, contrast_token_id=contrast)


def _singular_to_proto(c: SingularComponent) -> pb.SingularComponent:
    return pb.SingularComponent(
        rank=c.rank,
        value=c.value,
        left=tensor_from_array(c.left),
        right=tensor_from_array(c.right),
        left_tokens=[_token_score_to_proto(t) for t in c.left_tokens],
        right_tokens=[_token_score_to_proto(t) for t in c.right_tokens],
        residual_left=c.residual_left,
        residual_right=c.residual_right,
    )


def _singular_from_proto(message: pb.SingularComponent) -> SingularComponent:
    return SingularComponent(
        rank=message.rank,
        value=message.value,
        left=array_from_tensor(message.left),
        right=array_from_tensor(message.right),
        left_tokens=tuple(_token_score_from_proto(t) for t in message.left_tokens),
        right_tokens=tuple(_token_score_from_proto(t) for t in message.right_tokens),
        residual_left=message.residual_left,
        residual_right=message.residual_right,
    )


def _position_spectrum_to_proto(s: PositionSpectrum) -> pb.PositionSpectrum:
    return pb.PositionSpectrum(
        position=s.position,
        token_id=s.token_id,
        token_text=s.token_text,
        components=[_singular_to_proto(c) for c in s.components],
        singular_values=tensor_from_array(s.singular_values),
        captured_share=list(s.captured_share),
        stable_rank=s.stable_rank,
        term_norm=s.term_norm,
        singular_values_complete=s.singular_values_complete,
        stable_rank_error=s.stable_rank_error,
    )


def _position_spectrum_from_proto(message: pb.PositionSpectrum) -> PositionSpectrum:
    return PositionSpectrum(
        position=message.position,
        token_id=message.token_id,
        token_text=message.token_text,
        components=tuple(_singular_from_proto(c) for c in message.components),
        singular_values=array_from_tensor(message.singular_values),
        captured_share=tuple(message.captured_share),
        stable_rank=message.stable_rank,
        term_norm=message.term_norm,
        singular_values_complete=message.singular_values_complete,
        stable_rank_error=message.stable_rank_error,
    )


def _linear_map_to_proto(s: LinearMapSpectrum) -> pb.LinearMapSpectrum:
    return pb.LinearMapSpectrum(
        components=[_singular_to_proto(c) for c in s.components],
        singular_values=tensor_from_array(s.singular_values),
        captured_share=list(s.captured_share),
        stable_rank=s.stable_rank,
        term_norm=s.term_norm,
        reconstruction_error=s.reconstruction_error,
        singular_values_complete=s.singular_values_complete,
        stable_rank_error=s.stable_rank_error,
    )


def _linear_map_from_proto(message: pb.LinearMapSpectrum) -> LinearMapSpectrum:
    return LinearMapSpectrum(
        components=tuple(_singular_from_proto(c) for c in message.components),
        singular_values=array_from_tensor(message.singular_values),
        captured_share=tuple(message.captured_share),
        stable_rank=message.stable_rank,
        term_norm=message.term_norm,
        reconstruction_error=message.reconstruction_error,
        singular_values_complete=message.singular_values_complete,
        stable_rank_error=message.stable_rank_error,
    )


def _contribution_to_proto(c: ComponentContribution) -> pb.ComponentContribution:
    message = pb.ComponentContribution(
        layer=c.layer,
        component=_COMPONENT[c.component],
        logit=c.logit,
        per_token=_double_list(c.per_token),
        constant=c.constant,
        y_norm=c.y_norm,
        y_share=c.y_share,
    )
    if c.spectrum is not None:
        message.spectrum.CopyFrom(_linear_map_to_proto(c.spectrum))
    return message


def _contribution_from_proto(message: pb.ComponentContribution) -> ComponentContribution:
    component = _COMPONENT_FROM_PB.get(message.component)
    if component is None:
        raise ValueError(f"ComponentContribution.component {message.component} is not attention or mlp")
    return ComponentContribution(
        layer=message.layer,
        component=component,  # type: ignore[arg-type]  # one of the table's two names
        logit=message.logit,
        per_token=_doubles(message.per_token),
        constant=message.constant,
        y_norm=message.y_norm,
        y_share=message.y_share,
        spectrum=_linear_map_from_proto(message.spectrum) if message.HasField("spectrum") else None,
    )


def layer_attributions_to_proto(a: LayerAttributions) -> pb.LayerAttributions:
    return pb.LayerAttributions(
        step=a.step,
        explained=predicted_to_proto(a.explained),
        input_tokens=list(a.input_tokens),
        attention=tensor_from_array(a.attention),
        mlp=tensor_from_array(a.mlp),
        per_layer=tensor_from_array(a.per_layer),
        direct=tensor_from_array(a.direct),
        attention_logits=tensor_from_array(a.attention_logits),
        mlp_logits=tensor_from_array(a.mlp_logits),
        logit=a.logit,
        completeness_error=a.completeness_error,
        decomposition_error=a.decomposition_error,
        constant=a.constant,
    )


def layer_attributions_from_proto(message: pb.LayerAttributions) -> LayerAttributions:
    return LayerAttributions(
        step=message.step,
        explained=predicted_from_proto(message.explained),
        input_tokens=tuple(message.input_tokens),
        attention=array_from_tensor(message.attention),
        mlp=array_from_tensor(message.mlp),
        per_layer=array_from_tensor(message.per_layer),
        direct=array_from_tensor(message.direct),
        attention_logits=array_from_tensor(message.attention_logits),
        mlp_logits=array_from_tensor(message.mlp_logits),
        logit=message.logit,
        completeness_error=message.completeness_error,
        decomposition_error=message.decomposition_error,
        constant=message.constant,
    )


def layer_result_to_proto(r: LayerResult) -> pb.LayerResult:
    message = pb.LayerResult(
        step=r.step,
        layer=r.layer,
        attention=_contribution_to_proto(r.attention),
        mlp=_contribution_to_proto(r.mlp),
        duration_ms=r.duration_ms,
        vjp_count=r.vjp_count,
    )
    if r.up_to_layer is not None:
        message.up_to_layer.CopyFrom(_linear_map_to_proto(r.up_to_layer))
    if r.layer_alone is not None:
        message.layer_alone.CopyFrom(_linear_map_to_proto(r.layer_alone))
    return message


def layer_result_from_proto(message: pb.LayerResult) -> LayerResult:
    return LayerResult(
        step=message.step,
        layer=message.layer,
        up_to_layer=_linear_map_from_proto(message.up_to_layer) if message.HasField("up_to_layer") else None,
        layer_alone=_linear_map_from_proto(message.layer_alone) if message.HasField("layer_alone") else None,
        attention=_contribution_from_proto(message.attention),
        mlp=_contribution_from_proto(message.mlp),
        duration_ms=message.duration_ms,
        vjp_count=message.vjp_count,
    )


def explanation_to_proto(e: Explanation) -> pb.Explanation:
    """The Explanation message, its layer analysis (if any) included."""
    message = pb.Explanation(
        step=e.step,
        input_ids=list(e.input_ids),
        input_tokens=list(e.input_tokens),
        predicted=predicted_to_proto(e.predicted),
        explained=predicted_to_proto(e.explained),
        y=tensor_from_array(e.y),
        constant=tensor_from_array(e.constant),
        has_bias=e.has_bias,
        attributions=[
            pb.Attribution(
                target=_target_to_proto(a.target),
                label=a.label,
                per_token=_double_list(a.per_token),
                constant=a.constant,
                total=a.total,
                completeness_error=a.completeness_error,
            )
            for a in e.attributions
        ],
        spectra=[_position_spectrum_to_proto(s) for s in e.spectra],
        truncated_relative_error=list(e.truncated_relative_error),
        precision=_PRECISION.to_pb(e.precision),
        gate_mode=_GATE_MODE.to_pb(e.gate_mode),
        vjp_count=e.vjp_count,
        timings=timings_to_proto(e.timings),
        layers=[layer_result_to_proto(r) for r in e.layers],
        method=_METHOD.to_pb(e.method) if e.method is not None else pb.EXPLAIN_METHOD_UNSPECIFIED,
        jvp_count=e.jvp_count,
    )
    if e.reconstruction is not None:
        r = e.reconstruction
        message.reconstruction.CopyFrom(
            pb.Reconstruction(
                relative_error_vs_model=r.relative_error_vs_model,
                relative_error_vs_detached=r.relative_error_vs_detached,
                max_abs_logit_error=r.max_abs_logit_error,
                predicts_same_token=r.predicts_same_token,
                linear_token_id=r.linear_token_id,
            )
        )
    if e.jacobians is not None:
        message.jacobians.CopyFrom(tensor_from_array(e.jacobians))
    if e.ordinary is not None:
        message.ordinary.CopyFrom(
            pb.OrdinaryContrast(
                relative_error_vs_model=e.ordinary.relative_error_vs_model,
                predicts_same_token=e.ordinary.predicts_same_token,
            )
        )
    if e.layer_attributions is not None:
        message.layer_attributions.CopyFrom(layer_attributions_to_proto(e.layer_attributions))
    if e.prompt_spectrum is not None:
        message.prompt_spectrum.CopyFrom(_linear_map_to_proto(e.prompt_spectrum))
    return message


def explanation_from_proto(message: pb.Explanation) -> Explanation:
    """The Explanation (tensors decoded to read-only numpy arrays), its layer analysis (if any) included."""
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
        predicted=predicted_from_proto(message.predicted),
        explained=predicted_from_proto(message.explained),
        y=array_from_tensor(message.y),
        constant=array_from_tensor(message.constant),
        has_bias=message.has_bias,
        reconstruction=reconstruction,
        attributions=tuple(
            Attribution(
                target=_target_from_proto(a.target),
                label=a.label,
                per_token=_doubles(a.per_token),
                constant=a.constant,
                total=a.total,
                completeness_error=a.completeness_error,
            )
            for a in message.attributions
        ),
        spectra=tuple(_position_spectrum_from_proto(s) for s in message.spectra),
        truncated_relative_error=tuple(message.truncated_relative_error),
        jacobians=array_from_tensor(message.jacobians) if message.HasField("jacobians") else None,
        ordinary=ordinary,
        precision=_PRECISION.from_pb(message.precision, "precision"),
        gate_mode=_GATE_MODE.from_pb(message.gate_mode, "gate_mode"),
        timings=timings_from_proto(message.timings),
        vjp_count=message.vjp_count,
        layer_attributions=(
            layer_attributions_from_proto(message.layer_attributions)
            if message.HasField("layer_attributions")
            else None
        ),
        layers=tuple(layer_result_from_proto(r) for r in message.layers),
        method=_METHOD.from_pb(message.method, "method") if message.method else None,
        jvp_count=message.jvp_count,
        prompt_spectrum=(
            _linear_map_from_proto(message.prompt_spectrum) if message.HasField("prompt_spectrum") else None
        ),
    )


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


__all__ = [
    "concept_spec_from_proto",
    "concept_spec_to_proto",
    "concept_vector_from_proto",
    "concept_vector_to_proto",
    "explain_options_from_proto",
    "explain_options_to_proto",
    "explain_result_from_proto",
    "explain_result_to_proto",
    "explain_stream_event_from_proto",
    "explanation_from_proto",
    "explanation_to_proto",
    "finish_reason_from_proto",
    "generated_token_from_proto",
    "generated_token_to_proto",
    "generation_from_proto",
    "generation_to_proto",
    "layer_attributions_from_proto",
    "layer_attributions_to_proto",
    "layer_options_from_proto",
    "layer_options_to_proto",
    "layer_result_from_proto",
    "layer_result_to_proto",
    "model_info_from_proto",
    "model_info_to_proto",
    "predicted_from_proto",
    "predicted_to_proto",
    "progress_from_proto",
    "progress_to_proto",
    "steering_from_proto",
    "steering_to_proto",
    "stream_event_from_proto",
    "stream_event_to_proto",
    "timings_from_proto",
    "timings_to_proto",
]
