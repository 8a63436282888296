"""Unit tests of the client SDK and the contract: message conversion, error mapping, retries, streaming, health.

No model is involved. The transport tests run a real gRPC server in-process on a free localhost port with a small
scripted LinlensService (the request says which status to abort with, how often to fail first, ...), so the client is
exercised through real channels, real status codes and real deadlines. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent import futures
from dataclasses import FrozenInstanceError
from typing import Any

import grpc
import numpy as np
import pytest

from linlens.client import (
    AsyncClient,
    AttributionTarget,
    CancelledError,
    ChatMessage,
    Client,
    ComponentContribution,
    DeadlineExceededError,
    ExplainOptions,
    Explanation,
    FailedPreconditionError,
    FinishReason,
    GateMode,
    GeneratedToken,
    GenerationDone,
    HealthStatus,
    InternalError,
    InvalidArgumentError,
    LayerAnalysisOptions,
    LayerAttributions,
    LayerResult,
    LinearMapSpectrum,
    LinlensError,
    ModelInfo,
    ModelState,
    NotFoundError,
    OptionError,
    PositionSelection,
    Precision,
    ResourceExhaustedError,
    RetryPolicy,
    ServerUnreachableError,
    Timings,
    UnauthenticatedError,
    UnavailableError,
    Usage,
    collect_stream,
    to_jsonable,
)
from linlens.client.health import decode_health_response, encode_health_request
from linlens.contract import TensorDecodeError, array_from_tensor, tensor_from_array
from linlens.contract.requests import build_input, build_sampling
from linlens.contract.retry_hint import NO_RETRY_KEY, NO_RETRY_VALUE
from linlens.contract.wire import (
    explain_options_from_proto,
    explain_options_to_proto,
    explain_result_from_proto,
    explanation_from_proto,
    explanation_to_proto,
    generation_from_proto,
    layer_attributions_from_proto,
    layer_options_from_proto,
    layer_result_from_proto,
    stream_event_from_proto,
)
from linlens.v1 import linlens_pb2 as pb
from linlens.v1 import linlens_pb2_grpc as pb_grpc

FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.05, multiplier=2.0, jitter=0.5)

# ----------------------------------------------------------------------------------------------------------------
# Tensors
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3), (2, 3, 4)])
def test_tensor_round_trip_keeps_values_shape_and_precision(dtype: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    array = rng.standard_normal(shape).astype(dtype)
    message = tensor_from_array(array)
    assert list(message.shape) == list(shape)
    assert message.dtype == (pb.TENSOR_DTYPE_FLOAT32 if dtype == "float32" else pb.TENSOR_DTYPE_FLOAT64)
    # The wire bytes are little-endian and row-major whatever the host is.
    assert message.data == array.astype("<f4" if dtype == "float32" else "<f8").tobytes(order="C")
    # Through real serialisation, as it travels.
    decoded = array_from_tensor(pb.Tensor.FromString(message.SerializeToString()))
    assert decoded.dtype == np.dtype(dtype)
    assert decoded.shape == shape
    np.testing.assert_array_equal(decoded, array)
    assert not decoded.flags.writeable


def test_tensor_decodes_hand_written_little_endian_bytes() -> None:
    data = b"".join(np.array([v], dtype="<f8").tobytes() for v in (1.0, -2.5, 3.25, 0.0, 1e-300, 7.0))
    decoded = array_from_tensor(pb.Tensor(shape=[2, 3], dtype=pb.TENSOR_DTYPE_FLOAT64, data=data))
    np.testing.assert_array_equal(decoded, [[1.0, -2.5, 3.25], [0.0, 1e-300, 7.0]])
    big_endian = np.array([1.5, 2.5], dtype=">f4")
    message = tensor_from_array(big_endian)
    assert message.data == np.array([1.5, 2.5], dtype="<f4").tobytes()


def test_tensor_defaults_and_forced_dtype() -> None:
    assert tensor_from_array(np.arange(3, dtype=np.float16)).dtype == pb.TENSOR_DTYPE_FLOAT32
    assert tensor_from_array([1, 2, 3]).dtype == pb.TENSOR_DTYPE_FLOAT32
    forced = tensor_from_array(np.ones(2, dtype=np.float32), dtype="float64")
    assert forced.dtype == pb.TENSOR_DTYPE_FLOAT64 and len(forced.data) == 16
    with pytest.raises(ValueError, match="float32"):
        tensor_from_array([1.0], dtype="int8")


@pytest.mark.parametrize(
    "message",
    [
        pb.Tensor(shape=[3], dtype=pb.TENSOR_DTYPE_FLOAT32, data=b"\x00" * 8),
        pb.Tensor(shape=[2], dtype=pb.TENSOR_DTYPE_UNSPECIFIED, data=b"\x00" * 8),
        pb.Tensor(shape=[-1], dtype=pb.TENSOR_DTYPE_FLOAT32, data=b""),
    ],
)
def test_malformed_tensors_are_rejected(message: pb.Tensor) -> None:
    with pytest.raises(TensorDecodeError):
        array_from_tensor(message)


# ----------------------------------------------------------------------------------------------------------------
# Message conversion
# ----------------------------------------------------------------------------------------------------------------


def _component(rank: int, d: int) -> pb.SingularComponent:
    return pb.SingularComponent(
        rank=rank,
        value=10.0 / rank,
        left=tensor_from_array(np.full(d, rank, dtype=np.float32)),
        right=tensor_from_array(np.full(d, -rank, dtype=np.float32)),
        left_tokens=[pb.TokenScore(token_id=7, text=" the", score=3.5)],
        right_tokens=[pb.TokenScore(token_id=8, text=" a", score=0.9), pb.TokenScore(token_id=9, text="b", score=0.1)],
    )


def sample_explanation(step: int = 0, d: int = 4, with_jacobians: bool = True) -> pb.Explanation:
    """A fully populated Explanation message (what a server would send for a 3-token input, top_k 2)."""
    rng = np.random.default_rng(step)
    message = pb.Explanation(
        step=step,
        input_ids=[1, 2, 3],
        input_tokens=["<s>", "The", " bridge"],
        predicted=pb.PredictedToken(token_id=7, text=" the", logit=12.5, probability=0.4),
        explained=pb.PredictedToken(token_id=8, text=" a", logit=11.0, probability=0.2),
        y=tensor_from_array(rng.standard_normal(d).astype(np.float32)),
        constant=tensor_from_array(np.zeros(d, dtype=np.float32)),
        has_bias=False,
        reconstruction=pb.Reconstruction(
            relative_error_vs_model=1e-6,
            relative_error_vs_detached=2e-7,
            max_abs_logit_error=3e-5,
            predicts_same_token=True,
            linear_token_id=7,
        ),
        attributions=[
            pb.Attribution(
                target=pb.AttributionTarget(token_id=8),
                label="' a'",
                per_token=[1.0, 2.0, 8.0],
                constant=0.0,
                total=11.0,
                completeness_error=1e-7,
            ),
            pb.Attribution(
                target=pb.AttributionTarget(token_id=7, contrast_token_id=8),
                label="' the' - ' a'",
                per_token=[0.5, -0.25, 1.25],
                constant=0.0,
                total=1.5,
                completeness_error=0.0,
            ),
        ],
        spectra=[
            pb.PositionSpectrum(
                position=2,
                token_id=3,
                token_text=" bridge",
                components=[_component(1, d), _component(2, d)],
                singular_values=tensor_from_array(np.array([5.0, 2.0, 1.0, 0.5], dtype=np.float32)),
                captured_share=[0.7, 0.9],
                stable_rank=1.2,
                term_norm=4.5,
            )
        ],
        truncated_relative_error=[0.3, 0.1],
        ordinary=pb.OrdinaryContrast(relative_error_vs_model=0.8, predicts_same_token=False),
        precision=pb.PRECISION_FLOAT32,
        gate_mode=pb.GATE_MODE_FREEZE_UP,
        vjp_count=4,
        timings=pb.Timings(forward_ms=1.0, jacobian_ms=2.0, svd_ms=0.5, total_ms=3.5),
    )
    if with_jacobians:
        message.jacobians.CopyFrom(tensor_from_array(np.arange(3 * d * d, dtype=np.float32).reshape(3, d, d)))
    return message


def test_explanation_conversion_carries_every_field() -> None:
    exp = explanation_from_proto(pb.Explanation.FromString(sample_explanation(step=2).SerializeToString()))
    assert isinstance(exp, Explanation)
    assert exp.step == 2
    assert exp.input_ids == (1, 2, 3) and exp.input_tokens == ("<s>", "The", " bridge")
    assert (exp.predicted.token_id, exp.predicted.text, exp.predicted.logit, exp.predicted.probability) == (
        7,
        " the",
        12.5,
        0.4,
    )
    assert exp.explained.token_id == 8
    assert exp.y.shape == (4,) and exp.y.dtype == np.float32
    assert exp.constant.shape == (4,) and not exp.has_bias
    assert exp.reconstruction is not None
    assert exp.reconstruction.predicts_same_token and exp.reconstruction.linear_token_id == 7
    assert exp.reconstruction.relative_error_vs_detached == pytest.approx(2e-7)
    first, second = exp.attributions
    assert first.target == AttributionTarget(8) and first.label == "' a'"
    np.testing.assert_array_equal(first.per_token, [1.0, 2.0, 8.0])
    assert first.per_token.sum() + first.constant == pytest.approx(first.total)
    assert second.target == AttributionTarget(7, 8)
    (spectrum,) = exp.spectra
    assert (spectrum.position, spectrum.token_id, spectrum.token_text) == (2, 3, " bridge")
    assert [c.rank for c in spectrum.components] == [1, 2]
    np.testing.assert_array_equal(spectrum.components[1].left, np.full(4, 2.0))
    np.testing.assert_array_equal(spectrum.components[1].right, np.full(4, -2.0))
    assert [t.text for t in spectrum.components[0].right_tokens] == [" a", "b"]
    assert spectrum.components[0].left_tokens[0].score == 3.5
    np.testing.assert_array_equal(spectrum.singular_values, [5.0, 2.0, 1.0, 0.5])
    assert spectrum.captured_share == (0.7, 0.9)
    assert (spectrum.stable_rank, spectrum.term_norm) == (1.2, 4.5)
    assert exp.truncated_relative_error == (0.3, 0.1)
    assert exp.jacobians is not None and exp.jacobians.shape == (3, 4, 4)
    assert exp.jacobians[1, 2, 3] == 1 * 16 + 2 * 4 + 3
    assert exp.ordinary is not None and not exp.ordinary.predicts_same_token
    assert exp.precision is Precision.FLOAT32 and exp.gate_mode is GateMode.FREEZE_UP
    assert exp.vjp_count == 4
    assert exp.timings.jacobian_ms == 2.0 and exp.timings.total_ms == 3.5
    with pytest.raises(FrozenInstanceError):
        exp.step = 3  # type: ignore[misc]


def test_absent_optional_parts_become_none() -> None:
    message = sample_explanation(with_jacobians=False)
    message.ClearField("reconstruction")
    message.ClearField("ordinary")
    exp = explanation_from_proto(message)
    assert exp.jacobians is None and exp.reconstruction is None and exp.ordinary is None


def test_float64_explanations_stay_float64() -> None:
    message = sample_explanation()
    message.precision = pb.PRECISION_FLOAT64
    message.y.CopyFrom(tensor_from_array(np.array([1.0 + 1e-12, 2.0])))
    exp = explanation_from_proto(message)
    assert exp.precision is Precision.FLOAT64
    assert exp.y.dtype == np.float64 and exp.y[0] == 1.0 + 1e-12


def test_generation_and_stream_events_convert() -> None:
    response = pb.GenerateResponse(
        model="smollm2-135m",
        text=" only one",
        tokens=[
            pb.GeneratedToken(index=0, token_id=885, text=" only", logprob=-1.5),
            pb.GeneratedToken(index=1, token_id=582, text=" one", logprob=-0.5),
        ],
        finish_reason=pb.FINISH_REASON_LENGTH,
        usage=pb.Usage(prompt_tokens=8, completion_tokens=2, explained_steps=1),
        explanations=[sample_explanation()],
        timings=pb.Timings(queue_ms=1.0, generation_ms=20.0, total_ms=25.0),
        prompt_text="The bridge",
    )
    generation = generation_from_proto(response)
    assert generation.text == " only one" and generation.model == "smollm2-135m"
    assert generation.tokens[1] == GeneratedToken(index=1, token_id=582, text=" one", logprob=-0.5)
    assert generation.finish_reason is FinishReason.LENGTH
    assert generation.usage.completion_tokens == 2 and generation.usage.explained_steps == 1
    assert len(generation.explanations) == 1 and generation.timings.generation_ms == 20.0
    assert generation.prompt_text == "The bridge"

    token = stream_event_from_proto(pb.GenerateStreamResponse(token=response.tokens[0]))
    assert isinstance(token, GeneratedToken) and token.text == " only"
    explanation = stream_event_from_proto(pb.GenerateStreamResponse(explanation=sample_explanation(step=1)))
    assert isinstance(explanation, Explanation) and explanation.step == 1
    done = stream_event_from_proto(
        pb.GenerateStreamResponse(done=pb.GenerateDone(text="x", finish_reason=pb.FINISH_REASON_EOS))
    )
    assert isinstance(done, GenerationDone) and done.finish_reason is FinishReason.EOS
    assert stream_event_from_proto(pb.GenerateStreamResponse()) is None


def test_explain_options_map_to_the_message() -> None:
    default = explain_options_to_proto(ExplainOptions())
    assert default.steps == pb.EXPLAIN_STEPS_FIRST
    # The defaults have one home, the dataclass: the SDK sends them explicitly, and a bare message (another
    # language's client leaving fields unset) decodes to the very same options.
    assert default.HasField("top_k") and default.top_k == 3 and default.tokens_per_vector == 8
    for name in ("explained_token_id", "vjp_chunk_size"):
        assert not default.HasField(name)
    assert default.precision == pb.PRECISION_FLOAT32 and default.gate_mode == pb.GATE_MODE_FREEZE_GATE
    assert default.positions == pb.POSITION_SELECTION_LAST
    assert explain_options_from_proto(pb.ExplainOptions()) == ExplainOptions()
    assert explain_options_from_proto(default) == ExplainOptions()

    options = ExplainOptions(
        steps=[0, 3],
        top_k=0,
        tokens_per_vector=5,
        positions="all",  # type: ignore[arg-type]
        targets=(AttributionTarget(5), 6, (7, 8)),
        include_jacobians=True,
        precision=Precision.FLOAT64,
        ordinary_contrast=True,
        gate_mode=GateMode.FREEZE_UP,
        explained_token_id=42,
        vjp_chunk_size=64,
    )
    assert options.positions is PositionSelection.ALL and options.steps == (0, 3)
    message = explain_options_to_proto(options)
    assert message.steps == pb.EXPLAIN_STEPS_LIST and list(message.step_indices) == [0, 3]
    assert message.HasField("top_k") and message.top_k == 0
    assert message.tokens_per_vector == 5 and message.positions == pb.POSITION_SELECTION_ALL
    assert [(t.token_id, t.HasField("contrast_token_id")) for t in message.targets] == [
        (5, False),
        (6, False),
        (7, True),
    ]
    assert message.targets[2].contrast_token_id == 8
    assert message.include_jacobians and message.ordinary_contrast
    assert message.precision == pb.PRECISION_FLOAT64 and message.gate_mode == pb.GATE_MODE_FREEZE_UP
    assert message.explained_token_id == 42 and message.vjp_chunk_size == 64
    assert explain_options_to_proto(ExplainOptions(steps="all")).steps == pb.EXPLAIN_STEPS_ALL
    # Both directions are one mapping: through the wire and back, the options are unchanged.
    assert explain_options_from_proto(pb.ExplainOptions.FromString(message.SerializeToString())) == options
    layered = ExplainOptions(steps="all", layers=LayerAnalysisOptions(every=4, layer_alone=True, top_k=1))
    assert explain_options_from_proto(explain_options_to_proto(layered)) == layered


def test_the_proto_documents_the_dataclass_defaults() -> None:
    """The proto's comments state the defaults of unset fields; they must be the dataclasses' own."""
    from pathlib import Path

    proto = (Path(__file__).resolve().parents[1] / "protos/linlens/v1/linlens.proto").read_text()
    explain, layers = proto.split("message ExplainOptions {")[1], proto.split("message LayerAnalysisOptions {")[1]
    assert f"Unset means {ExplainOptions().top_k}." in explain.split("optional uint32 top_k")[0]
    assert f"Unset means {ExplainOptions().tokens_per_vector}." in explain.split("optional uint32 tokens_per_vector")[0]
    assert f"Unset means {LayerAnalysisOptions().top_k};" in layers.split("optional uint32 top_k")[0]
    assert f"Unset means {LayerAnalysisOptions().tokens_per_vector}." in layers.split("optional uint32 tokens_per")[0]
    assert layer_options_from_proto(pb.LayerAnalysisOptions()) == LayerAnalysisOptions()


def test_unknown_enum_values_on_the_wire_name_the_field() -> None:
    with pytest.raises(OptionError, match="precision 7 is not a known Precision value"):
        explain_options_from_proto(pb.ExplainOptions(precision=7))  # type: ignore[arg-type]
    with pytest.raises(OptionError, match="steps 9 is not a known ExplainSteps value"):
        explain_options_from_proto(pb.ExplainOptions(steps=9))  # type: ignore[arg-type]
    with pytest.raises(OptionError, match="step_indices is empty"):
        explain_options_from_proto(pb.ExplainOptions(steps=pb.EXPLAIN_STEPS_LIST))
    with pytest.raises(OptionError, match=r"layers\.every cannot be combined"):
        explain_options_from_proto(pb.ExplainOptions(layers=pb.LayerAnalysisOptions(layers=[1], every=2)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": "some"}, "step_indices must be 'all'/'first' or a sequence"),
        ({"steps": [-1]}, r"step_indices holds negative step indices \[-1\]"),
        ({"steps": [1, 1]}, "step_indices names a step more than once"),
        ({"steps": []}, "step_indices is empty"),
        ({"top_k": -1}, "top_k must be at least 0, got -1"),
        ({"tokens_per_vector": 0}, "tokens_per_vector must be at least 1, got 0"),
        ({"vjp_chunk_size": 0}, "vjp_chunk_size must be at least 1, got 0"),
        ({"explained_token_id": -2}, "explained_token_id must be a token id"),
        ({"targets": [5, "x"]}, r"targets\[1\] cannot be used as an attribution target: 'x'"),
        ({"targets": [(-1, 2)]}, r"targets\[0\].token_id must be a token id \(>= 0\), got -1"),
        ({"precision": "float16"}, "precision must be one of float32, float64, bfloat16"),
        ({"gate_mode": "freeze_all"}, "gate_mode must be one of"),
    ],
)
def test_bad_explain_options_fail_locally(kwargs: dict[str, Any], message: str) -> None:
    """The options' own rules: one home (the dataclass), the same code on the client and the server."""
    with pytest.raises(OptionError, match=message):
        ExplainOptions(**kwargs)


