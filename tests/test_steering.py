"""Steering with the detached Jacobian, end to end on the real SmolLM2 through a real server.

- a concept vector is exactly a singular vector of the concept prompt's detached map: checked against an
  independent SVD of the Jacobian an explanation returns, and against the layer analysis of the same prompt;
- a steered generation's log-probabilities match an independent forward pass written out by hand (embeddings, the
  decoder layers one by one, the formula applied to the chosen layer's output, the final norm, the LM head), for
  each position selection;
- steering is scoped to its request: requests running at the same time on the same model, steered and not (each
  decodes in the batch of its own steering), get the tokens of a sequential run, logprobs within 1e-4;
- bad steering input is INVALID_ARGUMENT naming the field, and the server keeps serving;
- the SDK (sync and async) and the CLI (through a server and in-process) expose it.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from transformers.masking_utils import create_causal_mask

from linlens.cli.main import main
from linlens.client import (
    NO_RETRY,
    AsyncClient,
    Client,
    ConceptMap,
    ConceptSpec,
    ExplainOptions,
    LayerAnalysisOptions,
    SingularSide,
    Steering,
    SteeringPositions,
)
from linlens.contract.tensors import tensor_from_array
from linlens.v1 import linlens_pb2 as pb
from linlens.v1 import linlens_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CONCEPT = "The Golden Gate Bridge is in San"
PROMPT = "Tell me about your day."
LAYER = 20  # floor(2 * 30 / 3): the default steered layer of SmolLM2


@pytest.fixture(scope="module")
def client(target: str) -> Iterator[Client]:
    with Client(target, retry=NO_RETRY, timeout=120) as sdk:
        yield sdk


def francisco(smollm2: Any) -> np.ndarray:
    """A concept vector that needs no computation: the LM-head row of ' Francisco'."""
    (token,) = smollm2.tokenizer(" Francisco", add_special_tokens=False)["input_ids"]
    return smollm2.model.lm_head.weight[token].detach().numpy().copy()


# --- concept vectors ---------------------------------------------------------------------------------------------


def test_concept_vectors_are_the_singular_vectors_of_the_concept_prompts_maps(client: Client, smollm2: Any) -> None:
    options = ExplainOptions(
        top_k=2, include_jacobians=True, layers=LayerAnalysisOptions(layers=(LAYER,), top_k=1, tokens_per_vector=8)
    )
    explanation = client.explain(CONCEPT, options=options).explanation
    assert explanation.jacobians is not None
    # An independent SVD of the last position's detached Jacobian, signed so that u points along y.
    u, s, vt = np.linalg.svd(explanation.jacobians[-1].astype(np.float64))
    signs = np.sign(u.T @ explanation.y.astype(np.float64))
    u, vt = u * signs, vt * signs[:, None]

    top = client.compute_concept(CONCEPT)
    assert top.map is ConceptMap.OUTPUT and top.rank == 1 and top.side is SingularSide.LEFT and top.layer is None
    assert top.vector.shape == (576,) and abs(np.linalg.norm(top.vector) - 1) < 1e-6
    assert float(top.vector @ u[:, 0]) > 1 - 1e-5  # same direction, same sign
    assert abs(top.singular_value - s[0]) / s[0] < 1e-4
    # Its tokens are the LM head's reading of u, computed here from the model's own weights.
    logits = smollm2.model.lm_head.weight.detach().double().numpy() @ u[:, 0]
    assert [t.token_id for t in top.tokens] == [int(i) for i in np.argsort(-logits)[:8]]
    assert top.tokens[0].text == " Francisco"

    second = client.compute_concept(ConceptSpec(CONCEPT, rank=2, side=SingularSide.RIGHT), tokens_per_vector=3)
    assert second.rank == 2 and second.side is SingularSide.RIGHT and len(second.tokens) == 3
    assert float(second.vector @ vt[1]) > 1 - 1e-4
    assert abs(second.singular_value - s[1]) / s[1] < 1e-4

    layered = client.compute_concept(ConceptSpec(CONCEPT, map=ConceptMap.LAYER))
    assert layered.layer == LAYER  # unset: floor(2L/3)
    (result,) = explanation.layers
    assert result.up_to_layer is not None
    reference = result.up_to_layer.components[0]
    assert float(layered.vector @ reference.left) > 1 - 1e-5
    assert abs(layered.singular_value - reference.value) / reference.value < 1e-4
    assert [t.token_id for t in layered.tokens] == [t.token_id for t in reference.left_tokens]


# --- steered generation against a forward pass written out by hand -----------------------------------------------


def manual_logprobs(
    smollm2: Any, ids: list[int], vector: np.ndarray, strength: float, steered: list[bool]
) -> torch.Tensor:
    """log softmax of the logits at every position, with h_i <- h_i + strength a ||h_i|| / (2 ||a||) applied to the
    output of decoder layer LAYER at the positions marked in ``steered``: the decoder run layer by layer here."""
    model = smollm2.model
    base = model.model
    with torch.no_grad():
        hidden = base.embed_tokens(torch.tensor([ids]))
        position_ids = torch.arange(len(ids))[None]
        rotary = base.rotary_emb(hidden, position_ids=position_ids)
        mask = create_causal_mask(
            config=model.config, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=position_ids
        )
        a = torch.tensor(vector, dtype=torch.float64)
        for index, layer in enumerate(base.layers):
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=position_ids)
            if index == LAYER:
                norms = hidden.double().norm(dim=-1, keepdim=True)
                added = (strength * a * norms / (2 * a.norm())).float()
                hidden = hidden + added * torch.tensor(steered, dtype=torch.float32)[None, :, None]
        logits = model.lm_head(base.norm(hidden))[0]
    return torch.log_softmax(logits.double(), dim=-1)


@pytest.mark.parametrize("positions", list(SteeringPositions))
def test_a_steered_generation_matches_a_forward_pass_written_by_hand(
    client: Client, smollm2: Any, positions: SteeringPositions
) -> None:
    vector = francisco(smollm2)
    prompt_ids = [int(i) for i in smollm2.tokenizer(PROMPT)["input_ids"]]
    n = len(prompt_ids)
    steering = Steering(vector=vector, strength=2.0, positions=positions)
    steered = client.generate(token_ids=prompt_ids, max_new_tokens=8, ignore_eos=True, steering=steering)
    plain = client.generate(token_ids=prompt_ids, max_new_tokens=8, ignore_eos=True)
    tokens = [t.token_id for t in steered.tokens]
    assert tokens != [t.token_id for t in plain.tokens]  # the steering does something

    ids = prompt_ids + tokens
    marks = {
        SteeringPositions.ALL: [True] * len(ids),
        SteeringPositions.PROMPT: [i < n for i in range(len(ids))],
        SteeringPositions.GENERATED: [i >= n - 1 for i in range(len(ids))],
    }[positions]
    logprobs = manual_logprobs(smollm2, ids, vector, 2.0, marks)
    for step, token in enumerate(steered.tokens):
        row = logprobs[n - 1 + step]
        assert int(row.argmax()) == token.token_id, f"step {step}: greedy is the hand-made forward's argmax"
        assert abs(float(row[token.token_id]) - token.logprob) < 2e-4, f"step {step}"


# --- scope: concurrent requests ------------------------------------------------------------------------------------


def test_steering_is_scoped_to_its_request_while_others_run_at_the_same_time(make_server: Any, smollm2: Any) -> None:
    running = make_server(max_concurrent_jobs=4)
    vector = francisco(smollm2)
    prompts = ["Tell me about your day.", "The weather today is"]
    steering = Steering(vector=vector, strength=3.0)

    def run(sdk: Client, prompt: str, steer: bool) -> list[tuple[int, float]]:
        result = sdk.generate(prompt, max_new_tokens=10, ignore_eos=True, steering=steering if steer else None)
        return [(t.token_id, t.logprob) for t in result.tokens]

    with Client(running.target, retry=NO_RETRY, timeout=120) as sdk:
        alone = {(p, s): run(sdk, p, s) for p in prompts for s in (False, True)}
        assert alone[(prompts[0], False)] != alone[(prompts[0], True)]
        jobs = [(p, s) for p in prompts for s in (False, True, True)] * 2
        results: list[Any] = [None] * len(jobs)
        start = threading.Barrier(len(jobs))

        def worker(index: int) -> None:
            start.wait()
            results[index] = run(sdk, *jobs[index])

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=240)
    for job, result in zip(jobs, results, strict=True):
        # steered ones decode in the batch of their steering, unsteered ones in the plain batch: the same tokens as
        # alone, logprobs within 1e-4 (docs/operations.md)
        assert [t for t, _ in result] == [t for t, _ in alone[job]], f"{job}: tokens differ"
        assert all(abs(a - b) <= 1e-4 for (_, a), (_, b) in zip(result, alone[job], strict=True)), job


# --- bad input -----------------------------------------------------------------------------------------------------


def _steering(**fields: Any) -> pb.Steering:
    return pb.Steering(**fields)


BAD_STEERING = [
    ("no concept", _steering(), "steering.concept is missing"),
    (
        "a layer out of range",
        _steering(vector=tensor_from_array(np.ones(576)), layer=30),
        "steering.layer is 30, but the model has layers 0..29",
    ),
    (
        "a vector of the wrong size",
        _steering(vector=tensor_from_array(np.ones(5))),
        "steering.vector has 5 values, but the model's hidden size is 576",
    ),
    ("a NaN in the vector", _steering(vector=tensor_from_array(np.full(576, np.nan))), "steering.vector holds NaN"),
    ("a zero vector", _steering(vector=tensor_from_array(np.zeros(576))), "steering.vector is all zeros"),
    (
        "a 2-D vector",
        _steering(vector=tensor_from_array(np.ones((2, 288)))),
        "steering.vector must be a non-empty 1-D array",
    ),
    (
        "an infinite strength",
        _steering(vector=tensor_from_array(np.ones(576)), strength=float("inf")),
        "steering.strength must be finite",
    ),
    (
        "an empty concept prompt",
        _steering(concept_prompt=pb.ConceptSpec(prompt=pb.Input(text=""))),
        "steering.concept_prompt.prompt is empty",
    ),
    (
        "a chat concept prompt",
        _steering(concept_prompt=pb.ConceptSpec(prompt=pb.Input(chat=pb.ChatConversation()))),
        "steering.concept_prompt.prompt is a chat",
    ),
    (
        "rank 0",
        _steering(concept_prompt=pb.ConceptSpec(prompt=pb.Input(text=CONCEPT), rank=0)),
        "steering.concept_prompt.rank must be at least 1, got 0",
    ),
    (
        "a rank above the server's limit",
        _steering(concept_prompt=pb.ConceptSpec(prompt=pb.Input(text=CONCEPT), rank=9)),
        "steering.concept_prompt.rank is 9, above this server's limit of 8",
    ),
    (
        "a map layer out of range",
        _steering(concept_prompt=pb.ConceptSpec(prompt=pb.Input(text=CONCEPT), map=pb.CONCEPT_MAP_LAYER, layer=40)),
        "steering.concept_prompt.layer is 40, but the model has layers 0..29",
    ),
    (
        "an out-of-vocabulary concept token",
        _steering(concept_prompt=pb.ConceptSpec(prompt=pb.Input(token_ids=pb.TokenIds(ids=[5, 49152])))),
        "steering.concept_prompt.prompt[1] = 49152 is not a token id",
    ),
    (
        "an unknown positions value",
        _steering(vector=tensor_from_array(np.ones(576)), positions=7),  # type: ignore[arg-type]
        "steering.positions 7 is not a known SteeringPositions value",
    ),
]


@pytest.fixture(scope="module")
def stub(target: str) -> Iterator[pb_grpc.LinlensServiceStub]:
    with grpc.insecure_channel(target) as channel:
        yield pb_grpc.LinlensServiceStub(channel)


def assert_invalid(call: Any, fragment: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert fragment in (info.value.details() or ""), info.value.details()


@pytest.mark.parametrize(
    ("steering", "fragment"), [(s, f) for _, s, f in BAD_STEERING], ids=[n for n, _, _ in BAD_STEERING]
)
def test_bad_steering_is_invalid_argument_naming_the_field(
    stub: pb_grpc.LinlensServiceStub, steering: pb.Steering, fragment: str
) -> None:
    request = pb.GenerateRequest(input=pb.Input(text=PROMPT), steering=steering)
    assert_invalid(lambda: stub.Generate(request, timeout=30), fragment)
    stream = pb.GenerateStreamRequest(input=pb.Input(text=PROMPT), steering=steering)
    assert_invalid(lambda: list(stub.GenerateStream(stream, timeout=30)), fragment)


def test_bad_concept_requests_and_steering_with_explain(stub: pb_grpc.LinlensServiceStub) -> None:
    bad = [
        (pb.ComputeConceptRequest(), "concept is missing"),
        (pb.ComputeConceptRequest(concept=pb.ConceptSpec(prompt=pb.Input(text=""))), "concept.prompt is empty"),
        (
            pb.ComputeConceptRequest(concept=pb.ConceptSpec(prompt=pb.Input(text=CONCEPT)), tokens_per_vector=0),
            "tokens_per_vector must be at least 1, got 0",
        ),
        (
            pb.ComputeConceptRequest(concept=pb.ConceptSpec(prompt=pb.Input(text=CONCEPT), map=7)),  # type: ignore[arg-type]
            "concept.map 7 is not a known ConceptMap value",
        ),
    ]
    for request, fragment in bad:
        assert_invalid(lambda request=request: stub.ComputeConcept(request, timeout=30), fragment)
    both = pb.GenerateRequest(
        input=pb.Input(text=PROMPT),
        explain=pb.ExplainOptions(),
        steering=pb.Steering(vector=tensor_from_array(np.ones(576))),
    )
    assert_invalid(lambda: stub.Generate(both, timeout=30), "steering cannot be combined with explain")
    # The server keeps serving.
    assert stub.Generate(pb.GenerateRequest(input=pb.Input(text=PROMPT)), timeout=60).text


# --- SDK and CLI ---------------------------------------------------------------------------------------------------


def test_async_client_computes_a_concept_and_steers_with_it(target: str) -> None:
    async def scenario() -> tuple[Any, Any, Any]:
        async with AsyncClient(target, retry=None, timeout=120) as sdk:
            concept = await sdk.compute_concept(CONCEPT, tokens_per_vector=8)
            steered = await sdk.generate(
                PROMPT, max_new_tokens=4, steering=Steering(vector=concept.vector, strength=4.0)
            )
            streamed = [
                e
                async for e in sdk.generate_stream(
                    PROMPT, max_new_tokens=4, steering=Steering(concept=ConceptSpec(CONCEPT), strength=4.0)
                )
            ]
            return concept, steered, streamed

    concept, steered, streamed = asyncio.run(scenario())
    assert [t.text for t in concept.tokens[:2]] == [" Francisco", " Diego"]
    assert {t.token_id for t in steered.tokens} <= {t.token_id for t in concept.tokens}  # all concept tokens
    # The same steering, by concept prompt on the server or by the cached vector, gives the same tokens.
    assert [e.token_id for e in streamed if hasattr(e, "token_id")] == [t.token_id for t in steered.tokens]


def test_cli_concept_save_then_generate_with_the_saved_vector(
    target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LINLENS_SERVER", raising=False)
    saved = tmp_path / "concept.json"
    assert main(["concept", CONCEPT, "--save", str(saved), "--server", target]) == 0
    out = capsys.readouterr().out
    assert "left singular vector 1 of the output map" in out and "' Francisco'" in out
    assert len(json.loads(saved.read_text())["vector"]) == 576
    argv = ["generate", PROMPT, "--max-new-tokens", "4", "--no-stream", "--json"]
    assert main([*argv, "--steer-vector", str(saved), "--steer-strength", "8", "--server", target]) == 0
    by_vector = json.loads(capsys.readouterr().out)
    assert "Francisco" in by_vector["text"]
    # In this process, steering by the concept prompt gives the same document (the concept computed here).
    assert main([*argv, "--steer", CONCEPT, "--steer-strength", "8"]) == 0
    in_process = json.loads(capsys.readouterr().out)
    assert [t["token_id"] for t in in_process["tokens"]] == [t["token_id"] for t in by_vector["tokens"]]
    assert main([*argv, "--steer", CONCEPT, "--steer-vector", str(saved)]) == 2
    assert "exclude each other" in capsys.readouterr().err


def test_the_contract_rules_and_the_wire_mapping_of_steering() -> None:
    from linlens.client import DEFAULT_STEERING_STRENGTH, OptionError
    from linlens.contract import default_steering_layer
    from linlens.contract.wire import steering_from_proto, steering_to_proto

    assert default_steering_layer(30) == 20 and default_steering_layer(18) == 12 and default_steering_layer(1) == 0
    spec = ConceptSpec([5, 6], map="layer", layer=3, rank=2, side="right")
    back = steering_from_proto(steering_to_proto(Steering(concept=spec, layer=7, strength=-1.5, positions="prompt")))
    assert back.concept == spec and back.layer == 7 and back.strength == -1.5
    assert back.positions is SteeringPositions.PROMPT and back.vector is None
    plain = steering_from_proto(steering_to_proto(Steering(vector=[3.0, 4.0])))
    assert plain.strength == DEFAULT_STEERING_STRENGTH and plain.layer is None
    assert plain.positions is SteeringPositions.ALL and np.array_equal(plain.vector, [3.0, 4.0])
    assert spec.resolved_layer(30) == 3 and ConceptSpec("x", map="layer").resolved_layer(30, steering_layer=9) == 9
    assert ConceptSpec("x").resolved_layer(30) is None
    for fields, fragment in [
        ({}, "concept and vector: give exactly one"),
        ({"vector": [1.0], "concept": spec}, "give exactly one"),
        ({"vector": [float("nan")]}, "vector holds NaN"),
        ({"vector": [1.0], "strength": float("nan")}, "strength must be finite"),
        ({"vector": [1.0], "layer": -1}, "layer must be at least 0"),
        ({"vector": [1.0], "positions": "middle"}, "positions must be one of prompt, generated, all"),
    ]:
        with pytest.raises(OptionError, match=fragment):
            Steering(**fields)
    with pytest.raises(OptionError, match=r"layer is 30, but the model has layers 0\.\.29"):
        Steering(vector=[1.0], layer=30).resolved_layer(30)
    with pytest.raises(OptionError, match="prompt is empty"):
        ConceptSpec(())
