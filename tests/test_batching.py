"""Batched generation: concurrent requests decode together, and each gets exactly what it gets served alone.

Every family's tiny model and SmolLM2 are served by a real server on localhost. The same requests (different
lengths, greedy and seeded sampling, stop strings, ``ignore_eos``) are sent one at a time (each decodes in a batch of
one) and then all at once from as many threads (they decode together): greedy tokens must be equal, logprobs within
1e-4, and seeded samples equal. A cancelled stream and a passed deadline end only their own request.

Besides: every family batches, the sliding-window ones too, also checked in one process against transformers' own
``generate``; steered requests decode together with requests of the same steering and match a server that does not
batch; a served process exits within seconds of SIGTERM after batched work, and a drain leaves no decode thread.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import free_port, server_config
from prometheus_client import generate_latest
from tiny_models import FAMILIES, VOCAB, _configs, save_tiny_model

from linlens.client import Client, HealthStatus, Steering, SteeringPositions, UnavailableError
from linlens.client.errors import CancelledError, DeadlineExceededError, LinlensError
from linlens.client.retry import NO_RETRY
from linlens.contract import GeneratedToken, Generation

LOGPROB_TOLERANCE = 1e-4
REPO = Path(__file__).resolve().parents[1]
#: The tiny models' hidden size (tests/tiny_models.py).
HIDDEN = 64


def _tiny_requests() -> list[dict[str, Any]]:
    """Ten requests of different lengths, sampling, stop strings and ``ignore_eos`` (token ids: the tiny tokenizer is
    word-level)."""
    out: list[dict[str, Any]] = []
    for i in range(10):
        length = 2 + (i * 3) % 9
        ids = [(7 * i + 5 * j + 3) % (VOCAB - 4) + 4 for j in range(length)]
        args: dict[str, Any] = {"token_ids": ids, "max_new_tokens": 6 + (i * 5) % 19, "ignore_eos": i % 5 != 0}
        if i % 4 == 3:
            args.update(stop=["w1", "w2", "w3", "w5"])  # any of w10..w39 and w50..w59: about one token in three
        if i % 3 == 1:
            args.update(temperature=0.9, top_k=20, seed=1000 + i)
        elif i % 3 == 2:
            args.update(temperature=0.7, top_p=0.9, seed=2000 + i)
        out.append(args)
    return out


SMOL_PROMPTS = [
    "The bridge out of Marin is the",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "def fibonacci(n):",
    "The capital of France is",
    "Water boils at",
    "List three colours:",
    "In 1969, the first humans to walk on the Moon were",
    "The quick brown fox",
    "Photosynthesis is the process by which plants",
    "A haiku about winter:",
]


def _smol_requests() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, prompt in enumerate(SMOL_PROMPTS):
        args: dict[str, Any] = {"prompt": prompt, "max_new_tokens": 8 + (i * 7) % 17}
        if i % 3 == 1:
            args.update(temperature=0.8, top_p=0.95, seed=77 + i)
        if i % 4 == 3:
            args.update(stop=["\n", "."])
        if i == 5:
            args.update(ignore_eos=True)
        out.append(args)
    return out


def _run(client: Client, args: dict[str, Any]) -> Generation:
    args = dict(args)
    prompt = args.pop("prompt", None)
    return client.generate(prompt, **args)


def _all_at_once(target: str, requests: list[dict[str, Any]]) -> list[Generation]:
    start = threading.Barrier(len(requests))

    def one(args: dict[str, Any]) -> Generation:
        with Client(target, timeout=240, retry=NO_RETRY) as client:
            start.wait()
            return _run(client, args)

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(one, requests))


def assert_same(alone: Generation, batched: Generation, label: str) -> None:
    assert [t.token_id for t in batched.tokens] == [t.token_id for t in alone.tokens], label
    assert batched.text == alone.text, label
    assert batched.finish_reason == alone.finish_reason, label
    for a, b in zip(alone.tokens, batched.tokens, strict=True):
        assert abs(a.logprob - b.logprob) <= LOGPROB_TOLERANCE, (label, a, b)


def batch_sizes_seen(server: Any) -> float:
    """The sum of batch sizes over the decode steps the server has run (from its own metrics)."""
    text = generate_latest(server.metrics.registry).decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("linlens_generation_batch_size_sum"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def batch_steps(server: Any) -> float:
    text = generate_latest(server.metrics.registry).decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("linlens_generation_batch_size_count")
    )


@pytest.fixture(scope="module")
def tiny_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Any]]:
    from linlens.server.app import start_server

    root: Path = tmp_path_factory.mktemp("tiny-batch")
    started: list[Any] = []

    def make(family: str, **overrides: Any) -> Any:
        folder = root / family
        if not folder.exists():
            save_tiny_model(family, folder)
        server = start_server(server_config(models=(str(folder),), **overrides), load_in_background=False)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_family_batched_equals_alone(family: str, tiny_servers: Callable[..., Any]) -> None:
    server = tiny_servers(family)
    requests = _tiny_requests()
    with Client(server.target, timeout=120, retry=NO_RETRY) as client:
        alone = [_run(client, args) for args in requests]
    steps_alone, rows_alone = batch_steps(server), batch_sizes_seen(server)
    assert rows_alone == steps_alone  # one at a time: every step was a batch of one
    batched = _all_at_once(server.target, requests)
    for i, (a, b) in enumerate(zip(alone, batched, strict=True)):
        assert_same(a, b, f"{family} request {i}: {requests[i]}")
        if "seed" in requests[i]:
            assert b.seed == requests[i]["seed"]
    assert any(r.finish_reason.name == "STOP_SEQUENCE" for r in batched), family
    # every family batches, the sliding-window ones (window 4, shorter than every sequence here) included
    steps, rows = batch_steps(server) - steps_alone, batch_sizes_seen(server) - rows_alone
    print(f"{family}: {rows / steps:.2f} rows per step")
    assert rows / steps > 2.0, f"{family}: the concurrent requests did not decode together ({rows} rows, {steps} steps)"


def test_smollm2_batched_equals_alone(make_server: Callable[..., Any]) -> None:
    server = make_server()
    requests = _smol_requests()
    with Client(server.target, timeout=120, retry=NO_RETRY) as client:
        alone = [_run(client, args) for args in requests]
    steps_alone, rows_alone = batch_steps(server), batch_sizes_seen(server)
    assert rows_alone == steps_alone  # one at a time: every step was a batch of one
    batched = _all_at_once(server.target, requests)
    for i, (a, b) in enumerate(zip(alone, batched, strict=True)):
        assert_same(a, b, f"request {i}: {requests[i]}")
    steps, rows = batch_steps(server) - steps_alone, batch_sizes_seen(server) - rows_alone
    assert rows / steps > 2.0, f"the concurrent requests did not decode together ({rows} rows in {steps} steps)"
    assert any(r.finish_reason.name == "STOP_SEQUENCE" for r in batched)


def test_a_cancelled_stream_and_a_passed_deadline_end_only_their_own_request(make_server: Callable[..., Any]) -> None:
    server = make_server()
    requests = [{"prompt": p, "max_new_tokens": 24, "ignore_eos": True} for p in SMOL_PROMPTS[:4]]
    with Client(server.target, timeout=120, retry=NO_RETRY) as client:
        alone = [_run(client, args) for args in requests]
    results: dict[int, Generation] = {}
    errors: dict[str, BaseException] = {}
    cancelled_after: list[int] = []
    go = threading.Barrier(len(requests) + 2)

    def complete(i: int) -> None:
        with Client(server.target, timeout=120, retry=NO_RETRY) as client:
            go.wait()
            results[i] = _run(client, requests[i])

    def cancelled() -> None:
        with Client(server.target, timeout=120, retry=NO_RETRY) as client:
            go.wait()
            stream = client.generate_stream(SMOL_PROMPTS[5], max_new_tokens=64, ignore_eos=True)
            seen = 0
            try:
                for event in stream:
                    if isinstance(event, GeneratedToken):
                        seen += 1
                        if seen == 3:
                            stream.cancel()
            except LinlensError as error:  # a cancelled stream may end quietly or with CANCELLED
                errors["cancelled"] = error
            cancelled_after.append(seen)

    def deadline() -> None:
        with Client(server.target, timeout=1.5, retry=NO_RETRY) as client:
            go.wait()
            try:
                client.generate(SMOL_PROMPTS[6], max_new_tokens=64, ignore_eos=True)
            except LinlensError as error:
                errors["deadline"] = error

    threads = [threading.Thread(target=complete, args=(i,)) for i in range(len(requests))]
    threads += [threading.Thread(target=cancelled), threading.Thread(target=deadline)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert time.monotonic() - started < 180
    assert isinstance(errors["deadline"], DeadlineExceededError)
    assert cancelled_after == [3]
    if "cancelled" in errors:
        assert isinstance(errors["cancelled"], CancelledError)
    for i, a in enumerate(alone):
        assert_same(a, results[i], f"request {i}")


def _steering_vector(seed: int) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    return [float(v) for v in torch.randn(HIDDEN, generator=generator)]


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_steered_requests_batch_with_requests_of_the_same_steering(
    family: str, tiny_servers: Callable[..., Any]
) -> None:
    """Requests of one steering decode together; requests of other steerings (or none), sent at the same time, each
    get what they get alone from a server that does not batch (transformers' ``generate`` under the steering hook).
    gemma2 has window layers; each position selection is there."""
    server = tiny_servers(family)
    unbatched = tiny_servers(family, max_batch_size=1)
    same = Steering(vector=_steering_vector(1), strength=4.0, positions=SteeringPositions.ALL)
    others = [
        Steering(vector=_steering_vector(2), strength=4.0, positions=SteeringPositions.PROMPT),
        Steering(vector=_steering_vector(3), strength=-3.0, positions=SteeringPositions.GENERATED),
        Steering(vector=_steering_vector(1), strength=2.0, positions=SteeringPositions.ALL),  # same vector, weaker
        None,
    ]
    base = _tiny_requests()
    steered = [dict(args, steering=same) for args in base[:8]]
    mixed = steered + [dict(args, steering=others[i % len(others)]) for i, args in enumerate(base[2:10])]
    with Client(unbatched.target, timeout=120, retry=NO_RETRY) as client:
        alone = [_run(client, args) for args in mixed]
        unsteered = [_run(client, {k: v for k, v in args.items() if k != "steering"}) for args in mixed]
    # the steering does something, in every selection of positions
    changed = {str(args["steering"]) for args, a, u in zip(mixed, alone, unsteered, strict=True) if _ids(a) != _ids(u)}
    assert changed == {str(s) for s in [same, *others] if s is not None}
    assert batch_steps(unbatched) == 0
    steps_before, rows_before = batch_steps(server), batch_sizes_seen(server)
    together = _all_at_once(server.target, steered)
    steps, rows = batch_steps(server) - steps_before, batch_sizes_seen(server) - rows_before
    assert rows / steps > 2.0, f"{family}: same-steering requests did not decode together ({rows} rows, {steps} steps)"
    for i, (a, b) in enumerate(zip(alone[: len(steered)], together, strict=True)):
        assert_same(a, b, f"{family} steered request {i}")
    for i, (a, b) in enumerate(zip(alone, _all_at_once(server.target, mixed), strict=True)):
        assert_same(a, b, f"{family} mixed request {i}: {mixed[i].get('steering')}")


def _ids(generation: Generation) -> list[int]:
    return [t.token_id for t in generation.tokens]


def test_a_served_process_exits_promptly_after_sigterm_once_its_decode_batch_has_run(tmp_path: Path) -> None:
    """``linlens serve --grace-period-s 60`` (a real process, a sliding-window tiny model so that its batch merges
    window caches): concurrent generations decode together, a stream runs to its end, one stream is cancelled and one
    client is killed mid-stream; then SIGTERM must end the process within seconds, not after the grace period.
    The decode thread and the generation lane's workers must hold nothing that keeps the process alive."""
    folder = save_tiny_model("mistral", tmp_path / "mistral")
    port = free_port()
    target = f"127.0.0.1:{port}"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "client"), str(REPO / "server"), env.get("PYTHONPATH", "")])
    log_path = tmp_path / "server.log"
    serve = [sys.executable, "-m", "linlens.cli", "serve", "--model", str(folder), "--host", "127.0.0.1"]
    serve += ["--port", str(port), "--metrics-port", "0", "--grace-period-s", "60"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(serve, env=env, stdout=log, stderr=subprocess.STDOUT)
    killed: subprocess.Popen[bytes] | None = None
    try:
        with Client(target, retry=NO_RETRY, timeout=5) as client:
            end = time.monotonic() + 120
            while not _serving(client):
                assert proc.poll() is None and time.monotonic() < end, log_path.read_text()
                time.sleep(0.1)
            # a client killed in the middle of its stream (its call is cancelled by the connection's end)
            reader = "import sys\nfrom linlens.client import Client\nstream = Client(sys.argv[1]).generate_stream("
            reader += "token_ids=[5, 6], max_new_tokens=60, ignore_eos=True)\n"
            reader += "for e in stream:\n    print(e, flush=True)\n"
            killed = subprocess.Popen([sys.executable, "-c", reader, target], env=env, stdout=subprocess.PIPE)
            assert killed.stdout is not None and killed.stdout.readline()
            killed.kill()
            batched = _all_at_once(target, _tiny_requests())
            assert all(r.tokens for r in batched)
            stream = client.generate_stream(token_ids=[7, 8, 9], max_new_tokens=40, ignore_eos=True)
            for event in stream:
                if isinstance(event, GeneratedToken):
                    stream.cancel()
                    break
            events = list(client.generate_stream(token_ids=[4, 5], max_new_tokens=12, ignore_eos=True))
            assert sum(isinstance(e, GeneratedToken) for e in events) == 12
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log_path.read_text()
        took = time.monotonic() - sent
        print(f"exited {took:.1f} s after SIGTERM")
        assert took < 8.0, f"the server took {took:.1f} s to exit after SIGTERM\n{log_path.read_text()}"
    finally:
        for p in (proc, killed):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)


