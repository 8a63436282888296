"""The model families the engine can linearise exactly, and how to recognise them.

Every family here is a decoder built from the same few nonlinear pieces: a normalisation (RMSNorm, or LayerNorm whose
mean subtraction is linear), an MLP (gated, non-gated h * s(h), or a mixture of such experts behind a router), softmax
attention (rotary, partially rotary, none, or learned absolute positions) and residual sums, sequential or parallel.
What differs between them is small and is recorded here: where the layers and the final norm live, which submodules
write each block's term to the residual stream, the norms' weight convention, the MLP's parameter layout, and the
scalars a family multiplies by (Granite's residual multiplier, Granite's and Cohere's logit scales).

An architecture that is not listed is refused with an error that names the supported ones: the engine never guesses,
because a wrong guess would return a "linear explanation" that silently is not one. A listed architecture whose
modules are not what the engine expects is refused too, when its twin is built (``linearize.build_twin``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class UnsupportedArchitectureError(ValueError):
    """The model's architecture is not one the engine knows how to linearise exactly."""


def _one(_: Any) -> float:
    return 1.0


@dataclass(frozen=True)
class Family:
    """What the linearisation and the layer analysis need to know about one model family."""

    name: str
    #: RMSNorm multiplies by (1 + weight) instead of weight (Gemma's convention).
    norm_weight_offset: float = 0.0
    #: The MLP keeps gate and up projections in one fused matrix, gate first (Phi-3's `gate_up_proj`).
    fused_gate_up: bool = False
    #: The attribute of the base model that holds the decoder layers (GPT-2: ``h``).
    layers: str = "layers"
    #: The attribute of the base model that holds the final norm (GPT-2: ``ln_f``, GPT-NeoX: ``final_layer_norm``).
    final_norm: str = "norm"
    #: The submodule of a layer whose output is the attention block's term in the residual stream: ``self_attn``
    #: (GPT-2: ``attn``, GPT-NeoX: ``attention``), or the norm after it where the term passes one (Gemma's sandwich
    #: norms, OLMo 2's post-norms: ``post_attention_layernorm``).
    attention_term: str = "self_attn"
    #: The same for the MLP block (``mlp``, or ``post_feedforward_layernorm``).
    mlp_term: str = "mlp"
    #: A config attribute that scales each block's output before it joins the residual stream (Granite's
    #: ``residual_multiplier``): the term is the module's output times it.
    residual_multiplier: str | None = None
    #: logits = (LM head . y) * this (Granite divides by ``logits_scaling``, Cohere multiplies by ``logit_scale``).
    logit_multiplier: Callable[[Any], float] = _one
    #: Learned absolute position embeddings added to the input embeddings inside the model (GPT-2). The input
    #: embeddings x are the token embeddings; the position embeddings are a constant of the frozen system and
    #: join c (see docs/engine.md, "Positions").
    learned_positions: bool = False
    #: Attention and MLP read the same layer input and both add to it (GPT-NeoX with use_parallel_residual,
    #: Cohere). Informational: the residual terms are captured the same way either way.
    parallel_blocks: bool = False
    #: What the family brings besides a Llama-style block, for the docs and the README's table.
    notes: str = ""


def _inverse(attribute: str) -> Callable[[Any], float]:
    def multiplier(config: Any) -> float:
        return 1.0 / float(getattr(config, attribute))

    return multiplier


def _attribute(attribute: str) -> Callable[[Any], float]:
    def multiplier(config: Any) -> float:
        return float(getattr(config, attribute))

    return multiplier


_LLAMA = Family("llama")
_MISTRAL = Family("mistral")
#: Where the terms pass a norm of their own before joining the residual stream (sandwich norms, post-norms).
_POST_ATTENTION, _POST_MLP = "post_attention_layernorm", "post_feedforward_layernorm"

#: transformers architecture class name -> family.
SUPPORTED_ARCHITECTURES: dict[str, Family] = {
    "LlamaForCausalLM": _LLAMA,
    "Gemma3ForCausalLM": Family(
        "gemma3",
        norm_weight_offset=1.0,
        notes="sandwich norms, (1 + w) RMSNorm",
        attention_term=_POST_ATTENTION,
        mlp_term=_POST_MLP,
    ),
    "Gemma2ForCausalLM": Family(
        "gemma2",
        norm_weight_offset=1.0,
        notes="attention and final logit soft-capping, sandwich norms",
        attention_term=_POST_ATTENTION,
        mlp_term=_POST_MLP,
    ),
    "Qwen3ForCausalLM": Family("qwen3", notes="QK-norms"),
    "Qwen2ForCausalLM": Family("qwen2", notes="q, k, v biases: affine, c reported"),
    "Phi3ForCausalLM": Family("phi3", fused_gate_up=True, notes="fused gate_up_proj"),
    "MistralForCausalLM": _MISTRAL,
    "MinistralForCausalLM": _MISTRAL,
    "Ministral3ForCausalLM": _MISTRAL,
    "Olmo2ForCausalLM": Family("olmo2", notes="post-norms", attention_term=_POST_ATTENTION, mlp_term=_POST_MLP),
    "SmolLM3ForCausalLM": Family("smollm3", notes="layers without rotary embeddings (NoPE)"),
    "GraniteForCausalLM": Family(
        "granite",
        residual_multiplier="residual_multiplier",
        logit_multiplier=_inverse("logits_scaling"),
        notes="embedding, attention, residual and logit multipliers",
    ),
    "GPT2LMHeadModel": Family(
        "gpt2",
        layers="h",
        final_norm="ln_f",
        attention_term="attn",
        learned_positions=True,
        notes="LayerNorm, non-gated GELU, Conv1D with biases, learned positions (in c): affine",
    ),
    "GPTNeoXForCausalLM": Family(
        "gpt_neox",
        final_norm="final_layer_norm",
        attention_term="attention",
        parallel_blocks=True,
        notes="LayerNorm, non-gated GELU, biases, partial rotary, parallel residual: affine",
    ),
    "CohereForCausalLM": Family(
        "cohere",
        logit_multiplier=_attribute("logit_scale"),
        parallel_blocks=True,
        notes="parallel blocks, LayerNorm without bias, logit scale",
    ),
    "Cohere2ForCausalLM": Family(
        "cohere2",
        logit_multiplier=_attribute("logit_scale"),
        parallel_blocks=True,
        notes="parallel blocks, sliding and global (NoPE) layers, logit scale",
    ),
    "MixtralForCausalLM": Family("mixtral", notes="mixture of experts: router weights and top-k frozen"),
    "Qwen3MoeForCausalLM": Family("qwen3_moe", notes="mixture of experts: router weights and top-k frozen"),
    "OlmoeForCausalLM": Family("olmoe", notes="mixture of experts: router weights and top-k frozen"),
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
