"""Results, both ways: explanations, generations, concepts, model information (mirrors ``contract/results.py``)."""

from __future__ import annotations

from linlens.contract.options import (
    AttributionTarget,
)
from linlens.contract.results import (
    Attribution,
    ComponentContribution,
    ConceptVector,
    Explanation,
    LayerAttributions,
    LayerResult,
    LinearMapSpectrum,
    OrdinaryContrast,
    PositionSpectrum,
    PredictedToken,
    Reconstruction,
    SingularComponent,
    Timings,
    TokenScore,
)
from linlens.contract.tensors import array_from_tensor, tensor_from_array
from linlens.contract.wire.enums import (
    _COMPONENT,
    _COMPONENT_FROM_PB,
    _CONCEPT_MAP,
    _GATE_MODE,
    _METHOD,
    _PRECISION,
    _SIDE,
    _double_list,
    _doubles,
)
from linlens.v1 import linlens_pb2 as pb


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