def test_explained_steps_must_be_reachable() -> None:
    assert ExplainOptions().explained_steps(4) == (0,)
    assert ExplainOptions(steps="all").explained_steps(4) is None
    assert ExplainOptions(steps=(3, 0)).explained_steps(4) == (0, 3)
    with pytest.raises(OptionError, match=r"step_indices names step\(s\) \[1000000\].*max_new_tokens 2"):
        ExplainOptions(steps=(0, 1_000_000)).explained_steps(2)


def test_layer_options_map_to_the_message() -> None:
    every = explain_options_to_proto(ExplainOptions(layers=LayerAnalysisOptions.parse("every:5")))
    assert every.HasField("layers") and every.layers.every == 5 and not every.layers.layers
    assert every.layers.up_to_layer and every.layers.HasField("up_to_layer")
    assert every.layers.top_k == 3 and every.layers.tokens_per_vector == 8
    assert not explain_options_to_proto(ExplainOptions()).HasField("layers")
    everything = explain_options_to_proto(ExplainOptions(layers=LayerAnalysisOptions())).layers
    assert not everything.layers and everything.every == 0
    explicit = LayerAnalysisOptions.parse(
        "10,0,5", up_to_layer=False, layer_alone=True, component_spectra=True, top_k=0, tokens_per_vector=2
    )
    assert explicit.layers == (10, 0, 5)
    message = explain_options_to_proto(ExplainOptions(top_k=0, layers=explicit)).layers
    assert list(message.layers) == [10, 0, 5] and message.every == 0
    assert message.HasField("up_to_layer") and not message.up_to_layer
    assert message.layer_alone and message.component_spectra
    assert message.HasField("top_k") and message.top_k == 0 and message.tokens_per_vector == 2


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: LayerAnalysisOptions(layers=(3,), every=2), "every cannot be combined with explicit layers"),
        (lambda: LayerAnalysisOptions(layers=(-1,)), "layers holds negative layer indices"),
        (lambda: LayerAnalysisOptions(layers=(2, 2)), "layers names a layer more than once"),
        (lambda: LayerAnalysisOptions(layers=()), "layers is empty"),
        (lambda: LayerAnalysisOptions(layers="some"), "layers must be"),  # type: ignore[arg-type]
        (lambda: LayerAnalysisOptions(every=0), "every must be at least 1"),
        (lambda: LayerAnalysisOptions(top_k=-1), "top_k must be at least 0"),
        (lambda: LayerAnalysisOptions.parse("every:x"), "every:K needs an integer"),
        (lambda: LayerAnalysisOptions.parse("1,two"), "comma-separated layer indices"),
        (lambda: ExplainOptions(layers=True), "layers must be LayerAnalysisOptions"),  # type: ignore[arg-type]
    ],
)
def test_bad_layer_options_fail_locally(make: Any, message: str) -> None:
    with pytest.raises(OptionError, match=message):
        make()


