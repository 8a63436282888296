"""The engine on the two real pretrained models that ship on PyPI (SmolLM2-135M, Gemma 3 270M)."""

from __future__ import annotations

import checks
import numpy as np
import pytest
import torch

from linlens.engine import ExplainOptions, Precision
from linlens.models import LoadedModel, load_model

PROMPT = "The bridge out of Marin is the"
# `smollm2` is the session-wide fixture of conftest.py (one loaded copy shared with the server tests).

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma3() -> LoadedModel:
    return load_model("gemma-3-270m")


def _prompt_ids(model: LoadedModel) -> list[int]:
    return [int(t) for t in model.tokenizer(PROMPT)["input_ids"]]


def _untouched_argmax(model: LoadedModel, ids: list[int]) -> int:
    with torch.no_grad():
        return int(torch.argmax(model.model(input_ids=torch.tensor([ids])).logits[0, -1]))


#: Within about 10x of what is measured in float32 (SmolLM2: 7.4e-7 against the model, attributions 1e-6 of the
#: largest; Gemma 3 270M: 5.2e-7), and in float64 against the frozen system (SmolLM2: 1.7e-15).
FLOAT32 = 5e-6
FLOAT64 = 2e-14


def _check_common(model: LoadedModel, expected: str) -> tuple[list[int], object]:
    ids = _prompt_ids(model)
    options = ExplainOptions(top_k=2, tokens_per_vector=16, include_jacobians=True)
    explanation = model.explainer.explain(ids, options)
    assert explanation.predicted.text == expected
    assert explanation.predicted.token_id == _untouched_argmax(model, ids)
    recon = explanation.reconstruction
    assert recon is not None and recon.predicts_same_token
    assert recon.relative_error_vs_model <= FLOAT32 and recon.relative_error_vs_detached <= FLOAT32
    # The same numbers recomputed independently (tests/checks.py).
    reference = checks.Reference.of(model, explanation)
    checks.check_reconstruction(model, explanation, FLOAT32)
    checks.check_attributions(reference, explanation, 5 * FLOAT32)
    assert explanation.spectra[-1].position == len(ids) - 1
    return ids, explanation


def test_smollm2_explains_only(smollm2: LoadedModel) -> None:
    assert smollm2.architecture == "LlamaForCausalLM" and smollm2.hidden_size == 576
    _, explanation = _check_common(smollm2, " only")
    first = explanation.spectra[-1].components[0]  # type: ignore[attr-defined]
    assert " only" in [token.text for token in first.left_tokens[:8]]


def test_smollm2_float64_is_exact(smollm2: LoadedModel) -> None:
    options = ExplainOptions(top_k=1, precision=Precision.FLOAT64, include_jacobians=True)
    explanation = smollm2.explainer.explain(_prompt_ids(smollm2), options)
    assert explanation.reconstruction is not None
    assert explanation.reconstruction.relative_error_vs_detached <= FLOAT64
    checks.check_exactness(checks.Reference.of(smollm2, explanation), explanation, FLOAT64)
    assert explanation.y.dtype == np.float64


def test_gemma3_explains_its_prediction(gemma3: LoadedModel) -> None:
    """Gemma 3 270M as transformers 5.24 loads its Q4_K_M GGUF predicts " only" (logit 19.223) just ahead of
    " first" (19.212); " most" is fourth (17.94). Its top two left singular vectors decode to superlatives
    (" hardest, quickest, easiest, ...", " tallest, cleanest, ..., only, ..."), the concept being completed."""
    assert gemma3.architecture == "Gemma3ForCausalLM"
    ids, explanation = _check_common(gemma3, " only")
    assert ids[0] == gemma3.tokenizer.bos_token_id
    decoded = [token.text for component in explanation.spectra[-1].components for token in component.left_tokens]  # type: ignore[attr-defined]
    assert " only" in decoded
