"""Steering with the detached Jacobian: concept vectors, and adding them to a layer's hidden states while generating.

A *concept vector* a is one singular vector of a concept prompt's detached map (arXiv 2505.24293): the whole model's
J at the prompt's last position (what ``Explain`` decomposes), or the up-to-layer map of one layer (what the layer
analysis decomposes). Both come from :meth:`Explainer.explain`, so a concept vector is exactly the vector an
explanation of the same prompt reports, with the same sign convention (left vectors point along the map's output)
and the same decoded tokens.

*Steering* adds it to the output hidden states of one decoder layer of the served model while tokens are generated:

    h_i <- h_i + strength * a * ||h_i|| / (2 ||a||)

for the selected positions i. The added norm is a fixed share of each hidden state's own norm, so one strength means
the same push at every position and in every model, whatever the scale of its residual stream.

Scope. The forward passes one thread runs inside :func:`steered` are steered, and no others. A server runs a request
either in its own ``model.generate`` call on its own thread, or in a decode batch whose thread runs every forward pass
inside the one steering all its rows share (requests of different steerings never share a batch; the server's
``DecodeBatch``). The steering hook is registered once
on the steered layer and acts only when the calling thread is inside :func:`steered` (a ``ContextVar``, which is
per thread) *and* the module it fires on is the one that block steers. Every other forward pass -- other requests
on other threads, explanations (the linear twin, whose deep copy carries a copy of the hook, is never the steered
module) -- sees the hook return None: the layer's output is untouched, bit for bit. Nothing is ever monkey-patched
and no hook is added or removed while other threads run forward passes, except the first registration on a layer.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from linlens.contract import (
    ConceptMap,
    ConceptSpec,
    ConceptVector,
    ExplainOptions,
    LayerAnalysisOptions,
    PositionSelection,
    SingularComponent,
    SingularSide,
    SteeringPositions,
)
from linlens.engine import jacobian as jac
from linlens.engine.capture import decoder_layers
from linlens.engine.explainer import Explainer
from linlens.engine.families import family_of

#: Tokens a concept vector is decoded to when the request leaves it unset (ExplainOptions' own default).
DEFAULT_CONCEPT_TOKENS = ExplainOptions().tokens_per_vector


def concept_options(spec: ConceptSpec, layer: int | None, tokens_per_vector: int) -> ExplainOptions:
    """The explanation that computes ``spec``'s concept vector: the spectrum of the last position's J (OUTPUT) or
    the up-to-layer map of ``layer`` alone (LAYER), with top_k = the requested rank and nothing else."""
    if spec.map is ConceptMap.OUTPUT:
        return ExplainOptions(top_k=spec.rank, tokens_per_vector=tokens_per_vector, positions=PositionSelection.LAST)
    assert layer is not None, "a LAYER map needs its (resolved) layer"
    analysis = LayerAnalysisOptions(layers=(layer,), top_k=spec.rank, tokens_per_vector=tokens_per_vector)
    return ExplainOptions(top_k=0, tokens_per_vector=tokens_per_vector, layers=analysis)


def compute_concept(
    explainer: Explainer,
    input_ids: Sequence[int],
    spec: ConceptSpec,
    *,
    layer: int | None,
    model_name: str,
    tokens_per_vector: int = DEFAULT_CONCEPT_TOKENS,
    options: ExplainOptions | None = None,
    should_stop: jac.ShouldStop | None = None,
) -> ConceptVector:
    """The concept vector ``spec`` names, for the concept prompt ``input_ids``.

    ``layer`` is the resolved layer of a LAYER map (None for OUTPUT). ``options`` overrides :func:`concept_options`
    (the server passes the options it admitted, e.g. switched to matrix-free to fit its memory budget).
    """
    options = options or concept_options(spec, layer, tokens_per_vector)
    explanation = explainer.explain(input_ids, options, should_stop=should_stop)
    component: SingularComponent
    if spec.map is ConceptMap.OUTPUT:
        component = explanation.spectra[-1].components[spec.rank - 1]
    else:
        (result,) = explanation.layers
        assert result.up_to_layer is not None
        component = result.up_to_layer.components[spec.rank - 1]
    left = spec.side is SingularSide.LEFT
    vector = np.array(component.left if left else component.right, dtype=np.float32)
    vector /= max(float(np.linalg.norm(vector)), 1e-30)
    vector.flags.writeable = False
    return ConceptVector(
        model=model_name,
        vector=vector,
        singular_value=component.value,
        tokens=component.left_tokens if left else component.right_tokens,
        map=spec.map,
        layer=layer,
        rank=spec.rank,
        side=spec.side,
        prompt_text=explainer.context.decoder.tokenizer.decode(list(input_ids)),
    )


# ----------------------------------------------------------------------------------------------------------------
# Applying a concept vector while generating
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Active:
    """The steering of the forward passes the current thread runs inside :func:`steered`."""

    module: nn.Module
    #: strength * a / (2 ||a||), in float32: the added vector per unit of ||h_i||.
    direction: torch.Tensor
    positions: SteeringPositions
    prompt_length: int
    #: Positions seen so far: the absolute positions when the layer is not handed ``position_ids``.
    seen: int = 0


_ACTIVE: contextvars.ContextVar[_Active | None] = contextvars.ContextVar("linlens_steering", default=None)
_HOOKED: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_HOOK_LOCK = threading.Lock()


def steering_delta(hidden: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """strength * a * ||h_i|| / (2 ||a||) for every row h_i of ``hidden`` (``direction`` already holds
    strength * a / (2 ||a||)); norms in float32 whatever the hidden states' dtype."""
    norms = hidden.float().norm(dim=-1, keepdim=True)
    return (norms * direction).to(hidden.dtype)


