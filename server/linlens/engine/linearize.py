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
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from linlens.contract import GateMode
from linlens.engine.capture import install_capture_hooks
from linlens.engine.families import Family, UnsupportedArchitectureError, family_of
from linlens.engine.freeze import CoefficientTape, frozen, is_replaying, recording, replaying
from linlens.engine.frozen_attention import FrozenScores, additive, frozen_attention, keeps_whole
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
#: The same, with the forward values of transformers' SDPA attention, for twins of models served with it.
SERVED_SDPA_ATTENTION = "linlens_linear_sdpa"


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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eager softmax attention whose weights are frozen coefficients when the module is marked to detach.

    Queries and keys only feed the softmax weights (rotary embeddings, QK-norms and soft-capping act on them alone),
    so freezing the weights leaves the values their linear path (:func:`_frozen_attention`: frozen whole while they
    are few, through q and k beyond that). Forward-mode AD works too, unlike CPU scaled_dot_product_attention.
    Modules without grouped-query attention (GPT-2, GPT-NeoX) have one group. The weights are not returned (None, as
    transformers' SDPA attention returns): nothing reads them.

    Unfrozen (an ordinary twin, for contrast), the same weights are computed whole and differentiated through.
    """
    if getattr(module, "linlens_detach", True):
        return _frozen_attention(module, query, key, value, attention_mask, False, scaling, softcap), None
    v = _repeat_kv(value, int(getattr(module, "num_key_value_groups", 1)))
    live = _scores(module, query, key, attention_mask, False, scaling, softcap)
    weights = live.weights(slice(None), v.dtype)
    return torch.matmul(weights, v).transpose(1, 2).contiguous(), weights


def _scores(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    causal: bool,
    scaling: float | None,
    softcap: float | None,
) -> FrozenScores:
    """The inputs of one attention call's softmax weights: ``query`` and ``key`` (frozen, or live in the ordinary
    twin), the keys expanded to the query heads, with the call's mask, scale and soft-cap."""
    return FrozenScores(
        query=query,
        key=_repeat_kv(key, int(getattr(module, "num_key_value_groups", 1))),
        mask=attention_mask,
        causal=causal,
        scale=scaling if scaling is not None else query.shape[-1] ** -0.5,
        softcap=softcap,
        softmax_dtype=compute_dtype(query.dtype),
    )


def _frozen_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    causal: bool,
    scaling: float | None,
    softcap: float | None,
) -> torch.Tensor:
    """A v with A frozen; ``attention_mask`` additive or boolean, ``causal`` where it is None and the queries see
    only earlier keys. Returns (batch, queries, heads, head_dim), as transformers expects.

    A call whose weights are few (:func:`~linlens.engine.frozen_attention.keeps_whole`: short prompts, the
    last position's own graph, generation steps) freezes A itself and keeps it, which costs nothing per product. A
    larger one freezes q and k (recorded or replayed on the tape) and recomputes A by blocks in every product
    (:mod:`linlens.engine.frozen_attention`), so that its memory stays linear in the prompt."""
    values = _repeat_kv(value, int(getattr(module, "num_key_value_groups", 1)))

    def scores(q: torch.Tensor, k: torch.Tensor) -> FrozenScores:
        return _scores(module, q, k, attention_mask, causal, scaling, softcap)

    if keeps_whole(query.shape[1], query.shape[-2], key.shape[-2]):
        whole = scores(query.detach(), key.detach())
        weights = frozen(module, lambda: whole.weights(slice(None), values.dtype))
        output = torch.matmul(weights, values)
    else:
        output = frozen_attention(values, scores(frozen(module, lambda: query), frozen(module, lambda: key)))
    return output.transpose(1, 2).contiguous()


