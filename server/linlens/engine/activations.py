"""Activations written as h * s(h), with the coefficient s(h) optionally frozen.

SiLU, GELU and GELU's tanh approximation all have the form act(h) = h * s(h). Detaching s(h) from the gradient path
leaves the forward value alone and makes the map h -> act(h) linear in h with slope s(h) frozen at the current input.
The engine uses them for the "freeze the up projection" gate mode, where the gate keeps its linear path: the MLP
computes g * s(g) with s(g) taken as a frozen coefficient (``linlens.engine.freeze``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Coefficient = Callable[[torch.Tensor], torch.Tensor]


def _sigmoid(h: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(h)


def _gelu_erf(h: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(h / math.sqrt(2.0)))


def _gelu_tanh(h: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3))))


#: config.hidden_act / hidden_activation name -> the coefficient s(h) with act(h) = h * s(h).
COEFFICIENTS: dict[str, Coefficient] = {
    "silu": _sigmoid,
    "swish": _sigmoid,
    "gelu": _gelu_erf,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_python_tanh": _gelu_tanh,
}


def coefficient_for(name: str) -> Coefficient:
    """The coefficient function of a named activation, or a clear error for one that is not of the form h * s(h)."""
    try:
        return COEFFICIENTS[name]
    except KeyError:
        known = ", ".join(sorted(COEFFICIENTS))
        raise ValueError(f"activation {name!r} is not supported for linearisation; supported: {known}") from None
