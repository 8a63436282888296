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


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "base_model", model), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no decoder layer list (base_model.layers)")
    return layers


def install_capture_hooks(twin: nn.Module, family: Family) -> None:
    """Hook every decoder layer of ``twin`` so that :func:`capturing` blocks can read its residual stream."""
    for index, layer in enumerate(decoder_layers(twin)):

        def on_input(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], index: int = index) -> None:
            capture = _ACTIVE.get()
            if capture is not None:
                capture.layer_inputs[index] = args[0] if args else kwargs["hidden_states"]

        def on_output(slot: str, index: int = index) -> Any:
            def hook(_: nn.Module, __: Any, output: Any) -> None:
                capture = _ACTIVE.get()
                if capture is not None:
                    getattr(capture, slot)[index] = _tensor(output)

            return hook

        layer.register_forward_pre_hook(on_input, with_kwargs=True)
        layer.register_forward_hook(on_output("layer_outputs"))
        attention_term = getattr(layer, "post_attention_layernorm" if family.post_norm_terms else "self_attn")
        mlp_term = getattr(layer, "post_feedforward_layernorm" if family.post_norm_terms else "mlp")
        attention_term.register_forward_hook(on_output("attention"))
        mlp_term.register_forward_hook(on_output("mlp"))
