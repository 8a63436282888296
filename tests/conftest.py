"""Shared fixtures: the real default model, loaded once per session, and real servers on free localhost ports.

Loading SmolLM2 costs seconds and memory, so one LoadedModel is shared by the session's in-process servers (the
servers adopt it instead of loading their own copy) and by tests that compute reference answers with transformers
directly. Tests that need a differently configured server (a tiny queue, a drain) start one with ``make_server``; it
reuses the same model and stops the server when the test ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

MODEL = "smollm2-135m"


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def server_config(**overrides: Any) -> Any:
    """The configuration of the test servers: loopback, an OS-chosen port, no metrics port, small limits."""
    from linlens.server.config import ServerConfig

    base = ServerConfig(
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        models=(MODEL,),
        max_concurrent_jobs=1,
        max_queue=16,
        max_prompt_tokens=256,
        max_new_tokens=64,
        max_explained_steps=4,
        max_top_k=8,
        grace_period_s=10.0,
        grpc_threads=24,
    )
    return dataclasses.replace(base, **overrides).validate()


@pytest.fixture(scope="session")
def smollm2() -> Any:
    """The real default model (linlens.models.LoadedModel), loaded once for the whole session."""
    from linlens.models import load_model

    return load_model(MODEL)


@pytest.fixture(scope="session")
def server(smollm2: Any) -> Iterator[Any]:
    """One real server for the session, serving ``smollm2`` on a free localhost port (RunningServer)."""
    from linlens.server.app import start_server

    running = start_server(server_config(), models=[smollm2])
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def target(server: Any) -> str:
    """``127.0.0.1:<port>`` of the session server."""
    return str(server.target)


@pytest.fixture
def make_server(smollm2: Any) -> Iterator[Callable[..., Any]]:
    """Start extra servers with config overrides (e.g. ``max_queue=0``); each is stopped after the test."""
    from linlens.server.app import start_server

    started: list[Any] = []

    def make(**overrides: Any) -> Any:
        running = start_server(server_config(**overrides), models=[smollm2])
        started.append(running)
        return running

    yield make
    for running in started:
        with contextlib.suppress(Exception):
            running.stop()


#: The prompt the reports are tested on (the README's), and the layers whose up-to-layer maps they draw: at layer 10
#: ' only' is not among the top 8 tokens of the first singular vector, at layer 29 it is the first (docs/layers.md).
REPORT_PROMPT = "The bridge out of Marin is the"
REPORT_LAYERS = (10, 29)


@pytest.fixture(scope="session")
def report_result(target: str, smollm2: Any) -> Any:
    """One real ExplainResult, through the session server, with every panel a report draws: three singular
    components, an extra target (' first') and a contrast (' only' versus ' first'), and a layer analysis with the
    up-to-layer maps of REPORT_LAYERS (two d-VJP Jacobians: the costly part, computed once for the session)."""
    from linlens.client import Client, ExplainOptions, LayerAnalysisOptions

    only, first = (smollm2.tokenizer(text, add_special_tokens=False)["input_ids"][0] for text in (" only", " first"))
    options = ExplainOptions(
        top_k=3,
        targets=[first, (only, first)],
        layers=LayerAnalysisOptions(layers=REPORT_LAYERS, top_k=1, tokens_per_vector=8),
    )
    with Client(target, timeout=900) as client:
        return client.explain(REPORT_PROMPT, options=options)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every tiny family's model saved as a Hugging Face folder (tests/tiny_models.py), once per test module."""
    from tiny_models import FAMILIES, save_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {family: save_tiny_model(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="module")
def loaded(folders: dict[str, Any]) -> dict[str, Any]:
    """Every tiny family loaded through the real loading path (``load_model`` on its folder), once per test module."""
    from linlens.models import load_model

    return {family: load_model(str(folder)) for family, folder in folders.items()}
