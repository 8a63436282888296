"""The layers x tokens matrix by tangents and by cotangents (engine/block_shares.py): the same numbers, exact.

The reference for the matrix is forward passes of the frozen system (checks.check_layer_matrix), for the images the
forward-mode JVP of the explanation pass, never block_shares itself. The tiny models have 3 layers (6 blocks), so a
2-token prompt takes the tangents in a real explanation (2 x 2 + 1 < 6) and the usual 11-token one the cotangents.
Breakage this test was seen to catch (made once on purpose): the tangent of token j placed at position 0 instead of
j (every by-tangents comparison fails, and the 2-token explanation's matrix check).
"""

from __future__ import annotations

import checks
import pytest
import torch
from tiny_models import FAMILIES, sample_ids, save_tiny_model

from linlens.engine import ExplainMethod, ExplainOptions, LayerAnalysisOptions, Precision, block_shares
from linlens.engine.capture import Capture
from linlens.engine.final_norm import FrozenFinalNorm
from linlens.engine.forward import ExplanationPass
from linlens.models import LoadedModel, load_model

#: float64, every family; measured worst about 1e-15.
AGREES = 1e-12


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LoadedModel]:
    root = tmp_path_factory.mktemp("tiny-shares")
    return {family: load_model(str(save_tiny_model(family, root / family))) for family in FAMILIES}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


@pytest.mark.parametrize("family", FAMILIES)
def test_tangents_and_cotangents_agree(models: dict[str, LoadedModel], family: str) -> None:
    options = ExplainOptions(precision=Precision.FLOAT64, layers=LayerAnalysisOptions())
    p = ExplanationPass(models[family].explainer.context, sample_ids(), options)
    count = p.context.num_layers
    capture = p.capture
    norm = FrozenFinalNorm.of(p, capture.layer_outputs[count - 1][0, -1])
    seed = norm.seed(p.head[p.prediction.explained.token_id])
    terms = [capture.attention[layer][0, -1] for layer in range(count)]
    terms += [capture.mlp[layer][0, -1] for layer in range(count)]
    outputs = torch.stack(terms + [capture.layer_outputs[layer][0, -1] for layer in range(count)])
    by_rows, none = block_shares.token_shares(outputs, p.x, seed, 2 * count, tangents=False, chunk=64)
    by_columns, images = block_shares.token_shares(outputs, p.x, seed, 2 * count, tangents=True, chunk=3)
    assert none is None and images is not None
    assert by_rows.shape == by_columns.shape == (2 * count, p.n)
    assert _relative(by_columns, by_rows) < AGREES
    # the images' sum is M x of every output: the forward-mode JVP's
    forward = Capture()
    p.frozen_jvp(p.x.detach(), forward)
    for layer in range(count):
        for slot, kind in enumerate(("attention", "mlp", "layer_outputs")):
            got = images[slot * count + layer]
            assert _relative(got, getattr(forward, kind)[layer][0, -1]) < AGREES, (layer, kind)


def test_the_choice_follows_the_cost() -> None:
    assert block_shares.by_tangents(7, 60)  # SmolLM2 at 7 tokens: 7 tangents against 60 cotangents
    assert not block_shares.by_tangents(128, 60)
    assert block_shares.by_tangents(2, 6) and not block_shares.by_tangents(11, 6)  # the tiny models below


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_a_short_prompt_takes_the_tangents_and_stays_exact(models: dict[str, LoadedModel], family: str) -> None:
    model = models[family]
    ids = sample_ids(length=2)
    assert block_shares.by_tangents(len(ids), 2 * model.num_layers)
    layers = LayerAnalysisOptions(component_spectra=True, top_k=1, tokens_per_vector=2)
    options = ExplainOptions(top_k=0, precision=Precision.FLOAT64, method=ExplainMethod.MATRIX_FREE, layers=layers)
    explanation = model.explainer.explain(ids, options)
    checks.check_layer_matrix(checks.Reference.of(model, explanation), explanation, 3e-14)
    summary = explanation.layer_attributions
    assert summary is not None and summary.completeness_error <= 1e-14
    for result in explanation.layers:
        assert result.up_to_layer is not None and result.up_to_layer.reconstruction_error <= 1e-12
        for block in (result.attention, result.mlp):
            assert block.spectrum is not None and block.spectrum.reconstruction_error <= 1e-12


def test_smollm2_float32_tangents_match_float64(smollm2: LoadedModel) -> None:
    """The path SmolLM2's short prompts take, in float32, against float64 cotangents: within 1e-5 (measured 1.4e-6,
    the float32 cotangents 2.5e-6)."""
    ids = [int(t) for t in smollm2.tokenizer("The bridge out of Marin is the")["input_ids"]]
    count = smollm2.num_layers
    assert block_shares.by_tangents(len(ids), 2 * count)
    matrices = {}
    for precision, tangents in ((Precision.FLOAT32, True), (Precision.FLOAT64, False)):
        options = ExplainOptions(precision=precision, layers=LayerAnalysisOptions())
        p = ExplanationPass(smollm2.explainer.context, ids, options)
        capture = p.capture
        seed = FrozenFinalNorm.of(p, capture.layer_outputs[count - 1][0, -1]).seed(
            p.head[p.prediction.explained.token_id]
        )
        terms = [capture.attention[layer][0, -1] for layer in range(count)]
        terms += [capture.mlp[layer][0, -1] for layer in range(count)]
        shares, _ = block_shares.token_shares(
            torch.stack(terms), p.x, seed, 2 * count, tangents=tangents, chunk=p.vjp_chunk()
        )
        matrices[precision] = shares
    assert _relative(matrices[Precision.FLOAT32], matrices[Precision.FLOAT64]) < 1e-5
