"""Sampling draws from the model's own distribution, truncated as asked: tested by its statistics, not its seeds.

The distribution is SmolLM2's real next-token distribution for the README's prompt. Draws use fixed seeds, so every
statistic here is deterministic; the thresholds are chi-square critical values at a significance of 1e-4, so a sound
sampler fails with probability well below one in a thousand runs of these seeds, and a sampler that falls back to
greedy, ignores the temperature or leaks mass outside a top-k / top-p set fails by orders of magnitude.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from linlens.client import Client
from linlens.server.generation import Sampling, sample_token

pytestmark = pytest.mark.slow

PROMPT = "The bridge out of Marin is the"
DRAWS = 2000
Z_1E4 = 3.719  # the standard normal quantile of 1 - 1e-4


def chi_square_critical(df: int) -> float:
    """The 1 - 1e-4 quantile of chi-square with ``df`` degrees of freedom (Wilson-Hilferty, within 1% for df >= 3)."""
    return df * (1 - 2 / (9 * df) + Z_1E4 * math.sqrt(2 / (9 * df))) ** 3


@pytest.fixture(scope="module")
def logits(smollm2: Any) -> torch.Tensor:
    ids = smollm2.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return smollm2.model(ids).logits[0, -1].float()


def draw(logits: torch.Tensor, sampling: Sampling, count: int = DRAWS) -> np.ndarray:
    return np.array([sample_token(logits, sampling, torch.Generator().manual_seed(seed)) for seed in range(count)])


def chi_square(tokens: np.ndarray, probabilities: np.ndarray, buckets: int = 12) -> tuple[float, int]:
    """Pearson's statistic over the most likely tokens (one bucket each) and the rest (one bucket); (statistic, df)."""
    order = np.argsort(-probabilities)[:buckets]
    expected = [probabilities[t] * len(tokens) for t in order]
    observed = [int(np.sum(tokens == t)) for t in order]
    rest_expected = len(tokens) - sum(expected)
    if rest_expected > 5:
        expected.append(rest_expected)
        observed.append(len(tokens) - sum(observed))
    statistic = sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True))
    return statistic, len(expected) - 1


def softmax(values: torch.Tensor) -> np.ndarray:
    return torch.softmax(values.double(), dim=-1).numpy()


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.5])
def test_draws_follow_the_softmax_at_the_temperature(logits: torch.Tensor, temperature: float) -> None:
    tokens = draw(logits, Sampling(temperature=temperature))
    statistic, df = chi_square(tokens, softmax(logits / temperature))
    assert statistic < chi_square_critical(df), (statistic, df)
    # The same test rejects the wrong distribution: the draws are not those of another temperature, nor greedy.
    wrong, _ = chi_square(tokens, softmax(logits / (temperature * 1.5)))
    assert wrong > chi_square_critical(df)
    greedy = np.full(DRAWS, int(torch.argmax(logits)))
    assert chi_square(greedy, softmax(logits / temperature))[0] > 100 * chi_square_critical(df)


def test_top_k_keeps_only_the_k_most_likely_tokens(logits: torch.Tensor) -> None:
    k = 5
    tokens = draw(logits, Sampling(temperature=1.0, top_k=k))
    top = torch.topk(logits, k).indices.numpy()
    assert set(tokens.tolist()) <= set(top.tolist())
    truncated = torch.full_like(logits, -math.inf)
    truncated[top] = logits[top]
    statistic, df = chi_square(tokens, softmax(truncated), buckets=k)
    assert statistic < chi_square_critical(df)


def test_top_p_keeps_the_smallest_nucleus(logits: torch.Tensor) -> None:
    p = 0.3
    probabilities = softmax(logits)
    order = np.argsort(-probabilities)
    before = np.cumsum(probabilities[order]) - probabilities[order]
    nucleus = order[before < p]  # a token stays while the tokens before it hold less than p
    tokens = draw(logits, Sampling(temperature=1.0, top_p=p))
    assert set(tokens.tolist()) <= set(nucleus.tolist()) and len(nucleus) > 1
    truncated = torch.full_like(logits, -math.inf)
    truncated[nucleus] = logits[nucleus]
    statistic, df = chi_square(tokens, softmax(truncated), buckets=len(nucleus))
    assert statistic < chi_square_critical(df)


def test_the_server_samples_with_this_sampler_and_the_request_seed(target: str, logits: torch.Tensor) -> None:
    """A generation's first sampled token is the sampler's draw from the model's logits with the request's seed."""
    with Client(target) as client:
        for seed in range(12):
            result = client.generate(PROMPT, max_new_tokens=1, temperature=0.8, top_k=40, seed=seed)
            expected = sample_token(logits, Sampling(temperature=0.8, top_k=40), torch.Generator().manual_seed(seed))
            assert result.tokens[0].token_id == expected and result.seed == seed
