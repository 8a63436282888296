"""The ``linlens`` command line: serve, explain, generate, concept, models, wait.

Every command but ``serve`` works two ways, through the same SDK API:

- with ``--server HOST:PORT`` (or ``$LINLENS_SERVER``), through :class:`linlens.client.Client`: retries, TLS and
  metadata as the SDK has them; a model that is still loading is waited for (bounded by ``--timeout``, with a notice
  on stderr), a model that failed to load is an immediate error, and no server at all is said plainly;
- without, in this process, through ``linlens.server.inprocess.InProcessClient`` (needs the ``linlens[server]``
  extra): the server's own request path on a model loaded here.

``--json`` prints the result as JSON (field names as in the proto; arrays as lists), the same document either way.
``--html FILE`` and ``--png FILE`` (explain, generate) also write the result's report (``linlens.report``): one
self-contained HTML file, and a PNG image (the ``linlens[viz]`` extra; checked before any work starts).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, Unpack

from linlens.cli.flags import (
    IN_PROCESS_DEFAULT_MODEL,
    CommandError,
    add_concept,
    add_connection,
    add_explain,
    add_input,
    add_reports,
    add_security,
    concept_spec,
    explain_options,
    input_args,
    steering,
)
from linlens.cli.render import (
    explanation_report,
    explanations_text,
    finish_text,
    generation_text,
    models_text,
)
from linlens.client import (
    DEFAULT_TARGET,
    SERVER_ENV,
    Client,
    ConceptSpec,
    ConceptVector,
    ExplainOptions,
    ExplainResult,
    Explanation,
    ExplanationProgress,
    GeneratedToken,
    Generation,
    GenerationDone,
    LinlensError,
    ModelInfo,
    OptionError,
    ServerUnreachableError,
    Steering,
    SteeringPositions,
    StreamEvent,
    to_jsonable,
)
from linlens.contract import GenerateArgs, InputArgs, StreamAssembler
from linlens.report import MissingExtraError, require_viz, save_html, save_png

#: Seconds a command waits for a server to answer at all before saying that none does.
CONNECT_TIMEOUT = 10.0


class Backend(Protocol):
    """What the commands need: Client and InProcessClient both have it."""

    def explain(
        self,
        prompt: str | None = None,
        *,
        options: ExplainOptions | None = None,
        on_progress: Callable[[ExplanationProgress], None] | None = None,
        **kwargs: Unpack[InputArgs],
    ) -> ExplainResult: ...

    def generate(self, prompt: str | None = None, **kwargs: Unpack[GenerateArgs]) -> Generation: ...

    def generate_stream(self, prompt: str | None = None, **kwargs: Unpack[GenerateArgs]) -> Iterator[StreamEvent]: ...

    def compute_concept(
        self, concept: ConceptSpec | str, *, tokens_per_vector: int | None = None, model: str | None = None
    ) -> ConceptVector: ...

    def list_models(self) -> list[ModelInfo]: ...

    def close(self) -> None: ...


def _say(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _progress(progress: ExplanationProgress) -> None:
    """A progress bar on stderr, one line per phase of products (drawn only on a terminal)."""
    width = 32
    filled = round(min(progress.done / max(progress.total, 1), 1.0) * width)
    sys.stderr.write(
        f"\r{progress.phase:>8} [{'#' * filled}{'.' * (width - filled)}] {progress.done}/{progress.total} products"
    )
    if progress.done >= progress.total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def _bar() -> Callable[[ExplanationProgress], None] | None:
    return _progress if sys.stderr.isatty() else None


def open_backend(args: argparse.Namespace) -> Backend:
    """A client for the command: the server named by --server or $LINLENS_SERVER, else the model in-process."""
    target = args.server or os.environ.get(SERVER_ENV)
    if target:
        return _remote(args, target)
    try:
        from linlens.server.inprocess import InProcessClient
    except ImportError as error:
        raise CommandError(
            f"running in-process needs the server extra (pip install 'linlens[server]'): {error}; "
            f"or pass --server HOST:PORT (or set {SERVER_ENV}) to use a running server"
        ) from None
    model = args.model or IN_PROCESS_DEFAULT_MODEL
    if sys.stderr.isatty():
        _say(f"loading {model} in this process (pass --server HOST:PORT to use a running server) ...")
    return InProcessClient(model, timeout=args.timeout)


def _remote(args: argparse.Namespace, target: str) -> Backend:
    metadata = []
    for header in args.header or ():
        key, sep, value = header.partition("=")
        if not sep:
            raise CommandError(f"--header {header!r}: use KEY=VALUE")
        metadata.append((key.strip(), value.strip()))
    client = Client(target, timeout=args.timeout, metadata=metadata, **_security(args))
    try:
        client.wait_until_ready(
            args.timeout,
            model=args.model or None,
            connect_timeout=min(CONNECT_TIMEOUT, args.timeout),
            on_wait=_loading_notice(target),
        )
    except ServerUnreachableError as error:
        client.close()
        tls = (
            " If it speaks TLS, check --ca-cert (and --client-cert/--client-key where it asks for client certificates)."
            if args.tls
            else " If it speaks TLS, add --tls or --ca-cert."
        )
        raise CommandError(
            f"{error.details}.{tls} Start one with `linlens serve` (or `bash scripts/demo.sh`), or leave out --server "
            f"(and {SERVER_ENV}) to run the model in this process"
        ) from None
    except LinlensError:
        client.close()
        raise
    return client


def _security(args: argparse.Namespace) -> dict[str, Any]:
    """The Client's TLS and token arguments from --tls, --ca-cert, --client-cert/--client-key and --api-key."""

    def read(flag: str, path: str | None) -> bytes | None:
        if not path:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as error:
            raise CommandError(f"{flag} {path}: {error.strerror or error}") from None

    if bool(args.client_cert) != bool(args.client_key):
        raise CommandError("--client-cert and --client-key go together (the client certificate for mutual TLS)")
    return {
        "tls": args.tls,
        "root_certificates": read("--ca-cert", args.ca_cert),
        "certificate_chain": read("--client-cert", args.client_cert),
        "private_key": read("--client-key", args.client_key),
        "api_key": args.api_key,  # None: the SDK falls back to $LINLENS_API_KEY
    }