def _selected(active: _Active, positions: torch.Tensor) -> torch.Tensor:
    """Which of ``positions`` (absolute, 0-based) are steered."""
    if active.positions is SteeringPositions.PROMPT:
        return positions < active.prompt_length
    if active.positions is SteeringPositions.GENERATED:
        return positions >= active.prompt_length - 1
    return torch.ones_like(positions, dtype=torch.bool)


def _hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
    active = _ACTIVE.get()
    if active is None or active.module is not module:
        return None  # not this thread's steered layer: the output stays exactly what the layer computed
    hidden: torch.Tensor = output[0] if isinstance(output, tuple) else output
    count = hidden.shape[-2]
    position_ids = kwargs.get("position_ids")
    if isinstance(position_ids, torch.Tensor) and position_ids.shape[-1] == count:
        positions = position_ids.reshape(-1, count)[0].to(hidden.device)
    else:
        positions = torch.arange(active.seen, active.seen + count, device=hidden.device)
    active.seen += count
    mask = _selected(active, positions)
    steered = torch.where(mask[:, None], hidden + steering_delta(hidden, active.direction.to(hidden.device)), hidden)
    return (steered, *output[1:]) if isinstance(output, tuple) else steered


def _ensure_hook(module: nn.Module) -> None:
    """Register the steering hook on ``module`` once (it is inert outside :func:`steered`)."""
    with _HOOK_LOCK:
        if module not in _HOOKED:
            module.register_forward_hook(_hook, with_kwargs=True)
            _HOOKED.add(module)


@contextlib.contextmanager
def steered(
    model: nn.Module,
    vector: npt.ArrayLike | torch.Tensor,
    *,
    layer: int,
    strength: float,
    positions: SteeringPositions,
    prompt_length: int,
) -> Iterator[None]:
    """Steer the forward passes of ``model`` that this thread runs inside the block (and only those).

    ``layer`` is a 0-based decoder layer whose output is steered; ``prompt_length`` tells prompt positions from
    generated ones. Raises ValueError for a layer that does not exist or a vector of the wrong size or norm zero.
    """
    layers = decoder_layers(model, family_of(type(model).__name__))
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} does not exist: the model has layers 0..{len(layers) - 1}")
    if isinstance(vector, torch.Tensor):
        a = vector.detach().to(torch.float32).reshape(-1)
    else:
        a = torch.from_numpy(np.array(vector, dtype=np.float32).reshape(-1))  # a copy: wire arrays are read-only
    hidden_size = int(getattr(model.config, "hidden_size", a.numel()))
    if a.numel() != hidden_size:
        raise ValueError(f"the concept vector has {a.numel()} values, but the model's hidden size is {hidden_size}")
    norm = float(a.norm())
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError("the concept vector must be finite and not zero")
    module = layers[layer]
    _ensure_hook(module)
    direction = a * (float(strength) / (2.0 * norm))
    token = _ACTIVE.set(_Active(module, direction, SteeringPositions(positions), int(prompt_length)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


__all__ = ["DEFAULT_CONCEPT_TOKENS", "compute_concept", "concept_options", "steered", "steering_delta"]
