"""The server's configuration and where it comes from.

One ``ServerConfig`` value holds every setting. It is assembled from four layers, each overriding the one before:

1. the defaults written in :class:`ServerConfig`;
2. a config file (TOML, or YAML when PyYAML is installed), named by ``--config`` or ``LINLENS_CONFIG``; its keys are
   the field names, either at the top level or inside a ``[server]`` table;
3. environment variables ``LINLENS_<FIELD>`` (for example ``LINLENS_PORT=50052``, ``LINLENS_MODELS=a,b``);
4. command-line flags (``--port 50052``, ``--model a --model b``).

This order lets a container image ship a config file, a Kubernetes manifest adjust it through the environment, and a
person at a terminal override either with a flag, which is the precedence operators expect from most servers.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from linlens.contract.options import DEFAULT_MODEL

ENV_PREFIX = "LINLENS_"

_LOG_FORMATS = ("text", "json")
_LOG_LEVELS = ("debug", "info", "warning", "error")
_DTYPES = ("float32", "float64", "bfloat16", "float16")
_ATTENTION = ("auto", "sdpa", "eager")


class ConfigError(ValueError):
    """A setting is missing, malformed or out of range; the message names the setting and where it came from."""


@dataclass(frozen=True)
class ServerConfig:
    """Every setting of one linlens server process.

    Limits exist so that one request cannot take the process down: each is checked before any model work starts and a
    request over a limit is refused with a message naming the setting: INVALID_ARGUMENT when the request itself is too
    large (retrying it cannot help), RESOURCE_EXHAUSTED for momentary capacity (queue, open streams) and for message
    size, as gRPC does (docs/reliability.md has the table).
    """

    #: Address the gRPC server binds; 0.0.0.0 so that a container is reachable, 127.0.0.1 for local-only use.
    host: str = "0.0.0.0"
    #: gRPC port; 0 picks a free port (the chosen one is logged and available from ``RunningServer.port``).
    port: int = 50051
    #: Port of the Prometheus ``/metrics`` HTTP endpoint; 0 turns it off. 9464 is the port deploy/ scrapes (the
    #: OpenTelemetry Prometheus-exporter convention); it must equal metrics.DEFAULT_METRICS_PORT.
    metrics_port: int = 9464
    #: Address the metrics endpoint binds.
    metrics_host: str = "0.0.0.0"
    #: Models to load at start-up: registry names, Hugging Face folders or .gguf paths. The first is the default
    #: model, used when a request leaves ``model`` empty.
    models: tuple[str, ...] = (DEFAULT_MODEL,)
    #: Weight dtype the models are loaded in.
    dtype: str = "float32"
    #: torch device the models run on ("cpu", "cuda", "cuda:1", ...).
    device: str = "cpu"
    #: The served models' attention kernel: "auto" (transformers' choice: SDPA where the family has it), "sdpa" or
    #: "eager". The linear twin computes its attention values with the same kernel, so explanations share the served
    #: forward pass with either; eager prefills long prompts slower on a CPU (1,024 tokens: about 1.7x) and takes
    #: O(n^2) memory for the weights (docs/engine.md).
    attention: str = "auto"
    #: Model jobs (generations and explanations) that run at the same time. Each job uses all the threads torch has,
    #: so on a CPU machine 1 is usually fastest overall; raise it on accelerators with memory to spare.
    max_concurrent_jobs: int = 1
    #: Jobs that may wait for a free worker; one more is refused with RESOURCE_EXHAUSTED so that clients back off
    #: instead of piling up latency.
    max_queue: int = 16
    #: Generation requests (without explanations or steering) that decode together in one batch, one forward pass
    #: per token for all of them; more wait, counted against max_queue. 1 turns batching off.
    max_batch_size: int = 16
    #: Cache positions (prompt plus token budget, summed over a batch's requests) a batch may hold; a request that
    #: would exceed it waits for rows to leave (a request alone is always admitted).
    max_batch_tokens: int = 16384
    #: Longest accepted input, in tokens, after the chat template is applied; 0 means the model's own context
    #: (``max_position_embeddings``), which is always a limit too: an input that fills it leaves no room to predict.
    max_prompt_tokens: int = 0
    #: Largest accepted ``max_new_tokens``.
    max_new_tokens: int = 512
    #: Largest accepted number of singular components per explained position.
    max_top_k: int = 32
    #: Largest number of generated steps one request may ask to explain.
    max_explained_steps: int = 16
    #: Largest number of tokens each singular vector may be decoded to.
    max_tokens_per_vector: int = 64
    #: Largest number of extra attribution targets per request.
    max_attribution_targets: int = 16
    #: Largest request message, in bytes. A larger one is refused with RESOURCE_EXHAUSTED naming this setting
    #: (gRPC itself refuses anything above twice this size before it is read into memory).
    max_request_bytes: int = 4 * 1024 * 1024
    #: Memory, in MiB, that one explanation may need by the engine's estimate (forward graph, one batch of VJPs, the
    #: Jacobians it holds; see ``Explainer.memory_estimate``). A request whose estimate is larger is refused with
    #: INVALID_ARGUMENT before any work starts; ``vjp_chunk_size`` counts towards it, so it cannot step around it.
    max_explanation_memory_mb: int = 4096
    #: GenerateStream calls open at once. A stream holds a gRPC thread for its whole life (also while a slow client
    #: reads its events), so this stays below ``grpc_threads`` to keep threads for unary calls and health checks;
    #: one more stream is refused with RESOURCE_EXHAUSTED (retry later).
    max_concurrent_streams: int = 16
    #: Most layers one request may analyse with Jacobians (ExplainOptions.layers with up_to_layer, layer_alone or
    #: component_spectra), summed over its explained steps: each costs hidden_size VJPs or more, seconds on a CPU.
    max_analyzed_layers: int = 64
    #: Run one tiny generation and explanation per model before reporting SERVING, so that the first real request
    #: does not pay for lazy set-up (building the linear twin, first-call allocations): seconds at start-up instead.
    warmup: bool = True
    #: Seconds that in-flight requests get to finish after SIGTERM before the process exits anyway.
    grace_period_s: float = 30.0
    #: Threads serving gRPC calls. They only wait on the job queue, so this bounds open calls, not model work.
    grpc_threads: int = 32
    #: torch intra-op threads; 0 leaves torch's own default (one per core).
    torch_threads: int = 0
    #: "text" for people, "json" for one JSON object per line (log collectors).
    log_format: str = "text"
    log_level: str = "info"
    #: Whether request logs may contain prompt text. Off by default: prompts can hold personal data.
    log_prompts: bool = False
    #: PEM certificate chain of the server; together with ``tls_key_file`` it turns TLS on for the gRPC port. Read
    #: from a file (a mounted Kubernetes Secret), never baked into an image.
    tls_cert_file: str = ""
    #: PEM private key of ``tls_cert_file``.
    tls_key_file: str = ""
    #: PEM certificates of the CAs that sign client certificates. When set (TLS on), every client must present a
    #: certificate signed by one of them (mutual TLS); the handshake fails otherwise.
    tls_client_ca_file: str = ""
    #: File of accepted API tokens, stored hashed: one SHA-256 hex digest per line, optionally followed by a label
    #: that the access log shows as ``client`` (``#`` starts a comment). When set, every call except grpc.health.v1
    #: needs ``authorization: Bearer <token>`` metadata; others get UNAUTHENTICATED. Re-read when the file changes.
    auth_token_file: str = ""
    #: Serve gRPC server reflection (grpcurl, Postman can then list and call the API without the proto files).
    reflection: bool = True
    #: A second, plaintext port that serves only grpc.health.v1 (0 = off). With TLS on, Kubernetes' gRPC probes
    #: (which cannot speak TLS) and the image's health check ask this port; it exposes nothing but health.
    health_port: int = 0

    @property
    def default_model(self) -> str:
        return self.models[0]

    @property
    def tls(self) -> bool:
        """Whether the gRPC port speaks TLS."""
        return bool(self.tls_cert_file)

    @property
    def max_explanation_memory_bytes(self) -> int:
        return self.max_explanation_memory_mb * 1024 * 1024

    @property
    def served_attention(self) -> str | None:
        """The attention implementation to load the models with (None: transformers' own choice)."""
        return None if self.attention == "auto" else self.attention

    def validate(self) -> ServerConfig:
        """Raise ConfigError naming the first setting that is out of range; return self so calls can chain."""
        _check_port("port", self.port)
        _check_port("metrics_port", self.metrics_port)
        _check_port("health_port", self.health_port)
        if not self.models:
            raise ConfigError("models: at least one model is needed (a registry name, a folder or a .gguf path)")
        if any(not m.strip() for m in self.models):
            raise ConfigError("models: a model name is empty")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"dtype: {self.dtype!r} is not one of {', '.join(_DTYPES)}")
        if self.attention not in _ATTENTION:
            raise ConfigError(f"attention: {self.attention!r} is not one of {', '.join(_ATTENTION)}")
        positive = (
            "max_concurrent_jobs",
            "max_batch_size",
            "max_batch_tokens",
            "max_new_tokens",
            "max_request_bytes",
            "max_explanation_memory_mb",
            "max_concurrent_streams",
            "max_top_k",
            "max_explained_steps",
            "max_tokens_per_vector",
            "max_analyzed_layers",
            "grpc_threads",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        for name in ("max_queue", "max_attribution_targets", "torch_threads", "max_prompt_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be 0 or more, got {getattr(self, name)}")
        if self.max_concurrent_streams >= self.grpc_threads:
            raise ConfigError(
                f"max_concurrent_streams: {self.max_concurrent_streams} must stay below grpc_threads "
                f"({self.grpc_threads}), so that unary calls and health checks always find a thread"
            )
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigError("tls_cert_file and tls_key_file: give both (TLS) or neither (plaintext)")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ConfigError("tls_client_ca_file: mutual TLS needs TLS: set tls_cert_file and tls_key_file too")
        if self.health_port and self.health_port == self.port:
            raise ConfigError(f"health_port: {self.health_port} is the gRPC port; give another one, or 0 for none")
        if self.grace_period_s < 0:
            raise ConfigError(f"grace_period_s: must be 0 or more seconds, got {self.grace_period_s}")
        if self.log_format not in _LOG_FORMATS:
            raise ConfigError(f"log_format: {self.log_format!r} is not one of {', '.join(_LOG_FORMATS)}")
        if self.log_level not in _LOG_LEVELS:
            raise ConfigError(f"log_level: {self.log_level!r} is not one of {', '.join(_LOG_LEVELS)}")
        return self


def _check_port(name: str, port: int) -> None:
    if not 0 <= port <= 65535:
        raise ConfigError(f"{name}: {port} is not a TCP port (0-65535)")


# --- converting raw values -------------------------------------------------------------------------------------------

_FIELD_TYPES: dict[str, str] = {f.name: str(f.type) for f in fields(ServerConfig)}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(name: str, value: Any, origin: str) -> Any:
    """Turn a value from a file, the environment or a flag into the field's type, or say precisely what is wrong."""
    kind = _FIELD_TYPES[name]
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError("expected true or false")
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError("expected an integer")
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError("expected a number")
            return float(value)
        if kind == "tuple[str, ...]":
            if isinstance(value, str):
                items = [v.strip() for v in value.split(",")]
            elif isinstance(value, (list, tuple)):
                items = [str(v).strip() for v in value]
            else:
                raise ValueError("expected a list of strings or a comma-separated string")
            return tuple(v for v in items if v)
        if kind == "str":
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError("expected a string")
            return str(value).strip()
    except ValueError as exc:
        raise ConfigError(f"{name} (from {origin}): {value!r}: {exc}") from None
    raise AssertionError(f"unhandled field type {kind}")  # pragma: no cover - every field type is listed above


def _apply(values: dict[str, Any], updates: Mapping[str, Any], origin: str) -> None:
    for key, raw in updates.items():
        name = key.replace("-", "_").lower()
        if name == "model":  # a singular spelling is natural in files and the environment
            name = "models"
        if name not in _FIELD_TYPES:
            known = ", ".join(sorted(_FIELD_TYPES))
            raise ConfigError(f"{key} (from {origin}): unknown setting; known settings are: {known}")
        values[name] = _coerce(name, raw, origin)


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML or YAML config file into a flat dict of settings (a ``server`` table is unwrapped)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config file {p}: {exc.strerror or exc}") from None
    data: Any
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:  # pragma: no cover - pyyaml is installed with the dev extra
            raise ConfigError(f"config file {p}: YAML needs PyYAML (pip install pyyaml) or use TOML") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p}: invalid YAML: {exc}") from None
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p}: invalid TOML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: expected a table of settings at the top level")
    if "server" in data and isinstance(data["server"], dict):
        rest = {k: v for k, v in data.items() if k != "server"}
        if rest:
            raise ConfigError(f"config file {p}: settings outside the [server] table: {', '.join(sorted(rest))}")
        data = data["server"]
    return dict(data)


