"""The served model's own answer in an explanation pass (engine/forward.py, ModelContext.twin_is_served), issue 17.

Where the twin computes the served model's numbers bit for bit (the same precision, the same attention kernel's values,
a gate mode whose frozen arithmetic is the model's), the pass reads the prediction off the twin's forward instead of
running the served model a second time; everywhere else it runs the served model. Either way the prediction must be the
served model's own forward pass, bit for bit: these tests compare it with an independent forward through the untouched
model, on every family (most tiny models run transformers' SDPA attention, whose values the twin reproduces; Gemma 2
eager) and on a Llama switched to eager attention. The reconstruction's logits, read off the LM head once with the
prediction's, are checked against W (J x + c) recomputed here.

Breakages these tests were seen to catch (each made once on purpose): the probe of twin_is_served replaced by "always
shared" (the bitwise check fails on all 18: FREEZE_UP's twin rounds act(g) differently everywhere, and GPT-2's,
GPT-NeoX's and the mixtures' twins differ in every mode), the reconstruction reusing W y without checking that J x + c
is y bit for bit (the shifted y_linear test fails), and the SDPA twin computing eager values again (the probe then says
"not shared": the expected-sharing check fails on the 12 SDPA families that share).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import FAMILIES, sample_ids

from linlens.engine import ExplainOptions, GateMode, LayerAnalysisOptions, Precision
from linlens.engine.explanation import reconstructed
from linlens.engine.forward import ExplanationPass
from linlens.models import LoadedModel, load_model


@pytest.fixture(scope="module")
def eager_llama(folders: dict[str, Path]) -> LoadedModel:
    """A tiny Llama served with eager attention (the twin's own kind, the server's ``attention: eager`` setting): its
    twin is the served model bit for bit."""
    return load_model(str(folders["llama"]), attention="eager")


def _served_y(model: LoadedModel, ids: list[int]) -> torch.Tensor:
    """The served model's final hidden state at the last position, by an independent forward pass."""
    with torch.no_grad():
        return model.model.base_model(input_ids=torch.tensor([ids]), use_cache=False).last_hidden_state[0, -1]


