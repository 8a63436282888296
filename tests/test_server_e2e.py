"""End to end: the real server with the real SmolLM2 model on a free localhost port, called over real gRPC.

Answers are checked against transformers itself (greedy generation, the model's own prediction) and against the
linear decomposition (the returned Jacobians must rebuild y from the input embeddings). Calls go through the sync
SDK, the async SDK and the raw generated stubs. One server serves the whole module (see conftest.py).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from linlens.client import (
    NO_RETRY,
    AsyncClient,
    AttributionTarget,
    Client,
    ExplainOptions,
    FinishReason,
    GeneratedToken,
    GenerationDone,
    HealthStatus,
    InvalidArgumentError,
    NotFoundError,
    PositionSelection,
    Precision,
)
from linlens.client import Explanation as ClientExplanation
from linlens.v1 import linlens_pb2 as pb
from linlens.v1 import linlens_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PROMPT = "The bridge out of Marin is the"


def reference_greedy(smollm2: Any, prompt_ids: list[int], n: int) -> list[int]:
    """transformers' own greedy continuation."""
    with torch.no_grad():
        out = smollm2.model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=n,
        )
    return [int(t) for t in out[0, len(prompt_ids) :]]


def reference_argmax(smollm2: Any, ids: list[int]) -> int:
    with torch.no_grad():
        logits = smollm2.model(torch.tensor([ids])).logits[0, -1]
    return int(torch.argmax(logits))


@pytest.fixture(scope="module")
def client(target: str) -> Iterator[Client]:
    with Client(target, timeout=120, retry=NO_RETRY) as c:
        yield c


@pytest.fixture(scope="module")
def stub(target: str) -> Iterator[pb_grpc.LinlensServiceStub]:
    channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 256 * 1024 * 1024)])
    try:
        yield pb_grpc.LinlensServiceStub(channel)
    finally:
        channel.close()


@pytest.fixture(scope="module")
def prompt_ids(smollm2: Any) -> list[int]:
    return [int(i) for i in smollm2.tokenizer(PROMPT)["input_ids"]]


# --- generation ------------------------------------------------------------------------------------------------------


def test_greedy_generation_equals_transformers_generate(client: Client, smollm2: Any, prompt_ids: list[int]) -> None:
    expected = reference_greedy(smollm2, prompt_ids, 8)
    result = client.generate(PROMPT, max_new_tokens=8)
    assert [t.token_id for t in result.tokens] == expected
    assert result.text == smollm2.tokenizer.decode(expected, skip_special_tokens=True)
    assert result.text == " only one that can be built on the"
    assert result.finish_reason is FinishReason.LENGTH
    assert result.usage.prompt_tokens == len(prompt_ids) and result.usage.completion_tokens == 8
    assert result.model == "smollm2-135m" and result.prompt_text == PROMPT
    assert "".join(t.text for t in result.tokens) == result.text
    assert all(t.logprob < 0 for t in result.tokens)
    assert result.timings.generation_ms > 0 and result.timings.total_ms >= result.timings.generation_ms
    # logprob is the model's own: log softmax of the logits at each step
    with torch.no_grad():
        logits = smollm2.model(torch.tensor([prompt_ids + expected])).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    for i, token in enumerate(result.tokens):
        assert token.logprob == pytest.approx(float(logprobs[len(prompt_ids) - 1 + i, token.token_id]), abs=1e-3)


def test_raw_stub_token_ids_input_and_greedy(
    stub: pb_grpc.LinlensServiceStub, smollm2: Any, prompt_ids: list[int]
) -> None:
    request = pb.GenerateRequest(
        input=pb.Input(token_ids=pb.TokenIds(ids=prompt_ids)), sampling=pb.SamplingParams(max_new_tokens=5)
    )
    response: pb.GenerateResponse = stub.Generate(request, timeout=120)
    assert [t.token_id for t in response.tokens] == reference_greedy(smollm2, prompt_ids, 5)
    assert [t.index for t in response.tokens] == list(range(5))
    assert response.finish_reason == pb.FINISH_REASON_LENGTH
    assert response.usage.prompt_tokens == len(prompt_ids)