def test_layer_selection_needs_the_model_size() -> None:
    assert LayerAnalysisOptions().selected(3) == (0, 1, 2)
    assert LayerAnalysisOptions(every=10).selected(30) == (0, 10, 20, 29)
    assert LayerAnalysisOptions(layers=(5, 1)).selected(6) == (5, 1)
    with pytest.raises(OptionError, match=r"names layer\(s\) \[6\], but the model has layers 0..5"):
        LayerAnalysisOptions(layers=(6,)).selected(6)
    assert LayerAnalysisOptions(up_to_layer=False).vjps_per_layer(64) == 0
    assert LayerAnalysisOptions(layer_alone=True, component_spectra=True).vjps_per_layer(64) == 3 * 64


def _linear_map(d: int, error: float) -> pb.LinearMapSpectrum:
    return pb.LinearMapSpectrum(
        components=[_component(1, d)],
        singular_values=tensor_from_array(np.array([3.0, 1.0, 0.5, 0.1], dtype=np.float32)),
        captured_share=[0.8],
        stable_rank=1.1,
        term_norm=2.5,
        reconstruction_error=error,
    )


def sample_layer_messages(step: int, d: int = 4) -> tuple[pb.LayerAttributions, list[pb.LayerResult]]:
    """What a server sends for a 2-layer model and a 3-token input, layers [1, 0]."""
    matrix = np.arange(6, dtype=np.float32).reshape(2, 3)
    summary = pb.LayerAttributions(
        step=step,
        explained=pb.PredictedToken(token_id=7, text=" the", logit=12.5, probability=0.4),
        input_tokens=["<s>", "The", " bridge"],
        attention=tensor_from_array(matrix / 2),
        mlp=tensor_from_array(matrix / 2),
        per_layer=tensor_from_array(matrix),
        direct=tensor_from_array(np.array([0.0, 0.0, -2.5], dtype=np.float32)),
        attention_logits=tensor_from_array(np.array([1.5, 6.0], dtype=np.float32)),
        mlp_logits=tensor_from_array(np.array([1.5, 6.0], dtype=np.float32)),
        logit=12.5,
        completeness_error=1e-7,
        decomposition_error=2e-7,
    )
    results = []
    for layer in (1, 0):
        result = pb.LayerResult(
            step=step,
            layer=layer,
            attention=pb.ComponentContribution(
                layer=layer,
                component=pb.LAYER_COMPONENT_ATTENTION,
                logit=1.5,
                per_token=[0.5, 0.5, 0.5],
                y_norm=0.3,
                y_share=0.1,
                spectrum=_linear_map(d, 1e-7),
            ),
            mlp=pb.ComponentContribution(layer=layer, component=pb.LAYER_COMPONENT_MLP, logit=-1.0, per_token=[-1.0]),
            duration_ms=12.0,
            vjp_count=3 * d,
        )
        if layer == 1:
            result.up_to_layer.CopyFrom(_linear_map(d, 2e-7))
            result.layer_alone.CopyFrom(_linear_map(d, float("nan")))
        results.append(result)
    return summary, results


