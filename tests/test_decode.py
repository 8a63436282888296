"""The token decoder (engine/decode.py): one read of a tied vocabulary matrix names both sides of the triplets.

:meth:`TokenDecoder.both_tokens` scores the output (LM head) and the input (nearest embeddings by cosine) readings
with one matrix product where the head and the embeddings are one matrix. Each check compares it against a plain
float64 reference written here (W u and cosines, top by ``torch.topk``), on the real SmolLM2 (tied) and on a tiny
untied model, with and without special tokens excluded. Breakage this was seen to catch (made once on purpose): the
input side's cosine left undivided by the embedding rows' norms in the tied path.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tiny_models import save_tiny_model

from linlens.contract import TokenScore
from linlens.engine import ExplainOptions
from linlens.engine.decode import TokenDecoder
from linlens.models import load_model


def _reference(matrix: torch.Tensor, vectors: torch.Tensor, count: int, cosine: bool, excluded: set[int]) -> list:
    """(token ids, scores) per column of ``vectors``, in float64 from the float32 weights."""
    w, v = matrix.float().double(), vectors.float().double()
    scores = w @ v
    if cosine:
        scores = scores / (w.norm(dim=1)[:, None].clamp_min(1e-12) * v.norm(dim=0)[None].clamp_min(1e-12))
    for token in excluded:
        scores[token] = float("-inf")
    values, ids = torch.topk(scores, count, dim=0)
    return [(ids[:, j].tolist(), values[:, j]) for j in range(v.shape[1])]


def _check(found: list[tuple[TokenScore, ...]], expected: list, decoder: TokenDecoder) -> None:
    assert len(found) == len(expected)
    for tokens, (ids, values) in zip(found, expected, strict=True):
        got = [t.token_id for t in tokens]
        # float32 against float64 scores: a near tie may swap two neighbours, never the set or the scores
        assert set(got) == set(ids) and got[0] == ids[0]
        torch.testing.assert_close(
            torch.tensor([t.score for t in tokens], dtype=torch.float64), values, rtol=1e-5, atol=1e-6
        )
        assert [t.text for t in tokens] == [decoder.text(i) for i in got]


def _decoders(decoder: TokenDecoder) -> list[tuple[TokenDecoder, set[int]]]:
    skipping = decoder.for_request(ExplainOptions(skip_special_tokens=True))
    return [(decoder, set()), (skipping, set(decoder.special_ids.tolist()))]


def _all_paths_agree(decoder: TokenDecoder, d: int, count: int) -> None:
    generator = torch.Generator().manual_seed(3)
    outputs = torch.randn((d, 3), generator=generator)
    inputs = torch.randn((d, 3), generator=generator) * torch.tensor([1.0, 1e-3, 40.0])  # cosines ignore the scale
    for view, excluded in _decoders(decoder):
        want_out = _reference(view.lm_head, outputs, count, False, excluded)
        want_in = _reference(view.embeddings, inputs, count, True, excluded)
        left, right = view.both_tokens(outputs, inputs, count)
        _check(left, want_out, view)
        _check(right, want_in, view)
        _check(view.output_tokens(outputs, count), want_out, view)
        _check(view.input_tokens(inputs, count), want_in, view)


def test_one_read_of_a_tied_head_names_both_sides(smollm2: Any) -> None:
    decoder = smollm2.explainer.context.decoder
    assert decoder.tied, "SmolLM2 ties its head to its embeddings: the one-read path must be the one tested"
    assert decoder.special_ids.numel() > 0
    _all_paths_agree(decoder, decoder.lm_head.shape[1], 8)


@pytest.mark.parametrize("family", ["llama", "llama-bias"])
def test_both_sides_on_a_tiny_model(family: str, tmp_path: Any) -> None:
    loaded = load_model(str(save_tiny_model(family, tmp_path / family)))
    decoder = loaded.explainer.context.decoder
    tied = loaded.model.config.tie_word_embeddings
    assert decoder.tied == tied
    _all_paths_agree(decoder, decoder.lm_head.shape[1], 5)
