"""Each configurable limit, against a real server: refused before any work with the status the limit documents and a
message that names the setting; a request just inside the limit is served. The server keeps serving afterwards.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from linlens.client import (
    NO_RETRY,
    CancelledError,
    Client,
    ExplainMethod,
    ExplainOptions,
    GeneratedToken,
    InvalidArgumentError,
    ResourceExhaustedError,
)
from linlens.contract import PositionSelection
from linlens.contract.retry_hint import is_final
from linlens.contract.wire import explain_options_to_proto
from linlens.v1 import linlens_pb2 as pb
from linlens.v1 import linlens_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PROMPT = "The bridge out of Marin is the"


def test_input_tokens_default_to_the_models_context(make_server: Callable[..., Any], smollm2: Any) -> None:
    server = make_server(max_prompt_tokens=0)
    context = smollm2.max_positions
    assert context > 256
    with Client(server.target, retry=NO_RETRY, timeout=60) as client:
        with pytest.raises(InvalidArgumentError, match=rf"{context} tokens, which fills the model's context"):
            client.generate(token_ids=[1] * context, max_new_tokens=1)
        assert client.generate(token_ids=[504] * 300, max_new_tokens=1).usage.prompt_tokens == 300
    limited = make_server(max_prompt_tokens=5)
    with Client(limited.target, retry=NO_RETRY, timeout=60) as client:
        limit = r"7 tokens, above this server's limit of 5 \(max_prompt_tokens\)"
        with pytest.raises(InvalidArgumentError, match=limit):
            client.explain(PROMPT, options=ExplainOptions(top_k=0))
        assert client.explain("The bridge", options=ExplainOptions(top_k=0)).explanation.predicted.token_id >= 0


def test_request_bytes_are_limited_by_the_server_then_by_grpc(make_server: Callable[..., Any]) -> None:
    server = make_server(max_request_bytes=2000)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.LinlensServiceStub(channel)

        def generate(text: str) -> pb.GenerateResponse:
            request = pb.GenerateRequest(input=pb.Input(text=text), sampling=pb.SamplingParams(max_new_tokens=1))
            response: pb.GenerateResponse = stub.Generate(request, timeout=60)
            return response

        with pytest.raises(grpc.RpcError) as caught:
            generate("a " * 1500)  # 3000 bytes: between the setting and gRPC's own bound (twice the setting)
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "above this server's limit of 2000 (max_request_bytes)" in (caught.value.details() or "")
        assert is_final(caught.value.trailing_metadata())  # the same bytes fail the same way: not retried
        with pytest.raises(grpc.RpcError) as caught:
            generate("a " * 5000)  # beyond twice the setting gRPC refuses it before reading it all
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert generate("The bridge out of Marin is the").text == " only"


def test_max_new_tokens_is_named(target: str) -> None:
    limit = r"above this server's limit of 64 \(max_new_tokens\)"
    with Client(target, retry=NO_RETRY, timeout=60) as client, pytest.raises(InvalidArgumentError, match=limit):
        client.generate(PROMPT, max_new_tokens=65)


def test_explanation_memory_is_estimated_before_any_work(make_server: Callable[..., Any], smollm2: Any) -> None:
    n = 7  # the prompt's tokens
    full_method = ExplainMethod.FULL
    # Every position's spectrum needs the whole prompt's graph (the last alone runs on its own small graph).
    whole = {"positions": PositionSelection.ALL}
    full = smollm2.explainer.memory_estimate(n, ExplainOptions(top_k=3, method=full_method, **whole))
    big_batch = smollm2.explainer.memory_estimate(
        n, ExplainOptions(top_k=3, method=full_method, vjp_chunk_size=576, **whole)
    )
    attributions = smollm2.explainer.memory_estimate(n, ExplainOptions(top_k=0))
    free = smollm2.explainer.memory_estimate(n, ExplainOptions(top_k=3, method=ExplainMethod.MATRIX_FREE, **whole))
    last = smollm2.explainer.memory_estimate(n, ExplainOptions(top_k=3, method=full_method, vjp_chunk_size=576))
    # the parts are what the options keep alive: J (d x n x d floats) three times (as computed, per position, the
    # SVD's input), the graph, the batch of VJPs; the last position alone keeps no whole-prompt Jacobian
    assert full.jacobians == 3 * 576 * n * 576 * 4 and attributions.jacobians == 0 and free.jacobians == 0
    assert last.jacobians == 0 and last.total < big_batch.total
    assert attributions.total < full.total < big_batch.total
    assert free.total < full.total  # a second graph and a Krylov block instead of Jacobians
    assert big_batch.vjps == 576 and big_batch.batch > full.batch
    # longer inputs need more: Jacobians grow with n, attention with n squared
    longer = smollm2.explainer.memory_estimate(4 * n, ExplainOptions(top_k=3, method=full_method, **whole))
    assert longer.jacobians == 4 * full.jacobians

    limit_mb = full.total // 2**20 + 1  # the default batch fits; 576 VJPs in one batch do not
    server = make_server(max_explanation_memory_mb=limit_mb)
    with Client(server.target, retry=NO_RETRY, timeout=120) as client:
        result = client.explain(PROMPT, options=ExplainOptions(top_k=1, method=full_method, **whole))
        assert result.explanation.reconstruction is not None and result.explanation.method is full_method
        with pytest.raises(
            ResourceExhaustedError, match=r"options: an explanation of 7 tokens .* \(max_explanation_memory_mb\)"
        ) as caught:
            client.explain(PROMPT, options=ExplainOptions(top_k=1, method=full_method, vjp_chunk_size=576, **whole))
        assert "options.vjp_chunk_size" in caught.value.details  # the way out is named
        assert "options.method MATRIX_FREE" in caught.value.details
        # the server marks it final (the same request can never fit), so the SDK does not retry it
        too_big = ExplainOptions(top_k=1, method=full_method, vjp_chunk_size=576, **whole)
        request = pb.ExplainRequest(input=pb.Input(text=PROMPT), options=explain_options_to_proto(too_big))
        with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as raw:
            pb_grpc.LinlensServiceStub(channel).Explain(request, timeout=60)
        assert raw.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert is_final(raw.value.trailing_metadata())
        with pytest.raises(ResourceExhaustedError, match="include_jacobians"):
            client.explain(PROMPT, options=ExplainOptions(top_k=1, include_jacobians=True))
        # under AUTO a full request that does not fit runs matrix-free: the same prediction and top triplet
        auto = client.explain(PROMPT, options=ExplainOptions(top_k=1, vjp_chunk_size=576, **whole))
        assert auto.explanation.method is ExplainMethod.MATRIX_FREE
        assert auto.explanation.predicted.token_id == result.explanation.predicted.token_id
        top = result.explanation.spectra[-1].components[0].value
        assert abs(auto.explanation.spectra[-1].components[0].value - top) < 1e-4 * top
        # a generation's later steps are longer inputs: the longest explained step is what is estimated
        with pytest.raises(ResourceExhaustedError, match=r"explain: an explanation of 3\d tokens"):
            client.generate(
                PROMPT, max_new_tokens=30, explain=ExplainOptions(top_k=1, method=full_method, steps=(29,), **whole)
            )
        assert client.generate(PROMPT, max_new_tokens=2, explain=ExplainOptions(top_k=0, steps="all")).explanations
        with pytest.raises(InvalidArgumentError, match=r"vjp_chunk_size is 577, above the model's hidden size 576"):
            client.explain(PROMPT, options=ExplainOptions(top_k=1, vjp_chunk_size=577))


def test_concurrent_streams_are_limited(make_server: Callable[..., Any]) -> None:
    server = make_server(max_concurrent_streams=1, grpc_threads=4)
    first_token = threading.Event()
    events: list[Any] = []
    with Client(server.target, retry=NO_RETRY, timeout=120) as client:
        stream = client.generate_stream(PROMPT, max_new_tokens=64, ignore_eos=True)

        def consume() -> None:
            with contextlib.suppress(CancelledError):  # the cancel below ends it
                for event in stream:
                    events.append(event)
                    first_token.set()

        reader = threading.Thread(target=consume)
        reader.start()
        assert first_token.wait(60)
        try:
            limit = r"1 GenerateStream calls are open.*max_concurrent_streams"
            with pytest.raises(ResourceExhaustedError, match=limit):
                list(client.generate_stream(PROMPT, max_new_tokens=1))
            assert client.list_models()  # unary calls still find a thread
        finally:
            stream.cancel()
            reader.join(60)
        assert any(isinstance(e, GeneratedToken) for e in events)
        # the slot is free again once the first stream has ended on the server
        end = time.monotonic() + 30
        while True:
            try:
                assert [e for e in client.generate_stream(PROMPT, max_new_tokens=1) if isinstance(e, GeneratedToken)]
                break
            except ResourceExhaustedError:
                assert time.monotonic() < end, "the stream slot was never released"
                time.sleep(0.1)


def test_a_temperature_too_small_to_sample_is_refused(target: str) -> None:
    """Found by the fuzzing: logits divided by 1e-300 overflow and sampling failed with INTERNAL."""
    with Client(target, retry=NO_RETRY, timeout=60) as client:
        with pytest.raises(InvalidArgumentError, match=r"temperature must be 0 \(greedy\) or at least 0.01"):
            client.generate(PROMPT, max_new_tokens=1, temperature=1e-300)
        assert client.generate(PROMPT, max_new_tokens=1, temperature=0.01, seed=1).usage.completion_tokens == 1
