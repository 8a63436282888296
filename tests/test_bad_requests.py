"""Bad requests nobody means to send, through every RPC that takes them: each gets INVALID_ARGUMENT naming the field
(or the limit), nothing is queued, and the server keeps serving. The options travel as ExplainRequest.options in
Explain and as explain in Generate and GenerateStream, so each message names the field as the caller wrote it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import server_config
from tiny_models import save_tiny_model

from linlens.v1 import linlens_pb2 as pb
from linlens.v1 import linlens_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PROMPT = "The bridge out of Marin is the"

#: (name, ExplainOptions, the message's fragment after the request field's prefix). The session server's limits are
#: conftest.server_config's: max_top_k 8, max_tokens_per_vector 64, max_attribution_targets 16.
BAD_OPTIONS = [
    ("tokens_per_vector above its limit", pb.ExplainOptions(tokens_per_vector=65), "tokens_per_vector is 65, above"),
    (
        "too many targets",
        pb.ExplainOptions(targets=[pb.AttributionTarget(token_id=5)] * 17),
        "targets is 17, above this server's limit of 16",
    ),
    (
        "an out-of-vocabulary contrast token",
        pb.ExplainOptions(targets=[pb.AttributionTarget(token_id=5, contrast_token_id=49152)]),
        "targets[0].contrast_token_id = 49152 is not a token id of this model (valid: 0..49151)",
    ),
    ("an unknown precision", pb.ExplainOptions(precision=9), "precision 9 is not a known Precision value"),  # type: ignore[arg-type]
    ("an unknown gate mode", pb.ExplainOptions(gate_mode=7), "gate_mode 7 is not a known GateMode value"),  # type: ignore[arg-type]
    ("an unknown position selection", pb.ExplainOptions(positions=5), "positions 5 is not a known"),  # type: ignore[arg-type]
    ("vjp_chunk_size 0", pb.ExplainOptions(vjp_chunk_size=0), "vjp_chunk_size must be at least 1, got 0"),
    ("top_k above the hidden size", pb.ExplainOptions(top_k=600), "top_k is 600"),
]

#: Requests whose problem is only in Generate's fields (steps, sampling).
BAD_GENERATIONS = [
    (
        "too many step indices",
        pb.GenerateRequest(
            input=pb.Input(text=PROMPT),
            sampling=pb.SamplingParams(max_new_tokens=8),
            explain=pb.ExplainOptions(steps=pb.EXPLAIN_STEPS_LIST, step_indices=[0, 1, 2, 3, 4]),
        ),
        "explain.step_indices is 5, above this server's limit of 4",
    ),
    (
        "an unknown steps value",
        pb.GenerateRequest(input=pb.Input(text=PROMPT), explain=pb.ExplainOptions(steps=8)),  # type: ignore[arg-type]
        "explain.steps 8 is not a known ExplainSteps value",
    ),
    (
        "a chat with no messages",
        pb.GenerateRequest(input=pb.Input(chat=pb.ChatConversation())),
        "input.chat.messages is empty",
    ),
    (
        "a chat message without a role",
        pb.GenerateRequest(input=pb.Input(chat=pb.ChatConversation(messages=[pb.ChatMessage(content="hi")]))),
        "input.chat.messages[0].role is empty",
    ),
    ("no input at all", pb.GenerateRequest(), "input is missing"),
]


def calls(stub: pb_grpc.LinlensServiceStub, request: pb.GenerateRequest) -> Iterator[tuple[str, Callable[[], Any]]]:
    """The same request through Generate, GenerateStream and (its input and options) Explain."""
    yield "Generate", lambda: stub.Generate(request, timeout=30)
    stream = pb.GenerateStreamRequest.FromString(request.SerializeToString())
    yield "GenerateStream", lambda: list(stub.GenerateStream(stream, timeout=30))
    if request.explain.steps in (pb.EXPLAIN_STEPS_UNSPECIFIED, pb.EXPLAIN_STEPS_FIRST):
        explain = pb.ExplainRequest(model=request.model, input=request.input, options=request.explain)
        yield "Explain", lambda: stub.Explain(explain, timeout=30)


def assert_invalid(call: Callable[[], Any], fragment: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert fragment in (info.value.details() or ""), info.value.details()


@pytest.fixture(scope="module")
def stub(target: str) -> Iterator[pb_grpc.LinlensServiceStub]:
    with grpc.insecure_channel(target) as channel:
        yield pb_grpc.LinlensServiceStub(channel)


@pytest.mark.parametrize(
    ("options", "fragment"), [(o, f) for _, o, f in BAD_OPTIONS], ids=[n for n, _, _ in BAD_OPTIONS]
)
def test_bad_explain_options_through_every_rpc(
    stub: pb_grpc.LinlensServiceStub, options: pb.ExplainOptions, fragment: str
) -> None:
    request = pb.GenerateRequest(input=pb.Input(text=PROMPT), explain=options)
    for method, call in calls(stub, request):
        field = "options" if method == "Explain" else "explain"
        assert_invalid(call, f"{field}.{fragment}")
    # The server keeps serving.
    assert stub.Generate(pb.GenerateRequest(input=pb.Input(text=PROMPT)), timeout=60).text


@pytest.mark.parametrize(
    ("request_", "fragment"), [(r, f) for _, r, f in BAD_GENERATIONS], ids=[n for n, _, _ in BAD_GENERATIONS]
)
def test_bad_generation_requests_through_every_rpc(
    stub: pb_grpc.LinlensServiceStub, request_: pb.GenerateRequest, fragment: str
) -> None:
    for _, call in calls(stub, request_):
        assert_invalid(call, fragment)


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A server on a tiny model: 64 positions of context and no chat template."""
    from linlens.server.app import start_server

    folder: Path = save_tiny_model("llama", tmp_path_factory.mktemp("tiny-server") / "tiny-llama")
    server = start_server(server_config(models=(str(folder),), max_prompt_tokens=256), load_in_background=False)
    try:
        yield server
    finally:
        server.stop()


def test_a_model_without_a_chat_template_and_a_prompt_that_fills_the_context(tiny_server: Any) -> None:
    with grpc.insecure_channel(tiny_server.target) as channel:
        tiny = pb_grpc.LinlensServiceStub(channel)
        chat = pb.GenerateRequest(input=pb.Input(chat=pb.ChatConversation(messages=[pb.ChatMessage(role="user")])))
        for _, call in calls(tiny, chat):
            assert_invalid(call, "this model has no chat template; send input.text or input.token_ids instead")
        full = pb.GenerateRequest(input=pb.Input(token_ids=pb.TokenIds(ids=[5] * 64)))
        for _, call in calls(tiny, full):
            assert_invalid(call, "the input has 64 tokens, which fills the model's context of 64")
        fits = pb.GenerateRequest(input=pb.Input(token_ids=pb.TokenIds(ids=[5] * 63)), explain=pb.ExplainOptions())
        response = tiny.Generate(fits, timeout=60)
        assert len(response.tokens) == 1 and response.finish_reason == pb.FINISH_REASON_CONTEXT_LENGTH