def _print_json(value: Any) -> None:
    print(json.dumps(to_jsonable(value), indent=2, ensure_ascii=False))


def _check_reports(args: argparse.Namespace) -> None:
    """Fail before any model work when a report cannot be written: no matplotlib for --png, no such folder."""
    if getattr(args, "png", None):
        try:
            require_viz()
        except MissingExtraError as error:
            raise CommandError(f"--png: {error}") from None
    for flag in ("html", "png"):
        path = getattr(args, flag, None)
        if path and not Path(path).resolve().parent.is_dir():
            raise CommandError(f"--{flag} {path}: the folder {Path(path).resolve().parent} does not exist")


def _write_reports(args: argparse.Namespace, result: ExplainResult | Generation) -> None:
    """Write the --html and --png reports of ``result``, each announced on stderr (stdout keeps the result)."""
    for path, save, what in ((args.html, save_html, "HTML"), (args.png, save_png, "PNG")):
        if not path:
            continue
        try:
            save(result, path)
        except OSError as error:
            raise CommandError(f"cannot write the {what} report to {path}: {error}") from None
        _say(f"linlens: wrote the {what} report to {path}")


# --- commands ----------------------------------------------------------------------------------------------------


Connect = Callable[[], Backend]


def cmd_explain(args: argparse.Namespace, connect: Connect) -> int:
    options = explain_options(args)
    with contextlib.closing(connect()) as backend:
        result = backend.explain(model=args.model or None, options=options, on_progress=_bar(), **input_args(args))
    if args.json:
        _print_json(result)
    else:
        print(f"model: {result.model}")
        print(explanation_report(result.explanation))
    _write_reports(args, result)
    return 0


