"""The exact linear-explanation engine (arXiv 2505.24293, "detached Jacobian").

It knows about PyTorch and transformers, and nothing of gRPC: the service maps its dataclasses to protobuf.
"""

from linlens.engine.explainer import Explainer
from linlens.engine.families import SUPPORTED_ARCHITECTURES, UnsupportedArchitectureError, family_of
from linlens.engine.jacobian import ExplanationCancelled
from linlens.engine.results import (
    Attribution,
    AttributionTarget,
    ComponentContribution,
    ExplainOptions,
    Explanation,
    GateMode,
    LayerAttributions,
    LayerOptions,
    LayerResult,
    LinearMapSpectrum,
    OrdinaryContrast,
    PositionSelection,
    PositionSpectrum,
    Precision,
    PredictedToken,
    Reconstruction,
    SingularComponent,
    Timings,
    TokenScore,
)

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "Attribution",
    "AttributionTarget",
    "ComponentContribution",
    "ExplainOptions",
    "Explainer",
    "Explanation",
    "ExplanationCancelled",
    "GateMode",
    "LayerAttributions",
    "LayerOptions",
    "LayerResult",
    "LinearMapSpectrum",
    "OrdinaryContrast",
    "PositionSelection",
    "PositionSpectrum",
    "Precision",
    "PredictedToken",
    "Reconstruction",
    "SingularComponent",
    "Timings",
    "TokenScore",
    "UnsupportedArchitectureError",
    "family_of",
]
