"""Tiny random-weight models of every supported family, saved to disk and loaded back through the normal path.

Each is built from its transformers config class with at least 3 layers, fewer KV heads than query heads and, where
the family has one, a sliding window shorter than the test sequence. A word-level tokenizer is saved beside the
weights so the folder loads exactly like a downloaded checkpoint. The initialiser scale is raised so that the
nonlinearities matter: with the default 0.02 the ordinary Jacobian would reconstruct y almost as well as the detached
one, and the exactness tests could not tell them apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    Cohere2Config,
    Cohere2ForCausalLM,
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

VOCAB = 96
#: Longer than every sliding window below, so the windowed layers really mask.
SEQUENCE_LENGTH = 11
WINDOW = 4

_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=0.25,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _configs() -> dict[str, tuple[type, PretrainedConfig]]:
    return {
        "llama": (LlamaForCausalLM, LlamaConfig(**_COMMON, tie_word_embeddings=True)),
        "llama-bias": (
            LlamaForCausalLM,
            LlamaConfig(**_COMMON, attention_bias=True, mlp_bias=True, tie_word_embeddings=False),
        ),
        "gemma3": (
            Gemma3ForCausalLM,
            Gemma3TextConfig(
                **_COMMON,
                head_dim=16,
                sliding_window=WINDOW,
                layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                query_pre_attn_scalar=16,
                tie_word_embeddings=True,
            ),
        ),
        "qwen3": (
            Qwen3ForCausalLM,
            Qwen3Config(
                **_COMMON,
                head_dim=16,
                use_sliding_window=True,
                sliding_window=WINDOW,
                max_window_layers=1,
                layer_types=["full_attention", "sliding_attention", "sliding_attention"],
                tie_word_embeddings=False,
            ),
        ),
        "phi3": (Phi3ForCausalLM, Phi3Config(**_COMMON, sliding_window=WINDOW, tie_word_embeddings=False)),
        "mistral": (MistralForCausalLM, MistralConfig(**_COMMON, sliding_window=WINDOW, tie_word_embeddings=False)),
        "olmo2": (Olmo2ForCausalLM, Olmo2Config(**_COMMON, tie_word_embeddings=True)),
        # Affine families: bias terms (and GPT-2's learned positions) make c real.
        "qwen2": (Qwen2ForCausalLM, Qwen2Config(**_COMMON, tie_word_embeddings=False)),
        "gpt2": (
            GPT2LMHeadModel,
            GPT2Config(
                vocab_size=VOCAB,
                n_embd=64,
                n_inner=112,
                n_layer=3,
                n_head=4,
                n_positions=64,
                initializer_range=0.25,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
                tie_word_embeddings=True,
            ),
        ),
        "gpt_neox": (
            GPTNeoXForCausalLM,
            GPTNeoXConfig(
                **_COMMON,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
                use_parallel_residual=True,
                tie_word_embeddings=False,
            ),
        ),
        # Soft-capping, multipliers, NoPE layers, parallel blocks.
        "gemma2": (
            Gemma2ForCausalLM,
            Gemma2Config(
                **_COMMON,
                head_dim=16,
                sliding_window=WINDOW,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                query_pre_attn_scalar=16,
                attn_logit_softcapping=2.0,
                final_logit_softcapping=30.0,
                tie_word_embeddings=True,
            ),
        ),
        "granite": (
            GraniteForCausalLM,
            GraniteConfig(
                **_COMMON,
                embedding_multiplier=2.0,
                residual_multiplier=0.5,
                attention_multiplier=0.2,
                logits_scaling=4.0,
                tie_word_embeddings=False,
            ),
        ),
        "smollm3": (SmolLM3ForCausalLM, SmolLM3Config(**_COMMON, no_rope_layers=[1, 0, 1], tie_word_embeddings=True)),
        "cohere": (
            CohereForCausalLM,
            CohereConfig(**_COMMON, logit_scale=0.5, use_qk_norm=True, tie_word_embeddings=True),
        ),
        "cohere2": (
            Cohere2ForCausalLM,
            Cohere2Config(
                **_COMMON,
                sliding_window=WINDOW,
                layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                logit_scale=0.5,
                tie_word_embeddings=True,
            ),
        ),
        # Mixtures of experts: 4 experts, 2 per token.
        "mixtral": (
            MixtralForCausalLM,
            MixtralConfig(**_COMMON, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False),
        ),
        "qwen3_moe": (
            Qwen3MoeForCausalLM,
            Qwen3MoeConfig(
                **_COMMON,
                head_dim=16,
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=48,
                norm_topk_prob=True,
                mlp_only_layers=[1],
                tie_word_embeddings=False,
            ),
        ),
        "olmoe": (
            OlmoeForCausalLM,
            OlmoeConfig(**_COMMON, num_experts=4, num_experts_per_tok=2, tie_word_embeddings=False),
        ),
    }


FAMILIES = tuple(_configs())
#: The families whose tiny models have a nonzero affine constant c (bias terms, learned positions).
AFFINE = frozenset({"llama-bias", "qwen2", "gpt2", "gpt_neox"})


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, VOCAB)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def save_tiny_model(family: str, folder: Path, seed: int = 0) -> Path:
    """Build the tiny model of ``family`` with random weights and save it (and a tokenizer) to ``folder``."""
    model_class, config = _configs()[family]
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():  # transformers initialises biases to zero and LayerNorm to 1, 0; make c and the norms real
        for module in model.modules():
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.nn.Parameter):
                bias.normal_(0.0, 0.5)
            if isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("LayerNorm"):
                weight = getattr(module, "weight", None)
                if isinstance(weight, torch.nn.Parameter):
                    weight.normal_(1.0, 0.2)
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder


def sample_ids(seed: int = 1, length: int = SEQUENCE_LENGTH) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return [int(t) for t in torch.randint(4, VOCAB, (length,), generator=generator)]
