"""The ``linlens`` command line: serve, generate, explain, models.

``generate`` and ``models`` talk to a server (``--server``, default $LINLENS_SERVER or localhost:50051). ``explain``
runs in-process on a local model when no ``--server`` is given (this needs the ``linlens[server]`` extra: torch and
transformers are imported only then), and through the server otherwise. Both paths build the same protobuf
messages and go through the same option checks, so ``--json`` prints the same document either way: the response
message as JSON with the proto's snake_case field names.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from linlens.cli.render import explanation_text, generation_text, layers_text, models_text
from linlens.client import (
    AttributionTarget,
    ExplainOptions,
    GateMode,
    LayerAnalysisOptions,
    PositionSelection,
    Precision,
)
from linlens.client.convert import (
    build_input,
    build_sampling,
    explain_options_to_proto,
    explain_result_from_proto,
    generation_from_proto,
    model_info_from_proto,
)
from linlens.v1 import linlens_pb2 as pb
from linlens.v1 import linlens_pb2_grpc as pb_grpc

DEFAULT_SERVER = "localhost:50051"


def _print_json(message: Any) -> None:
    print(json.dumps(MessageToDict(message, preserving_proto_field_name=True), indent=2, ensure_ascii=False))


def _stub(target: str) -> pb_grpc.LinlensServiceStub:
    channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 512 * 1024 * 1024)])
    return pb_grpc.LinlensServiceStub(channel)


def _input(args: argparse.Namespace) -> pb.Input:
    if args.token_ids:
        return build_input(token_ids=[int(t) for t in args.token_ids.split(",")])
    if args.chat:
        return build_input(messages=[("user", args.prompt)])
    return build_input(args.prompt)


def _targets(args: argparse.Namespace) -> tuple[AttributionTarget, ...]:
    targets = [AttributionTarget(int(t)) for t in args.target or ()]
    for pair in args.contrast or ():
        a, _, b = pair.partition(":")
        targets.append(AttributionTarget(int(a), int(b)))
    return tuple(targets)


def _layer_options(args: argparse.Namespace) -> LayerAnalysisOptions | None:
    if not args.layers:
        return None
    try:
        return LayerAnalysisOptions.parse(
            args.layers,
            up_to_layer=not args.no_up_to_layer,
            layer_alone=args.layer_alone,
            component_spectra=args.component_spectra,
            top_k=args.layer_top_k,
            tokens_per_vector=args.layer_tokens_per_vector,
        )
    except ValueError as error:
        raise SystemExit(f"linlens: {error}") from None


def _explain_options(args: argparse.Namespace, *, steps: Any = "first") -> pb.ExplainOptions:
    return explain_options_to_proto(
        ExplainOptions(
            steps=steps,
            top_k=args.top_k,
            tokens_per_vector=args.tokens_per_vector,
            positions=PositionSelection(args.positions),
            targets=_targets(args),
            include_jacobians=args.include_jacobians,
            precision=Precision(args.precision),
            ordinary_contrast=args.ordinary,
            gate_mode=GateMode(args.gate_mode),
            layers=_layer_options(args),
        )
    )


def _progress(done: int, total: int) -> None:
    width = 32
    filled = round(done / max(total, 1) * width)
    sys.stderr.write(f"\rJacobian [{'#' * filled}{'.' * (width - filled)}] {done}/{total} VJPs")
    if done >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def _explain_in_process(args: argparse.Namespace, options: pb.ExplainOptions) -> pb.ExplainResponse:
    """Load the model here and explain with the same option mapping the server uses."""
    try:
        from linlens.models import load_model
        from linlens.server.config import ServerConfig
        from linlens.server.service import (
            RpcFailure,
            encode_input,
            explain_options_from_proto,
            explanation_proto,
            layer_options_from_proto,
            run_layer_analysis,
        )
    except ImportError as error:
        raise SystemExit(
            f"in-process explanations need the server extra (pip install 'linlens[server]'): {error}; "
            "or pass --server HOST:PORT"
        ) from None
    if sys.stderr.isatty():
        sys.stderr.write(f"loading {args.model or 'smollm2-135m'} ...\n")
    loaded = load_model(args.model or "smollm2-135m")
    config = ServerConfig()
    try:
        ids = encode_input(loaded, _input(args), config)
        engine_options = explain_options_from_proto(options, loaded, config)
        layer_options = layer_options_from_proto(options, loaded, config)
    except RpcFailure as failure:  # the same checks the server applies, reported the same way
        raise SystemExit(f"linlens: {failure.code.name}: {failure.message}") from None
    progress = _progress if sys.stderr.isatty() else None
    explanation = loaded.explainer.explain(ids, engine_options, on_progress=progress)
    response = pb.ExplainResponse(
        model=loaded.name,
        explanation=explanation_proto(explanation, 0),
        prompt_text=loaded.tokenizer.decode(ids),
    )
    if layer_options is not None:
        analysis = run_layer_analysis(loaded, ids, engine_options, layer_options, 0, on_progress=progress)
        response.layer_attributions.CopyFrom(analysis.attributions)
        response.layers.extend(analysis.layers)
    return response


def cmd_explain(args: argparse.Namespace) -> int:
    options = _explain_options(args)
    if args.server:
        request = pb.ExplainRequest(model=args.model or "", input=_input(args), options=options)
        response = _stub(args.server).Explain(request, timeout=args.timeout)
    else:
        response = _explain_in_process(args, options)
    if args.json:
        _print_json(response)
    else:
        result = explain_result_from_proto(response)
        print(f"model: {result.model}")
        print(explanation_text(result.explanation))
        if result.layer_attributions is not None or result.layers:
            print()
            print(layers_text(result.layer_attributions, result.layers))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    sampling = build_sampling(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.sample_top_k,
        seed=args.seed,
        stop=args.stop,
    )
    # --layers implies --explain: the layer analysis belongs to the explained steps
    explain = _explain_options(args, steps=args.explain_steps) if args.explain or args.layers else None
    stub = _stub(args.server or os.environ.get("LINLENS_SERVER", DEFAULT_SERVER))
    fields: dict[str, Any] = dict(model=args.model or "", input=_input(args), sampling=sampling)
    if explain is not None:
        fields["explain"] = explain
    if args.json:
        _print_json(stub.Generate(pb.GenerateRequest(**fields), timeout=args.timeout))
        return 0
    if args.no_stream:
        print(generation_text(generation_from_proto(stub.Generate(pb.GenerateRequest(**fields), timeout=args.timeout))))
        return 0
    # Stream: print each token as soon as the server has it, then the explanations.
    explanations = []
    layer_events: dict[int, pb.ExplainResponse] = {}  # per step: the layer analysis, in ExplainResponse's fields
    for event in stub.GenerateStream(pb.GenerateStreamRequest(**fields), timeout=args.timeout):
        kind = event.WhichOneof("event")
        if kind == "token":
            sys.stdout.write(event.token.text)
            sys.stdout.flush()
        elif kind == "explanation":
            explanations.append(event.explanation)
        elif kind == "layer_attributions":
            layer_events.setdefault(event.layer_attributions.step, pb.ExplainResponse()).layer_attributions.CopyFrom(
                event.layer_attributions
            )
        elif kind == "layer":
            layer_events.setdefault(event.layer.step, pb.ExplainResponse()).layers.append(event.layer)
        elif kind == "done":
            reason = pb.FinishReason.Name(event.done.finish_reason).removeprefix("FINISH_REASON_").lower()
            print(f"\n\nfinish: {reason}")
    for message in explanations:
        response = pb.ExplainResponse(explanation=message)
        if message.step in layer_events:
            response.MergeFrom(layer_events[message.step])
        result = explain_result_from_proto(response)
        print(f"\n--- explanation of generated step {message.step} ---")
        print(explanation_text(result.explanation))
        if result.layer_attributions is not None or result.layers:
            print()
            print(layers_text(result.layer_attributions, result.layers))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    response = _stub(args.server or os.environ.get("LINLENS_SERVER", DEFAULT_SERVER)).ListModels(
        pb.ListModelsRequest(), timeout=args.timeout
    )
    if args.json:
        _print_json(response)
    else:
        print(models_text([model_info_from_proto(m) for m in response.models]))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from linlens.server.app import serve
    from linlens.server.config import ConfigError, config_from_args
    from linlens.server.logs import setup_logging

    try:
        config = config_from_args(args)
    except ConfigError as error:
        print(f"linlens: configuration error: {error}", file=sys.stderr)
        return 2
    setup_logging(config.log_format, config.log_level)
    return serve(config)


def _add_input(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", default="", help="prompt text")
    parser.add_argument("--token-ids", help="comma-separated token ids instead of a prompt")
    parser.add_argument("--chat", action="store_true", help="send the prompt as one user turn of a chat")
    parser.add_argument("--model", default="", help="model name (default: the server's default / smollm2-135m)")
    parser.add_argument("--json", action="store_true", help="print the response message as JSON (proto field names)")
    parser.add_argument("--timeout", type=float, default=600.0, help="deadline in seconds")


def _add_explain(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--top-k", type=int, default=None, help="singular components per position (0: attributions only)"
    )
    parser.add_argument("--tokens-per-vector", type=int, default=None, help="tokens each singular vector decodes to")
    parser.add_argument("--positions", choices=["last", "all"], default="last")
    parser.add_argument("--target", action="append", metavar="TOKEN_ID", help="extra attribution target")
    parser.add_argument("--contrast", action="append", metavar="A:B", help="attribute logit(A) - logit(B)")
    parser.add_argument("--include-jacobians", action="store_true", help="return the per-token Jacobians")
    parser.add_argument("--precision", choices=["float32", "float64", "bfloat16"], default="float32")
    parser.add_argument("--ordinary", action="store_true", help="contrast with the ordinary (not detached) Jacobian")
    parser.add_argument("--gate-mode", choices=["freeze_gate", "freeze_up"], default="freeze_gate")
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
    explain.add_argument("--server", default=None, help="HOST:PORT of a server; without it, run in-process")
    explain.set_defaults(handler=cmd_explain)

    generate = commands.add_parser("generate", help="generate text through a server, optionally explained")
    _add_input(generate)
    _add_explain(generate)
    generate.add_argument("--server", default=None, help=f"HOST:PORT (default: $LINLENS_SERVER or {DEFAULT_SERVER})")
    generate.add_argument("--max-new-tokens", type=int, default=None)
    generate.add_argument("--temperature", type=float, default=None, help="0 or unset: greedy")
    generate.add_argument("--top-p", type=float, default=None)
    generate.add_argument("--sample-top-k", type=int, default=None, help="sampling top-k (not the explain top-k)")
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    generate.add_argument("--explain", action="store_true", help="explain generated steps")
    generate.add_argument("--explain-steps", default="first", help='"first", "all" or comma-separated step indices')
    generate.add_argument("--no-stream", action="store_true", help="one response at the end instead of streaming")
    generate.set_defaults(handler=cmd_generate)

    models = commands.add_parser("models", help="list the models a server has loaded")
    models.add_argument("--server", default=None)
    models.add_argument("--json", action="store_true")
    models.add_argument("--timeout", type=float, default=30.0)
    models.set_defaults(handler=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "explain_steps", None) not in (None, "first", "all"):
        args.explain_steps = [int(s) for s in args.explain_steps.split(",")]
    if getattr(args, "command", "") in ("explain", "generate") and not (args.prompt or args.token_ids):
        print("linlens: give a prompt or --token-ids", file=sys.stderr)
        return 2
    try:
        return int(args.handler(args))
    except grpc.RpcError as error:
        print(f"linlens: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
