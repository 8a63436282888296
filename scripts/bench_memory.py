#!/usr/bin/env python
"""Peak memory of explanations against the plain model's own forward + backward, and against admission's estimate.

    python scripts/bench_memory.py --model smollm2-135m --tokens 7,128,1024 --kinds plain,attr,default --threads 1

Every (tokens, kind) is measured in a fresh child process (this script run with ``--child``), so no allocator state,
twin or cache of an earlier measurement is resident. The child loads the model, warms the path once on a 4-token
prompt (the twin is built, the allocator has its arenas), collects garbage, returns freed heap pages to the OS
(``malloc_trim``), resets the kernel's peak resident set (writing 5 to ``/proc/self/clear_refs`` resets VmHWM) and
reads the resident set; the measured peak is VmHWM after the request minus that resident set. This is what the OS
really had to give the process (tracemalloc does not see torch's allocations, and ``ru_maxrss`` cannot be reset, so
it would include the loading peak). Linux only.

Kinds:

- ``plain``: the unit of docs/engine.md, ``model(inputs_embeds=x).logits[0, -1].max().backward()`` on the served
  model (its weights do not require grad, so only activations and their gradients count);
- ``attr``: ``Explain(top_k=0)`` (attributions and the reconstruction);
- ``default``: the default ``Explain`` (top 3 at the last position, AUTO: matrix-free on the position graph);
- ``full``: the same with ``method`` FULL (d VJPs on the position graph, then the SVD);
- ``long``: the default with the whole-prompt spectrum, matrix-free (Krylov rows of tokens x hidden each, on the
  whole graph: the long request of docs/engine.md; not among the default kinds, slow at long prompts).

The table gives each request's peak, its ratio to ``plain`` at the same length, and the engine's estimate
(``Explainer.memory_estimate``, what admission compares with ``max_explanation_memory_mb``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / p) for p in ("client", "server")] + [str(ROOT / "scripts")]

KINDS = ("plain", "attr", "default", "full")


def _peak_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _settle() -> None:
    """Free what can be freed and hand the heap's free pages back, so that the baseline is what is really alive."""
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _options(kind: str) -> Any:
    """The ExplainOptions of an explanation kind (the estimate is asked for the same options that ran)."""
    from linlens.engine import ExplainMethod, ExplainOptions

    return {
        "attr": ExplainOptions(top_k=0),
        "default": ExplainOptions(),
        "full": ExplainOptions(method=ExplainMethod.FULL),
        "long": ExplainOptions(method=ExplainMethod.MATRIX_FREE, prompt_spectrum=True),
    }[kind]


def _request(loaded: Any, kind: str) -> Any:
    """The function that runs one request of ``kind`` on a prompt."""
    import torch

    if kind == "plain":
        model = loaded.model

        def plain(ids: list[int]) -> None:
            x = model.get_input_embeddings()(torch.tensor([ids])).detach().requires_grad_(True)
            model(inputs_embeds=x).logits[0, -1].max().backward()

        return plain
    options = _options(kind)

    def explain(ids: list[int]) -> None:
        loaded.explainer.explain(ids, options)

    return explain


def child(model_name: str, tokens: int, kind: str, threads: int | None) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    import torch
    from bench_engine import _prompt_of

    from linlens.models import load_model

    if threads:
        torch.set_num_threads(threads)
    loaded = load_model(model_name)
    ids = _prompt_of(loaded.tokenizer, tokens)
    run = _request(loaded, kind)
    run(ids[:4])  # warm-up: the twin, the allocator's arenas
    _settle()
    Path("/proc/self/clear_refs").write_text("5")
    before = _resident_bytes()
    run(ids)
    peak = _peak_bytes() - before
    row: dict[str, Any] = {"tokens": len(ids), "kind": kind, "peak_mib": peak / 2**20}
    if kind != "plain":
        estimate = loaded.explainer.memory_estimate(len(ids), _options(kind))
        row["estimate_mib"] = estimate.total / 2**20
        row["estimate"] = estimate.describe()
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", default="7,128,1024")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", nargs=2, metavar=("TOKENS", "KIND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.model, int(args.child[0]), args.child[1], args.threads)), flush=True)
        return 0
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        plain: float | None = None
        for kind in args.kinds.split(","):
            command = [sys.executable, __file__, "--model", args.model, "--threads", str(args.threads)]
            done = subprocess.run([*command, "--child", str(tokens), kind], capture_output=True, text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            print(json.dumps(row), file=sys.stderr, flush=True)
            if kind == "plain":
                plain = row["peak_mib"]
            ratio = f"{row['peak_mib'] / plain:.2f}" if plain and kind != "plain" else ""
            estimate = f"{row['estimate_mib']:.0f}" if "estimate_mib" in row else ""
            rows.append(f"| {row['tokens']} | {kind} | {row['peak_mib']:.0f} | {ratio} | {estimate} |")
    print("| tokens | request | peak MiB above the loaded model | x plain fwd+bwd | admission's estimate MiB |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
