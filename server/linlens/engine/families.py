"""The model families the engine can linearise exactly, and how to recognise them.

Every family here is a pre-norm (or, for OLMo 2, post-norm) decoder built from the same four nonlinear pieces:
RMSNorm, a gated MLP, rotary softmax attention and residual sums. What differs between them is small and is recorded
here: the RMSNorm's weight convention and the MLP's parameter layout. An architecture that is not listed is refused
with an error that names the supported ones — the engine never guesses, because a wrong guess would return a
"linear explanation" that silently is not one.
"""

from __future__ import annotations

from dataclasses import dataclass


class UnsupportedArchitectureError(ValueError):
    """The model's architecture is not one the engine knows how to linearise exactly."""


@dataclass(frozen=True)
class Family:
    """What the linearisation needs to know about one model family."""

    name: str
    #: RMSNorm multiplies by (1 + weight) instead of weight (Gemma's convention).
    norm_weight_offset: float = 0.0
    #: The MLP keeps gate and up projections in one fused matrix, gate first (Phi-3's `gate_up_proj`).
    fused_gate_up: bool = False
    #: What attention and MLP add to the residual stream passes through a norm of its own first (Gemma 3's sandwich
    #: norms, OLMo 2's post-norms): the residual terms are then the outputs of `post_attention_layernorm` and
    #: `post_feedforward_layernorm`, otherwise those of `self_attn` and `mlp`.
    post_norm_terms: bool = False


_LLAMA = Family("llama")
_MISTRAL = Family("mistral")

#: transformers architecture class name -> family.
SUPPORTED_ARCHITECTURES: dict[str, Family] = {
    "LlamaForCausalLM": _LLAMA,
    "Gemma3ForCausalLM": Family("gemma3", norm_weight_offset=1.0, post_norm_terms=True),
    "Qwen3ForCausalLM": Family("qwen3"),
    "Phi3ForCausalLM": Family("phi3", fused_gate_up=True),
    "MistralForCausalLM": _MISTRAL,
    "MinistralForCausalLM": _MISTRAL,
    "Ministral3ForCausalLM": _MISTRAL,
    "Olmo2ForCausalLM": Family("olmo2", post_norm_terms=True),
}


def family_of(architecture: str) -> Family:
    """Return the family of a transformers architecture class name, or raise a clear error."""
    try:
        return SUPPORTED_ARCHITECTURES[architecture]
    except KeyError:
        supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
        raise UnsupportedArchitectureError(
            f"linlens cannot linearise architecture {architecture!r} exactly; supported architectures: {supported}"
        ) from None