def test_sampling_is_repeatable_with_a_seed_and_stop_sequences_cut(client: Client) -> None:
    a = client.generate(PROMPT, max_new_tokens=6, temperature=0.9, top_p=0.95, top_k=40, seed=1234)
    b = client.generate(PROMPT, max_new_tokens=6, temperature=0.9, top_p=0.95, top_k=40, seed=1234)
    assert [t.token_id for t in a.tokens] == [t.token_id for t in b.tokens]
    stopped = client.generate(PROMPT, max_new_tokens=10, stop=" built")
    assert stopped.finish_reason is FinishReason.STOP_SEQUENCE
    assert stopped.text == " only one that can be"


def test_chat_messages_use_the_chat_template_and_stop_at_eos(client: Client, smollm2: Any) -> None:
    messages = [{"role": "user", "content": "Say hello."}]
    result = client.generate(messages=messages, max_new_tokens=48)
    rendered = smollm2.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(rendered["input_ids"] if not isinstance(rendered, list) else rendered)
    assert result.usage.prompt_tokens == len(ids)
    assert [t.token_id for t in result.tokens] == reference_greedy(smollm2, ids, 48)[: len(result.tokens)]
    assert "<|im_start|>user" in result.prompt_text
    if result.finish_reason is FinishReason.EOS:
        assert result.tokens[-1].token_id == smollm2.tokenizer.eos_token_id


# --- explanations ----------------------------------------------------------------------------------------------------


def test_explained_generation_returns_every_field_exactly(
    stub: pb_grpc.LinlensServiceStub, client: Client, smollm2: Any, prompt_ids: list[int]
) -> None:
    """One full explanation: reconstruction <= 1e-5 in float32, and the returned J_i really rebuild y."""
    only, one = smollm2.tokenizer.encode(" only")[0], smollm2.tokenizer.encode(" one")[0]
    options = ExplainOptions(
        top_k=2,
        tokens_per_vector=4,
        include_jacobians=True,
        targets=[(one, only)],
        positions=PositionSelection.ALL,
        ordinary_contrast=True,
        steps="first",
    )
    result = client.generate(PROMPT, max_new_tokens=2, explain=options)
    assert result.usage.explained_steps == 1 and len(result.explanations) == 1
    exp: ClientExplanation = result.explanations[0]
    n, d = len(prompt_ids), smollm2.hidden_size
    assert exp.step == 0 and list(exp.input_ids) == prompt_ids and len(exp.input_tokens) == n
    assert exp.predicted.token_id == exp.explained.token_id == result.tokens[0].token_id == only
    assert 0 < exp.predicted.probability < 1
    rec = exp.reconstruction
    assert rec is not None and rec.relative_error_vs_model <= 1e-5 and rec.relative_error_vs_detached <= 1e-5
    assert rec.predicts_same_token and rec.linear_token_id == only
    assert exp.y.shape == (d,) and exp.y.dtype == np.float32 and exp.constant.shape == (d,)
    # attributions: the explained token first, then the contrast target; each sums to its total
    assert len(exp.attributions) == 2
    for a in exp.attributions:
        assert a.per_token.shape == (n,)
        assert float(a.per_token.sum()) + a.constant == pytest.approx(a.total, rel=1e-4, abs=1e-4)
    assert exp.attributions[1].target.token_id == one and exp.attributions[1].target.contrast_token_id == only
    # a spectrum per position with the top-2 singular vectors decoded to 4 tokens each
    assert [s.position for s in exp.spectra] == list(range(n))
    spectrum = exp.spectra[-1]
    assert len(spectrum.components) == 2 and spectrum.token_id == prompt_ids[-1]
    assert spectrum.singular_values.shape == (d,) and len(spectrum.captured_share) == 2
    for c in spectrum.components:
        assert c.left.shape == (d,) and c.right.shape == (d,)
        assert len(c.left_tokens) == 4 and len(c.right_tokens) == 4
    assert spectrum.components[0].value >= spectrum.components[1].value
    assert len(exp.truncated_relative_error) == 2
    assert exp.truncated_relative_error[0] >= exp.truncated_relative_error[1]
    # the ordinary Jacobian, for contrast, does not reconstruct y
    assert exp.ordinary is not None and exp.ordinary.relative_error_vs_model > 1e-3
    # the Jacobians themselves rebuild y from the input embeddings: y = sum_i J_i x_i (+ c)
    assert exp.jacobians is not None and exp.jacobians.shape == (n, d, d)
    x = smollm2.model.get_input_embeddings().weight[torch.tensor(prompt_ids)].detach().numpy().astype(np.float64)
    rebuilt = np.einsum("nij,nj->i", exp.jacobians.astype(np.float64), x) + exp.constant
    assert np.linalg.norm(rebuilt - exp.y) / np.linalg.norm(exp.y) <= 1e-5
    t = exp.timings
    assert t.jacobian_ms > 0 and t.svd_ms > 0 and t.decode_ms > 0 and t.forward_ms > 0 and t.ordinary_ms > 0
    assert result.timings.jacobian_ms == pytest.approx(t.jacobian_ms)
    assert exp.vjp_count >= d


