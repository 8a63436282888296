"""Build the detached ("locally linear") twin of a loaded causal LM.

The method (arXiv 2505.24293): every nonlinearity in these decoders is a product of a linear path and an
input-dependent coefficient — RMSNorm's 1/rms, a gated MLP's activated gate, attention's softmax weights. Detaching
each coefficient from the gradient path changes no forward value, yet makes the Jacobian of the output embedding with
respect to the input embeddings an exact linear system: y = sum_i J_i x_i (+ c when the model has bias terms).

How it is done here, without touching the served model or any library file:

* ``copy.deepcopy`` with a memo that maps every parameter and buffer to itself gives a *twin*: a separate module tree
  (its own config, its own submodule objects) that shares the served model's weights. The twin is built once per
  (precision, mode) and used only by explanation passes, so generation on the served model — in other threads, at the
  same time — never sees a modified module.
* In the twin, each RMSNorm and each gated MLP is swapped for a module that computes the same value with the
  coefficient detached, and attention is routed (through ``set_attn_implementation``, transformers' public API) to an
  eager softmax attention registered under its own name, which detaches queries and keys. Registering a *new* name
  in transformers' attention registries changes nothing for any model that does not select it.
* Every swapped module is checked against the module it replaces on a probe input when the twin is built, and any
  normalisation layer the engine does not recognise is refused: an unknown variant fails loudly instead of producing
  a "linear explanation" that is not one.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.modeling_utils import AttentionInterface

from linlens.contract import GateMode
from linlens.engine.activations import coefficient_for
from linlens.engine.capture import install_capture_hooks
from linlens.engine.families import Family, UnsupportedArchitectureError, family_of
from linlens.engine.freeze import frozen

#: The attention implementation name under which the twin's attention is registered.
ATTENTION_IMPLEMENTATION = "linlens_linear"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms and softmax run in float32 for half types (as transformers does) and in the input type otherwise.

    Unlike transformers' own norms, this never *lowers* precision: a float64 explanation stays float64 throughout.
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """Expand (batch, kv_heads, seq, dim) to (batch, kv_heads * groups, seq, dim) for grouped-query attention."""
    if groups == 1:
        return states
    batch, kv_heads, seq, dim = states.shape
    return states[:, :, None].expand(batch, kv_heads, groups, seq, dim).reshape(batch, kv_heads * groups, seq, dim)


def linear_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **_: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager softmax attention whose weights are frozen coefficients when the module is marked to detach.

    Queries and keys only feed the softmax weights (rotary embeddings, QK-norms and soft-capping act on them alone),
    so freezing the weights (:func:`~linlens.engine.freeze.frozen`: detached, and recorded or replayed on a
    coefficient tape) leaves the values their linear path. Forward-mode AD also works here, unlike CPU
    scaled_dot_product_attention.
    """
    detach = bool(getattr(module, "linlens_detach", True))
    v = _repeat_kv(value, module.num_key_value_groups)  # type: ignore[arg-type]

    def softmax_weights() -> torch.Tensor:
        k = _repeat_kv(key, module.num_key_value_groups)  # type: ignore[arg-type]
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        scores = torch.matmul(query, k.transpose(2, 3)) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if attention_mask is not None:
            scores = scores + attention_mask[:, :, :, : k.shape[-2]]
        return torch.softmax(scores, dim=-1, dtype=compute_dtype(scores.dtype)).to(v.dtype)

    weights = frozen(module, softmax_weights) if detach else softmax_weights()
    output = torch.matmul(weights, v).transpose(1, 2).contiguous()
    return output, weights


AttentionInterface.register(ATTENTION_IMPLEMENTATION, linear_attention)
# The mask factory must be registered under the same name, or transformers builds no (causal) mask at all.
AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, eager_mask)


class LinearizedRMSNorm(nn.Module):
    """RMSNorm with its 1/rms scale frozen: y = x * stop_grad(1/rms(x)) * (offset + weight)."""

    def __init__(self, weight: nn.Parameter, eps: float, offset: float, detach: bool) -> None:
        super().__init__()
        self.weight = weight
        self.eps = eps
        self.offset = offset
        self.detach = detach

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(hidden_states.dtype)
        h = hidden_states.to(dtype)

        def inverse_rms_of() -> torch.Tensor:
            return torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)

        inverse_rms = frozen(self, inverse_rms_of) if self.detach else inverse_rms_of()
        scale = self.weight.to(dtype)
        if self.offset:
            scale = self.offset + scale
        return (h * inverse_rms * scale).to(hidden_states.dtype)


class LinearizedGatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with one factor frozen (see GateMode), or nothing frozen for the ordinary twin."""

    def __init__(self, original: nn.Module, family: Family, activation: str, mode: GateMode | None) -> None:
        super().__init__()
        self.fused = family.fused_gate_up
        if self.fused:
            self.gate_up_proj = _submodule(original, "gate_up_proj")
        else:
            self.gate_proj = _submodule(original, "gate_proj")
            self.up_proj = _submodule(original, "up_proj")
        self.down_proj = _submodule(original, "down_proj")
        self.act_fn = _submodule(original, "activation_fn" if self.fused else "act_fn")
        self.mode = mode
        self.coefficient = coefficient_for(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        if self.mode is GateMode.FREEZE_GATE:
            hidden = frozen(self, lambda: self.act_fn(gate)) * up
        elif self.mode is GateMode.FREEZE_UP:
            hidden = gate * frozen(self, lambda: self.coefficient(gate)) * frozen(self, lambda: up)
        else:
            hidden = self.act_fn(gate) * up
        return self.down_proj(hidden)


def _submodule(module: nn.Module, name: str) -> nn.Module:
    child = getattr(module, name)
    if not isinstance(child, nn.Module):
        raise UnsupportedArchitectureError(f"{type(module).__name__}.{name} is not a module")
    return child


def _activation_name(config: Any) -> str:
    for attribute in ("hidden_activation", "hidden_act"):
        name = getattr(config, attribute, None)
        if isinstance(name, str):
            return name
    raise UnsupportedArchitectureError("the model config names no hidden activation (hidden_act)")


def _is_gated_mlp(module: nn.Module) -> bool:
    has_split = all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))
    has_fused = hasattr(module, "gate_up_proj") and hasattr(module, "down_proj")
    return has_split or has_fused


def _probe_equal(original: nn.Module, replacement: nn.Module, width: int, dtype: torch.dtype, device: Any) -> None:
    """Refuse a replacement whose forward value differs from the module it replaces."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    probe = torch.randn(1, 3, width, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    with torch.no_grad():
        expected = original(probe)
        actual = replacement(probe)
    tolerance = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5
    if not torch.allclose(expected.float(), actual.float(), rtol=tolerance, atol=tolerance):
        raise UnsupportedArchitectureError(
            f"{type(original).__name__} computes something other than the RMSNorm / gated MLP the engine knows; "
            "refusing to linearise it"
        )


def build_twin(model: PreTrainedModel, mode: GateMode | None) -> PreTrainedModel:
    """Return a twin of ``model`` sharing its weights, linearised for ``mode`` (None: the ordinary, undetached twin).

    The twin runs eager attention through :func:`linear_attention`; with mode None nothing is detached, which gives
    the ordinary Jacobian for contrast with the same forward arithmetic.
    """
    family = family_of(type(model).__name__)
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    twin = copy.deepcopy(model, shared)
    detach = mode is not None
    activation = _activation_name(twin.config)
    param = next(twin.parameters())
    dtype, device = param.dtype, param.device

    replacements: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in twin.modules():
        for child_name, child in parent.named_children():
            kind = type(child).__name__
            if kind.endswith("RMSNorm"):
                eps = getattr(child, "variance_epsilon", getattr(child, "eps", None))
                if eps is None:
                    raise UnsupportedArchitectureError(f"{kind} has no epsilon the engine recognises")
                weight = child.weight
                if not isinstance(weight, nn.Parameter):
                    raise UnsupportedArchitectureError(f"{kind} has no weight parameter")
                new: nn.Module = LinearizedRMSNorm(weight, float(eps), family.norm_weight_offset, detach)
                _probe_equal(child, new, int(weight.shape[-1]), dtype, device)
            elif "Norm" in kind:
                raise UnsupportedArchitectureError(f"normalisation layer {kind} is not one the engine can linearise")
            elif _is_gated_mlp(child):
                new = LinearizedGatedMLP(child, family, activation, mode)
                _probe_equal(child, new, twin.config.hidden_size, dtype, device)
            else:
                if hasattr(child, "num_key_value_groups"):
                    setattr(child, "linlens_detach", detach)  # noqa: B010 (read by linear_attention)
                continue
            replacements.append((parent, child_name, new))
    for parent, child_name, new in replacements:
        setattr(parent, child_name, new)

    twin.set_attn_implementation(ATTENTION_IMPLEMENTATION)
    if twin.config._attn_implementation != ATTENTION_IMPLEMENTATION:
        raise UnsupportedArchitectureError(f"{type(model).__name__} does not accept a custom attention function")
    install_capture_hooks(twin, family)
    twin.eval()
    return twin
