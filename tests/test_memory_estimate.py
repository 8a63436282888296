"""Admission's memory estimate follows the paths as they run, and long prompts keep their peak bounded (issue 17, 5).

Measured for real: each request runs in a fresh process (``scripts/bench_memory.py --child``), whose peak resident
set above the loaded model is compared with ``Explainer.memory_estimate`` and with the plain model's own forward +
backward on the same prompt. Breakages these tests were seen to catch (each made once on purpose): the last
position's rows left out of the estimate (the measured FULL peak is then above it), and the position graph's rows
not bounded by their memory budget (one pass of 576 rows: the plan test, and the FULL peak above 1.5x the plain one).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from linlens.engine import ExplainMethod, ExplainOptions
from linlens.engine.plan import POSITION_ROWS_BUDGET, plan

ROOT = Path(__file__).resolve().parents[1]
#: Long enough that the position graph's rows are split (341 per pass for SmolLM2), short enough for CI.
TOKENS = 256


def _measure(tokens: int, kind: str) -> dict[str, Any]:
    """One request's peak in a fresh process (see scripts/bench_memory.py)."""
    command = [sys.executable, str(ROOT / "scripts" / "bench_memory.py"), "--child", str(tokens), kind]
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=900)
    row: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return row


@pytest.mark.slow
def test_position_rows_are_bounded_at_long_prompts(smollm2: Any) -> None:
    """The rows per pass on the last position's graph shrink with the prompt so that their value gradients over the
    prefix stay within the budget; the options' own vjp_chunk_size still decides when given; the estimate follows."""
    explainer = smollm2.explainer
    shape = explainer.context.shape(torch.float32)
    full = ExplainOptions(method=ExplainMethod.FULL)
    short, long = plan(full, 7, shape), plan(full, 1024, shape)
    assert short.chain_chunk == 576 and long.on_position_graph
    assert long.chain_chunk == POSITION_ROWS_BUDGET // (1024 * (576 + 192) * 4) == 85
    assert plan(ExplainOptions(method=ExplainMethod.FULL, vjp_chunk_size=576), 1024, shape).chain_chunk == 576
    bounded = explainer.memory_estimate(1024, full)
    unbounded = explainer.memory_estimate(1024, ExplainOptions(method=ExplainMethod.FULL, vjp_chunk_size=576))
    assert bounded.position < unbounded.position / 5  # 85 rows against 576, each over the whole prefix
    # the whole-prompt map's matrix-free solve keeps 17 blocks of 8 rows of tokens x hidden (and the last position's
    # map, of hidden), six times over (the rows, their concatenation, the SVD's copy, workspace and right factor)
    whole = explainer.memory_estimate(1024, ExplainOptions(method=ExplainMethod.MATRIX_FREE, prompt_spectrum=True))
    assert whole.krylov == 6 * 17 * 8 * (1024 + 1) * 576 * 4 and whole.position == 0
    # the split rows give the same spectrum as one pass of all of them (SmolLM2 at 160 tokens: 545 rows per pass)
    ids = (smollm2.tokenizer("The bridge out of Marin is the only one that can be built")["input_ids"] * 20)[:160]
    assert plan(full, len(ids), shape).chain_chunk < 576
    split = explainer.explain(ids, full)
    one_pass = explainer.explain(ids, ExplainOptions(method=ExplainMethod.FULL, vjp_chunk_size=576))
    np.testing.assert_allclose(split.spectra[0].singular_values, one_pass.spectra[0].singular_values, rtol=1e-5)


@pytest.mark.slow
def test_estimate_covers_the_measured_peak_and_long_prompts_stay_near_the_plain_model() -> None:
    """Measured in fresh processes at 256 tokens: every request's peak is below its estimate and the estimate is
    not far above it (it decides admission); the default request and the attributions need at most 1.5x the plain
    forward + backward (the issue's goal), FULL at most 1.75x: at 256 tokens it measured 1.4x to 1.56x between runs
    of one day, and 1.86x (728 MiB against 391) with its row budget removed, which this bound still catches."""
    plain = _measure(TOKENS, "plain")["peak_mib"]
    for kind, bound in (("attr", 1.5), ("default", 1.5), ("full", 1.75)):
        row = _measure(TOKENS, kind)
        assert row["peak_mib"] <= row["estimate_mib"] <= 4 * row["peak_mib"] + 32, row
        assert row["peak_mib"] <= bound * plain, (row, plain)