def cmd_generate(args: argparse.Namespace, connect: Connect) -> int:
    steps: Any = args.explain_steps
    if steps not in (None, "first", "all"):
        steps = tuple(int(s) for s in steps.split(","))
    # --layers implies --explain (the layer analysis belongs to the explained steps), and so do --html and --png
    # (their pictures are of explanations)
    explained = args.explain or args.layers or args.html or args.png
    explain = explain_options(args, steps) if explained else None
    request: dict[str, Any] = dict(
        steering=steering(args),
        model=args.model or None,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.sample_top_k,
        seed=args.seed,
        stop=args.stop,
        explain=explain,
        **input_args(args),
    )
    with contextlib.closing(connect()) as backend:
        if args.json or args.no_stream:
            result = backend.generate(**request)
            _print_json(result) if args.json else print(generation_text(result))
            _write_reports(args, result)
            return 0
        # Stream: print each token as soon as it exists; explanations (with their layers) once the stream is over.
        assembler = StreamAssembler()
        for event in backend.generate_stream(**request):
            assembler.add(event)
            _show(event)
    print(explanations_text(assembler.explanations))
    _write_reports(args, assembler.generation())
    return 0


def _show(event: StreamEvent) -> None:
    if isinstance(event, ExplanationProgress):
        if sys.stderr.isatty():
            _progress(event)
    elif isinstance(event, GeneratedToken):
        sys.stdout.write(event.text)
        sys.stdout.flush()
    elif isinstance(event, GenerationDone):
        print(f"\n\n{finish_text(event)}")
    elif isinstance(event, Explanation):
        _say(f"(explained step {event.step})")


def cmd_concept(args: argparse.Namespace, connect: Connect) -> int:
    spec = concept_spec(args, args.prompt)
    with contextlib.closing(connect()) as backend:
        concept = backend.compute_concept(spec, tokens_per_vector=args.tokens_per_vector, model=args.model or None)
    if args.save:
        Path(args.save).write_text(json.dumps(to_jsonable(concept), ensure_ascii=False) + "\n")
    if args.json:
        _print_json(concept)
        return 0
    where = f"layer {concept.layer} map" if concept.layer is not None else "output map"
    print(f"model: {concept.model}")
    print(f"concept prompt: {concept.prompt_text!r}")
    print(
        f"{concept.side.value} singular vector {concept.rank} of the {where}, "
        f"singular value {concept.singular_value:.4g}"
    )
    print("tokens: " + ", ".join(f"{t.text!r} ({t.score:.3g})" for t in concept.tokens))
    if args.save:
        print(f"saved to {args.save}: steer with `linlens generate PROMPT --steer-vector {args.save}`")
    return 0


def cmd_models(args: argparse.Namespace, connect: Connect) -> int:
    with contextlib.closing(connect()) as backend:
        models = backend.list_models()
    if args.json:
        _print_json(models)
    else:
        print(models_text(models))
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    """Wait until a server's model can take requests (for scripts: start a server, wait, then call it)."""
    target = args.server or os.environ.get(SERVER_ENV) or DEFAULT_TARGET
    with Client(target, **_security(args)) as client:
        info = client.wait_until_ready(args.timeout, model=args.model or None, on_wait=_loading_notice(target))
    print(f"{info.name} is ready on {target}")
    return 0


def _loading_notice(target: str) -> Callable[[ModelInfo], None]:
    """A one-line notice on stderr the first time a wait sees the model still loading."""
    noticed = False

    def notice(info: ModelInfo) -> None:
        nonlocal noticed
        if not noticed:
            detail = f": {info.state_detail}" if info.state_detail else ""
            _say(f"linlens: waiting for model {info.name!r} on {target} to finish {info.state.value}{detail} ...")
            noticed = True

    return notice


