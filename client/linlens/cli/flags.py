"""The command line's flags and what they become: the options of a request, built from the contract.

The explain flags that are plain options (``--top-k``, ``--method``, ``--precision`` ...) are built from the fields of
:class:`linlens.contract.ExplainOptions`, with the help their field carries and the default the field has, so no
default is restated here; a flag left out leaves the option at its contract default.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
from pathlib import Path
from typing import Any

from linlens.client import (
    API_KEY_ENV,
    SERVER_ENV,
    AttributionTarget,
    ConceptMap,
    ConceptSpec,
    ExplainOptions,
    LayerAnalysisOptions,
    OptionError,
    PositionSelection,
    SingularSide,
    Steering,
    SteeringPositions,
)
from linlens.contract import DEFAULT_MODEL

#: The model a command uses in-process when --model is not given (the server's default is the server's choice).
IN_PROCESS_DEFAULT_MODEL = DEFAULT_MODEL


class CommandError(Exception):
    """A failure the command reports on one line (exit status 1)."""


# --- options from flags ------------------------------------------------------------------------------------------


def input_args(args: argparse.Namespace) -> dict[str, Any]:
    """The input keyword arguments: prompt text, --token-ids or --chat."""
    if args.token_ids:
        return {"token_ids": [int(t) for t in args.token_ids.split(",")]}
    if args.chat:
        return {"messages": [("user", args.prompt)]}
    return {"prompt": args.prompt}


def explain_options(args: argparse.Namespace, steps: Any = None) -> ExplainOptions:
    """The ExplainOptions of the explain flags; a flag left out leaves its option at the contract's default."""
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
    if args.positions is None:
        positions = {}
    elif args.positions in ("last", "all"):
        positions = {"positions": PositionSelection(args.positions)}
    else:
        try:
            positions["position_indices"] = tuple(int(i) for i in args.positions.split(","))
        except ValueError:
            raise OptionError("positions", f"{args.positions!r}: use last, all or comma-separated positions") from None
    fields: dict[str, Any] = {**contract_fields(args, ExplainOptions), **positions, "targets": tuple(targets)}
    if layers is not None:
        fields["layers"] = layers
    if steps is not None:
        fields["steps"] = steps
    return ExplainOptions(**fields)


def concept_spec(args: argparse.Namespace, prompt: str) -> ConceptSpec:
    """The ConceptSpec of ``prompt`` from --map, --map-layer / --steer-map-layer, --rank and --side flags."""
    fields: dict[str, Any] = {"map": ConceptMap(args.map), "rank": args.rank, "side": SingularSide(args.side)}
    if args.map_layer is not None:
        fields["layer"] = args.map_layer
    return ConceptSpec(prompt, **fields)


def steering(args: argparse.Namespace) -> Steering | None:
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
        return Steering(concept=concept_spec(args, args.steer), **fields)
    return Steering(vector=load_vector(args.steer_vector), **fields)


def load_vector(path: str) -> list[float]:
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


# --- the parser --------------------------------------------------------------------------------------------------


def add_connection(parser: argparse.ArgumentParser, timeout: float) -> None:
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
    add_security(group)
    group.add_argument("--header", action="append", metavar="KEY=VALUE", help="metadata sent with each call")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def add_security(group: Any) -> None:
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


def add_input(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", default="", help="prompt text")
    parser.add_argument("--token-ids", help="comma-separated token ids instead of a prompt")
    parser.add_argument("--chat", action="store_true", help="send the prompt as one user turn of a chat")


def _spelled(value: enum.Enum, spell: str | None) -> str:
    text = str(value.value)
    return text.replace("_", "-") if spell == "dashes" else text


def add_contract_flags(parser: argparse.ArgumentParser, options: type[Any]) -> None:
    """A flag for each field of the ``options`` dataclass that carries help (:func:`linlens.contract.options.flag`):
    a switch for a bool, choices for an enum, a typed value otherwise. Every flag defaults to None (not given), so
    that the option keeps its contract default, which the help shows."""
    for option in dataclasses.fields(options):
        if "help" not in option.metadata:
            continue
        meta, default = option.metadata, option.default
        name = meta.get("flag") or "--" + option.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(name, dest=option.name, action="store_true", default=None, help=meta["help"])
            continue
        shown = _spelled(default, meta.get("spell")) if isinstance(default, enum.Enum) else default
        kwargs: dict[str, Any] = {"dest": option.name, "default": None, "help": f"{meta['help']} (default: {shown})"}
        if isinstance(default, enum.Enum):
            kwargs["choices"] = [_spelled(v, meta.get("spell")) for v in type(default)]
        else:
            kwargs["type"] = type(default)
        parser.add_argument(name, **kwargs)


def contract_fields(args: argparse.Namespace, options: type[Any]) -> dict[str, Any]:
    """The fields of ``options`` whose flags (:func:`add_contract_flags`) were given, as the dataclass takes them."""
    given: dict[str, Any] = {}
    for option in dataclasses.fields(options):
        value = getattr(args, option.name, None) if "help" in option.metadata else None
        if value is None:
            continue
        if isinstance(option.default, enum.Enum):
            value = type(option.default)(value.replace("-", "_") if option.metadata.get("spell") else value)
        given[option.name] = value
    return given


def add_explain(parser: argparse.ArgumentParser) -> None:
    add_contract_flags(parser, ExplainOptions)
    parser.add_argument(
        "--positions",
        default=None,
        metavar="last|all|I,J,...",
        help=f"positions whose J_i get a spectrum (default: {ExplainOptions.positions.value})",
    )
    parser.add_argument("--target", action="append", metavar="TOKEN_ID", help="extra attribution target")
    parser.add_argument("--contrast", action="append", metavar="A:B", help="attribute logit(A) - logit(B)")
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


def add_reports(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("pictures", "write the result's report as well (see linlens.report)")
    group.add_argument("--html", metavar="FILE", help="one self-contained HTML file (works offline)")
    group.add_argument("--png", metavar="FILE", help="a PNG image (needs pip install 'linlens[viz]')")


def _add_enum(group: Any, flag: str, dest: str, default: enum.Enum, help_text: str) -> None:
    """A flag whose choices are the values of ``default``'s enum (one rule for every enum-valued flag)."""
    group.add_argument(flag, dest=dest, choices=[m.value for m in type(default)], default=default.value, help=help_text)


def add_concept(group: Any, prefix: str = "") -> None:
    """--map, --map-layer, --rank, --side (``prefix`` steer- for generate's --steer concept prompt)."""
    _add_enum(
        group,
        f"--{prefix}map",
        "map",
        ConceptSpec.map,
        "the map: the whole model's J (output) or a layer's up-to-layer map (layer)",
    )
    group.add_argument(
        f"--{prefix}map-layer", dest="map_layer", type=int, default=None, help="the layer of --map layer"
    )
    group.add_argument(
        f"--{prefix}rank", dest="rank", type=int, default=ConceptSpec.rank, help="which singular triplet (1 = top)"
    )
    _add_enum(group, f"--{prefix}side", "side", ConceptSpec.side, "which vector")
