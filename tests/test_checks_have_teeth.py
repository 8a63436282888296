"""A standing guard: break the engine on purpose, one way at a time, and make sure the suite's checks notice.

The checks of ``tests/checks.py`` recompute every number another way. A check that a broken engine still passes is a
defect, so each breakage below is applied to a separate engine object or to a copy of a result (never to the code
the other tests use), and the check that must catch it is asserted to fail. The unbroken engine passing the same
checks is what tests/test_engine_families.py and tests/test_engine_layers.py show.
"""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path
from typing import Any

import checks
import numpy as np
import pytest
import torch
from tiny_models import sample_ids, save_tiny_model

from linlens.contract import AttributionTarget, ExplainOptions, GateMode, LayerAnalysisOptions, Precision
from linlens.engine.context import DTYPES, ModelContext
from linlens.engine.explanation import explain_output
from linlens.engine.families import SUPPORTED_ARCHITECTURES, UnsupportedArchitectureError
from linlens.engine.forward import ExplanationPass
from linlens.engine.freeze import frozen
from linlens.engine.layers import analyze_layers
from linlens.engine.linear_modules import LinearizedLayerNorm, LinearizedMLP, LinearizedMoE, LinearizedRMSNorm
from linlens.engine.linearize import build_twin
from linlens.models import LoadedModel, load_model

EXACT = 1e-14
OPTIONS = ExplainOptions(
    top_k=0,
    precision=Precision.FLOAT64,
    include_jacobians=True,
    targets=(AttributionTarget(10, contrast_token_id=20),),
    layers=LayerAnalysisOptions(up_to_layer=False),
)


class BrokenContext(ModelContext):
    """A model context whose linear twins are broken in one stated way."""

    def __init__(self, model: LoadedModel, breakage: str) -> None:
        super().__init__(model.model, model.tokenizer)
        self.breakage = breakage

    def twin(self, precision: Precision, mode: GateMode | None) -> Any:
        if self.breakage == "nothing frozen":
            return super().twin(precision, None)
        twin = build_twin(self.base(DTYPES[precision]), mode)  # a twin of our own, to break
        for module in twin.modules():
            if self.breakage == "softmax left live" and hasattr(module, "linlens_detach"):
                module.linlens_detach = False
            if self.breakage == "norm scale left live" and isinstance(module, (LinearizedRMSNorm, LinearizedLayerNorm)):
                module.detach = False
            if self.breakage == "activation left live" and isinstance(module, LinearizedMLP):
                module.detach = False
            if self.breakage == "router left live" and isinstance(module, LinearizedMoE):
                module.detach = False
            if self.breakage == "layer norm mean frozen" and isinstance(module, LinearizedLayerNorm):
                module.forward = types.MethodType(_layer_norm_with_its_mean_frozen, module)
        return twin


def _layer_norm_with_its_mean_frozen(self: LinearizedLayerNorm, hidden_states: torch.Tensor) -> torch.Tensor:
    """LayerNorm with its mean taken as a coefficient too: the same value and still affine, but a different map (the
    mean subtraction is linear and must stay on the linear path)."""
    h = hidden_states
    mean = frozen(self, lambda: h.mean(-1, keepdim=True))
    out = (h - mean) * frozen(self, lambda: self.coefficient(h)) * self.gain(h.dtype)
    bias = self.bias_term(h.dtype)
    return out + bias if bias is not None else out


def broken_explanation(model: LoadedModel, breakage: str, context: ModelContext | None = None) -> Any:
    """What an engine broken this way (or with this context) returns for the sample input, layer analysis included."""
    explanation_pass = ExplanationPass(context or BrokenContext(model, breakage), sample_ids(), OPTIONS)
    explanation = explain_output(explanation_pass)
    assert OPTIONS.layers is not None
    events = list(analyze_layers(explanation_pass, OPTIONS.layers))
    return dataclasses.replace(explanation, layer_attributions=events[0], layers=tuple(events[1:]))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LoadedModel]:
    root: Path = tmp_path_factory.mktemp("teeth")
    families = ("llama-bias", "gemma3", "gpt2", "mixtral", "granite")
    return {family: load_model(str(save_tiny_model(family, root / family))) for family in families}


@pytest.fixture(scope="module")
def sound(models: dict[str, LoadedModel]) -> dict[str, Any]:
    """The unbroken engine's explanations; they pass every check."""
    out = {}
    for family, model in models.items():
        explanation = model.explainer.explain(sample_ids(), OPTIONS)
        reference = checks.Reference.of(model, explanation)
        checks.check_exactness(reference, explanation, EXACT)
        checks.check_constant(reference, explanation, EXACT)
        checks.check_attributions(reference, explanation, 5 * EXACT)
        checks.check_layer_matrix(reference, explanation, 3 * EXACT)
        out[family] = explanation
    return out