def test_layer_messages_convert_to_arrays_and_dataclasses() -> None:
    summary_message, result_messages = sample_layer_messages(step=1)
    summary = stream_event_from_proto(pb.GenerateStreamResponse(layer_attributions=summary_message))
    assert isinstance(summary, LayerAttributions) and summary.step == 1
    assert summary.per_layer.shape == (2, 3) and summary.per_layer.dtype == np.float32
    assert not summary.per_layer.flags.writeable
    np.testing.assert_array_equal(summary.per_layer, summary.attention + summary.mlp)
    assert summary.per_layer.sum() + summary.direct.sum() == pytest.approx(summary.logit)
    assert summary.explained.text == " the" and summary.input_tokens[2] == " bridge"
    first = stream_event_from_proto(pb.GenerateStreamResponse(layer=result_messages[0]))
    assert isinstance(first, LayerResult) and first.layer == 1 and first.step == 1 and first.vjp_count == 12
    assert isinstance(first.attention, ComponentContribution) and first.attention.component == "attention"
    assert first.mlp.component == "mlp" and first.mlp.spectrum is None
    assert first.attention.per_token.dtype == np.float64 and list(first.attention.per_token) == [0.5, 0.5, 0.5]
    assert isinstance(first.up_to_layer, LinearMapSpectrum) and first.up_to_layer.reconstruction_error == 2e-7
    assert first.up_to_layer.components[0].left_tokens[0].text == " the"
    assert first.layer_alone is not None and np.isnan(first.layer_alone.reconstruction_error)
    second = stream_event_from_proto(pb.GenerateStreamResponse(layer=result_messages[1]))
    assert isinstance(second, LayerResult) and second.up_to_layer is None and second.layer_alone is None

    # Explain and Generate carry the analysis in one place: inside the Explanation.
    message = sample_explanation(step=1)
    message.layer_attributions.CopyFrom(summary_message)
    message.layers.extend(result_messages)
    result = explain_result_from_proto(pb.ExplainResponse(model="m", explanation=message))
    assert result.layer_attributions is result.explanation.layer_attributions is not None
    assert [r.layer for r in result.layers] == [1, 0] == [r.layer for r in result.explanation.layers]
    plain = explain_result_from_proto(pb.ExplainResponse(explanation=sample_explanation()))
    assert plain.layer_attributions is None and plain.layers == ()
    exp = explanation_from_proto(message)
    assert exp.layer_attributions is not None and len(exp.layers) == 2
    # And back: the server's encoding of the same dataclass is the message it came from.
    assert explanation_to_proto(exp) == message
    data = json.loads(json.dumps(to_jsonable(exp)))
    assert data["layer_attributions"]["per_layer"] == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    assert data["layers"][0]["attention"]["component"] == "attention"