def test_explain_rpc_matches_the_models_prediction(stub: pb_grpc.LinlensServiceStub, smollm2: Any) -> None:
    ids = [int(i) for i in smollm2.tokenizer("The capital of France is")["input_ids"]]
    response: pb.ExplainResponse = stub.Explain(
        pb.ExplainRequest(input=pb.Input(text="The capital of France is"), options=pb.ExplainOptions(top_k=0)),
        timeout=120,
    )
    exp = response.explanation
    assert exp.predicted.token_id == reference_argmax(smollm2, ids)
    assert not exp.HasField("jacobians") and len(exp.spectra) == 0 and exp.method == pb.EXPLAIN_METHOD_UNSPECIFIED
    # Every explanation carries its reconstruction, from one forward-mode JVP (no Jacobian is built for top_k 0).
    assert exp.reconstruction.predicts_same_token and exp.reconstruction.relative_error_vs_model < 5e-6
    assert exp.vjp_count == 1 and exp.jvp_count == 1
    assert len(exp.attributions[0].per_token) == len(ids)
    assert exp.y.dtype == pb.TENSOR_DTYPE_FLOAT32 and len(exp.y.data) == 4 * smollm2.hidden_size
    y = np.frombuffer(exp.y.data, dtype="<f4")
    assert np.isfinite(y).all()
    assert response.prompt_text == "The capital of France is" and response.model == "smollm2-135m"


def test_float64_explanations_travel_as_float64(client: Client) -> None:
    exp = client.explain(PROMPT, options=ExplainOptions(top_k=0, precision=Precision.FLOAT64)).explanation
    assert exp.precision is Precision.FLOAT64 and exp.y.dtype == np.float64
    # total is w . y of the model's own float32 forward pass, so completeness stops at float32's rounding of it
    assert exp.attributions[0].completeness_error < 1e-6
    assert exp.explained.text == " only"


# --- streaming -------------------------------------------------------------------------------------------------------


