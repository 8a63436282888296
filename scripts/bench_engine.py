"""Benchmark the engine against the baselines it replaces, in one process, same model, prompt and precision.

(a) Full detached Jacobian: linlens' chunked batched VJPs against the paper code's approach,
    torch.autograd.functional.jacobian(f, x, vectorize=True, strategy="reverse-mode"), over the same detached
    forward f (the same linear twin). Wall time and peak resident memory above the pre-run baseline.
(b) Token attributions: linlens' single VJP (exact, sums to the logit) against Captum's LayerIntegratedGradients
    over the input embedding layer with n_steps=50, on the unmodified model, zero-id baseline. Wall time and
    completeness error |sum(a) - (F(x) - F(baseline))| / |F(x) - F(baseline)| (for linlens: the baseline is the
    affine constant, |sum(a) + w.c - logit| / |logit|).

(c) The layer analysis: the layers x tokens matrix from one batched VJP against 2L separate VJPs.
(d) Matrix-free spectra against the full Jacobian (``--part d``): the default request (top_k 3, last position) with
    method FULL and MATRIX_FREE at several prompt lengths, wall time, peak resident memory and the agreement of the
    two answers (largest relative difference of the singular values, the same decoded top-8 tokens); the same on a
    wide, shallow random Llama (``--wide``: hidden size 4096, 2 layers, built from its config class and loaded
    through the normal path) to show how the ratio grows with d; and ``--layers all`` both ways.

Speed goals are ratios measured in the same run (machines are noisy); no absolute time is asserted anywhere.

    python scripts/bench_engine.py --model smollm2-135m --repeats 3 [--markdown docs/benchmarks.md]
    python scripts/bench_engine.py --part d --model smollm2-135m --tokens 7,128,1024 [--layers-all] [--wide]
    python scripts/bench_engine.py --part units --model smollm2-135m --tokens 7,128,1024 (scripts/bench_units.py)
    (add --threads 1 for the one-thread numbers of docs/engine.md)
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil
import torch

from linlens.engine import ExplainOptions
from linlens.engine import jacobian as jac
from linlens.models import load_model

PROMPT = "The bridge out of Marin is the"


def _trim() -> None:
    """Return freed heap pages to the OS so that each run's resident-memory peak starts from a clean baseline."""
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure(function: Callable[[], Any], *, memory: bool = True) -> tuple[float, float, Any]:
    """Run ``function`` once; return (seconds, peak RSS above the starting RSS in MiB, result).

    The memory sampler is a thread that wakes every 2 ms; on 2 cores it slows sub-second work noticeably, so
    ``memory=False`` times without it (and reports 0 MiB).
    """
    if not memory:
        _trim()
        started = time.perf_counter()
        result = function()
        return time.perf_counter() - started, 0.0, result
    _trim()
    process = psutil.Process()
    baseline = process.memory_info().rss
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    result = function()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    peak = max(peak, process.memory_info().rss)
    return seconds, (peak - baseline) / 2**20, result


