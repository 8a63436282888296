"""The exact linear-explanation engine (arXiv 2505.24293, "detached Jacobian").

It knows about PyTorch and transformers, and nothing of gRPC: the service maps its dataclasses to protobuf.
"""

from linlens.engine.explainer import Explainer
from linlens.engine.families import SUPPORTED_ARCHITECTURES, UnsupportedArchitectureError, family_of
from linlens.engine.jacobian import ExplanationCancelled
from linlens.engine.results import (
    Attribution,
    AttributionTarget,
    ExplainOptions,
    Explanation,
    GateMode,
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
    "ExplainOptions",
    "Explainer",
    "Explanation",
    "ExplanationCancelled",
    "GateMode",
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