def _logits(model: LoadedModel, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model.model(input_ids=torch.tensor([ids])).logits[0, -1]


#: Families whose float32 twin (default gate mode) is the served model bit for bit. Not GPT-2 and GPT-NeoX (their
#: non-gated MLP freezes s(h) of gelu(h) = h * s(h), which rounds differently) nor the mixtures of experts (the twin
#: runs the experts' eager loop, the served model transformers' grouped kernel).
SHARES_THE_SERVED_PASS = frozenset(FAMILIES) - {"gpt2", "gpt_neox", "mixtral", "qwen3_moe", "olmoe"}


@pytest.mark.parametrize("family", FAMILIES)
def test_prediction_is_the_served_models_own_forward(loaded: dict[str, LoadedModel], family: str) -> None:
    """In every precision and gate mode, shared or not, y and the logits are the served model's own, bit for bit."""
    model = loaded[family]
    ids = sample_ids()
    expected_y, expected_logits = _served_y(model, ids), _logits(model, ids)
    reported: set[float] = set()
    for precision in (Precision.FLOAT32, Precision.FLOAT64):
        for mode in GateMode:
            options = ExplainOptions(top_k=0, precision=precision, gate_mode=mode)
            p = ExplanationPass(model.explainer.context, ids, options)
            assert torch.equal(p.prediction.y_model, expected_y), (precision, mode, p.served_by_twin)
            assert p.prediction.predicted.token_id == int(torch.argmax(expected_logits))
            head = model.explainer.context.decoder.lm_head  # the logit before any soft-capping, as reported
            logit = float(head[p.prediction.predicted.token_id] @ expected_y)
            assert abs(p.prediction.predicted.logit - logit) <= 1e-5 * max(1.0, abs(logit))
            reported.add(p.prediction.predicted.logit)
            # Another precision always runs the served model itself; the served precision shares where it can.
            assert not (p.served_by_twin and precision is Precision.FLOAT64)
            if precision is Precision.FLOAT32 and mode is GateMode.FREEZE_GATE:
                assert p.served_by_twin == (family in SHARES_THE_SERVED_PASS), p.served_by_twin
    # The served model's answer does not depend on the request: the same logit to the last bit in every pass.
    assert len(reported) == 1, reported


def test_an_eager_model_shares_its_forward_with_the_twin(eager_llama: LoadedModel) -> None:
    """Served with eager attention, the twin of the served precision is the served model: the pass runs one forward,
    and what it reports is unchanged (y bit for bit the model's, the reconstruction a real check against it)."""
    ids = sample_ids()
    context = eager_llama.explainer.context
    assert context.twin_is_served(Precision.FLOAT32, GateMode.FREEZE_GATE)
    assert not context.twin_is_served(Precision.FLOAT64, GateMode.FREEZE_GATE)
    p = ExplanationPass(context, ids, ExplainOptions(top_k=0))
    assert p.served_by_twin
    assert torch.equal(p.prediction.y_model, _served_y(eager_llama, ids))
    explanation = eager_llama.explainer.explain(ids, ExplainOptions(top_k=1))
    assert explanation.predicted.token_id == int(torch.argmax(_logits(eager_llama, ids)))
    recon = explanation.reconstruction
    assert recon is not None and recon.predicts_same_token and recon.relative_error_vs_model < 5e-6
    # The generation the service runs with this model is untouched by the probe and the explanations.
    assert eager_llama.model.config._attn_implementation == "eager"


def test_reconstruction_logits_follow_y_linear(loaded: dict[str, LoadedModel]) -> None:
    """W y is reused for the reconstruction only where J x + c is y bit for bit; any other y_linear is read off the
    LM head itself (here y_linear shifted along one LM-head row: its logit error must show the shift)."""
    model = loaded["llama"]
    ids = sample_ids()
    p = ExplanationPass(model.explainer.context, ids, ExplainOptions(top_k=0))
    assert p.logits_of_y is not None
    y = p.y.detach()
    same = reconstructed(y.clone(), y, p.prediction, p.head, logits_of_y=p.logits_of_y)
    fresh = reconstructed(y.clone(), y, p.prediction, p.head)
    assert same.linear_token_id == fresh.linear_token_id
    assert abs(same.max_abs_logit_error - fresh.max_abs_logit_error) <= 1e-5
    row = p.head[7]
    shifted = y + 3.0 * row / row.norm() ** 2  # W y + 3 at token 7 (plus its overlap with the other rows)
    moved = reconstructed(shifted, y, p.prediction, p.head, logits_of_y=p.logits_of_y)
    expected = float((p.head @ shifted - p.prediction.logits).abs().max())
    assert moved.max_abs_logit_error >= 2.9
    assert abs(moved.max_abs_logit_error - expected) <= 1e-4 * expected


def test_the_prefix_is_kept_only_where_something_reads_it(loaded: dict[str, LoadedModel]) -> None:
    """Attributions and the reconstruction alone keep no key/value cache; a last-position spectrum or a layer
    analysis keeps the prefix its graph needs."""
    context = loaded["llama"].explainer.context
    ids = sample_ids()
    bare = ExplanationPass(context, ids, ExplainOptions(top_k=0))
    assert not bare.keeps_prefix and bare.prefix == []
    with pytest.raises(RuntimeError, match="kept no prefix"):
        bare.position_graph()
    for options in (ExplainOptions(), ExplainOptions(top_k=0, layers=LayerAnalysisOptions(top_k=1))):
        p = ExplanationPass(context, ids, options)
        assert p.keeps_prefix and len(p.prefix) == context.num_layers
        assert p.prefix[0][0].shape[-2] == len(ids) - 1


def test_a_server_set_to_eager_attention_serves_and_explains_with_one_forward(folders: dict[str, Path]) -> None:
    """The server's ``attention`` setting reaches the loader: a real server on a tiny Llama folder with ``attention
    eager`` serves a model whose twin is the served model, and a real Explain call over gRPC reports the served
    model's own prediction (checked against an independent forward of an SDPA load of the same folder)."""
    from conftest import server_config

    from linlens.client import Client
    from linlens.client import ExplainOptions as ClientOptions
    from linlens.server.app import start_server

    folder = str(folders["llama"])
    config = server_config(models=(folder,), attention="eager")
    assert config.served_attention == "eager" and server_config().served_attention is None
    running = start_server(config, load_in_background=False)
    try:
        loaded = running.host.ready(running.host.default_name)
        assert loaded.model.config._attn_implementation == "eager"
        assert loaded.explainer.context.twin_is_served(Precision.FLOAT32, GateMode.FREEZE_GATE)
        ids = sample_ids()
        reference = load_model(folder)  # transformers' own choice (SDPA)
        assert reference.model.config._attn_implementation == "sdpa"
        with Client(running.target, timeout=120) as client:
            result = client.explain(token_ids=ids, options=ClientOptions(top_k=0))
        assert result.explanation.predicted.token_id == int(torch.argmax(_logits(reference, ids)))
        assert result.explanation.reconstruction is not None
        assert result.explanation.reconstruction.relative_error_vs_model < 5e-6
    finally:
        running.stop()