def layer_costs(explainer: Any, ids: list[int], repeats: int) -> str:
    """(c) What the layer analysis costs: the layers x tokens matrix from one batched VJP with 2L seeds, against 2L
    separate VJPs (one per block), and one layer's up-to-layer Jacobian (d VJPs) against the full final Jacobian."""
    from linlens.engine import ExplainMethod, LayerAnalysisOptions

    options = ExplainOptions(top_k=0)
    count = explainer.num_layers

    def matrix() -> Any:
        return explainer.explain(ids, ExplainOptions(top_k=0, layers=LayerAnalysisOptions(up_to_layer=False)))

    def one_layer() -> Any:
        one = LayerAnalysisOptions(layers=(count - 1,), top_k=3)
        return explainer.explain(ids, ExplainOptions(top_k=0, method=ExplainMethod.FULL, layers=one))

    def final_jacobian() -> Any:
        return explainer.explain(ids, ExplainOptions(top_k=3, method=ExplainMethod.FULL))

    twin = explainer.twin(options.precision, options.gate_mode)
    x0 = explainer.model.get_input_embeddings()(torch.tensor(ids)).detach()
    head = explainer.model.get_output_embeddings().weight.detach()

    def separate_vjps() -> Any:
        """The same matrix the naive way: one backward per block (2L of them) on one retained graph."""
        from linlens.engine.capture import capturing

        x = x0.clone().requires_grad_(True)
        with capturing() as capture, torch.enable_grad():
            twin.base_model(inputs_embeds=x[None], use_cache=False)
            seed = head[0]
            rows = []
            for terms in (capture.attention, capture.mlp):
                for layer in range(count):
                    (grad,) = torch.autograd.grad(terms[layer][0, -1], x, grad_outputs=seed, retain_graph=True)
                    rows.append((grad * x.detach()).sum(dim=-1))
        return rows

    jobs = [
        ("layers x tokens matrix, one batched VJP with 2L seeds", matrix, f"1 (batch of {2 * count})"),
        ("the same matrix as 2L separate VJPs", separate_vjps, f"{2 * count}"),
        ("one layer's up-to-layer Jacobian + spectra (matrix included)", one_layer, f"{explainer.hidden_size} + 1"),
        ("the final Jacobian + spectra (Explain top_k=3, method full)", final_jacobian, f"{explainer.hidden_size} + 1"),
    ]
    for _, function, _ in jobs:
        function()
    rows = [
        f"(c) layer analysis, {count} layers, median of {repeats}:",
        "",
        "| what | VJPs | seconds |",
        "|---|---|---|",
    ]
    for name, function, vjps in jobs:
        seconds = statistics.median(measure(function, memory=False)[0] for _ in range(repeats))
        rows.append(f"| {name} | {vjps} | {seconds:.3f} |")
    return "\n".join(rows)


