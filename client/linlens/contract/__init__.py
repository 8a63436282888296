"""The contract in Python, shared by the SDK, the server and the engine (torch-free: numpy and protobuf only).

- :mod:`~linlens.contract.options`: what a request asks for, with the one home of every default and value rule;
- :mod:`~linlens.contract.results`: what linlens answers (explanations, generations, models);
- :mod:`~linlens.contract.wire`: the one mapping between those dataclasses and the protobuf messages;
- :mod:`~linlens.contract.tensors`: how arrays travel (raw little-endian bytes plus a shape);
- :mod:`~linlens.contract.requests`: request messages from the keyword arguments every client takes.

The protobuf definition (``protos/linlens/v1/linlens.proto``) stays the contract; this package is its Python face.
"""

from linlens.contract.options import (
    AttributionTarget,
    ExplainMethod,
    ExplainOptions,
    GateMode,
    LayerAnalysisOptions,
    OptionError,
    PositionSelection,
    Precision,
)
from linlens.contract.requests import ChatMessage, GenerateArgs, InputArgs, MessageLike
from linlens.contract.results import (
    EXPLANATION_PHASES,
    Attribution,
    ComponentContribution,
    ExplainResult,
    Explanation,
    ExplanationProgress,
    FinishReason,
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
    StreamAssembler,
    StreamEvent,
    Timings,
    TokenScore,
    Usage,
    collect_stream,
    to_jsonable,
)
from linlens.contract.tensors import TensorDecodeError, array_from_tensor, tensor_from_array

__all__ = [
    "EXPLANATION_PHASES",
    "Attribution",
    "AttributionTarget",
    "ChatMessage",
    "ComponentContribution",
    "ExplainMethod",
    "ExplainOptions",
    "ExplainResult",
    "Explanation",
    "ExplanationProgress",
    "FinishReason",
    "GateMode",
    "GenerateArgs",
    "GeneratedToken",
    "Generation",
    "GenerationDone",
    "InputArgs",
    "LayerAnalysisOptions",
    "LayerAttributions",
    "LayerResult",
    "LinearMapSpectrum",
    "MessageLike",
    "ModelInfo",
    "ModelState",
    "OptionError",
    "OrdinaryContrast",
    "PositionSelection",
    "PositionSpectrum",
    "Precision",
    "PredictedToken",
    "Reconstruction",
    "SingularComponent",
    "StreamAssembler",
    "StreamEvent",
    "TensorDecodeError",
    "Timings",
    "TokenScore",
    "Usage",
    "array_from_tensor",
    "collect_stream",
    "tensor_from_array",
    "to_jsonable",
]
