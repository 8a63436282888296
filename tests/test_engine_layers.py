"""Layer-by-layer linear explanations: every layer's map, every block's share, exact on every family."""

from __future__ import annotations

import checks
import numpy as np
import pytest
from tiny_models import FAMILIES, SEQUENCE_LENGTH, sample_ids, save_tiny_model

from linlens.engine import (
    ExplainOptions,
    LayerAnalysisOptions,
    LayerAttributions,
    LayerResult,
    OptionError,
    Precision,
)
from linlens.models import LoadedModel, load_model

#: Within about 10x of what is measured on every family in float64 (worst: maps 1.4e-15, the matrix's rows 3e-15,
#: completeness 4.5e-16, decomposition 1.4e-16).
EXACT = 1e-14
ROWS = 3e-14


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LoadedModel]:
    root = tmp_path_factory.mktemp("tiny-layers")
    return {family: load_model(str(save_tiny_model(family, root / family))) for family in FAMILIES}


def _run(model: LoadedModel, options: LayerAnalysisOptions) -> tuple[LayerAttributions, list[LayerResult]]:
    """A float64 explanation with the layer analysis; also checks that the parts came out in streaming order."""
    events: list[object] = []
    options_64 = ExplainOptions(top_k=0, precision=Precision.FLOAT64, layers=options)
    explanation = model.explainer.explain(sample_ids(), options_64, on_event=events.append)
    summary, results = explanation.layer_attributions, list(explanation.layers)
    assert isinstance(summary, LayerAttributions)
    assert all(isinstance(r, LayerResult) for r in results)
    assert [type(e).__name__ for e in events] == ["Explanation", "LayerAttributions"] + ["LayerResult"] * len(results)
    assert events[1] is summary and events[2:] == results
    return summary, results


@pytest.mark.parametrize("family", FAMILIES)
def test_every_layer_and_block_is_exact(models: dict[str, LoadedModel], family: str) -> None:
    model = models[family]
    everything = LayerAnalysisOptions(layer_alone=True, component_spectra=True, top_k=2, tokens_per_vector=4)
    summary, results = _run(model, everything)
    layers = model.num_layers
    # Each row of the matrix and each block's constant, recomputed from forward passes of the frozen system.
    explanation = model.explainer.explain(
        sample_ids(), ExplainOptions(top_k=0, precision=Precision.FLOAT64, layers=LayerAnalysisOptions(top_k=0))
    )
    checks.check_layer_matrix(checks.Reference.of(model, explanation), explanation, ROWS)
    assert [r.layer for r in results] == list(range(layers))
    # The residual decomposition reproduces y, and the block shares (with the direct path) sum to the logit.
    assert summary.decomposition_error <= EXACT
    assert summary.completeness_error <= EXACT
    assert abs(summary.logit - model.explainer.explain(sample_ids(), ExplainOptions(top_k=0)).predicted.logit) < 1e-9
    # The layers x tokens matrix: rows are attention + MLP, and with the constants it sums to the block totals.
    assert summary.per_layer.shape == (layers, SEQUENCE_LENGTH)
    np.testing.assert_allclose(summary.per_layer, summary.attention + summary.mlp, atol=1e-12)
    constants = sum(r.attention.constant + r.mlp.constant for r in results)
    split_total = summary.per_layer.sum() + summary.direct.sum() + constants
    block_total = summary.attention_logits.sum() + summary.mlp_logits.sum() + summary.direct.sum()
    assert abs(split_total - block_total) <= EXACT * abs(block_total)
    assert np.count_nonzero(summary.direct) == 1 and summary.direct[-1] != 0
    for result in results:
        # Up to layer l, layer l alone, and each block: each linear map reproduces what the layer really computed.
        assert result.up_to_layer is not None and result.up_to_layer.reconstruction_error <= EXACT
        assert result.layer_alone is not None
        if not model.explainer.has_bias:
            assert result.layer_alone.reconstruction_error <= EXACT
        for block in (result.attention, result.mlp):
            assert block.spectrum is not None and block.spectrum.reconstruction_error <= EXACT
            assert abs(block.per_token.sum() + block.constant - block.logit) <= 1e-9
        assert len(result.up_to_layer.components) == 2
        assert len(result.up_to_layer.components[0].left_tokens) == 4
        assert result.up_to_layer.stable_rank >= 1.0
    assert (summary.attention_logits == [r.attention.logit for r in results]).all()


def test_selected_layers_only_and_costs(models: dict[str, LoadedModel]) -> None:
    model = models["llama"]
    summary, results = _run(model, LayerAnalysisOptions(layers=(2, 0), top_k=1))
    assert [r.layer for r in results] == [2, 0]
    assert summary.per_layer.shape[0] == model.num_layers  # the matrix always covers every layer
    assert all(r.vjp_count == model.hidden_size for r in results)
    assert all(r.layer_alone is None and r.attention.spectrum is None for r in results)
    _, cheap = _run(model, LayerAnalysisOptions(up_to_layer=False, top_k=0))
    assert all(r.vjp_count == 0 and r.up_to_layer is None for r in cheap)


def test_last_layer_up_to_map_is_the_final_jacobian(models: dict[str, LoadedModel]) -> None:
    """Up to the last layer, the map's top direction decodes like the final J_last (same space, g applied)."""
    model = models["qwen3"]
    _, results = _run(model, LayerAnalysisOptions(layers=(model.num_layers - 1,), top_k=1, tokens_per_vector=5))
    final = model.explainer.explain(
        sample_ids(), ExplainOptions(top_k=1, tokens_per_vector=5, precision=Precision.FLOAT64)
    )
    up_to = results[0].up_to_layer
    assert up_to is not None
    # The final norm's frozen scale is a positive diagonal, so both top singular values are related but the decoded
    # token sets come from the same residual direction: the top token agrees.
    assert up_to.components[0].left_tokens[0].token_id == final.spectra[-1].components[0].left_tokens[0].token_id


def test_bad_layer_options_are_refused(models: dict[str, LoadedModel]) -> None:
    with pytest.raises(OptionError, match=r"layers.layers names layer\(s\) \[99\], but the model has layers 0..2"):
        models["llama"].explainer.explain(sample_ids(), ExplainOptions(layers=LayerAnalysisOptions(layers=(99,))))
    for structural in ({"layers": (1, 1)}, {"top_k": -1}, {"every": 2, "layers": (1,)}):
        with pytest.raises(OptionError):
            LayerAnalysisOptions(**structural)  # type: ignore[arg-type]


def test_layer_analysis_on_smollm2(smollm2: LoadedModel) -> None:
    """The real model: the per-layer shares sum to the logit and " only" emerges in the up-to-layer vectors."""
    ids = [int(t) for t in smollm2.tokenizer("The bridge out of Marin is the")["input_ids"]]
    last = smollm2.num_layers - 1
    options = ExplainOptions(top_k=0, layers=LayerAnalysisOptions(layers=(last,), top_k=1))
    explanation = smollm2.explainer.explain(ids, options)
    summary, (result,) = explanation.layer_attributions, explanation.layers
    assert isinstance(summary, LayerAttributions) and isinstance(result, LayerResult)
    assert summary.explained.text == " only"
    assert summary.completeness_error <= 1e-4 and summary.decomposition_error <= 1e-5
    assert result.up_to_layer is not None and result.up_to_layer.reconstruction_error <= 1e-5
    assert " only" in [t.text for t in result.up_to_layer.components[0].left_tokens]
