"""The command line both ways: in this process (no server) and through a real server, with the real model.

Every command must work without a server or say plainly that none answers; through a server it waits for a model
that is still loading and fails at once for one that failed to load. In-process and remote answers must be the same
document, since both run the server's own request path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, server_config

from linlens.cli.main import main

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PROMPT = "The bridge out of Marin is the"
ROOT = Path(__file__).resolve().parents[1]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _without_timings(document: Any) -> Any:
    """A result document without what differs between two runs of the same request: durations and paths."""
    if isinstance(document, dict):
        return {k: _without_timings(v) for k, v in document.items() if k not in ("timings", "duration_ms")}
    if isinstance(document, list):
        return [_without_timings(v) for v in document]
    return document


def test_explain_in_process_and_through_a_server_give_the_same_document(
    target: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LINLENS_SERVER", raising=False)
    argv = ["explain", PROMPT, "--top-k", "1", "--tokens-per-vector", "4", "--json"]
    status, local_out, _ = run(argv, capsys)
    assert status == 0
    status, remote_out, _ = run([*argv, "--server", target], capsys)
    assert status == 0
    local, remote = json.loads(local_out), json.loads(remote_out)
    assert local["explanation"]["predicted"]["text"] == " only"
    assert _without_timings(local) == _without_timings(remote)


def test_generate_and_models_run_in_process_without_a_server(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LINLENS_SERVER", raising=False)
    status, out, _ = run(["generate", PROMPT, "--max-new-tokens", "4", "--explain", "--top-k", "0"], capsys)
    assert status == 0
    assert out.startswith(" only one that can") and "finish: length, tokens: 4" in out
    assert "--- explanation of generated step 0 ---" in out and "attribution to ' only'" in out
    status, out, _ = run(["models"], capsys)
    assert status == 0
    (row,) = [line for line in out.splitlines() if line.startswith("smollm2-135m")]
    assert "ready" in row and "LlamaForCausalLM" in row and "(default)" in row


def test_linlens_server_names_the_server(
    target: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LINLENS_SERVER", target)
    status, out, _ = run(["models", "--json"], capsys)
    assert status == 0
    (model,) = json.loads(out)
    assert model["name"] == "smollm2-135m" and model["state"] == "ready" and model["is_default"]


def test_no_server_is_said_plainly(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    started = time.monotonic()
    status, out, err = run(["models", "--server", f"127.0.0.1:{port}", "--timeout", "2"], capsys)
    assert status == 1 and out == ""
    assert f"no linlens server answers at 127.0.0.1:{port}" in err
    assert "linlens serve" in err and "leave out --server" in err
    assert time.monotonic() - started < 10


def test_the_cli_waits_for_a_model_that_is_still_loading() -> None:
    """The CLI is started before the server: it waits for the server, then for the model, then explains."""
    from linlens.server.app import start_server

    port = free_port()
    cli = subprocess.Popen(
        [sys.executable, "-m", "linlens.cli", "explain", PROMPT, "--server", f"127.0.0.1:{port}", "--top-k", "0"],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "LINLENS_SERVER"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)
    server = start_server(server_config(port=port))  # loads smollm2 on a background thread
    try:
        out, err = cli.communicate(timeout=240)
    finally:
        server.stop()
    assert cli.returncode == 0, err
    assert "linlens: waiting for model 'smollm2-135m'" in err and "to finish loading" in err
    assert "predicted: ' only'" in out


def test_a_model_that_failed_to_load_is_an_immediate_clear_error(
    make_server: Callable[..., Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = make_server(models=("smollm2-135m", str(tmp_path / "missing-model.gguf")))
    assert server.wait_until_loaded(60)
    started = time.monotonic()
    status, _, err = run(["explain", "x", "--server", server.target, "--model", "missing-model"], capsys)
    assert status == 1
    assert "FAILED_PRECONDITION" in err and "'missing-model' failed to load" in err and "no GGUF file at" in err
    assert time.monotonic() - started < 10


def test_bad_options_are_reported_before_any_model_loads(capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    status, _, err = run(["explain", PROMPT, "--layers", "every:x"], capsys)
    assert status == 2 and "every:K needs an integer" in err
    assert time.monotonic() - started < 2


def test_explain_and_generate_write_html_and_png_reports(
    target: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """--html and --png, in-process (explain) and through a server (a streamed generate, which they make explained)."""
    from PIL import Image

    monkeypatch.delenv("LINLENS_SERVER", raising=False)
    html, png = tmp_path / "explain.html", tmp_path / "explain.png"
    status, out, err = run(["explain", PROMPT, "--top-k", "0", "--html", str(html), "--png", str(png)], capsys)
    assert status == 0 and "predicted: ' only'" in out
    assert f"linlens: wrote the HTML report to {html}" in err and f"linlens: wrote the PNG report to {png}" in err
    document = html.read_text(encoding="utf-8")
    assert document.startswith("<!DOCTYPE html>") and 'data-kind="explained"' in document
    assert all(f">{word}<" in document or f"> {word}<" in document for word in PROMPT.split())
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width == 1200 and image.height > 250

    html, png = tmp_path / "generate.html", tmp_path / "generate.png"
    argv = ["generate", PROMPT, "--max-new-tokens", "2", "--top-k", "0", "--server", target]
    status, out, err = run([*argv, "--html", str(html), "--png", str(png)], capsys)
    assert status == 0 and out.startswith(" only one")
    assert "--- explanation of generated step 0 ---" in out  # --html implies --explain
    document = html.read_text(encoding="utf-8")
    assert '<section class="explanation" data-step="0">' in document
    assert '"> only</span>' in document and '"> one</span>' in document  # the generated tokens, as chips
    with Image.open(png) as image:
        assert image.width == 1200


def test_report_flags_are_checked_before_any_work(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    started = time.monotonic()
    missing = tmp_path / "no-such-folder" / "report.png"
    status, out, err = run(["explain", PROMPT, "--png", str(missing)], capsys)
    assert status == 1 and out == ""
    assert f"--png {missing}: the folder {missing.parent} does not exist" in err
    assert time.monotonic() - started < 2
