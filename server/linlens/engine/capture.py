"""Record the twin's intermediate tensors (layer inputs, outputs, attention and MLP residual terms) on request.

Hooks are installed once, on the linear twin only (never on the served model). They record nothing unless the
calling thread opened a :func:`capturing` block, so concurrent explanation passes on the same twin, in other threads,
neither see nor disturb each other's tensors (a ``ContextVar`` is per thread).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from linlens.engine.families import Family


@dataclass
class Capture:
    """Tensors of one forward pass, indexed by layer; each is (1, n, d) and part of the autograd graph."""

    layer_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    layer_outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    attention: dict[int, torch.Tensor] = field(default_factory=dict)
    mlp: dict[int, torch.Tensor] = field(default_factory=dict)
    #: Cut the graph at every layer input: each layer then reads a fresh leaf (``layer_inputs``) holding the value
    #: of what entered it (kept, still connected, in ``entered``), so that products with one layer's own map cost
    #: one layer (:mod:`linlens.engine.layer_chain`).
    cut: bool = False
    entered: dict[int, torch.Tensor] = field(default_factory=dict)


_ACTIVE: contextvars.ContextVar[Capture | None] = contextvars.ContextVar("linlens_capture", default=None)


@contextlib.contextmanager
def capturing(capture: Capture | None = None) -> Iterator[Capture]:
    """Record the twin's intermediate tensors for the forward passes run in this block (in this thread), into
    ``capture`` (a new one when None)."""
    capture = capture if capture is not None else Capture()
    token = _ACTIVE.set(capture)
    try:
        yield capture
    finally:
        _ACTIVE.reset(token)


def _tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def decoder_layers(model: nn.Module, family: Family) -> nn.ModuleList:
    """The decoder layers of ``model`` (``base_model.layers``; GPT-2's ``base_model.h``)."""
    layers = getattr(getattr(model, "base_model", model), family.layers, None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no decoder layer list (base_model.{family.layers})")
    return layers


def final_norm(model: nn.Module, family: Family) -> nn.Module:
    """The norm between the last layer and the LM head (``base_model.norm``; GPT-2's ``ln_f``)."""
    norm = getattr(getattr(model, "base_model", model), family.final_norm, None)
    if not isinstance(norm, nn.Module):
        raise ValueError(f"{type(model).__name__} has no final norm (base_model.{family.final_norm})")
    return norm


def install_capture_hooks(twin: nn.Module, family: Family) -> None:
    """Hook every decoder layer of ``twin`` so that :func:`capturing` blocks can read its residual stream.

    Each block's term is what it adds to the residual stream: the output of ``family.attention_term`` /
    ``family.mlp_term`` (times Granite's residual multiplier). Sequential and parallel blocks alike write
    h_out = h_in + attention term + MLP term.
    """
    multiplier = 1.0
    if family.residual_multiplier is not None:
        multiplier = float(getattr(twin.config, family.residual_multiplier))
    for index, layer in enumerate(decoder_layers(twin, family)):

        def on_input(
            _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], index: int = index
        ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
            capture = _ACTIVE.get()
            if capture is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if not capture.cut:
                capture.layer_inputs[index] = hidden
                return None
            capture.entered[index] = hidden
            leaf = hidden.detach().requires_grad_(True)
            capture.layer_inputs[index] = leaf
            if args:
                return (leaf, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": leaf}

        def on_output(slot: str, scale: float = 1.0, index: int = index) -> Any:
            def hook(_: nn.Module, __: Any, output: Any) -> None:
                capture = _ACTIVE.get()
                if capture is not None:
                    tensor = _tensor(output)
                    getattr(capture, slot)[index] = tensor * scale if scale != 1.0 else tensor

            return hook

        layer.register_forward_pre_hook(on_input, with_kwargs=True)
        layer.register_forward_hook(on_output("layer_outputs"))
        for slot, name in (("attention", family.attention_term), ("mlp", family.mlp_term)):
            term = getattr(layer, name, None)
            if not isinstance(term, nn.Module):
                raise ValueError(f"{type(layer).__name__} has no {name} module (the {slot} block's term)")
            term.register_forward_hook(on_output(slot, multiplier))
