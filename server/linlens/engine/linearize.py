"""Build the detached ("locally linear") twin of a loaded causal LM.

The method (arXiv 2505.24293): every nonlinearity in these decoders is a product of a linear path and an
input-dependent coefficient — a norm's 1/rms or 1/std, an MLP's activated gate or s(h) in act(h) = h * s(h), a
router's weights, attention's softmax weights. Detaching each coefficient from the gradient path changes no forward
value, yet makes the Jacobian of the output embedding with respect to the input embeddings an exact linear system:
y = sum_i J_i x_i (+ c when the model has bias terms or learned positions).

How it is done here, without touching the served model or any library file:

* ``copy.deepcopy`` with a memo that maps every parameter and buffer to itself gives a *twin*: a separate module tree
  (its own config, its own submodule objects) that shares the served model's weights. The twin is built once per
  (precision, mode) and used only by explanation passes, so generation on the served model — in other threads, at the
  same time — never sees a modified module.
* In the twin, each norm, MLP and mixture of experts is swapped for a module of :mod:`linlens.engine.linear_modules`
  that computes the same value with the coefficient frozen, and attention is routed (through
  ``set_attn_implementation``, transformers' public API) to an eager softmax attention registered under its own name,
  whose softmax weights are frozen. Queries and keys only feed those weights (rotary or partial rotary embeddings,
  QK-norms, soft-capping, Granite's attention multiplier act on them alone), so every attention variant keeps its
  values' linear path. Registering a *new* name in transformers' attention registries changes nothing for any model
  that does not select it.
* Every swapped module is checked against the module it replaces on a probe input when the twin is built, any
  normalisation layer the engine does not recognise is refused, and the finished twin must be affine once its
  coefficients are frozen (F(2x) - 2 F(x) + F(0) = 0 on a probe prompt): an unknown variant, or a module that computes
  its own softmax instead of calling the attention interface, fails loudly instead of producing a "linear
  explanation" that is not one.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.modeling_utils import AttentionInterface

from linlens.contract import GateMode
from linlens.engine.capture import install_capture_hooks
from linlens.engine.families import Family, UnsupportedArchitectureError, family_of
from linlens.engine.freeze import CoefficientTape, frozen, recording, replaying
from linlens.engine.linear_modules import (
    LinearizedGatedMLP,
    LinearizedLayerNorm,
    LinearizedMLP,
    LinearizedMoE,
    LinearizedRMSNorm,
    compute_dtype,
    is_moe_block,
    non_gated_layout,
)

#: The attention implementation name under which the twin's attention is registered.
ATTENTION_IMPLEMENTATION = "linlens_linear"


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
    scaled_dot_product_attention. Modules without grouped-query attention (GPT-2, GPT-NeoX) have one group.
    """
    detach = bool(getattr(module, "linlens_detach", True))
    groups = int(getattr(module, "num_key_value_groups", 1))
    v = _repeat_kv(value, groups)

    def softmax_weights() -> torch.Tensor:
        k = _repeat_kv(key, groups)
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


def _activation_name(config: Any) -> str:
    for attribute in ("hidden_activation", "hidden_act", "activation_function"):
        name = getattr(config, attribute, None)
        if isinstance(name, str):
            return name
    raise UnsupportedArchitectureError("the model config names no hidden activation (hidden_act)")


def _is_gated_mlp(module: nn.Module) -> bool:
    def has(name: str) -> bool:
        return isinstance(getattr(module, name, None), nn.Module)

    return has("down_proj") and (has("gate_up_proj") or (has("gate_proj") and has("up_proj")))


def _norm_epsilon(module: nn.Module) -> float:
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if not isinstance(eps, (int, float)):
        raise UnsupportedArchitectureError(f"{type(module).__name__} has no epsilon the engine recognises")
    return float(eps)


def _linearized_norm(module: nn.Module, family: Family, detach: bool) -> nn.Module | None:
    """The frozen-coefficient replacement of a normalisation layer, None for a module that is not one, or
    UnsupportedArchitectureError for a normalisation the engine does not know."""
    kind = type(module).__name__
    if kind.endswith("RMSNorm"):
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter):
            raise UnsupportedArchitectureError(f"{kind} has no weight parameter")
        return LinearizedRMSNorm(weight, _norm_epsilon(module), family.norm_weight_offset, detach)
    if isinstance(module, nn.LayerNorm) or kind.endswith("LayerNorm"):
        shape = getattr(module, "normalized_shape", None)
        if isinstance(module, nn.LayerNorm) and shape is not None and len(shape) != 1:
            raise UnsupportedArchitectureError(f"{kind} normalises over {len(shape)} dimensions, not the last one")
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        if weight is not None and not isinstance(weight, torch.Tensor):
            raise UnsupportedArchitectureError(f"{kind} has a weight the engine does not recognise")
        if bias is not None and not isinstance(bias, torch.Tensor):
            raise UnsupportedArchitectureError(f"{kind} has a bias the engine does not recognise")
        return LinearizedLayerNorm(weight, bias, _norm_epsilon(module), detach)
    if "Norm" in kind:
        raise UnsupportedArchitectureError(f"normalisation layer {kind} is not one the engine can linearise")
    return None


