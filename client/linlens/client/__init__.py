"""Typed Python client for the linlens service (no torch needed).

    from linlens.client import Client, ExplainOptions

    with Client() as client:                      # $LINLENS_SERVER, else localhost:50051
        client.wait_until_ready()                 # the default model loaded and SERVING
        result = client.generate("The bridge out of Marin is the", max_new_tokens=8, explain=True)
        print(result.text)
        attribution = result.explanations[0].attributions[0]
        print(attribution.label, attribution.per_token)

``AsyncClient`` offers the same methods as coroutines. Failed calls raise LinlensError subclasses. The option and
result types are the contract's (``linlens.contract``), re-exported here; the same types come back from a local
model through ``linlens.server.inprocess.InProcessClient``.
"""

from linlens.client._base import API_KEY_ENV, DEFAULT_TARGET, SERVER_ENV
from linlens.client.aio import AsyncClient, AsyncGenerationStream
from linlens.client.display import show_results_in_jupyter
from linlens.client.errors import (
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    LinlensError,
    NotFoundError,
    ResourceExhaustedError,
    ServerUnreachableError,
    UnauthenticatedError,
    UnavailableError,
    error_for_code,
    from_rpc_error,
)
from linlens.client.health import HealthStatus
from linlens.client.retry import DEFAULT_RETRY, NO_RETRY, RetryPolicy
from linlens.client.sync import Client, GenerationStream
from linlens.contract import (
    DEFAULT_STEERING_STRENGTH,
    Attribution,
    AttributionTarget,
    ChatMessage,
    ComponentContribution,
    ConceptMap,
    ConceptSpec,
    ConceptVector,
    ExplainMethod,
    ExplainOptions,
    ExplainResult,
    Explanation,
    ExplanationProgress,
    FinishReason,
    GateMode,
    GenerateArgs,
    GeneratedToken,
    Generation,
    GenerationDone,
    InputArgs,
    LayerAnalysisOptions,
    LayerAttributions,
    LayerResult,
    LinearMapSpectrum,
    ModelInfo,
    ModelState,
    OptionError,
    OrdinaryContrast,
    PositionSelection,
    PositionSpectrum,
    Precision,
    PredictedToken,
    Reconstruction,
    SingularComponent,
    SingularSide,
    Steering,
    SteeringPositions,
    StreamEvent,
    Timings,
    TokenScore,
    Usage,
    collect_stream,
    to_jsonable,
)

show_results_in_jupyter()

__all__ = [
    "API_KEY_ENV",
    "DEFAULT_RETRY",
    "DEFAULT_STEERING_STRENGTH",
    "DEFAULT_TARGET",
    "NO_RETRY",
    "SERVER_ENV",
    "AsyncClient",
    "AsyncGenerationStream",
    "Attribution",
    "AttributionTarget",
    "CancelledError",
    "ChatMessage",
    "Client",
    "ComponentContribution",
    "ConceptMap",
    "ConceptSpec",
    "ConceptVector",
    "DeadlineExceededError",
    "ExplainMethod",
    "ExplainOptions",
    "ExplainResult",
    "Explanation",
    "ExplanationProgress",
    "FailedPreconditionError",
    "FinishReason",
    "GateMode",
    "GenerateArgs",
    "GeneratedToken",
    "Generation",
    "GenerationDone",
    "GenerationStream",
    "HealthStatus",
    "InputArgs",
    "InternalError",
    "InvalidArgumentError",
    "LayerAnalysisOptions",
    "LayerAttributions",
    "LayerResult",
    "LinearMapSpectrum",
    "LinlensError",
    "ModelInfo",
    "ModelState",
    "NotFoundError",
    "OptionError",
    "OrdinaryContrast",
    "PositionSelection",
    "PositionSpectrum",
    "Precision",
    "PredictedToken",
    "Reconstruction",
    "ResourceExhaustedError",
    "RetryPolicy",
    "ServerUnreachableError",
    "SingularComponent",
    "SingularSide",
    "Steering",
    "SteeringPositions",
    "StreamEvent",
    "Timings",
    "TokenScore",
    "UnauthenticatedError",
    "UnavailableError",
    "Usage",
    "collect_stream",
    "error_for_code",
    "from_rpc_error",
    "to_jsonable",
]
