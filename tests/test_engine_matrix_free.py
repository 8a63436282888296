"""The matrix-free method against the full one: the same triplets from products only, with honest certificates.

Every family's tiny model in float64 (and one in float32), the per-position spectra (last, all, a list), the
whole-prompt spectrum [J_1 ... J_n] against the SVD of the concatenated full Jacobian, the layer maps, and the real
SmolLM2 on the README's request. The full method's SVD is the reference: it is the matrix itself.
"""

from __future__ import annotations

from typing import Any

import checks
import numpy as np
import pytest
from tiny_models import FAMILIES, sample_ids, save_tiny_model

from linlens.engine import (
    ExplainMethod,
    ExplainOptions,
    ExplanationCancelled,
    LayerAnalysisOptions,
    PositionSelection,
    Precision,
)
from linlens.models import LoadedModel, load_model

#: What the issue asks: float64 values within 1e-8 (relative to the largest) and subspaces within 1e-6 (the sine of
#: the largest principal angle); float32 both within 1e-4.
VALUES = {Precision.FLOAT64: 1e-8, Precision.FLOAT32: 1e-4}
ANGLES = {Precision.FLOAT64: 1e-6, Precision.FLOAT32: 1e-4}
#: The solver's own residual targets (engine/matrix_free.py): what a certificate must be below.
TARGET = {Precision.FLOAT64: 1e-10, Precision.FLOAT32: 1e-5}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LoadedModel]:
    root = tmp_path_factory.mktemp("tiny-free")
    return {family: load_model(str(save_tiny_model(family, root / family))) for family in FAMILIES}


def sine_of_largest_angle(a: np.ndarray, b: np.ndarray) -> float:
    """sin of the largest principal angle between the column spaces of a and b (float64, orthonormalised first)."""
    qa = np.linalg.qr(np.asarray(a, np.float64))[0]
    qb = np.linalg.qr(np.asarray(b, np.float64))[0]
    return float(np.linalg.norm(qb - qa @ (qa.T @ qb), 2))


def compare(full: Any, free: Any, precision: Precision, *, certified: bool = True) -> None:
    """One spectrum (PositionSpectrum or LinearMapSpectrum) of each method."""
    k = len(free.components)
    assert k == len(full.components) and not free.singular_values_complete and full.singular_values_complete
    values = np.asarray(full.singular_values[:k], np.float64)
    if values[0] == 0:  # a position the prediction cannot see (outside every sliding window): J_i = 0 exactly
        assert np.all(np.asarray(free.singular_values) == 0) and free.term_norm == 0 and free.stable_rank == 0
        return
    error = np.max(np.abs(np.asarray(free.singular_values, np.float64) - values)) / values[0]
    assert error <= VALUES[precision], f"singular values differ by {error:.1e}"
    left = sine_of_largest_angle(
        np.stack([c.left.ravel() for c in full.components], 1), np.stack([c.left.ravel() for c in free.components], 1)
    )
    right = sine_of_largest_angle(
        np.stack([c.right.ravel() for c in full.components], 1),
        np.stack([c.right.ravel() for c in free.components], 1),
    )
    assert max(left, right) <= ANGLES[precision], f"subspaces differ: sin angle {left:.1e} / {right:.1e}"
    if certified:
        worst = max(max(c.residual_left, c.residual_right) for c in free.components)
        assert 0 < worst <= TARGET[precision], f"certificate {worst:.1e}"
    # The full method's certificates are exact residuals of the materialised matrix.
    assert max(c.residual_left for c in full.components) < 100 * TARGET[precision]
    np.testing.assert_allclose(free.captured_share, full.captured_share, atol=10 * VALUES[precision])
    assert free.term_norm == pytest.approx(full.term_norm, rel=10 * VALUES[precision])
    # The stable rank needs ||J||_F^2: an estimate, with an error bar that covers the exact value.
    assert abs(free.stable_rank - full.stable_rank) <= 4 * free.stable_rank_error and full.stable_rank_error == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_matrix_free_spectra_match_the_full_svd_in_float64(models: dict[str, LoadedModel], family: str) -> None:
    model = models[family]
    common = dict(top_k=3, precision=Precision.FLOAT64, positions=PositionSelection.ALL, prompt_spectrum=True)
    full = model.explainer.explain(
        sample_ids(), ExplainOptions(method=ExplainMethod.FULL, include_jacobians=True, **common)
    )
    free = model.explainer.explain(sample_ids(), ExplainOptions(method=ExplainMethod.MATRIX_FREE, **common))
    assert (full.method, free.method) == (ExplainMethod.FULL, ExplainMethod.MATRIX_FREE)
    for a, b in zip(full.spectra, free.spectra, strict=True):
        assert a.position == b.position
        compare(a, b, Precision.FLOAT64)
    np.testing.assert_allclose(free.truncated_relative_error, full.truncated_relative_error, atol=1e-12)
    # The whole-prompt map against the SVD of the concatenated Jacobian [J_1 ... J_n] (d x n d).
    assert full.prompt_spectrum is not None and free.prompt_spectrum is not None
    compare(full.prompt_spectrum, free.prompt_spectrum, Precision.FLOAT64)
    assert full.jacobians is not None
    concatenated = np.transpose(full.jacobians.astype(np.float64), (1, 0, 2)).reshape(full.jacobians.shape[1], -1)
    exact = np.linalg.svd(concatenated, compute_uv=False)[:3]
    np.testing.assert_allclose(free.prompt_spectrum.singular_values, exact, rtol=1e-8)
    assert free.prompt_spectrum.components[0].right.shape == (len(free.input_ids), model.hidden_size)
    # The one-JVP reconstruction (every explanation has it) is the full Jacobian's reconstruction.
    jvp = free.reconstruction
    assert jvp is not None
    from_jacobians = checks.check_reconstruction(model, full, 1.0)
    assert abs(jvp.relative_error_vs_model - from_jacobians) <= 1e-12


