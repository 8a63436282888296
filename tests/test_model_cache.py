"""The GGUF conversion cache under the things that go wrong on a first start: a process killed mid-way, a damaged
folder, a full disk; and the progress a long conversion shows. Real conversions of the real SmolLM2 file."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from disks import small_disk

from linlens.models import REGISTRY, LoadProgress, ModelCacheError, load_model
from linlens.models.gguf_cache import MANIFEST, cache_folder, converted, problem_with

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

GGUF = REGISTRY["smollm2-135m"].locate()
STAGING = ".SmolLM2-135M-Instruct.Q4_1-*-staging-*"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty LINLENS_CACHE_DIR for one test (the variable is read at each conversion)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("LINLENS_CACHE_DIR", str(folder))
    return folder


def test_progress_logs_a_heartbeat_while_a_phase_lasts(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="linlens.models")
    changes: list[str] = []
    progress = LoadProgress("m", interval=0.05, on_change=changes.append)
    with progress.phase("converting the file", measure=lambda: "3 of 5 MB written"):
        time.sleep(0.4)
        assert progress.current.startswith("converting the file (0 s, 3 of 5 MB written)")
    assert progress.current == ""
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "model m: converting the file"
    heartbeats = [line for line in lines if line.startswith("model m: still converting the file (")]
    assert len(heartbeats) >= 4, lines  # one every 0.05 s of a 0.4 s phase, give or take a busy machine
    assert changes[0].startswith("converting the file") and changes[-1] == ""


def test_a_conversion_killed_mid_way_is_never_trusted_and_is_redone(cache: Path) -> None:
    """SIGKILL while the converted model is being written: nothing the next load trusts; the next load converts."""
    script = (
        "import sys; from pathlib import Path; from linlens.models import LoadProgress;"
        "from linlens.models.gguf_cache import converted; converted(Path(sys.argv[1]), LoadProgress('m'))"
    )
    process = subprocess.Popen([sys.executable, "-c", script, str(GGUF)], env=dict(os.environ))
    gguf_folder = cache / "gguf"
    try:
        deadline = time.monotonic() + 240
        while not list(gguf_folder.glob(STAGING)):  # the write phase has begun
            assert process.poll() is None, "the conversion ended before it was killed"
            assert time.monotonic() < deadline, "no staging folder appeared"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    folder = cache_folder(GGUF)
    assert problem_with(folder) is not None  # not there, or not complete: either way not trusted
    assert list(gguf_folder.glob(STAGING))  # what the killed process left

    again = converted(GGUF, LoadProgress("m"))
    assert again == folder and problem_with(folder) is None
    assert not list(gguf_folder.glob(STAGING))  # the leftovers were removed under the lock

    # A damaged copy (a truncated weights file) is detected by its manifest and converted again.
    weights = next(folder.glob("*.safetensors"))
    size = weights.stat().st_size
    with open(weights, "r+b") as handle:
        handle.truncate(size // 2)
    assert "has" in (problem_with(folder) or "") and weights.name in (problem_with(folder) or "")
    loaded = load_model(str(GGUF))
    assert loaded.source == str(folder) and weights.stat().st_size == size and problem_with(folder) is None
    assert (folder / MANIFEST).is_file()


def test_a_full_disk_is_said_plainly_and_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with small_disk(tmp_path / "small", 64) as disk:
        monkeypatch.setenv("LINLENS_CACHE_DIR", str(disk))
        with pytest.raises(ModelCacheError, match=r"no space left on the device of .* \(about \d+ MB are needed\)"):
            converted(GGUF, LoadProgress("m"))
        assert problem_with(cache_folder(GGUF)) is not None
        assert not list((disk / "gguf").glob(STAGING))
