"""The exact linear-explanation engine (arXiv 2505.24293, "detached Jacobian").

It knows PyTorch and transformers, and nothing of gRPC. It takes and returns the contract's dataclasses
(``linlens.contract``), all re-exported here for notebooks:
``Explainer(model, tokenizer).explain(ids, ExplainOptions())``.
"""

from linlens import contract
from linlens.contract import *  # noqa: F403  (the contract's __all__, re-exported below)
from linlens.engine.explainer import Explainer, ExplanationEvent, check_token_id
from linlens.engine.families import SUPPORTED_ARCHITECTURES, UnsupportedArchitectureError, family_of
from linlens.engine.jacobian import ExplanationCancelled

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "Explainer",
    "ExplanationCancelled",
    "ExplanationEvent",
    "UnsupportedArchitectureError",
    "check_token_id",
    "family_of",
]
__all__ += contract.__all__  # the option and result types: the contract's list
