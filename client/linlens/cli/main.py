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

from linlens.cli.render import (
    explanation_report,
    explanations_text,
    finish_text,
    generation_text,
    models_text,
)
from linlens.client import (
    API_KEY_ENV,
    DEFAULT_TARGET,
    SERVER_ENV,
    AttributionTarget,
    Client,
    ConceptMap,
    ConceptSpec,
    ConceptVector,
    ExplainMethod,
    ExplainOptions,
    ExplainResult,
    Explanation,
    ExplanationProgress,
    GateMode,
    GeneratedToken,
    Generation,
    GenerationDone,
    LayerAnalysisOptions,
    LinlensError,
    ModelInfo,
    OptionError,
    PositionSelection,
    Precision,
    ServerUnreachableError,
    SingularSide,
    Steering,
    SteeringPositions,
    StreamEvent,
    to_jsonable,
)
from linlens.contract import DEFAULT_MODEL, GenerateArgs, InputArgs, StreamAssembler
from linlens.report import MissingExtraError, require_viz, save_html, save_png

#: The model a command uses in-process when --model is not given (the server's default is the server's choice).
IN_PROCESS_DEFAULT_MODEL = DEFAULT_MODEL
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


class CommandError(Exception):
    """A failure the command reports on one line (exit status 1)."""


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


# --- options from flags ------------------------------------------------------------------------------------------


def _input(args: argparse.Namespace) -> dict[str, Any]:
    """The input keyword arguments: prompt text, --token-ids or --chat."""
    if args.token_ids:
        return {"token_ids": [int(t) for t in args.token_ids.split(",")]}
    if args.chat:
        return {"messages": [("user", args.prompt)]}
    return {"prompt": args.prompt}


def _explain_options(args: argparse.Namespace, steps: Any = "first") -> ExplainOptions:
    targets = [AttributionTarget(int(t)) for t in args.target or ()]
    for pair in args.contrast or ():
        a, _, b = pair.partition(":")
        targets.append(AttributionTarget(int(a), int(b)))
    layers = None
    if args.layers:
        layer_fields: dict[str, Any] = {
            "up_to_layer": not args.no_up_to_layer,
            "layer_alone": args.layer_alone,
            "component_spectra": args.component_spectra,
        }
        if args.layer_top_k is not None:
            layer_fields["top_k"] = args.layer_top_k
        if args.layer_tokens_per_vector is not None:
            layer_fields["tokens_per_vector"] = args.layer_tokens_per_vector
        layers = LayerAnalysisOptions.parse(args.layers, **layer_fields)
    positions: dict[str, Any] = {"positions": PositionSelection.LIST, "position_indices": ()}
    if args.positions in ("last", "all"):
        positions = {"positions": PositionSelection(args.positions)}
    else:
        try:
            positions["position_indices"] = tuple(int(i) for i in args.positions.split(","))
        except ValueError:
            raise OptionError("positions", f"{args.positions!r}: use last, all or comma-separated positions") from None
    fields: dict[str, Any] = {
        "steps": steps,
        **positions,
        "method": ExplainMethod(args.method.replace("-", "_")),
        "prompt_spectrum": args.prompt_spectrum,
        "targets": tuple(targets),
        "include_jacobians": args.include_jacobians,
        "precision": Precision(args.precision),
        "ordinary_contrast": args.ordinary,
        "gate_mode": GateMode(args.gate_mode),
        "layers": layers,
    }
    if args.top_k is not None:
        fields["top_k"] = args.top_k
    if args.tokens_per_vector is not None:
        fields["tokens_per_vector"] = args.tokens_per_vector
    return ExplainOptions(**fields)


def _concept_spec(args: argparse.Namespace, prompt: str) -> ConceptSpec:
    """The ConceptSpec of ``prompt`` from --map, --map-layer / --steer-map-layer, --rank and --side flags."""
    fields: dict[str, Any] = {"map": ConceptMap(args.map), "rank": args.rank, "side": SingularSide(args.side)}
    if args.map_layer is not None:
        fields["layer"] = args.map_layer
    return ConceptSpec(prompt, **fields)


def _steering(args: argparse.Namespace) -> Steering | None:
    """The Steering from --steer (a concept prompt) or --steer-vector (a saved concept), None without either."""
    if args.steer and args.steer_vector:
        raise OptionError("steering", "--steer and --steer-vector exclude each other: give one")
    if not (args.steer or args.steer_vector):
        return None
    fields: dict[str, Any] = {"positions": SteeringPositions(args.steer_positions)}
    if args.steer_layer is not None:
        fields["layer"] = args.steer_layer
    if args.steer_strength is not None:
        fields["strength"] = args.steer_strength
    if args.steer:
        return Steering(concept=_concept_spec(args, args.steer), **fields)
    return Steering(vector=_load_vector(args.steer_vector), **fields)


