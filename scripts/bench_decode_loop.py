#!/usr/bin/env python
"""The batched decode loop alone (no gRPC), against transformers' batched generate, interleaved in one process.

    python scripts/bench_decode_loop.py [--rounds 2] [--new-tokens 32]

Each round: DecodeBatch with 1 request, transformers generate with 1 prompt, DecodeBatch with 8 concurrent requests,
generate with the 8 prompts as one left-padded batch. Interleaving makes both see the same machine load.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "client"), str(ROOT / "server")]

from bench_serving import PROMPTS  # noqa: E402

from linlens.models import load_model  # noqa: E402
from linlens.server.batching import DecodeBatch  # noqa: E402
from linlens.server.generation import Sampling, generate_batched  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    loaded = load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    n = args.new_tokens
    batch = DecodeBatch(model)

    def ours(k: int) -> float:
        sampling = Sampling(max_new_tokens=n, ignore_eos=True)
        threads = [
            threading.Thread(target=generate_batched, args=(batch, model, tokenizer, ids[i], sampling))
            for i in range(k)
        ]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return k * n / (time.monotonic() - started)

    def theirs(k: int) -> float:
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        encoded = tokenizer(PROMPTS[:k], return_tensors="pt", padding=True)
        started = time.monotonic()
        with torch.inference_mode():
            model.generate(
                **encoded, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=tokenizer.pad_token_id
            )
        return k * n / (time.monotonic() - started)

    ours(1)
    theirs(1)
    print("| round | DecodeBatch 1 | DecodeBatch 8 | ratio | generate 1 | generate batch of 8 | ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in range(args.rounds):
        o1, h1, o8, h8 = ours(1), theirs(1), ours(8), theirs(8)
        print(f"| {r + 1} | {o1:.1f} | {o8:.1f} | {o8 / o1:.2f}x | {h1:.1f} | {h8:.1f} | {h8 / h1:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
