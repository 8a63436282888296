"""The frozen coefficients of one detached pass, kept so that the same frozen system can be evaluated again.

In the linear twin every nonlinearity is a linear path times a coefficient computed from the input (RMSNorm's
1/rms, a gated MLP's activated gate, attention's softmax weights). With the coefficients held at their values for an
input x, the twin is an exactly affine function F_x(z) = J z + c of the input embeddings z. A :class:`CoefficientTape`
records those coefficients during the explanation's own forward pass; replaying it evaluates F_x at any other input:

- ``F_x(0) = c``, the affine constant (the bias terms propagated through the frozen linear map), computed without
  ever looking at y, so that the reconstruction ``y = J x + c`` of a model with biases is a real check;
- ``F_x(x + t d)`` for finite differences along any direction d, an independent check of a Jacobian-vector product.

Modules ask for a coefficient through :func:`frozen`. Outside a tape it is simply computed and detached. Recording
and replaying are scoped to the calling thread (a ``ContextVar``), so concurrent passes on the same twin never see
each other's coefficients, and the served model is never involved.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch
from torch import nn


class CoefficientTape:
    """The coefficients of one forward pass of the twin, per module in call order."""

    def __init__(self) -> None:
        self._values: dict[int, list[torch.Tensor]] = {}
        self._replayed: dict[int, int] = {}
        self.replaying = False

    def __len__(self) -> int:
        return sum(len(values) for values in self._values.values())

    def take(self, module: nn.Module, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        key = id(module)
        if not self.replaying:
            value = compute().detach()
            self._values.setdefault(key, []).append(value)
            return value
        index = self._replayed.get(key, 0)
        values = self._values.get(key, [])
        if index >= len(values):
            raise RuntimeError(
                f"{type(module).__name__} asked for a coefficient the recorded pass did not compute; a replay must "
                "run the same twin on inputs of the same shape"
            )
        self._replayed[key] = index + 1
        return values[index]


_ACTIVE: contextvars.ContextVar[CoefficientTape | None] = contextvars.ContextVar("linlens_tape", default=None)


@contextlib.contextmanager
def recording(tape: CoefficientTape) -> Iterator[CoefficientTape]:
    """Record the coefficients of the twin's forward passes run in this block (in this thread) into ``tape``."""
    token = _ACTIVE.set(tape)
    try:
        yield tape
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def replaying(tape: CoefficientTape) -> Iterator[None]:
    """Use ``tape``'s coefficients, instead of computing them, in the forward passes run in this block."""
    replay = CoefficientTape()
    replay._values = tape._values
    replay.replaying = True
    token = _ACTIVE.set(replay)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def is_replaying() -> bool:
    """Whether this thread's twin passes run on replayed coefficients (a tape's, not the input's own)."""
    tape = _ACTIVE.get()
    return tape is not None and tape.replaying


def frozen(module: nn.Module, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The coefficient ``compute()`` of ``module``, detached: recorded or replayed when a tape is active."""
    tape = _ACTIVE.get()
    if tape is None:
        return compute().detach()
    return tape.take(module, compute)


__all__ = ["CoefficientTape", "frozen", "is_replaying", "recording", "replaying"]