@pytest.mark.parametrize("positions", [PositionSelection.LAST, PositionSelection.LIST])
def test_matrix_free_in_float32_and_position_lists(
    models: dict[str, LoadedModel], positions: PositionSelection
) -> None:
    model = models["gemma3"]
    indices = (7, 0, 3) if positions is PositionSelection.LIST else ()
    common = dict(top_k=3, precision=Precision.FLOAT32, positions=positions, position_indices=indices)
    full = model.explainer.explain(sample_ids(), ExplainOptions(method=ExplainMethod.FULL, **common))
    free = model.explainer.explain(sample_ids(), ExplainOptions(method=ExplainMethod.MATRIX_FREE, **common))
    assert [s.position for s in free.spectra] == ([7, 0, 3] if indices else [len(free.input_ids) - 1])
    for a, b in zip(full.spectra, free.spectra, strict=True):
        compare(a, b, Precision.FLOAT32)


@pytest.mark.parametrize("family", ["llama-bias", "gemma3", "olmo2"])
def test_matrix_free_layer_maps_match_the_full_ones(models: dict[str, LoadedModel], family: str) -> None:
    model = models[family]
    layers = LayerAnalysisOptions(layer_alone=True, component_spectra=True, top_k=2)
    common = dict(top_k=0, precision=Precision.FLOAT64, layers=layers)
    full = model.explainer.explain(sample_ids(), ExplainOptions(method=ExplainMethod.FULL, **common))
    free = model.explainer.explain(sample_ids(), ExplainOptions(method=ExplainMethod.MATRIX_FREE, **common))
    for a, b in zip(full.layers, free.layers, strict=True):
        assert b.vjp_count < a.vjp_count * 10  # counted, and of the same order on a 64-wide model
        for name in ("up_to_layer", "layer_alone"):
            compare(getattr(a, name), getattr(b, name), Precision.FLOAT64)
        for block in ("attention", "mlp"):
            compare(getattr(a, block).spectrum, getattr(b, block).spectrum, Precision.FLOAT64)
        for spectrum in (b.up_to_layer, b.attention.spectrum, b.mlp.spectrum):
            assert spectrum.reconstruction_error <= 1e-14  # M x (one forward-mode JVP) rebuilds the map's output


def test_the_same_seed_gives_the_same_answer_and_auto_picks_by_cost(models: dict[str, LoadedModel]) -> None:
    model = models["qwen3"]
    options = ExplainOptions(top_k=2, method=ExplainMethod.MATRIX_FREE, precision=Precision.FLOAT64)
    first, second = (model.explainer.explain(sample_ids(), options) for _ in range(2))
    assert np.array_equal(first.spectra[0].components[0].left, second.spectra[0].components[0].left)
    # On a 64-wide model the full Jacobian (64 VJPs) is cheaper than Krylov; with raw Jacobians it is the only way.
    assert model.explainer.explain(sample_ids(), ExplainOptions(top_k=2)).method is ExplainMethod.FULL
    assert model.explainer.explain(sample_ids(), ExplainOptions(top_k=0)).method is None


def test_matrix_free_work_can_be_cancelled(models: dict[str, LoadedModel]) -> None:
    calls: list[int] = []
    with pytest.raises(ExplanationCancelled):
        models["llama"].explainer.explain(
            sample_ids(),
            ExplainOptions(top_k=3, method=ExplainMethod.MATRIX_FREE, positions=PositionSelection.ALL),
            should_stop=lambda: len(calls) > 2,
            on_progress=lambda phase, done, total: calls.append(done),
        )


def test_smollm2_default_request_matrix_free(smollm2: LoadedModel) -> None:
    """The README's request: the same decoded tokens as the full method, values within 1e-4, certified."""
    ids = [int(t) for t in smollm2.tokenizer("The bridge out of Marin is the")["input_ids"]]
    free = smollm2.explainer.explain(ids, ExplainOptions(top_k=3))  # auto: matrix-free on a 576-wide model
    full = smollm2.explainer.explain(ids, ExplainOptions(top_k=3, method=ExplainMethod.FULL))
    # 118 products in 14 passes (52 VJPs + 66 JVPs, a block of 8; a block of 16 took 198 in 12 passes, slower on
    # one thread: a pass costs the weights' read whether it carries 3 rows or 8, and ~1.4 ms a row beyond that)
    # against the full method's 577
    assert free.method is ExplainMethod.MATRIX_FREE and free.vjp_count + free.jvp_count < full.vjp_count / 4
    (a,), (b,) = full.spectra, free.spectra
    for x, y in zip(a.components, b.components, strict=True):
        assert [t.text for t in x.left_tokens] == [t.text for t in y.left_tokens]
        assert [t.text for t in x.right_tokens] == [t.text for t in y.right_tokens]
        assert abs(x.value - y.value) <= 1e-4 * a.components[0].value
        assert 0 < y.residual_left <= 1e-3 and y.residual_right <= 1e-3
    assert b.components[0].left_tokens[0].text == " only"