@pytest.mark.parametrize(
    ("family", "breakage"),
    [
        *[
            (f, b)
            for f in ("llama-bias", "gemma3")
            for b in ("nothing frozen", "softmax left live", "norm scale left live")
        ],
        ("gpt2", "norm scale left live"),  # LayerNorm's 1/std
        ("gpt2", "activation left live"),  # a non-gated MLP's s(h)
        ("mixtral", "router left live"),  # a mixture of experts' routing weights
    ],
)
def test_a_twin_that_is_not_linear_is_caught(models: dict[str, LoadedModel], family: str, breakage: str) -> None:
    model = models[family]
    broken = broken_explanation(model, breakage)
    reference = checks.Reference.of(model, broken)
    with pytest.raises(AssertionError, match="misses the frozen system"):
        checks.check_exactness(reference, broken, EXACT)
    with pytest.raises(AssertionError, match="central differences"):
        checks.check_attributions(reference, broken, 5 * EXACT)
    with pytest.raises(AssertionError, match="layers x tokens matrix"):
        checks.check_layer_matrix(reference, broken, 3 * EXACT)


def test_nothing_frozen_with_c_taken_as_the_residual_is_caught_by_the_constant(models: dict[str, LoadedModel]) -> None:
    """c = y - J x makes the reconstruction hold by algebra whatever J is; only an independent c catches it."""
    model = models["llama-bias"]
    broken = broken_explanation(model, "nothing frozen")
    assert broken.jacobians is not None
    x = checks.embeddings(model, broken.input_ids)
    y = checks.model_output(model, broken.input_ids)
    residual = y - np.einsum("nod,nd->o", broken.jacobians, x)
    cheat = dataclasses.replace(broken, constant=residual)
    checks.check_reconstruction(model, cheat, 1e-12)  # passes: the residual absorbs every error
    with pytest.raises(AssertionError, match="differs from the frozen system at zero"):
        checks.check_constant(checks.Reference.of(model, cheat), cheat, EXACT)


@pytest.mark.parametrize("family", ["llama-bias", "gemma3"])
def test_permuted_attributions_are_caught(models: dict[str, LoadedModel], sound: dict[str, Any], family: str) -> None:
    """Reversing the per-token values keeps every sum, so only the values themselves catch it."""
    explanation = sound[family]
    permuted = dataclasses.replace(
        explanation,
        attributions=tuple(
            dataclasses.replace(a, per_token=a.per_token[::-1].copy()) for a in explanation.attributions
        ),
    )
    assert permuted.attributions[0].per_token.sum() == pytest.approx(explanation.attributions[0].per_token.sum())
    with pytest.raises(AssertionError, match="central differences"):
        checks.check_attributions(checks.Reference.of(models[family], permuted), permuted, 5 * EXACT)


@pytest.mark.parametrize("family", ["llama-bias", "gemma3"])
def test_shifted_layer_rows_are_caught(models: dict[str, LoadedModel], sound: dict[str, Any], family: str) -> None:
    """Rolling the rows by one layer keeps the matrix's sum, the completeness and decomposition errors."""
    explanation = sound[family]
    matrix = explanation.layer_attributions
    assert matrix is not None
    shifted = dataclasses.replace(
        explanation,
        layer_attributions=dataclasses.replace(
            matrix, attention=np.roll(matrix.attention, 1, axis=0), mlp=np.roll(matrix.mlp, 1, axis=0)
        ),
    )
    with pytest.raises(AssertionError, match="rows of the layers x tokens matrix differ"):
        checks.check_layer_matrix(checks.Reference.of(models[family], shifted), shifted, 3 * EXACT)


def test_the_reference_is_the_frozen_system_itself(models: dict[str, LoadedModel]) -> None:
    """The checks' yardstick: replaying the frozen coefficients at x gives y bit for bit, and is affine."""
    model = models["llama-bias"]
    reference = checks.Reference(model, sample_ids())
    y = reference.pass_.y.detach()
    assert torch.equal(reference.frozen(reference.x), y)
    a, b = reference.direction(2), reference.direction(5, scale=-0.5)
    c = reference.frozen(torch.zeros_like(reference.x))
    lhs = reference.frozen(a + b) - c
    rhs = (reference.frozen(a) - c) + (reference.frozen(b) - c)
    assert float((lhs - rhs).norm() / y.norm()) < 1e-14