def _serving(client: Client) -> bool:
    try:
        return client.health() is HealthStatus.SERVING
    except UnavailableError:
        return False


def test_a_drained_server_leaves_no_decode_thread_running(tmp_path: Path) -> None:
    """The drain ends the decode threads (they would otherwise idle on for IDLE_S seconds), so that no thread of the
    server runs the model while the process exits."""
    from linlens.server.app import start_server

    folder = save_tiny_model("gemma3", tmp_path / "gemma3")
    before = set(threading.enumerate())  # other tests' servers may still have theirs
    server = start_server(server_config(models=(str(folder),)), load_in_background=False)
    try:
        _all_at_once(server.target, _tiny_requests()[:4])
        ours = [t for t in threading.enumerate() if t.name == "linlens-decode" and t not in before]
        assert ours
    finally:
        server.stop()
    assert not [t for t in ours if t.is_alive()]


SLIDING = [f for f in FAMILIES if f in ("gemma3", "qwen3", "phi3", "mistral", "gemma2", "cohere2")]


@pytest.mark.parametrize("family", SLIDING)
def test_window_families_batched_equal_transformers_generate(family: str, tmp_path: Path) -> None:
    """In one process, without a server: rows that join a sliding-window model's batch at different steps (staggered
    starts, different prompt lengths, each longer than the window by the end) get the greedy tokens of transformers'
    own ``generate`` with its own window cache, logprobs within 1e-4."""
    from linlens.models import load_model
    from linlens.server.batching import DecodeBatch
    from linlens.server.generation import Sampling, generate, generate_batched

    loaded = load_model(str(save_tiny_model(family, tmp_path / family)))
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts = [[(5 * i + 3 * j) % (VOCAB - 4) + 4 for j in range(1 + 2 * i)] for i in range(8)]
    # the longer a prompt, the sooner its row leaves: the batch drops its leftmost columns (a cut of every layer)
    sampling = [Sampling(max_new_tokens=18 - i, ignore_eos=True) for i in range(8)]
    alone = [generate(model, tokenizer, p, s) for p, s in zip(prompts, sampling, strict=True)]
    sizes: list[int] = []
    decoding = threading.Event()

    def on_step(size: int) -> None:
        sizes.append(size)
        if len(sizes) >= 2:
            decoding.set()

    batch = DecodeBatch(model, on_step=on_step)
    results: list[Any] = [None] * len(prompts)

    def one(i: int) -> None:
        if i >= 4:  # the later rows join a batch that is already decoding
            decoding.wait(30)
        results[i] = generate_batched(batch, model, tokenizer, prompts[i], sampling[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert max(sizes) >= 4 and len(set(sizes)) >= 3, f"{family}: rows did not join and leave a running batch: {sizes}"
    for i, (a, b) in enumerate(zip(alone, results, strict=True)):
        assert [t.token_id for t in b.tokens] == [t.token_id for t in a.tokens], f"{family} row {i}"
        for x, y in zip(a.tokens, b.tokens, strict=True):
            assert abs(x.logprob - y.logprob) <= LOGPROB_TOLERANCE, (family, i, x, y)


def test_which_models_batch() -> None:
    """Every supported family's cache merges; chunked attention (transformers keeps it in the same window layers, but
    its mask follows absolute positions, which left padding shifts) decodes one request at a time."""
    from transformers import Llama4TextConfig
    from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer

    from linlens.server.batching import _mergeable

    for family in FAMILIES:
        assert _mergeable(_configs()[family][1]), family
    chunked = Llama4TextConfig(num_hidden_layers=4, attention_chunk_size=8)
    assert any(isinstance(layer, DynamicSlidingWindowLayer) for layer in DynamicCache(config=chunked).layers)
    assert not _mergeable(chunked)