def env_settings(environ: Mapping[str, str]) -> dict[str, str]:
    """The ``LINLENS_<FIELD>`` variables that name a setting (others, such as LINLENS_CONFIG, are left alone)."""
    out: dict[str, str] = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if name == "model":
            name = "models"
        if name in _FIELD_TYPES:
            out[name] = value
    return out


def load_config(
    config_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ServerConfig:
    """Assemble a validated ServerConfig: defaults < config file < environment < overrides (flags).

    ``config_file`` defaults to ``$LINLENS_CONFIG`` when that is set; ``environ`` defaults to ``os.environ``.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = config_file if config_file is not None else env.get(ENV_PREFIX + "CONFIG") or None
    if path:
        _apply(values, read_config_file(path), f"config file {path}")
    for name, raw in env_settings(env).items():
        _apply(values, {name: raw}, f"environment variable {ENV_PREFIX}{name.upper()}")
    if overrides:
        _apply(values, {k: v for k, v in overrides.items() if v is not None}, "command line")
    return dataclasses.replace(ServerConfig(), **values).validate()


# --- command line ----------------------------------------------------------------------------------------------------

_HELP: dict[str, str] = {
    "host": "address the gRPC server binds",
    "port": "gRPC port (0 = pick a free one)",
    "metrics_port": "Prometheus /metrics port (0 = off)",
    "metrics_host": "address the metrics endpoint binds",
    "dtype": "weight dtype",
    "device": "torch device, e.g. cpu or cuda",
    "attention": "served attention kernel: auto, sdpa or eager",
    "max_concurrent_jobs": "model jobs running at once",
    "max_queue": "jobs allowed to wait; more are refused with RESOURCE_EXHAUSTED",
    "max_batch_size": "generation requests decoded together in one batch (1 = no batching)",
    "max_batch_tokens": "cache positions (prompt + token budget) one batch may hold",
    "max_prompt_tokens": "longest accepted input in tokens (0 = the model's context)",
    "max_request_bytes": "largest accepted request message in bytes",
    "max_explanation_memory_mb": "memory one explanation may need by the engine's estimate, in MiB",
    "max_concurrent_streams": "GenerateStream calls open at once; more get RESOURCE_EXHAUSTED",
    "max_new_tokens": "largest accepted max_new_tokens",
    "max_top_k": "largest accepted explanation top_k",
    "max_explained_steps": "most generated steps one request may explain",
    "max_tokens_per_vector": "largest accepted tokens_per_vector",
    "max_attribution_targets": "most extra attribution targets per request",
    "max_analyzed_layers": "most layers with Jacobians per request (layer analysis), over all explained steps",
    "grace_period_s": "seconds in-flight requests get after SIGTERM",
    "grpc_threads": "threads serving gRPC calls",
    "torch_threads": "torch intra-op threads (0 = torch default)",
    "log_format": "text or json (one JSON object per line)",
    "log_level": "debug, info, warning or error",
    "tls_cert_file": "PEM server certificate chain (with --tls-key-file: TLS on)",
    "tls_key_file": "PEM private key of the server certificate",
    "tls_client_ca_file": "PEM CA certificates of client certificates (mutual TLS: clients must present one)",
    "auth_token_file": "file of SHA-256 hex digests of accepted bearer tokens, one per line (tokens required)",
    "health_port": "extra plaintext port serving only grpc.health.v1, for probes (0 = off)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the server's flags to ``parser`` (the CLI's ``serve`` subcommand reuses this).

    Every flag defaults to None, meaning "not given", so that only flags the user typed override the layers below.
    """
    parser.add_argument("--config", metavar="FILE", help="TOML or YAML config file (default: $LINLENS_CONFIG)")
    parser.add_argument(
        "--model",
        dest="models",
        action="append",
        metavar="NAME",
        help=f"model to load (repeatable; the first is the default; default: {DEFAULT_MODEL})",
    )
    defaults = ServerConfig()
    for f in fields(ServerConfig):
        if f.name in ("models", "log_prompts", "warmup", "reflection"):
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = {"int": int, "float": float, "str": str}[str(f.type)]
        parser.add_argument(
            flag,
            dest=f.name,
            type=kind,
            default=None,
            help=f"{_HELP.get(f.name, f.name)} (default: {getattr(defaults, f.name)})",
        )
    switches = (
        ("log_prompts", "allow prompt text in request logs (default: off)"),
        ("warmup", "warm each model up before reporting SERVING (default: on)"),
        ("reflection", "serve gRPC server reflection (default: on)"),
    )
    for name, text in switches:
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ServerConfig:
    """Build the config from parsed flags (see :func:`add_arguments`), the environment and the config file."""
    overrides = {f.name: getattr(args, f.name, None) for f in fields(ServerConfig)}
    return load_config(getattr(args, "config", None), environ, overrides)


def build_parser(prog: str = "linlens-server") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run the linlens gRPC server. Settings: defaults < config file < LINLENS_* environment < flags.",
    )
    add_arguments(parser)
    return parser


def build_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> ServerConfig:
    """Parse ``argv`` (default: sys.argv[1:]) into a validated ServerConfig, applying the documented precedence."""
    args = build_parser().parse_args(argv)
    return config_from_args(args, environ)


__all__ = [
    "DEFAULT_MODEL",
    "ENV_PREFIX",
    "ConfigError",
    "ServerConfig",
    "add_arguments",
    "build_config",
    "build_parser",
    "config_from_args",
    "env_settings",
    "load_config",
    "read_config_file",
]
