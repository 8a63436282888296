"""The twin's replacement modules: each computes what the module it replaces computes, its coefficient frozen.

Every nonlinearity in the supported decoders is a linear path times an input-dependent coefficient. Each module here
takes that coefficient through :func:`~linlens.engine.freeze.frozen` (detached, and recorded or replayed on a
coefficient tape) and keeps the linear path differentiable:

- :class:`LinearizedRMSNorm`: x * 1/rms(x) * w, with 1/rms(x) frozen;
- :class:`LinearizedLayerNorm`: (x - mean(x)) * 1/std(x) * w + b. The mean subtraction is linear (a projection), so
  only 1/std(x) is frozen; the bias joins the affine constant c;
- :class:`LinearizedGatedMLP`: down(act(gate(x)) * up(x)) with one factor frozen (the gate mode);
- :class:`LinearizedMLP`: proj(act(fc(x))) for a non-gated MLP, act(h) = h * s(h) with s(h) frozen;
- :class:`LinearizedMoE`: a mixture of gated experts; the router's weights and its top-k choice are one frozen
  coefficient (a dense tokens x experts matrix, zero for the experts a token does not use), which leaves a fixed
  weighted sum of linear experts: exact.

Built with ``detach=False`` (gate mode None) they freeze nothing, which gives the ordinary Jacobian of the same
arithmetic for contrast.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from linlens.contract import GateMode
from linlens.engine.activations import coefficient_for
from linlens.engine.families import Family, UnsupportedArchitectureError
from linlens.engine.freeze import frozen


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms and softmax run in float32 for half types (as transformers does) and in the input type otherwise.

    Unlike transformers' own norms, this never *lowers* precision: a float64 explanation stays float64 throughout.
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def submodule(module: nn.Module, name: str) -> nn.Module:
    """``module.name`` as a module, or UnsupportedArchitectureError."""
    child = getattr(module, name, None)
    if not isinstance(child, nn.Module):
        raise UnsupportedArchitectureError(f"{type(module).__name__}.{name} is not a module")
    return child


class LinearizedRMSNorm(nn.Module):
    """RMSNorm with its 1/rms scale frozen: y = x * stop_grad(1/rms(x)) * (offset + weight)."""

    centred = False

    def __init__(self, weight: nn.Parameter, eps: float, offset: float, detach: bool) -> None:
        super().__init__()
        self.weight = weight
        self.eps = eps
        self.offset = offset
        self.detach = detach

    def gain(self, dtype: torch.dtype) -> torch.Tensor:
        """What multiplies the normalised input: offset + weight."""
        scale = self.weight.to(dtype)
        return self.offset + scale if self.offset else scale

    def bias_term(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None

    def coefficient(self, h: torch.Tensor) -> torch.Tensor:
        """1/rms(h) along the last dimension (keepdim): the coefficient this norm freezes."""
        return torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(hidden_states.dtype)
        h = hidden_states.to(dtype)
        inverse_rms = frozen(self, lambda: self.coefficient(h)) if self.detach else self.coefficient(h)
        return (h * inverse_rms * self.gain(dtype)).to(hidden_states.dtype)


class LinearizedLayerNorm(nn.Module):
    """LayerNorm with its 1/std frozen: y = (x - mean(x)) * stop_grad(1/std(x)) * weight + bias.

    The mean subtraction is a fixed linear projection, so it stays on the linear path; the bias is a constant of the
    frozen system (it joins c). ``weight`` and ``bias`` may be None (no elementwise affine, or no bias).
    """

    centred = True

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, detach: bool) -> None:
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.eps = eps
        self.offset = 0.0
        self.detach = detach

    def gain(self, dtype: torch.dtype) -> torch.Tensor:
        """What multiplies the normalised input: the weight (ones without one)."""
        if self.weight is None:
            return torch.ones((), dtype=dtype)
        return self.weight.to(dtype)

    def bias_term(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(dtype)

    def coefficient(self, h: torch.Tensor) -> torch.Tensor:
        """1/std(h) along the last dimension (keepdim): the coefficient this norm freezes."""
        centred = h - h.mean(-1, keepdim=True)
        return torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(hidden_states.dtype)
        h = hidden_states.to(dtype)
        centred = h - h.mean(-1, keepdim=True)
        inverse_std = frozen(self, lambda: self.coefficient(h)) if self.detach else self.coefficient(h)
        out = centred * inverse_std * self.gain(dtype)
        bias = self.bias_term(dtype)
        if bias is not None:
            out = out + bias
        return out.to(hidden_states.dtype)


def _gated(
    owner: nn.Module,
    gate: torch.Tensor,
    up: torch.Tensor,
    act: Any,
    coefficient: Any,
    mode: GateMode | None,
) -> torch.Tensor:
    """act(gate) * up with the factor of ``mode`` frozen (nothing frozen for mode None)."""
    if mode is GateMode.FREEZE_GATE:
        return frozen(owner, lambda: act(gate)) * up
    if mode is GateMode.FREEZE_UP:
        return gate * frozen(owner, lambda: coefficient(gate)) * frozen(owner, lambda: up)
    return act(gate) * up


class LinearizedGatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with one factor frozen (see GateMode), or nothing frozen for the ordinary twin."""

    def __init__(self, original: nn.Module, family: Family, activation: str, mode: GateMode | None) -> None:
        super().__init__()
        self.fused = family.fused_gate_up or not hasattr(original, "gate_proj")
        if self.fused:
            self.gate_up_proj = submodule(original, "gate_up_proj")
        else:
            self.gate_proj = submodule(original, "gate_proj")
            self.up_proj = submodule(original, "up_proj")
        self.down_proj = submodule(original, "down_proj")
        self.act_fn = submodule(original, "activation_fn" if hasattr(original, "activation_fn") else "act_fn")
        self.mode = mode
        self.coefficient = coefficient_for(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(_gated(self, gate, up, self.act_fn, self.coefficient, self.mode))


#: Non-gated MLP layouts: (input projection, output projection, activation) attribute names.
NON_GATED_LAYOUTS = (("c_fc", "c_proj", "act"), ("dense_h_to_4h", "dense_4h_to_h", "act"), ("fc1", "fc2", "act"))


def non_gated_layout(module: nn.Module) -> tuple[str, str, str] | None:
    """The layout of a non-gated MLP (GPT-2's c_fc / c_proj, GPT-NeoX's dense_h_to_4h / dense_4h_to_h), or None."""
    for layout in NON_GATED_LAYOUTS:
        if all(isinstance(getattr(module, name, None), nn.Module) for name in layout):
            return layout
    return None


class LinearizedMLP(nn.Module):
    """proj(act(fc(x))) with act(h) = h * s(h) and s(h) frozen: the non-gated MLP of GPT-2 and GPT-NeoX.

    Both gate modes freeze the same coefficient here: there is no gate to choose.
    """

    def __init__(self, original: nn.Module, layout: tuple[str, str, str], activation: str, detach: bool) -> None:
        super().__init__()
        fc, proj, act = layout
        self.fc = submodule(original, fc)
        self.proj = submodule(original, proj)
        self.act = submodule(original, act)
        self.coefficient = coefficient_for(activation)
        self.detach = detach

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        hidden = h * frozen(self, lambda: self.coefficient(h)) if self.detach else self.act(h)
        return self.proj(hidden)


def is_moe_block(module: nn.Module) -> bool:
    """A sparse mixture-of-experts block as transformers writes them (Mixtral, Qwen 3 MoE, OLMoE): a top-k router
    ``gate`` returning (logits, scores, indices) and ``experts`` holding (E, 2I, d) gate_up and (E, d, I) down weights.
    """
    experts = getattr(module, "experts", None)
    router = getattr(module, "gate", None)
    return (
        isinstance(experts, nn.Module)
        and isinstance(router, nn.Module)
        and isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor)
        and isinstance(getattr(experts, "down_proj", None), torch.Tensor)
        and hasattr(router, "top_k")
    )


