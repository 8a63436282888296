"""Layer-by-layer analysis end to end: the real server with SmolLM2, real gRPC, the SDK and the CLI.

Layers with Jacobians cost hidden_size VJPs each (seconds on a CPU), so these tests ask for one or two of them and
use the cheap parts (the layers x tokens matrix, the blocks' logit shares: one batched VJP) for everything else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import free_port
from prometheus_client.parser import text_string_to_metric_families

from linlens.client import (
    NO_RETRY,
    Client,
    DeadlineExceededError,
    ExplainMethod,
    ExplainOptions,
    Explanation,
    GenerationDone,
    InvalidArgumentError,
    LayerAnalysisOptions,
    LayerAttributions,
    LayerResult,
    collect_stream,
)
from linlens.v1 import linlens_pb2 as pb
from linlens.v1 import linlens_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PROMPT = "The bridge out of Marin is the"
ROOT = Path(__file__).resolve().parent.parent
LAYERS = 30  # SmolLM2-135M


def test_explain_returns_the_exact_layer_matrix_and_layer_maps(target: str) -> None:
    options = ExplainOptions(
        top_k=0,
        method=ExplainMethod.FULL,
        layers=LayerAnalysisOptions(layers=(29, 5), top_k=2, tokens_per_vector=4),
    )
    with Client(target) as client:
        result = client.explain(PROMPT, options=options, timeout=120)
    summary = result.layer_attributions
    assert summary is not None and summary.step == 0
    n = len(result.explanation.input_ids)
    assert summary.per_layer.shape == (LAYERS, n) == summary.attention.shape == summary.mlp.shape
    assert summary.direct.shape == (n,) and summary.attention_logits.shape == (LAYERS,)
    # The matrix plus the embeddings' direct path is the logit (SmolLM2 has no biases, so no constants).
    logit = result.explanation.attributions[0].total
    assert summary.logit == pytest.approx(logit, rel=1e-6)
    total = float(summary.per_layer.astype(np.float64).sum() + summary.direct.astype(np.float64).sum())
    assert abs(total - logit) <= 1e-4 * abs(logit)
    np.testing.assert_allclose(summary.per_layer, summary.attention + summary.mlp, rtol=1e-5, atol=1e-6)
    assert summary.completeness_error <= 1e-5 and summary.decomposition_error <= 1e-5
    assert summary.explained.text == " only" and summary.input_tokens[-1] == " the"

    assert [r.layer for r in result.layers] == [29, 5]
    for layer in result.layers:
        assert layer.step == 0 and layer.vjp_count == 576
        up_to = layer.up_to_layer
        assert up_to is not None and up_to.reconstruction_error <= 1e-5
        assert len(up_to.components) == 2 and len(up_to.components[0].left_tokens) == 4
        assert up_to.stable_rank >= 1.0 and layer.layer_alone is None
        # Each block's share equals its row of the matrix (no constants) and its total in the summary.
        for block, row, totals in (
            (layer.attention, summary.attention, summary.attention_logits),
            (layer.mlp, summary.mlp, summary.mlp_logits),
        ):
            assert block.layer == layer.layer and block.spectrum is None
            assert block.logit == pytest.approx(float(totals[layer.layer]), rel=1e-5, abs=1e-6)
            np.testing.assert_allclose(block.per_token, row[layer.layer], rtol=1e-5, atol=1e-6)
        assert layer.attention.component == "attention" and layer.mlp.component == "mlp"
    # Up to the last layer, the map's top direction reads as the prediction itself.
    last = result.layers[0].up_to_layer
    assert last is not None and last.components[0].left_tokens[0].text == " only"


def test_generate_stream_sends_layer_events_live_and_in_order(target: str) -> None:
    # up_to_layer off: the blocks' shares and the matrix only, no Jacobians, so this is fast.
    layers = LayerAnalysisOptions(layers=(7, 2, 29), up_to_layer=False)
    options = ExplainOptions(steps=[1], top_k=0, layers=layers)
    with Client(target) as client:
        events = list(client.generate_stream(PROMPT, max_new_tokens=2, explain=options, timeout=120))
        unary = client.generate(PROMPT, max_new_tokens=2, explain=options, timeout=120)
    kinds = [type(e).__name__ for e in events]
    assert isinstance(events[-1], GenerationDone) and kinds.count("GenerationDone") == 1
    explanation_at = next(i for i, e in enumerate(events) if isinstance(e, Explanation))
    summary_at = next(i for i, e in enumerate(events) if isinstance(e, LayerAttributions))
    layer_events = [e for e in events if isinstance(e, LayerResult)]
    assert explanation_at < summary_at < events.index(layer_events[0])
    assert [e.layer for e in layer_events] == [7, 2, 29]
    assert all(e.step == 1 and e.up_to_layer is None and e.vjp_count == 0 for e in layer_events)
    summary = events[summary_at]
    assert isinstance(summary, LayerAttributions) and summary.step == 1
    # The explained token of step 1 is the generated token " one", read after " only".
    assert summary.explained.text == " one" and summary.input_tokens[-1] == " only"

    generation = collect_stream(events)
    streamed = generation.explanations[0]
    assert streamed.layer_attributions is not None and [r.layer for r in streamed.layers] == [7, 2, 29]
    # Generate (unary) carries the same analysis inside its Explanation.
    exp = unary.explanations[0]
    assert exp.step == 1 and exp.layer_attributions is not None
    np.testing.assert_allclose(exp.layer_attributions.per_layer, summary.per_layer, rtol=1e-5, atol=1e-6)
    assert [r.layer for r in exp.layers] == [7, 2, 29]


@pytest.mark.parametrize(
    ("layers", "steps", "message"),
    [
        (
            pb.LayerAnalysisOptions(layers=[30]),
            None,
            "options.layers.layers names layer(s) [30], but the model has layers 0..29",
        ),
        (pb.LayerAnalysisOptions(layers=[3, 3]), None, "options.layers.layers names a layer more than once"),
        (pb.LayerAnalysisOptions(layers=[1], every=2), None, "options.layers.every cannot be combined with explicit"),
        (
            pb.LayerAnalysisOptions(layers=[1], top_k=9),
            None,
            "options.layers.top_k is 9, above this server's limit of 8",
        ),
        (
            pb.LayerAnalysisOptions(layers=[1], tokens_per_vector=0),
            None,
            "options.layers.tokens_per_vector must be at least 1",
        ),
        # every layer for three steps: 90 layers with Jacobians, above the default max_analyzed_layers of 64
        (pb.LayerAnalysisOptions(), [0, 1, 2], "max_analyzed_layers"),
    ],
)
def test_bad_layer_options_are_invalid_argument(
    target: str, layers: pb.LayerAnalysisOptions, steps: list[int] | None, message: str
) -> None:
    stub = pb_grpc.LinlensServiceStub(grpc.insecure_channel(target))
    if steps is None:
        request: pb.ExplainRequest | pb.GenerateRequest = pb.ExplainRequest(
            input=pb.Input(text=PROMPT), options=pb.ExplainOptions(top_k=0, layers=layers)
        )
        call = stub.Explain
    else:
        request = pb.GenerateRequest(
            input=pb.Input(text=PROMPT),
            sampling=pb.SamplingParams(max_new_tokens=3),
            explain=pb.ExplainOptions(steps=pb.EXPLAIN_STEPS_LIST, step_indices=steps, top_k=0, layers=layers),
        )
        call = stub.Generate
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details() or ""
    assert message in details or (message == "max_analyzed_layers" and "limit of 64" in details), details
    # The server keeps serving: a cheap layer request right after works.
    ok = stub.Explain(
        pb.ExplainRequest(
            input=pb.Input(text="Hello"),
            options=pb.ExplainOptions(top_k=0, layers=pb.LayerAnalysisOptions(every=10, up_to_layer=False)),
        ),
        timeout=60,
    )
    assert [r.layer for r in ok.explanation.layers] == [0, 10, 20, 29]


def test_sdk_rejects_bad_layer_options_like_the_server(target: str) -> None:
    with Client(target) as client, pytest.raises(InvalidArgumentError, match=r"0\.\.29"):
        client.explain(PROMPT, options=ExplainOptions(top_k=0, layers=LayerAnalysisOptions(layers=(40,))))


def test_deadline_stops_a_long_layer_analysis(target: str) -> None:
    """Every layer's layer-alone and block spectra (one Krylov solve per map on the whole graph) take tens of seconds
    on a CPU; a short deadline stops them (the cancel token reaches the engine), and the next request does not wait
    behind the rest of the analysis. (The up-to-layer maps alone now finish within the deadline: the layer chain.)"""
    options = ExplainOptions(top_k=0, layers=LayerAnalysisOptions(layer_alone=True, component_spectra=True))
    with Client(target, retry=NO_RETRY) as client:
        with pytest.raises(DeadlineExceededError):
            client.explain(PROMPT, options=options, timeout=3)
        started = time.monotonic()
        result = client.explain("Hello", options=ExplainOptions(top_k=0), timeout=60)
        waited = time.monotonic() - started
    assert result.explanation.predicted.text
    assert waited < 10, f"the next request waited {waited:.1f} s: the layer analysis was not stopped"


def test_layer_phase_time_is_exported(make_server: Callable[..., Any]) -> None:
    running = make_server(metrics_host="127.0.0.1", metrics_port=free_port())
    options = ExplainOptions(top_k=0, layers=LayerAnalysisOptions(every=10, up_to_layer=False))
    with Client(running.target) as client:
        client.explain(PROMPT, options=options, timeout=60)
    with urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {
        (sample.name, sample.labels.get("phase")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("linlens_explanation_phase_duration_seconds")
    }
    assert samples[("linlens_explanation_phase_duration_seconds_count", "layers")] == 1
    assert samples[("linlens_explanation_phase_duration_seconds_sum", "layers")] > 0


def test_cli_in_process_layers_table() -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "linlens.cli",
            "explain",
            PROMPT,
            "--top-k",
            "0",
            "--layers",
            "29",
            "--layer-top-k",
            "1",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    out = completed.stdout
    assert "predicted: ' only'" in out
    table = out[out.index("layer by layer") :]
    lines = table.splitlines()
    row = next(line for line in lines if line.lstrip().startswith("29") and "up-to-layer" in line)
    assert "' only'" in row and "+100.0%" in row
    assert any(line.strip().startswith("attention") for line in lines)
    assert any(line.strip().startswith("mlp") for line in lines)
    # The heat map: one row per layer (0..29), the direct path, then the token legend.
    heat = table[table.index("layers x tokens") :].splitlines()
    assert [line.split()[0] for line in heat[2:32]] == [str(i) for i in range(LAYERS)]
    assert heat[32].split()[0] == "dir" and "' Marin'" in heat[33]


def test_cli_layers_through_the_server_prints_json(target: str) -> None:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "linlens.cli",
            "explain",
            PROMPT,
            "--server",
            target,
            "--top-k",
            "0",
            "--layers",
            "every:10",
            "--no-up-to-layer",
            "--json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    document = json.loads(completed.stdout)["explanation"]
    assert [entry["layer"] for entry in document["layers"]] == [0, 10, 20, 29]
    per_layer = np.array(document["layer_attributions"]["per_layer"])
    assert per_layer.shape == (LAYERS, 7)
    assert document["layers"][0]["attention"]["component"] == "attention"
    # The numbers are the explanation's: the matrix and the direct path sum to the explained logit.
    total = per_layer.sum() + sum(document["layer_attributions"]["direct"])
    assert total == pytest.approx(document["layer_attributions"]["logit"], rel=1e-5)