def test_stream_delivers_tokens_before_generation_ends(client: Client, smollm2: Any, prompt_ids: list[int]) -> None:
    arrivals: list[tuple[float, Any]] = []
    with client.generate_stream(PROMPT, max_new_tokens=12, explain=ExplainOptions(top_k=0, steps=[0, 3])) as stream:
        for event in stream:
            arrivals.append((time.monotonic(), event))
    kinds = [type(e).__name__ for _, e in arrivals]
    assert kinds == ["GeneratedToken"] * 12 + ["Explanation"] * 2 + ["GenerationDone"]
    tokens = [e for _, e in arrivals if isinstance(e, GeneratedToken)]
    assert [t.token_id for t in tokens] == reference_greedy(smollm2, prompt_ids, 12)
    first_token_at = arrivals[0][0]
    last_token_at = arrivals[11][0]
    done_at = arrivals[-1][0]
    # the first token arrived while the other eleven were still being generated
    assert last_token_at - first_token_at > 0.05
    assert done_at > last_token_at
    explanations = [e for _, e in arrivals if isinstance(e, ClientExplanation)]
    assert [e.step for e in explanations] == [0, 3]
    assert explanations[1].explained.token_id == tokens[3].token_id
    assert list(explanations[1].input_ids) == prompt_ids + [t.token_id for t in tokens[:3]]
    # the steps are read off one shared pass (engine/sequence.py): each is its prefix's own explanation
    alone = smollm2.explainer.explain(
        list(explanations[1].input_ids), ExplainOptions(top_k=0, explained_token_id=tokens[3].token_id)
    )
    shared, own = explanations[1].attributions[0].per_token, alone.attributions[0].per_token
    assert float(np.linalg.norm(shared - own) / np.linalg.norm(own)) < 1e-5
    done = arrivals[-1][1]
    assert isinstance(done, GenerationDone)
    assert done.text == "".join(t.text for t in tokens) and done.usage.explained_steps == 2


def test_raw_stream_events_in_order(stub: pb_grpc.LinlensServiceStub) -> None:
    request = pb.GenerateStreamRequest(input=pb.Input(text=PROMPT), sampling=pb.SamplingParams(max_new_tokens=3))
    events = list(stub.GenerateStream(request, timeout=120))
    assert [e.WhichOneof("event") for e in events] == ["token", "token", "token", "done"]
    assert events[-1].done.finish_reason == pb.FINISH_REASON_LENGTH


# --- errors ----------------------------------------------------------------------------------------------------------

_INVALID: list[tuple[str, Any, str]] = [
    ("empty text", pb.GenerateRequest(input=pb.Input(text="")), "input.text is empty"),
    ("no input", pb.GenerateRequest(), "input is missing"),
    ("no token ids", pb.GenerateRequest(input=pb.Input(token_ids=pb.TokenIds())), "token_ids.ids is empty"),
    (
        "unknown token id",
        pb.GenerateRequest(input=pb.Input(token_ids=pb.TokenIds(ids=[1, 49152]))),
        "ids[1] = 49152 is not a token id",
    ),
    (
        "too many prompt tokens",
        pb.GenerateRequest(input=pb.Input(token_ids=pb.TokenIds(ids=[260] * 257))),
        "limit of 256",
    ),
    (
        "negative temperature",
        pb.GenerateRequest(input=pb.Input(text="x"), sampling=pb.SamplingParams(temperature=-1)),
        "temperature",
    ),
    ("top_p above 1", pb.GenerateRequest(input=pb.Input(text="x"), sampling=pb.SamplingParams(top_p=1.5)), "top_p"),
    (
        "zero max_new_tokens",
        pb.GenerateRequest(input=pb.Input(text="x"), sampling=pb.SamplingParams(max_new_tokens=0)),
        "max_new_tokens must be at least 1",
    ),
    (
        "too many new tokens",
        pb.GenerateRequest(input=pb.Input(text="x"), sampling=pb.SamplingParams(max_new_tokens=65)),
        "limit of 64",
    ),
    (
        "empty stop sequence",
        pb.GenerateRequest(input=pb.Input(text="x"), sampling=pb.SamplingParams(stop_sequences=[""])),
        "stop_sequences",
    ),
    ("top_k too big", pb.GenerateRequest(input=pb.Input(text="x"), explain=pb.ExplainOptions(top_k=9)), "top_k"),
    (
        "list without steps",
        pb.GenerateRequest(input=pb.Input(text="x"), explain=pb.ExplainOptions(steps=pb.EXPLAIN_STEPS_LIST)),
        "step_indices is empty",
    ),
    (
        "all steps above the limit",
        pb.GenerateRequest(
            input=pb.Input(text="x"),
            sampling=pb.SamplingParams(max_new_tokens=10),
            explain=pb.ExplainOptions(steps=pb.EXPLAIN_STEPS_ALL),
        ),
        "EXPLAIN_STEPS_ALL",
    ),
    (
        "a step max_new_tokens never reaches",
        pb.GenerateRequest(
            input=pb.Input(text="x"),
            sampling=pb.SamplingParams(max_new_tokens=2),
            explain=pb.ExplainOptions(steps=pb.EXPLAIN_STEPS_LIST, step_indices=[1_000_000]),
        ),
        "explain.step_indices names step(s) [1000000], but a generation of max_new_tokens 2 has steps 0..1",
    ),
    (
        "target outside the vocabulary",
        pb.GenerateRequest(
            input=pb.Input(text="x"), explain=pb.ExplainOptions(targets=[pb.AttributionTarget(token_id=-3)])
        ),
        "targets[0].token_id",
    ),
    (
        "bfloat16 on a CPU",
        pb.GenerateRequest(input=pb.Input(text="x"), explain=pb.ExplainOptions(precision=pb.PRECISION_BFLOAT16)),
        "BFLOAT16",
    ),
]