def test_a_dropped_outside_constant_is_caught(models: dict[str, LoadedModel], sound: dict[str, Any]) -> None:
    """GPT-2's position embeddings and final-norm bias reach the logit outside every block: the matrix's constant."""
    explanation = sound["gpt2"]
    matrix = explanation.layer_attributions
    assert matrix is not None and abs(matrix.constant) > 1e-3
    dropped = dataclasses.replace(explanation, layer_attributions=dataclasses.replace(matrix, constant=0.0))
    with pytest.raises(AssertionError, match="its constant differs from the frozen system at zero"):
        checks.check_layer_matrix(checks.Reference.of(models["gpt2"], dropped), dropped, 3 * EXACT)


def test_a_layer_norm_read_without_its_mean_subtraction_is_caught(
    models: dict[str, LoadedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The layer analysis must push terms through LayerNorm's mean subtraction, not only its scale."""
    model = models["gpt2"]
    reference = checks.Reference(model, sample_ids())  # built before the breakage: the checks' own norm is sound
    monkeypatch.setattr(LinearizedLayerNorm, "centred", False)  # read by the layer analysis's frozen final norm
    explanation = model.explainer.explain(sample_ids(), OPTIONS)
    with pytest.raises(AssertionError, match="layers x tokens matrix"):
        checks.check_layer_matrix(reference, explanation, 3 * EXACT)


def test_a_layer_norm_with_its_mean_frozen_is_caught(models: dict[str, LoadedModel]) -> None:
    """Freezing LayerNorm's mean as well keeps y and keeps the system affine (y = J x + c still holds, c absorbing
    the frozen mean), so the reconstruction cannot see it; c at zero and the attributions against the sound frozen
    system do."""
    model = models["gpt2"]
    broken = broken_explanation(model, "layer norm mean frozen")
    reference = checks.Reference.of(model, broken)
    checks.check_exactness(reference, broken, EXACT)  # passes: the broken map is affine and exact about itself
    with pytest.raises(AssertionError, match="differs from the frozen system at zero"):
        checks.check_constant(reference, broken, EXACT)
    with pytest.raises(AssertionError, match="central differences"):
        checks.check_attributions(reference, broken, 5 * EXACT)


def test_a_dropped_logit_multiplier_is_caught(models: dict[str, LoadedModel], monkeypatch: pytest.MonkeyPatch) -> None:
    """Granite divides its logits by logits_scaling. An engine that forgets it is refused when its context is built;
    with that guard switched off too, the attributions and the layer matrix (against the logits the model itself
    computes) catch it."""
    model = models["granite"]
    family = SUPPORTED_ARCHITECTURES["GraniteForCausalLM"]
    monkeypatch.setitem(
        SUPPORTED_ARCHITECTURES, "GraniteForCausalLM", dataclasses.replace(family, logit_multiplier=lambda _: 1.0)
    )
    with pytest.raises(UnsupportedArchitectureError, match="logits are not the LM head"):
        ModelContext(model.model, model.tokenizer)
    monkeypatch.setattr(ModelContext, "_check_logits", lambda self: None)
    broken = broken_explanation(model, "logit multiplier dropped", ModelContext(model.model, model.tokenizer))
    monkeypatch.undo()  # the checks' reference is the sound engine
    reference = checks.Reference.of(model, broken)
    with pytest.raises(AssertionError, match="central differences"):
        checks.check_attributions(reference, broken, 5 * EXACT)
    with pytest.raises(AssertionError, match="layers x tokens matrix"):
        checks.check_layer_matrix(reference, broken, 3 * EXACT)


def test_a_dropped_residual_multiplier_is_caught(
    models: dict[str, LoadedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Granite scales each block's output by residual_multiplier before it joins the residual stream. Block terms
    read without it no longer add up to the logit's linear part (the checks' own capture is broken the same way:
    the sum against the frozen system at x and at zero is what catches it)."""
    model = models["granite"]
    family = SUPPORTED_ARCHITECTURES["GraniteForCausalLM"]
    monkeypatch.setitem(
        SUPPORTED_ARCHITECTURES, "GraniteForCausalLM", dataclasses.replace(family, residual_multiplier=None)
    )
    context = ModelContext(model.model, model.tokenizer)
    broken = broken_explanation(model, "residual multiplier dropped", context)
    with pytest.raises(AssertionError, match="layers x tokens matrix"):
        checks.check_layer_matrix(checks.Reference.of(model, broken), broken, 3 * EXACT)