def cmd_serve(args: argparse.Namespace) -> int:
    from linlens.server.logs import quiet_progress_bars

    quiet_progress_bars()  # before torch and transformers are imported
    from linlens.server.app import serve_configured
    from linlens.server.config import config_from_args

    return serve_configured(lambda: config_from_args(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="linlens", description="Exact linear explanations of language models.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve", help="run the gRPC server", description="Settings: defaults < config file < LINLENS_* env < flags."
    )
    try:
        from linlens.server.config import add_arguments
    except ImportError:
        serve.set_defaults(handler=lambda _: sys.exit("linlens serve needs: pip install 'linlens[server]'"))
    else:
        add_arguments(serve)
        serve.set_defaults(handler=cmd_serve)

    def explaining(name: str, help: str) -> argparse.ArgumentParser:
        """A command that explains: its input, the explain flags, the reports and the connection."""
        command: argparse.ArgumentParser = commands.add_parser(name, help=help)
        add_input(command)
        add_explain(command)
        add_reports(command)
        add_connection(command, 600.0)
        return command

    explain = explaining("explain", "explain the next-token prediction for a prompt")
    explain.set_defaults(command_handler=cmd_explain)

    generate = explaining("generate", "generate text, optionally explained")
    generate.add_argument("--max-new-tokens", type=int, default=None)
    generate.add_argument("--temperature", type=float, default=None, help="0 or unset: greedy")
    generate.add_argument("--top-p", type=float, default=None)
    generate.add_argument("--sample-top-k", type=int, default=None, help="sampling top-k (not the explain top-k)")
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    generate.add_argument(
        "--explain", action="store_true", help="explain generated steps (implied by --layers, --html and --png)"
    )
    generate.add_argument(
        "--explain-steps",
        default=None,
        help=f'"first", "all" or comma-separated step indices (default: {ExplainOptions.steps})',
    )
    generate.add_argument("--no-stream", action="store_true", help="one response at the end instead of streaming")
    steer = generate.add_argument_group(
        "steering",
        "add a concept vector a to one layer's hidden states while generating: h <- h + strength a ||h|| / (2 ||a||)",
    )
    steer.add_argument("--steer", metavar="CONCEPT_PROMPT", help="steer toward this concept prompt's concept vector")
    steer.add_argument("--steer-vector", metavar="FILE", help="steer with a concept saved by `linlens concept --save`")
    steer.add_argument("--steer-layer", type=int, default=None, help="the steered layer (default: floor(2L/3))")
    steer.add_argument("--steer-strength", type=float, default=None, help="lambda (default 0.5; negative steers away)")
    steer.add_argument(
        "--steer-positions",
        choices=[p.value for p in SteeringPositions],
        default=Steering.positions.value,
        help="positions steered",
    )
    add_concept(steer, prefix="steer-")
    generate.set_defaults(command_handler=cmd_generate)

    concept = commands.add_parser(
        "concept", help="compute a concept vector (a decoded singular vector of a concept prompt's detached map)"
    )
    concept.add_argument("prompt", help="the concept prompt")
    add_concept(concept)
    concept.add_argument("--tokens-per-vector", type=int, default=None, help="tokens the vector is decoded to")
    concept.add_argument("--save", metavar="FILE", help="write the concept (JSON) for generate --steer-vector")
    add_connection(concept, 600.0)
    concept.set_defaults(command_handler=cmd_concept)

    models = commands.add_parser("models", help="list the models (a server's, or the one loaded in-process)")
    add_connection(models, 30.0)
    models.set_defaults(command_handler=cmd_models)

    wait = commands.add_parser(
        "wait", help="wait until a server's model is loaded and SERVING (exit 0), e.g. after starting a server"
    )
    wait.add_argument("--server", default=None, help=f"HOST:PORT (default: ${SERVER_ENV} or {DEFAULT_TARGET})")
    wait.add_argument("--model", default="", help="model name (default: the server's default model)")
    wait.add_argument("--timeout", type=float, default=600.0, help="seconds to wait, the server's start included")
    add_security(wait)
    wait.set_defaults(handler=cmd_wait)
    from linlens.cli.batch import add_batch_parser

    add_batch_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "ca_cert", None) or getattr(args, "client_cert", None):
        args.tls = True
    if args.command in ("serve", "wait", "batch"):
        try:
            return int(args.handler(args))
        except (LinlensError, CommandError) as error:
            print(f"linlens: {error}", file=sys.stderr)
            return 1
    if args.command in ("explain", "generate") and not (args.prompt or args.token_ids):
        print("linlens: give a prompt or --token-ids", file=sys.stderr)
        return 2
    handler: Callable[[argparse.Namespace, Connect], int] = args.command_handler
    try:
        _check_reports(args)
        return handler(args, lambda: open_backend(args))
    except OptionError as error:
        print(f"linlens: {error}", file=sys.stderr)
        return 2
    except LinlensError as error:
        print(f"linlens: {error}", file=sys.stderr)
        return 1
    except CommandError as error:
        print(f"linlens: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