@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
@pytest.mark.parametrize(("request_", "fragment"), [(r, f) for _, r, f in _INVALID], ids=[n for n, _, _ in _INVALID])
def test_invalid_requests_fail_with_invalid_argument(
    stub: pb_grpc.LinlensServiceStub, request_: pb.GenerateRequest, fragment: str, method: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        if method == "Generate":
            stub.Generate(request_, timeout=30)
        else:  # the same fields, field for field; the error arrives with the first read
            list(stub.GenerateStream(pb.GenerateStreamRequest.FromString(request_.SerializeToString()), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in info.value.details()


def test_explain_with_an_unknown_explained_token_and_the_sdk_error_class(client: Client) -> None:
    with pytest.raises(InvalidArgumentError, match="explained_token_id"):
        client.explain(PROMPT, options=ExplainOptions(top_k=0, explained_token_id=10**9))


def test_unknown_model_is_not_found_and_lists_the_models(stub: pb_grpc.LinlensServiceStub, client: Client) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(pb.GenerateRequest(model="gpt-17", input=pb.Input(text="x")), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "smollm2-135m" in info.value.details()
    with pytest.raises(NotFoundError):
        client.get_model("gpt-17")
    with pytest.raises(NotFoundError):
        client.explain("x", model="gpt-17")
    # and the server keeps serving
    assert client.generate(PROMPT, max_new_tokens=1).tokens[0].text == " only"


def test_stream_errors_arrive_as_statuses(stub: pb_grpc.LinlensServiceStub) -> None:
    bad = pb.GenerateStreamRequest(input=pb.Input(text=PROMPT), sampling=pb.SamplingParams(max_new_tokens=1000))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.GenerateStream(bad, timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_new_tokens" in info.value.details()
    unknown = pb.GenerateStreamRequest(model="nope", input=pb.Input(text=PROMPT))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.GenerateStream(unknown, timeout=30))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


# --- models, health, reflection --------------------------------------------------------------------------------------


def test_models_health_and_reflection(client: Client, target: str, smollm2: Any) -> None:
    (info,) = client.list_models()
    assert info.name == "smollm2-135m" and info.is_default and info.loaded
    assert (info.family, info.architecture) == ("llama", "LlamaForCausalLM")
    assert (info.hidden_size, info.num_layers, info.vocab_size) == (576, 30, 49152)
    assert info.dtype == "float32" and info.device == "cpu" and info.max_positions == smollm2.max_positions
    assert client.get_model("") == info
    assert client.health() is HealthStatus.SERVING
    assert client.health("smollm2-135m") is HealthStatus.SERVING
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service="linlens.v1.LinlensService"), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = list(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in responses[0].list_services_response.service}
        assert {"linlens.v1.LinlensService", "grpc.health.v1.Health"} <= names


# --- concurrency and the async SDK -----------------------------------------------------------------------------------

_CONCURRENT_PROMPTS = [
    "The bridge out of Marin is the",
    "Paris is the capital of",
    "One, two, three,",
    "The quick brown fox",
]


@pytest.fixture(scope="module")
def separate_copy() -> Any:
    """A second, separately loaded copy of the model: references must not come from the object being served."""
    from linlens.models import load_model

    return load_model("smollm2-135m")


def test_eight_concurrent_clients_on_three_workers_get_the_sequential_answers(
    make_server: Any, separate_copy: Any
) -> None:
    """Generations and explanations run at the same time on three workers; each answer equals the one a separate copy
    of the model gives alone: the same tokens, the same prediction, the same attribution values (float32 rounding)."""
    server = make_server(max_concurrent_jobs=3)
    options = ExplainOptions(top_k=0, targets=(AttributionTarget(582),))
    expected_gen, expected_exp = {}, {}
    for p in _CONCURRENT_PROMPTS:
        ids = [int(i) for i in separate_copy.tokenizer(p)["input_ids"]]
        expected_gen[p] = reference_greedy(separate_copy, ids, 4)
        expected_exp[p] = separate_copy.explainer.explain(ids, options)
    results: dict[tuple[str, str], Any] = {}
    errors: list[BaseException] = []
    running = threading.Barrier(2 * len(_CONCURRENT_PROMPTS))

    def run(kind: str, prompt: str) -> None:
        try:
            with Client(server.target, timeout=240, retry=NO_RETRY) as c:
                running.wait(timeout=60)
                if kind == "generate":
                    results[(kind, prompt)] = [t.token_id for t in c.generate(prompt, max_new_tokens=4).tokens]
                else:
                    results[(kind, prompt)] = c.explain(prompt, options=options).explanation
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k, p)) for p in _CONCURRENT_PROMPTS for k in ("generate", "explain")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=280)
    assert not errors, errors
    for p in _CONCURRENT_PROMPTS:
        assert results[("generate", p)] == expected_gen[p]
        got, want = results[("explain", p)], expected_exp[p]
        assert got.predicted.token_id == want.predicted.token_id
        for a, b in zip(got.attributions, want.attributions, strict=True):
            np.testing.assert_allclose(a.per_token, b.per_token, rtol=1e-5, atol=1e-5 * np.abs(b.per_token).max())
    # And the served model, after all of it, still computes bit for bit what the separate copy computes.
    ids = torch.tensor([[int(i) for i in separate_copy.tokenizer(PROMPT)["input_ids"]]])
    with torch.no_grad():
        assert torch.equal(server.host.ready("").model(ids).logits, separate_copy.model(ids).logits)


def test_async_sdk_generate_stream_and_explain_concurrently(target: str) -> None:
    async def main() -> tuple[Any, list[Any], Any]:
        async with AsyncClient(target, timeout=120, retry=NO_RETRY) as c:

            async def collect() -> list[Any]:
                return [e async for e in c.generate_stream(PROMPT, max_new_tokens=4)]

            return await asyncio.gather(
                c.generate(PROMPT, max_new_tokens=4),
                collect(),
                c.explain(PROMPT, options=ExplainOptions(top_k=0)),
            )

    generation, events, explained = asyncio.run(main())
    assert generation.text == " only one that can"
    assert "".join(e.text for e in events if isinstance(e, GeneratedToken)) == " only one that can"
    assert isinstance(events[-1], GenerationDone)
    assert explained.explanation.predicted.text == " only"