def _additive_mask(attention_mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
    """The eager softmax's additive mask for a mask built for SDPA: a boolean mask (True: attend), or None where
    transformers left causality to SDPA's ``is_causal`` (a square causal pattern, or one query that sees every key)."""
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        return attention_mask
    if attention_mask is not None:
        return additive(attention_mask, query.dtype)
    q_length, kv_length = query.shape[-2], key.shape[-2]
    if q_length == 1:
        return None
    rows = torch.arange(q_length, device=query.device)[:, None] + (kv_length - q_length)
    visible = rows >= torch.arange(kv_length, device=query.device)[None, :]
    return additive(visible, query.dtype)[None, None]


def served_sdpa_linear_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`linear_attention` for a model served with transformers' SDPA attention: the values its forward
    computes are SDPA's own, bit for bit, and its gradient path is the frozen eager softmax's.

    Why (issue 17): an explanation reports the served model's own prediction. Where the twin computes the served
    model's numbers bit for bit, its forward *is* the served forward and the explanation need not run the model a
    second time (:meth:`~linlens.engine.context.ModelContext.twin_is_served`); SDPA rounds differently from an eager
    softmax (about 1e-7 relative in float32), so a twin with eager values never was. Here the output is

        SDPA(q, k, v) (detached)  +  A (v - v.detach())

    with A the frozen softmax weights: the second term is exactly zero in value, so the forward is SDPA's, and all
    of its derivative, so the linear map is A v on the values, as in :func:`linear_attention`. The linear system
    y = J x + c then holds to the rounding between the two kernels (the reconstruction error reports it), and so does
    a replay of the pass's coefficients at x (a replay, an undetached twin and soft-capping, which SDPA lacks, compute
    eager values). Only the twin of the served precision runs it (:func:`build_twin`'s ``served``): elsewhere it
    could share nothing.
    """
    detach = bool(getattr(module, "linlens_detach", True))
    if not detach or kwargs.get("softcap") is not None or is_replaying():
        return linear_attention(module, query, key, value, _additive_mask(attention_mask, query, key), **kwargs)
    served, _ = sdpa_attention_forward(module, query.detach(), key.detach(), value.detach(), attention_mask, **kwargs)
    # The mask as SDPA got it (boolean, or None for a causal pattern): the frozen weights build their rows of it block
    # by block, where an additive copy would be a queries x keys tensor kept for every layer's products.
    causal = attention_mask is None and query.shape[-2] > 1
    path = _frozen_attention(
        module, query, key, value - value.detach(), attention_mask, causal, kwargs.get("scaling"), None
    )
    return served + path, None


AttentionInterface.register(ATTENTION_IMPLEMENTATION, linear_attention)
AttentionInterface.register(SERVED_SDPA_ATTENTION, served_sdpa_linear_attention)
# The mask factory must be registered under the same name, or transformers builds no (causal) mask at all; each
# variant gets the mask its values' kernel gets in the served model.
AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, eager_mask)
AttentionMaskInterface.register(SERVED_SDPA_ATTENTION, sdpa_mask)


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


def build_twin(model: PreTrainedModel, mode: GateMode | None, *, served: bool = False) -> PreTrainedModel:
    """Return a twin of ``model`` sharing its weights, linearised for ``mode`` (None: the ordinary, undetached twin).

    The twin's attention is :func:`linear_attention`, an eager softmax with frozen weights; with mode None nothing is
    detached, which gives the ordinary Jacobian for contrast with the same forward arithmetic. ``served``: ``model``
    is the served model itself (not a copy in another precision), so its twin may compute the served forward bit for
    bit; where the model is served with SDPA its attention values are then SDPA's own
    (:func:`served_sdpa_linear_attention`). Any other twin keeps eager values, with which replaying its frozen
    coefficients at x gives y bit for bit.
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

    # The twin computes its values with the served model's attention kernel, so that where nothing else differs its
    # forward is the served forward bit for bit (served_sdpa_linear_attention).
    sdpa = served and model.config._attn_implementation == "sdpa"
    attention = SERVED_SDPA_ATTENTION if sdpa else ATTENTION_IMPLEMENTATION
    twin.set_attn_implementation(attention)
    if twin.config._attn_implementation != attention:
        raise UnsupportedArchitectureError(f"{type(model).__name__} does not accept a custom attention function")
    twin.eval()
    if mode is not None:
        _check_affine(twin, dtype)
    install_capture_hooks(twin, family)
    return twin


__all__ = [
    "ATTENTION_IMPLEMENTATION",
    "SERVED_SDPA_ATTENTION",
    "LinearizedRMSNorm",
    "build_twin",
    "compute_dtype",
    "linear_attention",
    "served_sdpa_linear_attention",
]
