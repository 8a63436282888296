"""``linlens batch``: explain or generate over a whole dataset into a Parquet table (see linlens.batch)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from linlens.contract.options import ExplainMethod, ExplainOptions, Precision


def add_batch_parser(commands: Any) -> None:
    """Add the ``batch`` subcommand to ``commands`` (the parser's subparsers)."""
    batch = commands.add_parser(
        "batch",
        help="explain (or generate) every row of a dataset into a Parquet table; rerun to resume",
        description="Rows hold prompt (text), token_ids or messages, and optionally id, target and contrast. "
        "Runs in-process by default, on a fleet with --server, or on Ray with --ray.",
    )
    batch.add_argument("input", help="a .jsonl/.csv/.parquet file or folder, or a Hugging Face dataset with --hf-split")
    batch.add_argument("-o", "--output", required=True, help="the output folder (a Parquet table of part files)")
    batch.add_argument("--hf-split", default=None, help="read INPUT with datasets.load_dataset(INPUT, split=...)")
    batch.add_argument("--model", default=None, help="the model to load in-process or on Ray (default: SmolLM2)")
    batch.add_argument("--generate", action="store_true", help="generate (greedy) instead of explaining the next token")
    batch.add_argument("--max-new-tokens", type=int, default=16, help="with --generate")
    batch.add_argument("--no-explain", action="store_true", help="with --generate: do not explain the first token")
    batch.add_argument("--top-k", type=int, default=3, help="singular components (0: attributions only)")
    batch.add_argument("--tokens-per-vector", type=int, default=8, help="decoded tokens per singular vector")
    batch.add_argument("--method", choices=[m.value for m in ExplainMethod], default="auto")
    batch.add_argument("--precision", choices=[p.value for p in Precision], default="float32")
    batch.add_argument("--full-results", action="store_true", help="also write each row's full result as JSON")
    batch.add_argument("--max-prompt-tokens", type=int, default=0, help="prompt limit in-process and on Ray")
    batch.add_argument("--threads", type=int, default=0, help="torch threads per model (0: torch's default)")
    batch.add_argument("--part-rows", type=int, default=8, help="rows per Parquet part file")
    run = batch.add_argument_group("where to run (default: in-process)")
    run.add_argument("--server", action="append", default=[], help="fleet server HOST:PORT (repeatable) or a DNS name")
    run.add_argument("--workers", type=int, default=None, help="rows in flight (default: 1, or 2 per fleet server)")
    run.add_argument(
        "--ray", nargs="?", const="local", default=None, metavar="ADDRESS", help="run on Ray (local, or a cluster)"
    )
    run.add_argument("--actors", type=int, default=2, help="Ray actors, each holding one model")
    run.add_argument("--cpus-per-actor", type=float, default=1.0)
    run.add_argument("--gpus-per-actor", type=float, default=0.0)
    batch.add_argument("--no-progress", action="store_true", help="no progress bar (the summary is still printed)")
    batch.set_defaults(handler=cmd_batch)


def cmd_batch(args: argparse.Namespace) -> int:
    from linlens.batch import BatchJob, run_batch

    if args.server and args.ray:
        print("linlens: use --server or --ray, not both", file=sys.stderr)
        return 2
    source: Any = args.input
    if args.hf_split is not None:
        import datasets

        source = datasets.load_dataset(args.input, split=args.hf_split)
    options = ExplainOptions(
        top_k=args.top_k,
        tokens_per_vector=args.tokens_per_vector,
        method=ExplainMethod(args.method),
        precision=Precision(args.precision),
    )
    job = BatchJob(
        source,
        args.output,
        model=args.model,
        mode="generate" if args.generate else "explain",
        options=options,
        max_new_tokens=args.max_new_tokens,
        explain_generation=not args.no_explain,
        full_results=args.full_results,
        max_prompt_tokens=args.max_prompt_tokens,
        torch_threads=args.threads,
        part_rows=args.part_rows,
    )
    summary = run_batch(
        job,
        servers=args.server,
        ray=None if args.ray is None else (True if args.ray == "local" else args.ray),
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor,
        workers=args.workers,
        progress=None if args.no_progress else sys.stderr,
    )
    if args.no_progress:
        print(summary.line(), file=sys.stderr)
    return 0
