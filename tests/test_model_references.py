"""Every way to name a model works in every command, in this process and through a server (issue 18).

A model is configured by registry name, by folder or by .gguf file; the name requests use is the registry name, the
folder's name or the file's stem. A command given the reference itself (``--model ./folder``, ``--model x.gguf``)
must reach that model both in-process (where the CLI loads what it was given, then names it in its requests) and
against a server that serves it. Registry names are covered by tests/test_cli.py in both ways.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import server_config
from tiny_models import save_tiny_model

from linlens.cli.main import main
from linlens.models.registry import REGISTRY

pytestmark = [pytest.mark.timeout(300)]


def _explain(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    status = main(["explain", "a b c", "--top-k", "0", "--json", *argv])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    document: dict[str, object] = json.loads(captured.out)
    return document


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("models") / "tiny-llama")


def _both_ways(reference: str, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    from linlens.server.app import start_server

    assert _explain(["--model", reference], capsys)["model"] == name
    running = start_server(server_config(models=(reference,)), load_in_background=False)
    try:
        assert _explain(["--model", reference, "--server", running.target], capsys)["model"] == name
        assert _explain(["--model", name, "--server", running.target], capsys)["model"] == name
    finally:
        running.stop()


def test_a_model_folder_works_in_process_and_through_a_server(
    folder: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LINLENS_SERVER", raising=False)
    _both_ways(str(folder), "tiny-llama", capsys)
    monkeypatch.chdir(folder.parent)
    assert _explain(["--model", "./tiny-llama"], capsys)["model"] == "tiny-llama"  # relative, as the README writes it


@pytest.mark.slow
def test_a_gguf_file_works_in_process_and_through_a_server(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LINLENS_SERVER", raising=False)
    gguf = REGISTRY["smollm2-135m"].locate()
    _both_ways(str(gguf), gguf.stem, capsys)