def _probe_equal(
    original: nn.Module, replacement: nn.Module, shape: tuple[int, ...], dtype: torch.dtype, device: Any
) -> None:
    """Refuse a replacement whose forward value differs from the module it replaces."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    probe = torch.randn(1, 3, *shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    with torch.no_grad():
        expected = original(probe)
        actual = replacement(probe)
    tolerance = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5
    if not torch.allclose(expected.float(), actual.float(), rtol=tolerance, atol=tolerance):
        raise UnsupportedArchitectureError(
            f"{type(original).__name__} computes something other than the norm / MLP / mixture of experts the engine "
            "knows; refusing to linearise it"
        )


def _replacements(
    twin: PreTrainedModel, family: Family, mode: GateMode | None, dtype: torch.dtype, device: Any
) -> Iterator[tuple[nn.Module, str, nn.Module]]:
    """(parent, name, replacement) for every module of the twin that must be swapped, each checked on a probe.

    Attention modules are marked instead (``linlens_detach``, read by :func:`linear_attention`); a replaced module's
    own children are not visited (the experts inside a mixture of experts belong to its replacement).
    """
    detach = mode is not None
    activation = _activation_name(twin.config)
    hidden = int(twin.config.hidden_size)

    def visit(parent: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Module]]:
        for child_name, child in parent.named_children():
            new = _linearized_norm(child, family, detach)
            if new is not None:
                weight = getattr(child, "weight", None)
                shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else (hidden,)
                _probe_equal(child, new, shape, dtype, device)
            elif is_moe_block(child):
                new = LinearizedMoE(child, activation, mode)
                _probe_equal(child, new, (hidden,), dtype, device)
            elif _is_gated_mlp(child):
                new = LinearizedGatedMLP(child, family, activation, mode)
                _probe_equal(child, new, (hidden,), dtype, device)
            elif (layout := non_gated_layout(child)) is not None:
                new = LinearizedMLP(child, layout, activation, detach)
                _probe_equal(child, new, (hidden,), dtype, device)
            else:
                if type(child).__name__.endswith("Attention"):
                    setattr(child, "linlens_detach", detach)  # noqa: B010 (read by linear_attention)
                yield from visit(child)
                continue
            yield parent, child_name, new

    yield from visit(twin)


def _check_affine(twin: PreTrainedModel, dtype: torch.dtype) -> None:
    """Refuse a twin that is not affine in its input embeddings once its coefficients are frozen.

    On a probe prompt, the frozen system F must satisfy F(2x) - 2 F(x) + F(0) = 0 (to rounding): a nonlinearity the
    twin failed to freeze (an attention module that computes its own softmax, an activation applied outside the
    modules the engine replaced) breaks it by far more than rounding.
    """
    embeddings = twin.get_input_embeddings()
    weight = embeddings.weight
    assert isinstance(weight, torch.Tensor)
    ids = torch.arange(3, 8, device=weight.device).clamp_max(weight.shape[0] - 1)
    with torch.no_grad():
        x = embeddings(ids)[None]
        tape = CoefficientTape()
        with recording(tape):
            once = twin.base_model(inputs_embeds=x, use_cache=False).last_hidden_state
        with replaying(tape):
            twice = twin.base_model(inputs_embeds=2 * x, use_cache=False).last_hidden_state
        with replaying(tape):
            zero = twin.base_model(inputs_embeds=torch.zeros_like(x), use_cache=False).last_hidden_state
    error = float((twice - 2 * once + zero).double().norm() / (once.double().norm() + zero.double().norm()))
    tolerance = {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 5e-2)
    if not error <= tolerance:
        raise UnsupportedArchitectureError(
            f"{type(twin).__name__}: the frozen system is not affine in the input embeddings (second difference "
            f"{error:.1e} on a probe prompt): some nonlinearity was not frozen; refusing to explain it"
        )


def build_twin(model: PreTrainedModel, mode: GateMode | None) -> PreTrainedModel:
    """Return a twin of ``model`` sharing its weights, linearised for ``mode`` (None: the ordinary, undetached twin).

    The twin runs eager attention through :func:`linear_attention`; with mode None nothing is detached, which gives
    the ordinary Jacobian for contrast with the same forward arithmetic.
    """
    family = family_of(type(model).__name__)
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    twin = copy.deepcopy(model, shared)
    param = next(twin.parameters())
    dtype, device = param.dtype, param.device
    if any(is_moe_block(m) for m in twin.modules()):
        # The original experts are only run to check their replacements against; transformers' default grouped
        # matmul has no float64 kernel. The twin has its own config, so the served model keeps its choice.
        twin.set_experts_implementation("eager")

    for parent, child_name, new in list(_replacements(twin, family, mode, dtype, device)):
        setattr(parent, child_name, new)

    twin.set_attn_implementation(ATTENTION_IMPLEMENTATION)
    if twin.config._attn_implementation != ATTENTION_IMPLEMENTATION:
        raise UnsupportedArchitectureError(f"{type(model).__name__} does not accept a custom attention function")
    twin.eval()
    if mode is not None:
        _check_affine(twin, dtype)
    install_capture_hooks(twin, family)
    return twin


__all__ = ["ATTENTION_IMPLEMENTATION", "LinearizedRMSNorm", "build_twin", "compute_dtype", "linear_attention"]
