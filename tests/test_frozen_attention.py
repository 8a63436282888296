"""The frozen attention that recomputes its weights block by block (engine/frozen_attention.py), against the weights
computed whole by hand: its value, its backward (plain and batched), its double backward and its forward-mode
derivative, split into many blocks and into one; and, in a real explanation, that no tape or graph keeps the
queries x keys weights while the explanation stays what it was."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from tiny_models import FAMILIES, sample_ids

import linlens.engine.frozen_attention as fa
from linlens.contract import ExplainOptions, Precision
from linlens.engine.forward import ExplanationPass
from linlens.engine.frozen_attention import FrozenScores, frozen_attention
from linlens.models import LoadedModel

HEADS, QUERIES, KEYS, DIM = 4, 11, 11, 8


def _scores(softcap: float | None, mask: str = "additive", seed: int = 0) -> FrozenScores:
    """Random frozen scores with a causal pattern given as transformers gives it: an additive mask (eager), a boolean
    one (SDPA) or none at all (SDPA's is_causal)."""
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(1, HEADS, QUERIES, DIM, generator=generator, dtype=torch.float64)
    key = torch.randn(1, HEADS, KEYS, DIM, generator=generator, dtype=torch.float64)
    visible = torch.ones(QUERIES, KEYS, dtype=torch.bool).tril()[None, None]
    given = {
        "additive": torch.zeros(visible.shape, dtype=torch.float64).masked_fill(~visible, -1e300),
        "boolean": visible,
    }
    return FrozenScores(query, key, given.get(mask), mask == "none", DIM**-0.5, softcap, torch.float64)


def _by_hand(scores: FrozenScores) -> torch.Tensor:
    """The whole weights matrix, computed independently of the module's blocks and of the mask it was given."""
    logits = scores.query @ scores.key.transpose(2, 3) * scores.scale
    if scores.softcap is not None:
        logits = scores.softcap * torch.tanh(logits / scores.softcap)
    visible = torch.ones(QUERIES, KEYS, dtype=torch.bool).tril()
    return torch.softmax(logits.masked_fill(~visible, -math.inf), dim=-1)


@pytest.mark.parametrize("block", [1 << 22, 3 * HEADS * KEYS, HEADS * KEYS])
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("mask", ["additive", "boolean", "none"])
def test_every_derivative_is_the_whole_weights_products(
    monkeypatch: pytest.MonkeyPatch, block: int, softcap: float | None, mask: str
) -> None:
    monkeypatch.setattr(fa, "BLOCK_ELEMENTS", block)
    scores = _scores(softcap, mask)
    blocks = len(scores.blocks())
    assert blocks == (1 if block == 1 << 22 else math.ceil(QUERIES / (block // (HEADS * KEYS))))
    weights = _by_hand(scores)
    torch.testing.assert_close(scores.weights(slice(None), torch.float64), weights, rtol=1e-13, atol=1e-13)
    generator = torch.Generator().manual_seed(1)
    values = torch.randn(1, HEADS, KEYS, DIM, generator=generator, dtype=torch.float64, requires_grad=True)
    out = frozen_attention(values, scores)
    torch.testing.assert_close(out, weights @ values, rtol=1e-13, atol=1e-13)

    # the backward, one cotangent and a batch of them
    g = torch.randn(3, 1, HEADS, QUERIES, DIM, generator=generator, dtype=torch.float64)
    (one,) = torch.autograd.grad(out, values, grad_outputs=g[0], retain_graph=True)
    torch.testing.assert_close(one, weights.transpose(-1, -2) @ g[0], rtol=1e-13, atol=1e-13)
    (batched,) = torch.autograd.grad(out, values, grad_outputs=g, retain_graph=True, is_grads_batched=True)
    torch.testing.assert_close(batched, weights.transpose(-1, -2) @ g, rtol=1e-13, atol=1e-13)

    # the double backward: the gradient of u -> A^T u along h is A h (how linlens.engine.products takes JVPs)
    u = torch.zeros(1, HEADS, QUERIES, DIM, dtype=torch.float64, requires_grad=True)
    (transposed,) = torch.autograd.grad(out, values, grad_outputs=u, create_graph=True)
    h = torch.randn(2, 1, HEADS, KEYS, DIM, generator=generator, dtype=torch.float64)
    (jvps,) = torch.autograd.grad(transposed, u, grad_outputs=h, is_grads_batched=True)
    torch.testing.assert_close(jvps, weights @ h, rtol=1e-13, atol=1e-13)

    # forward mode
    tangent = torch.randn(1, HEADS, KEYS, DIM, generator=generator, dtype=torch.float64)
    with forward_ad.dual_level():
        dual = frozen_attention(forward_ad.make_dual(values.detach(), tangent), scores)
        derivative = forward_ad.unpack_dual(dual).tangent
    torch.testing.assert_close(derivative, weights @ tangent, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_many_block_explanation_is_the_one_block_explanation_and_keeps_no_weights(
    loaded: dict[str, LoadedModel], family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every family in float64: the spectra, the reconstruction and the attributions with every attention call's
    weights recomputed in blocks of one query row equal those of the weights kept whole (a short prompt's default)
    within 1e-12, and the coefficient tape then holds no tensor of queries x keys (the quadratic memory this module
    exists to avoid)."""
    model = loaded[family]
    ids = sample_ids()
    options = ExplainOptions(precision=Precision.FLOAT64, top_k=2)
    whole = model.explainer.explain(ids, options)
    monkeypatch.setattr(fa, "KEEP_WHOLE_ELEMENTS", 0)
    monkeypatch.setattr(fa, "BLOCK_ELEMENTS", 1)
    rows = model.explainer.explain(ids, options)
    assert rows.predicted.token_id == whole.predicted.token_id
    scale = float(np.abs(whole.y).max())
    np.testing.assert_allclose(rows.y, whole.y, rtol=0, atol=1e-12 * scale)
    for a, b in zip(rows.attributions, whole.attributions, strict=True):
        np.testing.assert_allclose(a.per_token, b.per_token, rtol=0, atol=1e-12 * max(1.0, abs(b.total)))
    assert rows.reconstruction is not None and whole.reconstruction is not None
    assert rows.reconstruction.relative_error_vs_detached < 1e-12
    assert abs(rows.reconstruction.relative_error_vs_model - whole.reconstruction.relative_error_vs_model) < 1e-12
    for s, t in zip(rows.spectra, whole.spectra, strict=True):
        for c, d in zip(s.components, t.components, strict=True):
            assert abs(c.value - d.value) <= 1e-12 * max(1.0, abs(d.value))

    p = ExplanationPass(model.explainer.context, ids, options)
    n = len(ids)
    quadratic = [
        t.shape for values in p.tape._values.values() for t in values if t.dim() >= 2 and t.shape[-2:] == (n, n)
    ]
    assert not quadratic, f"the tape keeps attention weights: {quadratic}"