def _prompt_of(tokenizer: Any, length: int) -> list[int]:
    """``length`` token ids: the README's prompt, preceded by enough ordinary English to reach the length."""
    filler = (
        "The Golden Gate Bridge spans the strait between San Francisco Bay and the Pacific Ocean. Ferries, tunnels "
        "and other bridges connect the cities around the bay, and traffic is heavy every morning. "
    )
    tail = [int(t) for t in tokenizer(PROMPT)["input_ids"]]
    head = [int(t) for t in tokenizer(filler * (length // 10 + 1))["input_ids"]]
    return (head + tail)[-length:] if length >= len(tail) else tail[-length:]


def _agreement(full: Any, free: Any) -> tuple[float, bool]:
    """(largest relative difference of the top singular values, whether every component decodes to the same top-8)."""
    (a,), (b,) = full.spectra, free.spectra
    scale = a.components[0].value
    values = max(abs(x.value - y.value) for x, y in zip(a.components, b.components, strict=True)) / scale
    tokens = all(
        [t.token_id for t in x.left_tokens] == [t.token_id for t in y.left_tokens]
        for x, y in zip(a.components, b.components, strict=True)
    )
    return values, tokens


def _wide_llama(folder: str) -> Any:
    """A random Llama, hidden size 4096, 2 layers, saved and loaded through the normal path."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=2,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=2048,
        initializer_range=0.05,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, 2048)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(folder)
    return load_model(folder)


def matrix_free_costs(loaded: Any, lengths: list[int], repeats: int, layers_all: bool, label: str) -> str:
    """(d) The default request, FULL against MATRIX_FREE, at each prompt length (and ``--layers all`` at the first)."""
    from linlens.engine import ExplainMethod, LayerAnalysisOptions

    explainer = loaded.explainer
    rows = [
        f"(d) {label} (d={loaded.hidden_size}, {loaded.num_layers} layers), the default request (top_k 3, last "
        f"position), float32, {torch.get_num_threads()} torch thread(s), median of {repeats}:",
        "",
        "| tokens | full: s | matrix-free: s | speed-up | full: peak MiB | matrix-free: peak MiB | memory ratio "
        "| products full / matrix-free | largest value difference | same top-8 tokens |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for length in lengths:
        ids = _prompt_of(loaded.tokenizer, length) if length else [1, 2, 3, 4, 5, 6, 7]
        if loaded.hidden_size == 4096:  # the random model's vocabulary: word ids
            ids = [int(t) for t in torch.randint(1, 2048, (length,), generator=torch.Generator().manual_seed(0))]
        options = {m: ExplainOptions(top_k=3, method=m) for m in (ExplainMethod.FULL, ExplainMethod.MATRIX_FREE)}
        results: dict[Any, list[tuple[float, float, Any]]] = {m: [] for m in options}
        for opts in options.values():  # warm each path once: twins, allocator
            explainer.explain(ids[:16], opts)
        for repeat in range(repeats):
            print(f"bench: {len(ids)} tokens, run {repeat + 1} of {repeats}", file=sys.stderr, flush=True)
            for method, opts in options.items():
                results[method].append(measure(lambda opts=opts, ids=ids: explainer.explain(ids, opts)))
        full_s = statistics.median(r[0] for r in results[ExplainMethod.FULL])
        free_s = statistics.median(r[0] for r in results[ExplainMethod.MATRIX_FREE])
        full_m = statistics.median(r[1] for r in results[ExplainMethod.FULL])
        free_m = statistics.median(r[1] for r in results[ExplainMethod.MATRIX_FREE])
        full, free = results[ExplainMethod.FULL][-1][2], results[ExplainMethod.MATRIX_FREE][-1][2]
        difference, same = _agreement(full, free)
        print(f"bench: {len(ids)} tokens: full {full_s:.2f} s, matrix-free {free_s:.2f} s", file=sys.stderr, flush=True)
        rows.append(
            f"| {len(ids)} | {full_s:.2f} | {free_s:.2f} | {full_s / free_s:.1f}x | {full_m:.0f} | {free_m:.0f} "
            f"| {full_m / max(free_m, 1e-9):.1f}x | {full.vjp_count + full.jvp_count} / "
            f"{free.vjp_count + free.jvp_count} | {difference:.1e} | {'yes' if same else 'NO'} |"
        )
    if layers_all:
        ids = _prompt_of(loaded.tokenizer, lengths[0])
        timed = {}
        for method in (ExplainMethod.FULL, ExplainMethod.MATRIX_FREE):
            opts = ExplainOptions(top_k=0, method=method, layers=LayerAnalysisOptions(top_k=1))
            seconds, mib, result = measure(lambda opts=opts: explainer.explain(ids, opts))
            print(f"bench: --layers all, {method.value}: {seconds:.1f} s", file=sys.stderr, flush=True)
            products = sum(r.vjp_count for r in result.layers)
            timed[method] = (seconds, mib, products, result)
        (fs, fm, fp, fr), (ms, mm, mp, mr) = timed[ExplainMethod.FULL], timed[ExplainMethod.MATRIX_FREE]
        same = all(
            [t.token_id for t in a.up_to_layer.components[0].left_tokens]
            == [t.token_id for t in b.up_to_layer.components[0].left_tokens]
            for a, b in zip(fr.layers, mr.layers, strict=True)
        )
        rows += [
            "",
            f"`--layers all` ({loaded.num_layers} layers, up-to-layer maps, layer top_k 1), {len(ids)} tokens, "
            "one run:",
            "",
            "| method | seconds | peak MiB | products | speed-up | same top tokens in every layer |",
            "|---|---|---|---|---|---|",
            f"| full | {fs:.1f} | {fm:.0f} | {fp} | | |",
            f"| matrix-free | {ms:.1f} | {mm:.0f} | {mp} | {fs / ms:.1f}x | {'yes' if same else 'NO'} |",
        ]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50, help="Captum integration steps")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--markdown", help="append the result table to this file")
    parser.add_argument(
        "--part",
        choices=["abc", "d", "units"],
        default="abc",
        help="d: matrix-free against full; units: requests in units of the plain forward + backward",
    )
    parser.add_argument("--tokens", default="7,128,1024", help="(d) prompt lengths")
    parser.add_argument("--layers-all", action="store_true", help="(d) also --layers all both ways")
    parser.add_argument("--wide", action="store_true", help="(d) a random Llama with hidden size 4096, 2 layers")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--no-generation", action="store_true", help="(units) skip the explained generation")
    parser.add_argument("--only-generation", action="store_true", help="(units) the explained generation rows alone")
    parser.add_argument(
        "--rows", help="(units) comma-separated request rows to run: attributions, default, layers (default: all)"
    )
    parser.add_argument("--attention", help="(units) serve the model with this attention implementation (eager)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"bench: torch threads {torch.get_num_threads()}", file=sys.stderr, flush=True)
    if args.part == "units":
        from bench_units import ROWS, unit_costs

        lengths = [int(t) for t in args.tokens.split(",")]
        rows = frozenset(r.strip() for r in args.rows.split(",")) if args.rows else None
        unknown = sorted(rows - set(ROWS)) if rows else []
        if unknown:
            parser.error(f"--rows: unknown {unknown}; choose from {', '.join(ROWS)}")
        if args.wide:
            import tempfile

            with tempfile.TemporaryDirectory() as folder:
                wide = _wide_llama(folder)
                prompts = {n: [(7 * i + 3) % 1000 for i in range(n)] for n in lengths}
                table = unit_costs(wide, prompts, args.repeats, "random Llama, hidden 4096", False, False, rows)
        else:
            loaded = load_model(args.model)
            label = args.model
            if args.attention:
                loaded.model.set_attn_implementation(args.attention)
                label = f"{args.model} ({args.attention} attention)"
            prompts = {n: _prompt_of(loaded.tokenizer, n) for n in lengths}
            table = unit_costs(loaded, prompts, args.repeats, label, not args.no_generation, args.only_generation, rows)
        print(table)
        if args.markdown:
            with open(args.markdown, "a", encoding="utf-8") as handle:
                handle.write("\n" + table + "\n")
        return
    if args.part == "d":
        lengths = [int(t) for t in args.tokens.split(",")]
        if args.wide:
            import tempfile

            with tempfile.TemporaryDirectory() as folder:
                table = matrix_free_costs(_wide_llama(folder), lengths, args.repeats, False, "random Llama")
        else:
            table = matrix_free_costs(load_model(args.model), lengths, args.repeats, args.layers_all, args.model)
        print(table)
        if args.markdown:
            with open(args.markdown, "a", encoding="utf-8") as handle:
                handle.write("\n" + table + "\n")
        return

    loaded = load_model(args.model)
    explainer = loaded.explainer
    ids = [int(t) for t in loaded.tokenizer(args.prompt)["input_ids"]]
    n, d = len(ids), loaded.hidden_size
    twin = explainer.twin(ExplainOptions().precision, ExplainOptions().gate_mode)
    x0 = loaded.model.get_input_embeddings()(torch.tensor(ids)).detach()

    def detached(inputs: torch.Tensor) -> torch.Tensor:
        return twin.base_model(inputs_embeds=inputs[None], use_cache=False).last_hidden_state[0, -1]

    def ours_jacobian() -> torch.Tensor:
        x = x0.clone().requires_grad_(True)
        with torch.enable_grad():
            y = detached(x)
            return jac.full_jacobian(y, x, chunk=explainer.context.vjp_chunk(n, torch.float32))

    def paper_jacobian() -> torch.Tensor:
        return torch.autograd.functional.jacobian(detached, x0.clone(), vectorize=True, strategy="reverse-mode")

    # Warm both paths once (twin caches, allocator), then alternate to spread machine noise evenly.
    reference = paper_jacobian()
    assert torch.allclose(ours_jacobian(), reference, atol=1e-5, rtol=1e-4), "the two Jacobians disagree"
    del reference
    rows: dict[str, list[tuple[float, float]]] = {"ours": [], "paper": []}
    for _ in range(args.repeats):
        for name, function in (("ours", ours_jacobian), ("paper", paper_jacobian)):
            seconds, mib, _ = measure(function)
            rows[name].append((seconds, mib))

    # (b) attributions
    predicted = explainer.explain(ids, ExplainOptions(top_k=0))
    target = predicted.predicted.token_id

    phases: list[dict[str, float]] = []

    def ours_attribution() -> float:
        """The whole Explain(top_k=0) path: the model's own prediction pass, the detached pass, one VJP, the
        reconstruction's JVP; its phases are kept to show each one's cost."""
        explanation = explainer.explain(ids, ExplainOptions(top_k=0))
        phases.append(explanation.timings.phases_ms())
        return explanation.attributions[0].completeness_error

    head = loaded.model.get_output_embeddings().weight.detach()

    def ours_vjp_only() -> float:
        """Like for like with Captum, which is handed the target: the detached pass and one VJP, nothing else."""
        x = x0.clone().requires_grad_(True)
        with torch.enable_grad():
            y = detached(x)
            products = jac.cotangent_products(y, x, head[target][None], retain_graph=False)
        scores = (products[0] * x.detach()).sum(dim=-1)
        logit = float(head[target] @ y.detach())
        return abs(float(scores.sum()) - logit) / abs(logit)

    from captum.attr import LayerIntegratedGradients

    def logit(input_ids: torch.Tensor) -> torch.Tensor:
        return loaded.model(input_ids=input_ids).logits[:, -1, target]

    integrated = LayerIntegratedGradients(logit, loaded.model.get_input_embeddings())
    input_tensor = torch.tensor([ids])
    baseline = torch.zeros_like(input_tensor)

    def captum_attribution() -> float:
        _attributions, delta = integrated.attribute(
            input_tensor, baselines=baseline, n_steps=args.steps, return_convergence_delta=True
        )
        with torch.no_grad():
            span = float(logit(input_tensor) - logit(baseline))
        return abs(float(delta)) / abs(span)

    attribution_rows: dict[str, list[tuple[float, float]]] = {"ours": [], "vjp": [], "captum": []}
    ours_attribution()
    ours_vjp_only()
    for _ in range(args.repeats):
        attribution_jobs: list[tuple[str, Callable[[], Any]]] = [
            ("ours", ours_attribution),
            ("vjp", ours_vjp_only),
            ("captum", captum_attribution),
        ]
        for name, function in attribution_jobs:
            seconds, _, error = measure(function, memory=False)
            attribution_rows[name].append((seconds, error))

    def median(values: list[tuple[float, float]], index: int) -> float:
        return statistics.median(v[index] for v in values)

    ours_t, paper_t = median(rows["ours"], 0), median(rows["paper"], 0)
    ours_m, paper_m = median(rows["ours"], 1), median(rows["paper"], 1)
    attr_t, captum_t = median(attribution_rows["ours"], 0), median(attribution_rows["captum"], 0)
    attr_e, captum_e = median(attribution_rows["ours"], 1), median(attribution_rows["captum"], 1)
    vjp_t, vjp_e = median(attribution_rows["vjp"], 0), median(attribution_rows["vjp"], 1)
    timed = phases[-args.repeats :]
    phase_ms = {name: statistics.median(p.get(name, 0.0) for p in timed) for name in timed[0]}
    attribution_s = phase_ms.get("attribution", 0.0) / 1000
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    table = "\n".join(
        [
            f"Model `{args.model}` (d={d}), prompt {args.prompt!r} ({n} tokens), float32, "
            f"median of {args.repeats}; {machine}.",
            "",
            "| measurement | linlens | baseline | ratio (baseline / linlens) |",
            "|---|---|---|---|",
            f"| (a) full Jacobian, seconds | {ours_t:.2f} | {paper_t:.2f} (autograd.functional.jacobian, vectorize) "
            f"| {paper_t / ours_t:.2f}x |",
            f"| (a) full Jacobian, peak RSS above baseline, MiB | {ours_m:.0f} | {paper_m:.0f} "
            f"| {paper_m / max(ours_m, 1e-9):.2f}x |",
            f"| (b) attribution, whole Explain(top_k=0) incl. the model's own prediction pass, seconds | {attr_t:.3f} "
            f"| {captum_t:.3f} (Captum LayerIG, n_steps={args.steps}) | {captum_t / attr_t:.1f}x |",
            f"| (b) attribution, like for like (target given: detached pass + 1 VJP), seconds | {vjp_t:.3f} "
            f"| {captum_t:.3f} | {captum_t / vjp_t:.1f}x |",
            f"| (b) attribution, relative completeness error | {attr_e:.1e} (like for like {vjp_e:.1e}) "
            f"| {captum_e:.1e} | |",
            "| (b) the whole call's phases, ms: "
            + ", ".join(f"{name} {ms:.0f}" for name, ms in phase_ms.items())
            + " (forward: the model's own pass and the detached pass; reconstruction: its one JVP) | | | |",
            f"| (b) the attribution phase alone (one batched VJP on the detached pass's graph), seconds "
            f"| {attribution_s:.3f} | {captum_t:.3f} | {captum_t / max(attribution_s, 1e-9):.1f}x |",
        ]
    )
    table += "\n\n" + layer_costs(explainer, ids, args.repeats)
    print(table)
    if args.markdown:
        with open(args.markdown, "a", encoding="utf-8") as handle:
            handle.write("\n" + table + "\n")


if __name__ == "__main__":
    main()