def _load_vector(path: str) -> list[float]:
    """A concept vector saved by ``linlens concept --save`` (or any JSON list of floats, or {"vector": [...]})."""
    try:
        document = json.loads(Path(path).read_text())
    except OSError as error:
        raise CommandError(f"--steer-vector {path}: {error.strerror or error}") from None
    except ValueError as error:
        raise CommandError(f"--steer-vector {path}: not JSON ({error})") from None
    vector = document.get("vector") if isinstance(document, dict) else document
    if not isinstance(vector, list):
        raise CommandError(f"--steer-vector {path}: expected a JSON list of floats or an object with a 'vector' list")
    return [float(v) for v in vector]


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
    options = _explain_options(args)
    with contextlib.closing(connect()) as backend:
        result = backend.explain(model=args.model or None, options=options, on_progress=_bar(), **_input(args))
    if args.json:
        _print_json(result)
    else:
        print(f"model: {result.model}")
        print(explanation_report(result.explanation))
    _write_reports(args, result)
    return 0


def cmd_generate(args: argparse.Namespace, connect: Connect) -> int:
    steps: Any = args.explain_steps
    if steps not in ("first", "all"):
        steps = tuple(int(s) for s in steps.split(","))
    # --layers implies --explain (the layer analysis belongs to the explained steps), and so do --html and --png
    # (their pictures are of explanations)
    explained = args.explain or args.layers or args.html or args.png
    explain = _explain_options(args, steps) if explained else None
    request: dict[str, Any] = dict(
        steering=_steering(args),
        model=args.model or None,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.sample_top_k,
        seed=args.seed,
        stop=args.stop,
        explain=explain,
        **_input(args),
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
    spec = _concept_spec(args, args.prompt)
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
    from linlens.server.logs import quiet_progress_bars, setup_logging

    quiet_progress_bars()  # before torch and transformers are imported
    from linlens.server.app import serve
    from linlens.server.config import ConfigError, config_from_args

    try:
        config = config_from_args(args)
    except ConfigError as error:
        print(f"linlens: configuration error: {error}", file=sys.stderr)
        return 2
    setup_logging(config.log_format, config.log_level)
    return serve(config)


# --- the parser --------------------------------------------------------------------------------------------------


def _add_connection(parser: argparse.ArgumentParser, timeout: float) -> None:
    group = parser.add_argument_group("where it runs")
    group.add_argument(
        "--server",
        default=None,
        metavar="HOST:PORT",
        help=f"use a running server (default: ${SERVER_ENV}); without it, the model runs in this process",
    )
    group.add_argument(
        "--model", default="", help=f"model name (default: the server's default; in-process {IN_PROCESS_DEFAULT_MODEL})"
    )
    group.add_argument(
        "--timeout", type=float, default=timeout, help="deadline in seconds, waiting for a model included"
    )
    _add_security(group)
    group.add_argument("--header", action="append", metavar="KEY=VALUE", help="metadata sent with each call")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _add_security(group: Any) -> None:
    group.add_argument("--tls", action="store_true", help="connect with TLS (system root certificates)")
    group.add_argument("--ca-cert", metavar="FILE", help="PEM root certificates for TLS (implies --tls)")
    group.add_argument("--client-cert", metavar="FILE", help="PEM client certificate for mutual TLS (implies --tls)")
    group.add_argument("--client-key", metavar="FILE", help="PEM private key of --client-cert")
    group.add_argument(
        "--api-key",
        default=None,
        metavar="TOKEN",
        help=f"API token sent as 'authorization: Bearer' (default: ${API_KEY_ENV}, which keeps it out of the "
        "shell history and the process list)",
    )


def _add_input(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", default="", help="prompt text")
    parser.add_argument("--token-ids", help="comma-separated token ids instead of a prompt")
    parser.add_argument("--chat", action="store_true", help="send the prompt as one user turn of a chat")


def _add_explain(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--top-k", type=int, default=None, help="singular components per position (0: attributions only; default 3)"
    )
    parser.add_argument("--tokens-per-vector", type=int, default=None, help="tokens each singular vector decodes to")
    parser.add_argument(
        "--positions", default="last", metavar="last|all|I,J,...", help="positions whose J_i get a spectrum"
    )
    parser.add_argument(
        "--method",
        choices=[m.value.replace("_", "-") for m in ExplainMethod],
        default="auto",
        help="how the singular triplets are computed (auto: the cheaper of full and matrix-free)",
    )
    parser.add_argument("--prompt-spectrum", action="store_true", help="also the whole-prompt map [J_1 ... J_n]")
    parser.add_argument("--target", action="append", metavar="TOKEN_ID", help="extra attribution target")
    parser.add_argument("--contrast", action="append", metavar="A:B", help="attribute logit(A) - logit(B)")
    parser.add_argument("--include-jacobians", action="store_true", help="return the per-token Jacobians")
    parser.add_argument("--precision", choices=[p.value for p in Precision], default="float32")
    parser.add_argument("--ordinary", action="store_true", help="contrast with the ordinary (not detached) Jacobian")
    parser.add_argument("--gate-mode", choices=[g.value for g in GateMode], default="freeze_gate")
    layers = parser.add_argument_group(
        "layer by layer",
        "--layers adds the layers x tokens attribution matrix (cheap) and, per selected layer, the up-to-layer "
        "Jacobian decoded logit-lens style (hidden_size VJPs per layer: seconds each on a CPU)",
    )
    layers.add_argument("--layers", metavar="all|every:K|I,J,...", help="layers to analyse (e.g. 29, every:5, all)")
    layers.add_argument("--no-up-to-layer", action="store_true", help="skip the up-to-layer Jacobians")
    layers.add_argument("--layer-alone", action="store_true", help="also each layer's own map of its input")
    layers.add_argument("--component-spectra", action="store_true", help="also attention / MLP spectra (2d VJPs)")
    layers.add_argument("--layer-top-k", type=int, default=None, help="singular components per layer map")
    layers.add_argument("--layer-tokens-per-vector", type=int, default=None, help="tokens per layer singular vector")


def _add_reports(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("pictures", "write the result's report as well (see linlens.report)")
    group.add_argument("--html", metavar="FILE", help="one self-contained HTML file (works offline)")
    group.add_argument("--png", metavar="FILE", help="a PNG image (needs pip install 'linlens[viz]')")


def _add_concept(group: Any, prefix: str = "") -> None:
    """--map, --map-layer, --rank, --side (``prefix`` steer- for generate's --steer concept prompt)."""
    group.add_argument(
        f"--{prefix}map",
        dest="map",
        choices=[m.value for m in ConceptMap],
        default="output",
        help="the map: the whole model's J (output) or a layer's up-to-layer map (layer)",
    )
    group.add_argument(
        f"--{prefix}map-layer", dest="map_layer", type=int, default=None, help="the layer of --map layer"
    )
    group.add_argument(f"--{prefix}rank", dest="rank", type=int, default=1, help="which singular triplet (1 = top)")
    group.add_argument(
        f"--{prefix}side", dest="side", choices=[s.value for s in SingularSide], default="left", help="which vector"
    )


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

    explain = commands.add_parser("explain", help="explain the next-token prediction for a prompt")
    _add_input(explain)
    _add_explain(explain)
    _add_reports(explain)
    _add_connection(explain, 600.0)
    explain.set_defaults(command_handler=cmd_explain)

    generate = commands.add_parser("generate", help="generate text, optionally explained")
    _add_input(generate)
    _add_explain(generate)
    _add_reports(generate)
    _add_connection(generate, 600.0)
    generate.add_argument("--max-new-tokens", type=int, default=None)
    generate.add_argument("--temperature", type=float, default=None, help="0 or unset: greedy")
    generate.add_argument("--top-p", type=float, default=None)
    generate.add_argument("--sample-top-k", type=int, default=None, help="sampling top-k (not the explain top-k)")
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    generate.add_argument(
        "--explain", action="store_true", help="explain generated steps (implied by --layers, --html and --png)"
    )
    generate.add_argument("--explain-steps", default="first", help='"first", "all" or comma-separated step indices')
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
        "--steer-positions", choices=[p.value for p in SteeringPositions], default="all", help="positions steered"
    )
    _add_concept(steer, prefix="steer-")
    generate.set_defaults(command_handler=cmd_generate)

    concept = commands.add_parser(
        "concept", help="compute a concept vector (a decoded singular vector of a concept prompt's detached map)"
    )
    concept.add_argument("prompt", help="the concept prompt")
    _add_concept(concept)
    concept.add_argument("--tokens-per-vector", type=int, default=None, help="tokens the vector is decoded to")
    concept.add_argument("--save", metavar="FILE", help="write the concept (JSON) for generate --steer-vector")
    _add_connection(concept, 600.0)
    concept.set_defaults(command_handler=cmd_concept)

    models = commands.add_parser("models", help="list the models (a server's, or the one loaded in-process)")
    _add_connection(models, 30.0)
    models.set_defaults(command_handler=cmd_models)

    wait = commands.add_parser(
        "wait", help="wait until a server's model is loaded and SERVING (exit 0), e.g. after starting a server"
    )
    wait.add_argument("--server", default=None, help=f"HOST:PORT (default: ${SERVER_ENV} or {DEFAULT_TARGET})")
    wait.add_argument("--model", default="", help="model name (default: the server's default model)")
    wait.add_argument("--timeout", type=float, default=600.0, help="seconds to wait, the server's start included")
    _add_security(wait)
    wait.set_defaults(handler=cmd_wait)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "ca_cert", None) or getattr(args, "client_cert", None):
        args.tls = True
    if args.command in ("serve", "wait"):
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
