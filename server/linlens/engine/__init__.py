"""The exact linear-explanation engine (arXiv 2505.24293, "detached Jacobian").

It knows PyTorch and transformers, and nothing of gRPC. It takes and returns the contract's dataclasses
(``linlens.contract``), re-exported here for notebooks: ``Explainer(model, tokenizer).explain(ids, ExplainOptions())``.
"""

from linlens.contract import (
    Attribution,
    AttributionTarget,
    ComponentContribution,
    ExplainMethod,
    ExplainOptions,
    Explanation,
    GateMode,
    LayerAnalysisOptions,
    LayerAttributions,
    LayerResult,
    LinearMapSpectrum,
    OptionError,
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
from linlens.engine.explainer import Explainer, ExplanationEvent, check_token_id
from linlens.engine.families import SUPPORTED_ARCHITECTURES, UnsupportedArchitectureError, family_of
from linlens.engine.jacobian import ExplanationCancelled

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "Attribution",
    "AttributionTarget",
    "ComponentContribution",
    "ExplainMethod",
    "ExplainOptions",
    "Explainer",
    "Explanation",
    "ExplanationCancelled",
    "ExplanationEvent",
    "GateMode",
    "LayerAnalysisOptions",
    "LayerAttributions",
    "LayerResult",
    "LinearMapSpectrum",
    "OptionError",
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
    "check_token_id",
    "family_of",
]
