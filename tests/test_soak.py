"""The soak script for about a minute, as CI runs it: 4 clients of mixed traffic against a real server process, then
every request accounted for (scripts/soak.py; docs/reliability.md has a 10-minute run with 8 clients)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]


def test_one_minute_soak_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "soak.py"), "--clients", "4", "--seconds", "60", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    assert out.is_file(), result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["accepted_but_never_answered"] == 0, result.stdout
    assert summary["inflight_at_end"] == 0 and summary["client_calls_that_never_ended"] == 0
    assert summary["server_answers_without_an_access_log_line"] == 0 and summary["access_log_lines_repeated"] == 0
    assert summary["internal_or_unknown"] == 0, summary["outcomes"]
    assert summary["outcomes"].get("OK", 0) >= 4, summary["outcomes"]  # it did serve, not only refuse
    assert summary["rss_end_mib"] > 0 and summary["requests"] >= 8
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
