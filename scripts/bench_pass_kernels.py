#!/usr/bin/env python
"""Where one product pass on the last position's graph spends its time: the matrix products, and the kernel behind them.

    python scripts/bench_pass_kernels.py [--model smollm2-135m] [--tokens 7] [--threads 1]

Two parts, both quoted in docs/engine.md ("Measured again, and where a pass's time goes"):

1. A pass profiled: the position graph of the default ``Explain`` is built as the engine builds it, then 5 batched
   VJPs and 5 JVPs of 8 rows run under ``torch.profiler``; the table gives each matrix product's shape and time and
   the share of the pass they take (the rest is autograd's bookkeeping).
2. The kernel alone: a down projection's product (rows x 576 by 576 x 1,536, SmolLM2's shape) over 30 distinct
   weights, so that every product reads its weight from memory as a pass does, for 1, 2, 4, 8 and 16 rows, and the
   8-row product in other layouts (the weight split along its inner dimension, a batched product over the pieces, a
   transposed copy). Microseconds per product, median of 20 rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "client"), str(ROOT / "server"), str(ROOT / "scripts")]

from bench_engine import _prompt_of  # noqa: E402

from linlens.engine import ExplainOptions  # noqa: E402
from linlens.engine.forward import ExplanationPass  # noqa: E402
from linlens.engine.products import GraphProducts  # noqa: E402
from linlens.models import load_model  # noqa: E402

WEIGHTS = 30


def _per_product_us(products: Callable[[], object], rounds: int = 20) -> float:
    """Median time of one call of ``products`` (WEIGHTS products), per product, in microseconds."""
    for _ in range(3):
        products()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        products()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6 / WEIGHTS


def profile_pass(model: str, tokens: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    loaded = load_model(model)
    ids = _prompt_of(loaded.tokenizer, tokens)
    graph = ExplanationPass(loaded.explainer.context, ids, ExplainOptions()).position_graph()
    products = GraphProducts(graph.y, graph.x, chunk=64)
    rows = torch.randn(8, graph.x.shape[0])
    for name, product in (("VJP", products.vjp), ("JVP", products.jvp)):
        for _ in range(3):
            product(rows)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(5):
                product(rows)
        events = prof.key_averages(group_by_input_shape=True)
        total_us = sum(e.self_cpu_time_total for e in events) / 5
        mm = [e for e in events if e.key == "aten::mm"]
        mm_us = sum(e.self_cpu_time_total for e in mm) / 5
        print(f"\n{name} of 8 rows: {total_us / 1e3:.1f} ms a pass (profiled), matrix products {mm_us / 1e3:.1f} ms")
        for e in sorted(mm, key=lambda e: -e.self_cpu_time_total):
            print(f"  {e.input_shapes!s:40s} {e.self_cpu_time_total / e.count:7.0f} us x {e.count // 5} a pass")


def kernels() -> None:
    down = [torch.randn(576, 1536) for _ in range(WEIGHTS)]
    print("\nrows x 576 by 576 x 1,536, us per product:")
    for b in (1, 2, 4, 8, 16):
        g = torch.randn(b, 576)
        print(f"  {b:2d} rows: {_per_product_us(lambda g=g: [g @ w for w in down]):.0f}")

    g = torch.randn(8, 576)

    def split(w: torch.Tensor, pieces: int) -> torch.Tensor:
        size = w.shape[0] // pieces
        out = g[:, :size] @ w[:size]
        for i in range(1, pieces):
            out.addmm_(g[:, i * size : (i + 1) * size], w[i * size : (i + 1) * size])
        return out

    def batched(w: torch.Tensor, pieces: int) -> torch.Tensor:
        size = w.shape[0] // pieces
        return torch.bmm(g.view(8, pieces, size).transpose(0, 1), w.view(pieces, size, -1)).sum(0)

    transposed = [w.t().contiguous() for w in down]
    print("8 rows, other layouts, us per product:")
    for pieces in (2, 4, 8):
        print(f"  split in {pieces}: {_per_product_us(lambda p=pieces: [split(w, p) for w in down]):.0f}")
    for pieces in (4, 8):
        print(f"  batched over {pieces} pieces: {_per_product_us(lambda p=pieces: [batched(w, p) for w in down]):.0f}")
    print(f"  transposed copy: {_per_product_us(lambda: [(w @ g.t()).t() for w in transposed]):.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}")
    profile_pass(args.model, args.tokens)
    kernels()


if __name__ == "__main__":
    main()
