"""The README's main command, exactly as written, on a fresh copy of the repository with an empty model cache.

This is the first thing every new user runs, so it is tested the way they run it: the command is read from the
README (not copied here), executed with bash in a copy of the repository that holds only what a clone holds (no
.venv, no caches), with an empty LINLENS_CACHE_DIR so that the model is converted from its GGUF file on the way. The
demo keeps its server running until Ctrl-C; the test presses it (SIGINT to the process group, as a terminal does)
and expects exit status 0, the explanation, and the first-load progress in the server's log, with no access-log line
per readiness poll.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[1]
#: The README paragraph that introduces the main command; the command is the indented line that follows it.
MAIN_JOB_HEADING = "**Set up and run the main job**"


def readme_main_command() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    after = text[text.index(MAIN_JOB_HEADING) :]
    match = re.search(r"\n\n    (\S.*)\n", after)
    assert match, "the README's main-job paragraph is not followed by an indented command"
    return match.group(1).strip()


def fresh_copy(destination: Path) -> Path:
    """What a clone of this working tree holds: tracked files plus new ones git does not ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if not source.is_file():  # deleted in the working tree
            continue
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    return destination


def test_the_readme_main_command_works_on_a_fresh_clone(tmp_path: Path) -> None:
    command = readme_main_command()
    assert "scripts/demo.sh" in command
    clone = fresh_copy(tmp_path / "linlens")
    assert not (clone / ".venv").exists()
    cache = tmp_path / "empty-cache"
    venv_bin = str(ROOT / ".venv" / "bin")
    env = {
        k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH") and not k.startswith("LINLENS_")
    }
    env.update(
        PATH=os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != venv_bin),
        LINLENS_CACHE_DIR=str(cache),
        LINLENS_PORT=str(free_port()),
        LINLENS_METRICS_PORT=str(free_port()),
        LINLENS_NO_CONTAINER_TOOLS="1",  # the outer setup installed them already where it could
        HF_HUB_OFFLINE="1",  # nothing may come from a model hub
    )
    process = subprocess.Popen(
        ["bash", "-c", command],
        cwd=clone,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    serving = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if "Ctrl-C to stop" in line:
                serving.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 1500
        while not serving.is_set() and process.poll() is None and time.monotonic() < deadline:
            serving.wait(1.0)
        output = "".join(lines)
        assert serving.is_set(), f"the demo did not reach its running server (exit {process.poll()}):\n{output[-6000:]}"
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C, as a terminal delivers it
        status = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        reader.join(timeout=120)  # the server may hold the pipe while it drains; under load that takes a while
    output = "".join(lines)
    assert status == 0, output[-6000:]

    # The explanation a new user is promised: the prediction, an exact reconstruction, the decoded concept.
    assert "predicted: ' only'" in output
    error = re.search(r"reconstruction y = sum_i J_i x_i: relative error ([0-9.e+-]+) vs the model", output)
    assert error and float(error.group(1)) < 1e-5, output[-6000:]
    assert "output side (LM head): ' only'" in output
    assert "layer by layer: logit of ' only'" in output
    assert " only one that can be built on the" in output
    # The first start converted the model, and said so while it did.
    assert "converting SmolLM2-135M-Instruct.Q4_1.gguf" in output
    assert "waiting for model 'smollm2-135m'" in output
    converted = list((cache / "gguf").glob("SmolLM2-135M-Instruct.Q4_1-*/linlens-manifest.json"))
    assert len(converted) == 1
    assert "stopping the server" in output
    # The readiness polls of the wait (GetModel, once a second while the model converts) and the health checks write
    # no access-log line: the progress and then the explanation stand on their own.
    polls = [line for line in output.splitlines() if re.search(r"method=(GetModel|ListModels|Check|Watch)\b", line)]
    assert not polls, "\n".join(polls[:5])