class LinearizedMoE(nn.Module):
    """A sparse mixture of gated experts with the router's output frozen: a fixed weighted sum of linear experts.

    The router runs as the model's own module (so its softmax, top-k and any renormalisation are the model's); its
    scores are scattered into a dense (tokens, experts) matrix, zero where a token does not use an expert, and that
    matrix is one frozen coefficient. Each expert used by some token is a gated MLP, linearised like
    :class:`LinearizedGatedMLP`, applied to the tokens routed to it.
    """

    def __init__(self, original: nn.Module, activation: str, mode: GateMode | None) -> None:
        super().__init__()
        self.router = submodule(original, "gate")
        self.experts = submodule(original, "experts")
        self.gate_up: torch.Tensor = self.experts.gate_up_proj  # type: ignore[assignment]
        self.down: torch.Tensor = self.experts.down_proj  # type: ignore[assignment]
        self.act_fn = submodule(self.experts, "act_fn")
        self.num_experts = int(self.gate_up.shape[0])
        self.mode = mode
        #: Whether the router's output is frozen (it is whenever a gate mode is: the ordinary twin leaves it live).
        self.detach = mode is not None
        self.coefficient = coefficient_for(activation)
        if getattr(self.experts, "has_bias", False) or self.gate_up.dim() != 3 or self.down.dim() != 3:
            raise UnsupportedArchitectureError(f"{type(original).__name__}: an expert layout the engine does not know")

    def routing(self, flat: torch.Tensor) -> torch.Tensor:
        """The router's weights as a dense (tokens, experts) matrix: the top-k scores, zeros elsewhere."""
        _, scores, indices = self.router(flat)
        dense = torch.zeros(flat.shape[0], self.num_experts, dtype=scores.dtype, device=flat.device)
        return dense.scatter(1, indices, scores)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        weights = frozen(self, lambda: self.routing(flat)) if self.detach else self.routing(flat)
        out = torch.zeros_like(flat)
        used = torch.nonzero(weights.detach().ne(0).any(dim=0)).flatten().tolist()
        for expert in used:
            rows = torch.nonzero(weights.detach()[:, expert]).flatten()
            tokens = flat[rows]
            gate, up = nn.functional.linear(tokens, self.gate_up[expert]).chunk(2, dim=-1)
            hidden = _gated(self, gate, up, self.act_fn, self.coefficient, self.mode)
            expert_out = nn.functional.linear(hidden, self.down[expert])
            out = out.index_add(0, rows, (expert_out * weights[rows, expert, None]).to(out.dtype))
        return out.reshape(shape)


__all__ = [
    "LinearizedGatedMLP",
    "LinearizedLayerNorm",
    "LinearizedMLP",
    "LinearizedMoE",
    "LinearizedRMSNorm",
    "compute_dtype",
    "is_moe_block",
    "non_gated_layout",
    "submodule",
]