def test_collect_stream_attaches_layer_events_to_their_step() -> None:
    events: list[Any] = []
    for step in (0, 1):
        events.append(explanation_from_proto(sample_explanation(step=step)))
        summary, results = sample_layer_messages(step=step)
        events.append(layer_attributions_from_proto(summary))
        events.extend(layer_result_from_proto(r) for r in results)
    events.append(GenerationDone("m", "x", FinishReason.LENGTH, Usage(), Timings(), "p"))
    generation = collect_stream(events)
    for step, exp in enumerate(generation.explanations):
        assert exp.step == step and exp.layer_attributions is not None and exp.layer_attributions.step == step
        assert [r.layer for r in exp.layers] == [1, 0] and all(r.step == step for r in exp.layers)


def test_inputs_need_exactly_one_form() -> None:
    assert build_input("hi").text == "hi"
    assert list(build_input(token_ids=[1, 2]).token_ids.ids) == [1, 2]
    chat = build_input(
        messages=[ChatMessage("system", "be brief"), {"role": "user", "content": "hi"}, ("assistant", "hello")]
    ).chat
    assert [(m.role, m.content) for m in chat.messages] == [
        ("system", "be brief"),
        ("user", "hi"),
        ("assistant", "hello"),
    ]
    assert not chat.omit_generation_prompt
    assert build_input(messages=[("user", "x")], add_generation_prompt=False).chat.omit_generation_prompt
    with pytest.raises(ValueError, match="exactly one"):
        build_input()
    with pytest.raises(ValueError, match="exactly one"):
        build_input("a", token_ids=[1])
    with pytest.raises(ValueError, match="role"):
        build_input(messages=[{"content": "no role"}])


