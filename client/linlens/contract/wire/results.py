"""Results, both ways: explanations, generations, concepts, model information (mirrors ``contract/results.py``).

Every field travels by name (``codec.Codec``): a new result field needs the proto and the dataclass only. Written
by hand is the one field whose wire form differs: a block's ``component`` (an enum on the wire, a name here).
"""

from __future__ import annotations

from typing import Any

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
from linlens.contract.wire.codec import Codec, same_names
from linlens.contract.wire.enums import _COMPONENT, _COMPONENT_FROM_PB
from linlens.v1 import linlens_pb2 as pb


def _write_component(c: ComponentContribution, message: pb.ComponentContribution) -> None:
    message.component = _COMPONENT[c.component]


def _read_component(message: pb.ComponentContribution) -> dict[str, Any]:
    component = _COMPONENT_FROM_PB.get(message.component)
    if component is None:
        raise ValueError(f"ComponentContribution.component {message.component} is not attention or mlp")
    return {"component": component}


# the messages reached only inside others, each named as its dataclass
same_names(TokenScore, Reconstruction, OrdinaryContrast, Attribution, SingularComponent, PositionSpectrum)
same_names(LinearMapSpectrum)
_PREDICTED = Codec(PredictedToken, pb.PredictedToken)
_TIMINGS = Codec(Timings, pb.Timings)
_CONTRIBUTION = Codec(
    ComponentContribution,
    pb.ComponentContribution,
    by_hand=("component",),
    write=_write_component,
    read=_read_component,
)
_LAYER_ATTRIBUTIONS = Codec(LayerAttributions, pb.LayerAttributions)
_LAYER_RESULT = Codec(LayerResult, pb.LayerResult)
_EXPLANATION = Codec(Explanation, pb.Explanation)
_CONCEPT_VECTOR = Codec(ConceptVector, pb.ComputeConceptResponse)


concept_vector_to_proto, concept_vector_from_proto = _CONCEPT_VECTOR.to_proto, _CONCEPT_VECTOR.from_proto
timings_to_proto, timings_from_proto = _TIMINGS.to_proto, _TIMINGS.from_proto
predicted_to_proto, predicted_from_proto = _PREDICTED.to_proto, _PREDICTED.from_proto
layer_attributions_to_proto, layer_attributions_from_proto = (
    _LAYER_ATTRIBUTIONS.to_proto,
    _LAYER_ATTRIBUTIONS.from_proto,
)
layer_result_to_proto, layer_result_from_proto = _LAYER_RESULT.to_proto, _LAYER_RESULT.from_proto
#: The Explanation both ways, its layer analysis (if any) included (tensors decode to read-only numpy arrays).
explanation_to_proto, explanation_from_proto = _EXPLANATION.to_proto, _EXPLANATION.from_proto
