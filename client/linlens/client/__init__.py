"""Typed Python client for the linlens service (no torch needed).

    from linlens.client import Client, ExplainOptions

    with Client() as client:                      # $LINLENS_SERVER, else localhost:50051
        client.wait_until_ready()                 # the default model loaded and SERVING
        result = client.generate("The bridge out of Marin is the", max_new_tokens=8, explain=True)
        print(result.text)
        attribution = result.explanations[0].attributions[0]
        print(attribution.label, attribution.per_token)

``AsyncClient`` offers the same methods as coroutines. Failed calls raise LinlensError subclasses. The option and
result types are the contract's: every name of ``linlens.contract.__all__`` is re-exported here (that list is their
one home); the same types come back from a local model through ``linlens.server.inprocess.InProcessClient``.
"""

from linlens import contract
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
from linlens.contract import *  # noqa: F403  (the contract's __all__, re-exported below)

show_results_in_jupyter()

__all__ = [
    "API_KEY_ENV",
    "DEFAULT_RETRY",
    "DEFAULT_TARGET",
    "NO_RETRY",
    "SERVER_ENV",
    "AsyncClient",
    "AsyncGenerationStream",
    "CancelledError",
    "Client",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "GenerationStream",
    "HealthStatus",
    "InternalError",
    "InvalidArgumentError",
    "LinlensError",
    "NotFoundError",
    "ResourceExhaustedError",
    "RetryPolicy",
    "ServerUnreachableError",
    "UnauthenticatedError",
    "UnavailableError",
    "error_for_code",
    "from_rpc_error",
]
__all__ += contract.__all__  # the option and result types: the contract's list
