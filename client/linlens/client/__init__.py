"""Typed Python client for the linlens service (no torch needed).

    from linlens.client import Client, ExplainOptions

    with Client("localhost:50051") as client:
        result = client.generate("The bridge out of Marin is the", max_new_tokens=8, explain=True)
        print(result.text)
        attribution = result.explanations[0].attributions[0]
        print(attribution.label, attribution.per_token)

``AsyncClient`` offers the same methods as coroutines. Failed calls raise LinlensError subclasses.
"""

from linlens.client.aio import AsyncClient, AsyncGenerationStream
from linlens.client.errors import (
    CancelledError,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    LinlensError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
    from_rpc_error,
)
from linlens.client.retry import DEFAULT_RETRY, NO_RETRY, RetryPolicy
from linlens.client.sync import Client, GenerationStream
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
    GateMode,
    GeneratedToken,
    Generation,
    GenerationDone,
    HealthStatus,
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
    collect_stream,
    to_jsonable,
)

__all__ = [
    "DEFAULT_RETRY",
    "NO_RETRY",
    "AsyncClient",
    "AsyncGenerationStream",
    "Attribution",
    "AttributionTarget",
    "CancelledError",
    "ChatMessage",
    "Client",
    "ComponentContribution",
    "DeadlineExceededError",
    "ExplainOptions",
    "ExplainResult",
    "Explanation",
    "FinishReason",
    "GateMode",
    "GeneratedToken",
    "Generation",
    "GenerationDone",
    "GenerationStream",
    "HealthStatus",
    "InternalError",
    "InvalidArgumentError",
    "LayerAnalysisOptions",
    "LayerAttributions",
    "LayerResult",
    "LinearMapSpectrum",
    "LinlensError",
    "ModelInfo",
    "NotFoundError",
    "OrdinaryContrast",
    "PositionSelection",
    "PositionSpectrum",
    "Precision",
    "PredictedToken",
    "Reconstruction",
    "ResourceExhaustedError",
    "RetryPolicy",
    "SingularComponent",
    "StreamEvent",
    "Timings",
    "TokenScore",
    "UnavailableError",
    "Usage",
    "array_from_tensor",
    "collect_stream",
    "from_rpc_error",
    "tensor_from_array",
    "to_jsonable",
]
