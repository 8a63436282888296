#!/usr/bin/env python
"""Measure the memory explanations really take against the engine's estimate (Explainer.memory_estimate), which
the server's admission compares with max_explanation_memory_mb.

    python scripts/explanation_memory.py 8:full 8:chunk576 64:full 64:chunk576

Each argument is TOKENS:KIND (kinds below). The model loads once; before each explanation the process's peak
resident set (VmHWM) is reset (/proc/self/clear_refs), so "measured" is the peak above the resident set at the start
of that explanation. Memory a previous explanation freed but the allocator kept counts as already resident, so later
rows can read low: run one argument per process for the cleanest numbers. Linux only.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / p) for p in ("client", "server")]

from linlens.contract import ExplainMethod, ExplainOptions, LayerAnalysisOptions, PositionSelection  # noqa: E402
from linlens.models import load_model  # noqa: E402

KINDS = {
    "attr": ExplainOptions(top_k=0),
    "auto": ExplainOptions(top_k=3),
    "full": ExplainOptions(top_k=3, method=ExplainMethod.FULL),
    "free": ExplainOptions(top_k=3, method=ExplainMethod.MATRIX_FREE),
    # the long-prompt request of docs/engine.md: attributions, reconstruction, top 3 at the last position and of the
    # whole prompt, matrix-free
    "long": ExplainOptions(top_k=3, method=ExplainMethod.MATRIX_FREE, prompt_spectrum=True),
    "chunk576": ExplainOptions(top_k=3, method=ExplainMethod.FULL, vjp_chunk_size=576),
    "all": ExplainOptions(top_k=3, positions=PositionSelection.ALL),
    "jac": ExplainOptions(top_k=3, include_jacobians=True),
    "ord": ExplainOptions(top_k=3, ordinary_contrast=True),
    "layer": ExplainOptions(top_k=0, layers=LayerAnalysisOptions(layers=(29,))),
}


def peak_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def main(argv: list[str]) -> int:
    model = load_model("smollm2-135m")
    text = "The bridge out of Marin is the only one that can be built on the river, and the city"
    base = model.tokenizer(text)["input_ids"]
    model.explainer.explain(base[:4], ExplainOptions(top_k=0))
    for arg in argv or ["8:full"]:
        tokens, kind = arg.split(":")
        n, options = int(tokens), KINDS[kind]
        ids = (base * (n // len(base) + 1))[:n]
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set
        before = resident_bytes()
        started = time.perf_counter()
        model.explainer.explain(ids, options)
        measured = peak_bytes() - before
        estimate = model.explainer.memory_estimate(n, options)
        row = {
            "tokens": n,
            "kind": kind,
            "measured_mib": round(measured / 2**20),
            "estimate_mib": round(estimate.total / 2**20),
            "seconds": round(time.perf_counter() - started, 1),
            "estimate": estimate.describe(),
        }
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