def test_sampling_defaults_and_wire_checks() -> None:
    default = build_sampling({})
    assert not default.HasField("max_new_tokens") and not default.HasField("seed")
    assert default.temperature == 0.0
    sampling = build_sampling(
        {"max_new_tokens": 4, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": 0, "stop": "\n"}
    )
    assert sampling.max_new_tokens == 4 and sampling.HasField("seed") and sampling.seed == 0
    assert list(sampling.stop_sequences) == ["\n"]
    assert list(build_sampling({"stop": ["a", "b"]}).stop_sequences) == ["a", "b"]
    # Value rules (a temperature, a top_p) are the server's; only what cannot go on the wire fails here.
    assert build_sampling({"temperature": -1.0}).temperature == -1.0
    for bad in ({"max_new_tokens": -1}, {"top_k": -2}, {"seed": -3}):
        with pytest.raises(ValueError, match="must be >= 0"):
            build_sampling(bad)  # type: ignore[arg-type]


def test_health_wire_encoding_matches_grpc_health() -> None:
    health_pb2 = pytest.importorskip("grpc_health.v1.health_pb2")
    for service in ("", "smollm2-135m", "é" * 200):
        assert health_pb2.HealthCheckRequest.FromString(encode_health_request(service)).service == service
    for status, expected in ((0, "UNKNOWN"), (1, "SERVING"), (2, "NOT_SERVING"), (3, "SERVICE_UNKNOWN")):
        data = health_pb2.HealthCheckResponse(status=status).SerializeToString()
        assert decode_health_response(data) is HealthStatus(expected)


# ----------------------------------------------------------------------------------------------------------------
# A real in-process server with scripted behaviour
# ----------------------------------------------------------------------------------------------------------------


class ScriptedService(pb_grpc.LinlensServiceServicer):
    """Behaviour chosen by the request, so that one server serves every test.

    GetModel name: "abort:CODE" aborts with CODE; "flaky:KEY:N:CODE" fails N times with CODE, then answers;
    "sleep:SECONDS" answers late; "echo-metadata" returns the x-* metadata in ``source``. GenerateStream prompt:
    "tokens:N" streams N tokens, an explanation and done; "flaky-stream:KEY" fails once with UNAVAILABLE first;
    "fail-after-first" aborts after one token; "endless" streams until cancelled.
    """

    def __init__(self) -> None:
        self.attempts: defaultdict[str, int] = defaultdict(int)
        self.lock = threading.Lock()
        self.cancelled = threading.Event()
        self.last_generate: pb.GenerateRequest | None = None
        self.health: Any = None

    def _count(self, key: str) -> int:
        with self.lock:
            self.attempts[key] += 1
            return self.attempts[key]

    def GetModel(self, request: pb.GetModelRequest, context: grpc.ServicerContext) -> pb.GetModelResponse:
        kind, _, rest = request.name.partition(":")
        if kind == "abort":
            context.abort(grpc.StatusCode[rest], f"scripted {rest}")
        if kind == "flaky":
            key, failures, code = rest.split(":")
            if self._count(key) <= int(failures):
                context.abort(grpc.StatusCode[code], f"attempt {self.attempts[key]} fails")
            return pb.GetModelResponse(model=pb.ModelInfo(name=key, loaded=True))
        if kind == "too-big":  # "too-big:KEY": RESOURCE_EXHAUSTED about the request itself, marked final
            self._count(rest)
            context.set_trailing_metadata(((NO_RETRY_KEY, NO_RETRY_VALUE),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the request is above a limit")
        if kind == "sleep":
            time.sleep(float(rest))
        if kind == "echo-metadata":
            pairs = sorted(f"{k}={v}" for k, v in context.invocation_metadata() if k.startswith("x-"))
            return pb.GetModelResponse(model=pb.ModelInfo(name=request.name, source=",".join(pairs)))
        if kind == "loads":  # "loads:KEY:N": LOADING for N polls, then READY (and SERVING)
            key, polls = rest.split(":")
            if self._count(key) <= int(polls):
                return pb.GetModelResponse(
                    model=pb.ModelInfo(
                        name=key, state=pb.MODEL_STATE_LOADING, state_detail=f"phase {self.attempts[key]}"
                    )
                )
            if self.health is not None:
                self.health.set(key, SERVING)
            return pb.GetModelResponse(model=pb.ModelInfo(name=key, loaded=True, state=pb.MODEL_STATE_READY))
        if kind == "broken":
            return pb.GetModelResponse(
                model=pb.ModelInfo(name=request.name, state=pb.MODEL_STATE_FAILED, state_detail="OSError: disk full")
            )
        if kind == "stuck":
            return pb.GetModelResponse(
                model=pb.ModelInfo(name=request.name, state=pb.MODEL_STATE_LOADING, state_detail="converting (9 s)")
            )
        return pb.GetModelResponse(
            model=pb.ModelInfo(
                name=request.name or "default", is_default=not request.name, loaded=True, state=pb.MODEL_STATE_READY
            )
        )

    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[
                pb.ModelInfo(name="smollm2-135m", family="llama", hidden_size=576, is_default=True, loaded=True),
                pb.ModelInfo(name="gemma-3-270m", family="gemma3", source="pkg"),
            ],
            default_model="smollm2-135m",
        )

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        self.last_generate = request
        return pb.GenerateResponse(
            model=request.model or "smollm2-135m",
            text=" ok",
            tokens=[pb.GeneratedToken(index=0, token_id=3, text=" ok", logprob=-0.1)],
            finish_reason=pb.FINISH_REASON_LENGTH,
            usage=pb.Usage(
                prompt_tokens=2, completion_tokens=1, explained_steps=1 if request.HasField("explain") else 0
            ),
            explanations=[sample_explanation()] if request.HasField("explain") else [],
            prompt_text=request.input.text,
        )

    def Explain(self, request: pb.ExplainRequest, context: grpc.ServicerContext) -> pb.ExplainResponse:
        if not request.input.WhichOneof("kind"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "input is required")
        return pb.ExplainResponse(model="smollm2-135m", explanation=sample_explanation(), prompt_text="x")

    def ExplainStream(
        self, request: pb.ExplainStreamRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ExplainStreamResponse]:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")
        yield pb.ExplainStreamResponse()  # unreachable: makes this a generator, as the servicer's streams are

    def GenerateStream(
        self, request: pb.GenerateStreamRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateStreamResponse]:
        kind, _, rest = request.input.text.partition(":")
        if kind == "flaky-stream" and self._count(rest) == 1:
            context.abort(grpc.StatusCode.UNAVAILABLE, "draining")
        if kind == "endless":
            context.add_callback(self.cancelled.set)
            index = 0
            while context.is_active():
                yield pb.GenerateStreamResponse(token=pb.GeneratedToken(index=index, token_id=1, text="x"))
                index += 1
                time.sleep(0.01)
            return
        count = int(rest) if kind == "tokens" else 2
        for index in range(count):
            yield pb.GenerateStreamResponse(token=pb.GeneratedToken(index=index, token_id=10 + index, text=f"t{index}"))
            if kind == "fail-after-first":
                context.abort(grpc.StatusCode.UNAVAILABLE, "lost the model")
        yield pb.GenerateStreamResponse(explanation=sample_explanation(step=0))
        yield pb.GenerateStreamResponse(
            done=pb.GenerateDone(model="smollm2-135m", text="".join(f"t{i}" for i in range(count)))
        )


@pytest.fixture(scope="module")
def scripted() -> Iterator[tuple[str, ScriptedService]]:
    service = ScriptedService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_LinlensServiceServicer_to_server(service, server)
    service.health = _add_health_service(server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", service
    finally:
        server.stop(grace=None)


SERVING = 1  # grpc.health.v1.HealthCheckResponse.SERVING


def _add_health_service(server: grpc.Server) -> Any:
    """The real grpc.health.v1 servicer, when grpcio-health-checking is installed (the health tests skip if not)."""
    try:
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    except ImportError:
        return None
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("default", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("gemma-3-270m", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return servicer


ERROR_CLASSES = {
    "INVALID_ARGUMENT": InvalidArgumentError,
    "FAILED_PRECONDITION": FailedPreconditionError,
    "OUT_OF_RANGE": InvalidArgumentError,
    "NOT_FOUND": NotFoundError,
    "RESOURCE_EXHAUSTED": ResourceExhaustedError,
    "DEADLINE_EXCEEDED": DeadlineExceededError,
    "CANCELLED": CancelledError,
    "UNAVAILABLE": UnavailableError,
    "INTERNAL": InternalError,
    "UNKNOWN": InternalError,
    "DATA_LOSS": InternalError,
    "ALREADY_EXISTS": LinlensError,
    "PERMISSION_DENIED": UnauthenticatedError,
    "ABORTED": LinlensError,
    "UNIMPLEMENTED": LinlensError,
    "UNAUTHENTICATED": UnauthenticatedError,
}


@pytest.mark.parametrize(("code", "error_class"), sorted(ERROR_CLASSES.items()))
def test_status_codes_map_to_exceptions(scripted: tuple[str, ScriptedService], code: str, error_class: type) -> None:
    target, _ = scripted
    with Client(target, retry=None, timeout=10) as client, pytest.raises(LinlensError) as caught:
        client.get_model(f"abort:{code}")
    assert type(caught.value) is error_class
    assert caught.value.code is grpc.StatusCode[code]
    assert caught.value.details == f"scripted {code}"
    assert isinstance(caught.value.__cause__, grpc.RpcError)


def test_async_status_codes_map_to_exceptions(scripted: tuple[str, ScriptedService]) -> None:
    target, _ = scripted

    async def run() -> list[tuple[type, grpc.StatusCode]]:
        seen = []
        async with AsyncClient(target, retry=None, timeout=10) as client:
            for code in ("NOT_FOUND", "INVALID_ARGUMENT", "INTERNAL", "UNIMPLEMENTED"):
                try:
                    await client.get_model(f"abort:{code}")
                except LinlensError as error:
                    seen.append((type(error), error.code))
        return seen

    assert asyncio.run(run()) == [
        (NotFoundError, grpc.StatusCode.NOT_FOUND),
        (InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
        (InternalError, grpc.StatusCode.INTERNAL),
        (LinlensError, grpc.StatusCode.UNIMPLEMENTED),
    ]


# -- retries ------------------------------------------------------------------------------------------------------


def test_unavailable_twice_then_success_is_retried(scripted: tuple[str, ScriptedService]) -> None:
    target, service = scripted
    with Client(target, retry=FAST_RETRY, timeout=10) as client:
        model = client.get_model("flaky:retry-ok:2:UNAVAILABLE")
    assert model.name == "retry-ok" and model.loaded
    assert service.attempts["retry-ok"] == 3


def test_resource_exhausted_is_retried_too(scripted: tuple[str, ScriptedService]) -> None:
    target, service = scripted
    with Client(target, retry=FAST_RETRY, timeout=10) as client:
        assert client.get_model("flaky:queue-full:1:RESOURCE_EXHAUSTED").name == "queue-full"
    assert service.attempts["queue-full"] == 2


def test_a_failure_marked_final_is_not_retried(scripted: tuple[str, ScriptedService]) -> None:
    target, service = scripted
    with Client(target, retry=FAST_RETRY, timeout=10) as client, pytest.raises(ResourceExhaustedError):
        client.get_model("too-big:sync-final")
    assert service.attempts["sync-final"] == 1

    async def run() -> None:
        async with AsyncClient(target, retry=FAST_RETRY, timeout=10) as client:
            await client.get_model("too-big:async-final")

    with pytest.raises(ResourceExhaustedError):
        asyncio.run(run())
    assert service.attempts["async-final"] == 1


def test_other_codes_are_not_retried(scripted: tuple[str, ScriptedService]) -> None:
    target, service = scripted
    with Client(target, retry=FAST_RETRY, timeout=10) as client, pytest.raises(InvalidArgumentError):
        client.get_model("flaky:bad-input:2:INVALID_ARGUMENT")
    assert service.attempts["bad-input"] == 1


def test_retries_stop_after_max_attempts(scripted: tuple[str, ScriptedService]) -> None:
    target, service = scripted
    with Client(target, retry=FAST_RETRY, timeout=10) as client, pytest.raises(UnavailableError):
        client.get_model("flaky:always-down:100:UNAVAILABLE")
    assert service.attempts["always-down"] == FAST_RETRY.max_attempts


def test_retries_do_not_outlive_the_deadline(scripted: tuple[str, ScriptedService]) -> None:
    target, service = scripted
    slow = RetryPolicy(max_attempts=10, initial_backoff=0.4, max_backoff=0.4, jitter=0.0)
    started = time.monotonic()
    with Client(target, retry=slow) as client, pytest.raises(UnavailableError):
        client.get_model("flaky:deadline:100:UNAVAILABLE", timeout=1.0)
    assert time.monotonic() - started < 1.5
    assert 2 <= service.attempts["deadline"] <= 3


def test_async_client_retries(scripted: tuple[str, ScriptedService]) -> None:
    target, service = scripted

    async def run() -> str:
        async with AsyncClient(target, retry=FAST_RETRY, timeout=10) as client:
            return (await client.get_model("flaky:async-retry:2:UNAVAILABLE")).name

    assert asyncio.run(run()) == "async-retry"
    assert service.attempts["async-retry"] == 3


def test_backoff_grows_caps_and_jitters() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=1.0, multiplier=3.0, jitter=0.0)
    assert [policy.backoff(n) for n in (1, 2, 3, 4)] == pytest.approx([0.1, 0.3, 0.9, 1.0])
    jittered = RetryPolicy(initial_backoff=1.0, max_backoff=1.0, jitter=0.25)
    waits = {jittered.backoff(1) for _ in range(50)}
    assert len(waits) > 1 and all(0.75 <= w <= 1.25 for w in waits)
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


# -- deadlines, metadata, unary methods -----------------------------------------------------------------------------


def test_per_call_timeout_raises_deadline_exceeded(scripted: tuple[str, ScriptedService]) -> None:
    target, _ = scripted
    with Client(target, timeout=30) as client, pytest.raises(DeadlineExceededError):
        client.get_model("sleep:1.0", timeout=0.2)


def test_metadata_is_merged_into_every_call(scripted: tuple[str, ScriptedService]) -> None:
    target, _ = scripted
    with Client(target, metadata={"X-Tenant": "lab"}) as client:
        info = client.get_model("echo-metadata", metadata=[("x-request-id", "42")])
    assert info.source == "x-request-id=42,x-tenant=lab"


def test_unary_methods_return_typed_results(scripted: tuple[str, ScriptedService]) -> None:
    target, service = scripted
    with Client(target) as client:
        client.wait_until_ready(timeout=5)
        models = client.list_models()
        assert [m.name for m in models] == ["smollm2-135m", "gemma-3-270m"]
        assert models[0].is_default and models[0].hidden_size == 576 and not models[1].loaded
        assert client.get_model().is_default

        generation = client.generate(
            "The bridge", model="smollm2-135m", max_new_tokens=3, temperature=0.5, seed=7, stop=["\n"], explain=True
        )
        assert generation.text == " ok" and generation.finish_reason is FinishReason.LENGTH
        assert generation.prompt_text == "The bridge" and len(generation.explanations) == 1
        request = service.last_generate
        assert request is not None and request.model == "smollm2-135m"
        assert request.sampling.max_new_tokens == 3 and request.sampling.seed == 7
        assert request.HasField("explain") and request.explain.steps == pb.EXPLAIN_STEPS_FIRST

        client.generate(token_ids=[1, 2, 3])
        assert service.last_generate is not None and not service.last_generate.HasField("explain")

        result = client.explain(messages=[("user", "hi")], options=ExplainOptions(top_k=0))
        assert result.model == "smollm2-135m" and result.explanation.attributions[0].total == 11.0


def test_health_reports_serving_status(scripted: tuple[str, ScriptedService]) -> None:
    pytest.importorskip("grpc_health.v1.health")
    target, _ = scripted
    with Client(target) as client:
        assert client.health() is HealthStatus.SERVING
        assert client.health("gemma-3-270m") is HealthStatus.NOT_SERVING
        with pytest.raises(NotFoundError):
            client.health(service="no-such-service")

    async def run() -> HealthStatus:
        async with AsyncClient(target) as client:
            return await client.health()

    assert asyncio.run(run()) is HealthStatus.SERVING


def test_unreachable_server_is_unavailable() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with Client(f"127.0.0.1:{port}", retry=RetryPolicy(max_attempts=2, initial_backoff=0.01)) as client:
        with pytest.raises(UnavailableError):
            client.list_models(timeout=5)
        with pytest.raises(ServerUnreachableError, match=f"no linlens server answers at 127.0.0.1:{port}"):
            client.wait_until_ready(timeout=0.2)


# -- waiting for a model -------------------------------------------------------------------------------------------


def test_wait_until_ready_waits_through_loading(scripted: tuple[str, ScriptedService]) -> None:
    pytest.importorskip("grpc_health.v1.health")
    target, service = scripted
    seen: list[ModelInfo] = []
    with Client(target) as client:
        info = client.wait_until_ready(timeout=10, model="loads:m1:3", on_wait=seen.append)
        assert info.name == "m1" and info.state is ModelState.READY
        assert client.wait_until_ready(timeout=5).name == "default"  # no name: the server's default model
    assert service.attempts["m1"] == 4
    assert [i.state_detail for i in seen] == ["phase 1", "phase 2", "phase 3"]  # each new phase, once

    async def run() -> ModelInfo:
        async with AsyncClient(target) as client:
            return await client.wait_until_ready(timeout=10, model="loads:m2:2")

    assert asyncio.run(run()).state is ModelState.READY


def test_wait_until_ready_fails_at_once_for_a_broken_model(scripted: tuple[str, ScriptedService]) -> None:
    target, _ = scripted
    started = time.monotonic()
    with (
        Client(target) as client,
        pytest.raises(FailedPreconditionError, match=r"failed to load \(OSError: disk full\)"),
    ):
        client.wait_until_ready(timeout=30, model="broken:x")
    assert time.monotonic() - started < 5


def test_wait_until_ready_says_what_it_waited_for(scripted: tuple[str, ScriptedService]) -> None:
    target, _ = scripted
    with Client(target) as client, pytest.raises(UnavailableError) as caught:
        client.wait_until_ready(timeout=0.6, model="stuck:y")
    assert "model 'stuck:y' was not ready after 0.6 s (it was still loading: converting (9 s))" in str(caught.value)
    assert not isinstance(caught.value, ServerUnreachableError)


# -- streaming ----------------------------------------------------------------------------------------------------


def test_stream_yields_tokens_explanation_then_done(scripted: tuple[str, ScriptedService]) -> None:
    target, _ = scripted
    with Client(target) as client:
        events = list(client.generate_stream("tokens:3", explain=True))
    assert [type(e) for e in events] == [GeneratedToken] * 3 + [Explanation, GenerationDone]
    assert [e.index for e in events[:3] if isinstance(e, GeneratedToken)] == [0, 1, 2]
    done = events[-1]
    assert isinstance(done, GenerationDone) and done.text == "t0t1t2"


def test_collect_stream_and_to_jsonable(scripted: tuple[str, ScriptedService]) -> None:
    target, _ = scripted
    with Client(target) as client:
        generation = collect_stream(client.generate_stream("tokens:2"))
        with pytest.raises(ValueError, match="GenerationDone"):
            events = client.generate_stream("tokens:2")
            collect_stream(event for event in events if not isinstance(event, GenerationDone))
    assert generation.text == "t0t1" and [t.text for t in generation.tokens] == ["t0", "t1"]
    assert len(generation.explanations) == 1
    data = json.loads(json.dumps(to_jsonable(generation)))
    assert data["finish_reason"] == "unspecified"
    explanation = data["explanations"][0]
    assert explanation["attributions"][0]["per_token"] == [1.0, 2.0, 8.0]
    assert explanation["jacobians"][1][2][3] == 27.0 and explanation["gate_mode"] == "freeze_up"


def test_stream_failure_before_first_event_is_retried(scripted: tuple[str, ScriptedService]) -> None:
    target, service = scripted
    with Client(target, retry=FAST_RETRY) as client:
        events = list(client.generate_stream("flaky-stream:s1"))
    assert service.attempts["s1"] == 2
    assert isinstance(events[-1], GenerationDone)


def test_stream_failure_after_an_event_is_raised_not_retried(scripted: tuple[str, ScriptedService]) -> None:
    target, _ = scripted
    received = []
    with Client(target, retry=FAST_RETRY) as client, pytest.raises(UnavailableError, match="lost the model"):
        for event in client.generate_stream("fail-after-first"):
            received.append(event)
    assert len(received) == 1


def test_cancelling_a_stream_reaches_the_server(scripted: tuple[str, ScriptedService]) -> None:
    target, service = scripted
    service.cancelled.clear()
    with Client(target) as client:
        with client.generate_stream("endless") as stream:
            first = next(stream)
            assert isinstance(first, GeneratedToken)
        assert service.cancelled.wait(timeout=5)
        with pytest.raises(StopIteration):
            next(stream)


def test_async_stream(scripted: tuple[str, ScriptedService]) -> None:
    target, service = scripted
    service.cancelled.clear()

    async def run() -> tuple[list[type], bool]:
        async with AsyncClient(target, retry=FAST_RETRY) as client:
            kinds = [type(event) async for event in client.generate_stream("tokens:2")]
            async with client.generate_stream("endless") as stream:
                async for _event in stream:
                    break
            cancelled = await asyncio.get_running_loop().run_in_executor(None, service.cancelled.wait, 5)
            return kinds, cancelled

    kinds, cancelled = asyncio.run(run())
    assert kinds == [GeneratedToken, GeneratedToken, Explanation, GenerationDone]
    assert cancelled


def test_the_contract_never_imports_the_reports() -> None:
    """The reports are functions of the results: no module of the contract imports linlens.report, not even inside a
    function (the circle issue 18 removed)."""
    import ast
    from pathlib import Path

    import linlens.contract

    root = Path(linlens.contract.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            found += [f"{path.name}: {n}" for n in names if n == "linlens.report" or n.startswith("linlens.report.")]
    assert not found


def test_client_package_does_not_import_torch() -> None:
    """The base install is the client: importing it must not need (or load) torch or the server, nor the reports'
    plotting library (matplotlib, the viz extra) or the reports themselves (imported when Jupyter shows a result)."""
    import subprocess
    import sys

    code = (
        "import sys, linlens.client, linlens.client.aio, linlens.v1.linlens_pb2_grpc;"
        "bad = sorted(m for m in sys.modules if m in ('torch', 'matplotlib') or m.startswith(('torch.', "
        "'linlens.server', 'linlens.engine', 'linlens.report', 'matplotlib.', 'transformers')));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_client_and_engine_re_export_the_whole_contract() -> None:
    """``linlens.contract.__all__`` is the one list of the contract's public names: the SDK (and the engine, for
    notebooks) re-export every one of them as the very same object, and keep their own names besides."""
    import linlens.client
    import linlens.contract
    import linlens.engine

    for package, own in ((linlens.client, ("Client", "AsyncClient", "LinlensError")), (linlens.engine, ("Explainer",))):
        missing = [name for name in linlens.contract.__all__ if name not in package.__all__]
        assert not missing, f"{package.__name__} does not export {missing}"
        assert all(getattr(package, name) is getattr(linlens.contract, name) for name in linlens.contract.__all__)
        assert set(own) <= set(package.__all__)
        assert len(package.__all__) == len(set(package.__all__)), f"{package.__name__} lists a name twice"


def test_the_async_client_has_the_blocking_clients_methods_with_the_same_parameters() -> None:
    """Each public method is declared twice (``def`` and ``async def``: Python cannot share a signature between
    them without hiding it from ``help()``); this holds the two declarations to the same names, defaults and kinds."""
    import inspect

    def methods(kind: type) -> dict[str, inspect.Signature]:
        return {
            name: inspect.signature(member)
            for name, member in inspect.getmembers(kind, inspect.isfunction)
            if not name.startswith("_")
        }

    blocking, asynchronous = methods(Client), methods(AsyncClient)
    assert set(blocking) == set(asynchronous)
    assert {"generate", "generate_stream", "explain", "compute_concept", "health", "wait_until_ready"} <= set(blocking)
    for name, signature in blocking.items():
        assert list(signature.parameters.values()) == list(asynchronous[name].parameters.values()), name
