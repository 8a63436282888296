"""The linlens.v1.LinlensService servicer: protobuf in, engine and generation work on the scheduler, protobuf out.

Each RPC follows the same path:

1. admission on the gRPC thread: refuse while draining (UNAVAILABLE), resolve the model (NOT_FOUND, or UNAVAILABLE
   while it loads), tokenise and validate everything (INVALID_ARGUMENT). All of this is cheap, so bad requests fail
   at once without taking a queue slot;
2. the model work is submitted to the :class:`~linlens.server.scheduler.Scheduler` (RESOURCE_EXHAUSTED when its
   queue is full) with a :class:`CancelToken` that the call's termination callback and deadline set;
3. the gRPC thread waits for the job (for streams it forwards the job's events as they come), maps the result to
   protobuf, or maps the failure to a status with a message a person can act on;
4. one access-log line and the request metrics are written, whatever the outcome.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np

from linlens.client.tensors import tensor_from_array as tensor  # one wire encoding for both sides
from linlens.engine import (
    AttributionTarget,
    ComponentContribution,
    ExplainOptions,
    Explanation,
    ExplanationCancelled,
    GateMode,
    LayerAttributions,
    LayerOptions,
    LayerResult,
    LinearMapSpectrum,
    PositionSelection,
    Precision,
    SingularComponent,
)
from linlens.engine import Timings as EngineTimings
from linlens.server.config import ServerConfig
from linlens.server.generation import (
    DEFAULT_MAX_NEW_TOKENS,
    FinishReason,
    GeneratedToken,
    Generation,
    GenerationStopped,
    InputError,
    Sampling,
    check_token_ids,
    encode_chat,
    encode_text,
    generate,
)
from linlens.server.logs import log_request
from linlens.server.metrics import Metrics
from linlens.server.scheduler import (
    CancelToken,
    Job,
    JobStopped,
    QueueFullError,
    Scheduler,
    SchedulerClosed,
    StopReason,
)
from linlens.v1 import linlens_pb2 as pb
from linlens.v1 import linlens_pb2_grpc as pb_grpc

_log = logging.getLogger(__name__)

T = TypeVar("T")

#: Name under which the whole service reports in grpc.health.v1 (besides "" and one entry per model name).
SERVICE_NAME = "linlens.v1.LinlensService"

#: Explanation defaults when a request leaves a field unset (documented in the proto).
DEFAULT_TOP_K = 3
DEFAULT_TOKENS_PER_VECTOR = 8
#: Layer-analysis defaults (LayerAnalysisOptions) when a request leaves a field unset.
DEFAULT_LAYER_TOP_K = 3
DEFAULT_LAYER_TOKENS_PER_VECTOR = 8

#: How often a waiting gRPC thread re-checks its call, as a safety net behind the termination callback.
_POLL_S = 0.25


class RpcFailure(Exception):
    """A request fails with this gRPC status and message (always phrased so that the caller knows what to do)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --- models ----------------------------------------------------------------------------------------------------------


def display_name(ref: str) -> str:
    """The name requests use for a configured model reference, known before the model is loaded.

    Mirrors the loader: registry names stay as they are, a .gguf path becomes its file stem, a folder its name.
    """
    from linlens.models import REGISTRY

    if ref in REGISTRY:
        return ref
    path = Path(ref).expanduser()
    if path.suffix == ".gguf":
        return path.stem
    if path.is_dir():
        return path.name
    return ref


@dataclass
class ModelSlot:
    """One configured model and where it is in its life: loading, ready, or failed (with the reason)."""

    ref: str
    name: str
    state: str = "loading"  # "loading" | "ready" | "failed"
    loaded: Any = None  # linlens.models.LoadedModel once ready
    error: str = ""


class ModelHost:
    """The configured models. Loading happens once, at start-up, possibly on a background thread."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.slots: dict[str, ModelSlot] = {}
        for ref in config.models:
            name = display_name(ref)
            if name in self.slots:
                raise ValueError(f"two configured models are both called {name!r}; give each model once")
            self.slots[name] = ModelSlot(ref=ref, name=name)
        self.default_name = next(iter(self.slots))
        self._lock = threading.Lock()
        self._listeners: list[Callable[[ModelSlot], None]] = []

    def on_change(self, listener: Callable[[ModelSlot], None]) -> None:
        self._listeners.append(listener)

    def _notify(self, slot: ModelSlot) -> None:
        for listener in self._listeners:
            try:
                listener(slot)
            except Exception:
                _log.exception("model state listener failed")

    def adopt(self, loaded: Any) -> None:
        """Serve an already loaded model (tests and notebooks load once and start several servers)."""
        slot = self.slots.get(loaded.name)
        if slot is None:
            raise ValueError(f"model {loaded.name!r} is not among the configured models {list(self.slots)}")
        if self.config.warmup:
            warm_up(loaded)
        with self._lock:
            slot.loaded, slot.state, slot.error = loaded, "ready", ""
        self._notify(slot)

    def load_all(self, metrics: Metrics | None = None) -> None:
        """Load every configured model that is not loaded yet, one after another; failures are kept, not raised."""
        from linlens.models import load_model

        for slot in self.slots.values():
            if slot.state == "ready":
                continue
            _log.info("loading model %s (%s)", slot.name, slot.ref)
            try:
                loaded = load_model(slot.ref, dtype=self.config.dtype, device=self.config.device)
                if self.config.warmup:
                    warm_up(loaded)
            except Exception as exc:
                _log.exception("model %s failed to load", slot.name)
                with self._lock:
                    slot.state, slot.error = "failed", f"{type(exc).__name__}: {exc}"
                self._notify(slot)
                continue
            with self._lock:
                slot.loaded, slot.state = loaded, "ready"
            _log.info("model %s ready: %s, loaded in %.1f s", slot.name, loaded.architecture, loaded.load_seconds)
            if metrics is not None:
                metrics.observe_model_load(slot.name, loaded.load_seconds, model_labels(loaded))
            self._notify(slot)

    @property
    def all_ready(self) -> bool:
        return all(s.state == "ready" for s in self.slots.values())

    def resolve(self, name: str) -> ModelSlot:
        """The slot for a request's model name (empty: the default), or NOT_FOUND listing what there is."""
        key = name or self.default_name
        slot = self.slots.get(key)
        if slot is None:
            raise RpcFailure(
                grpc.StatusCode.NOT_FOUND,
                f"unknown model {name!r}; this server serves: {', '.join(self.slots)} "
                f"(an empty name means {self.default_name})",
            )
        return slot

    def ready(self, name: str) -> Any:
        """The loaded model for a request, or UNAVAILABLE while it loads or after it failed to."""
        slot = self.resolve(name)
        if slot.state == "loading":
            raise RpcFailure(
                grpc.StatusCode.UNAVAILABLE, f"model {slot.name!r} is still loading; retry in a few seconds"
            )
        if slot.state == "failed":
            raise RpcFailure(
                grpc.StatusCode.UNAVAILABLE,
                f"model {slot.name!r} failed to load ({slot.error}); the operator must fix the server's model setting",
            )
        return slot.loaded


def warm_up(loaded: Any) -> float:
    """One tiny generation and attributions-only explanation: builds the linear twin and primes the allocator."""
    started = time.monotonic()
    ids = encode_text(loaded.tokenizer, "Hello, world")
    generate(loaded.model, loaded.tokenizer, ids, Sampling(max_new_tokens=2), max_positions=loaded.max_positions)
    loaded.explainer.explain(ids, ExplainOptions(top_k=0))
    seconds = time.monotonic() - started
    _log.info("model %s warmed up in %.1f s", loaded.name, seconds)
    return seconds


def model_labels(loaded: Any) -> dict[str, str]:
    return {
        "family": loaded.family,
        "architecture": loaded.architecture,
        "dtype": loaded.dtype,
        "device": loaded.device,
        "hidden_size": str(loaded.hidden_size),
        "num_layers": str(loaded.num_layers),
        "vocab_size": str(loaded.vocab_size),
    }


def model_info(slot: ModelSlot, is_default: bool) -> pb.ModelInfo:
    info = pb.ModelInfo(name=slot.name, source=slot.ref, is_default=is_default, loaded=slot.state == "ready")
    m = slot.loaded
    if m is not None:
        info.source = m.source
        info.family = m.family
        info.architecture = m.architecture
        info.hidden_size = m.hidden_size
        info.num_layers = m.num_layers
        info.vocab_size = m.vocab_size
        info.dtype = m.dtype
        info.device = m.device
        info.load_seconds = m.load_seconds
        info.max_positions = m.max_positions
    return info


# --- protobuf conversion ---------------------------------------------------------------------------------------------

_PRECISION_TO_PB = {
    Precision.FLOAT32: pb.PRECISION_FLOAT32,
    Precision.FLOAT64: pb.PRECISION_FLOAT64,
    Precision.BFLOAT16: pb.PRECISION_BFLOAT16,
}
_PRECISION_FROM_PB = {v: k for k, v in _PRECISION_TO_PB.items()} | {pb.PRECISION_UNSPECIFIED: Precision.FLOAT32}
_GATE_TO_PB = {GateMode.FREEZE_GATE: pb.GATE_MODE_FREEZE_GATE, GateMode.FREEZE_UP: pb.GATE_MODE_FREEZE_UP}
_GATE_FROM_PB = {v: k for k, v in _GATE_TO_PB.items()} | {pb.GATE_MODE_UNSPECIFIED: GateMode.FREEZE_GATE}
_POSITIONS_FROM_PB = {
    pb.POSITION_SELECTION_UNSPECIFIED: PositionSelection.LAST,
    pb.POSITION_SELECTION_LAST: PositionSelection.LAST,
    pb.POSITION_SELECTION_ALL: PositionSelection.ALL,
}
_FINISH_TO_PB = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.CONTEXT_LENGTH: pb.FINISH_REASON_CONTEXT_LENGTH,
}


def _ms(seconds: float) -> float:
    return seconds * 1000.0


def timings_proto(
    engine: EngineTimings | None = None, *, queue_s: float = 0.0, generation_s: float = 0.0, total_s: float = 0.0
) -> pb.Timings:
    t = engine or EngineTimings()
    return pb.Timings(
        queue_ms=_ms(queue_s),
        generation_ms=_ms(generation_s),
        forward_ms=_ms(t.forward),
        jacobian_ms=_ms(t.jacobian),
        attribution_ms=_ms(t.attribution),
        svd_ms=_ms(t.svd),
        decode_ms=_ms(t.decode),
        ordinary_ms=_ms(t.ordinary),
        total_ms=_ms(total_s),
    )


def explanation_proto(exp: Explanation, step: int) -> pb.Explanation:
    """Everything the engine returned for one prediction, as an Explanation message."""

    def predicted(p: Any) -> pb.PredictedToken:
        return pb.PredictedToken(token_id=p.token_id, text=p.text, logit=p.logit, probability=p.probability)

    def target(t: AttributionTarget) -> pb.AttributionTarget:
        msg = pb.AttributionTarget(token_id=t.token_id)
        if t.contrast_token_id is not None:
            msg.contrast_token_id = t.contrast_token_id
        return msg

    msg = pb.Explanation(
        step=step,
        input_ids=list(exp.input_ids),
        input_tokens=list(exp.input_tokens),
        predicted=predicted(exp.predicted),
        explained=predicted(exp.explained),
        y=tensor(exp.y),
        constant=tensor(exp.constant),
        has_bias=exp.has_bias,
        truncated_relative_error=list(exp.truncated_relative_error),
        precision=_PRECISION_TO_PB[exp.precision],
        gate_mode=_GATE_TO_PB[exp.gate_mode],
        vjp_count=exp.vjp_count,
        timings=timings_proto(exp.timings, total_s=exp.timings.total),
    )
    if exp.reconstruction is not None:
        r = exp.reconstruction
        msg.reconstruction.CopyFrom(
            pb.Reconstruction(
                relative_error_vs_model=r.relative_error_vs_model,
                relative_error_vs_detached=r.relative_error_vs_detached,
                max_abs_logit_error=r.max_abs_logit_error,
                predicts_same_token=r.predicts_same_token,
                linear_token_id=r.linear_token_id,
            )
        )
    for a in exp.attributions:
        msg.attributions.append(
            pb.Attribution(
                target=target(a.target),
                label=a.label,
                per_token=[float(v) for v in np.asarray(a.per_token).ravel()],
                constant=a.constant,
                total=a.total,
                completeness_error=a.completeness_error,
            )
        )
    for s in exp.spectra:
        spectrum = pb.PositionSpectrum(
            position=s.position,
            token_id=s.token_id,
            token_text=s.token_text,
            singular_values=tensor(s.singular_values),
            captured_share=list(s.captured_share),
            stable_rank=s.stable_rank,
            term_norm=s.term_norm,
        )
        spectrum.components.extend(singular_component_proto(c) for c in s.components)
        msg.spectra.append(spectrum)
    if exp.jacobians is not None:
        msg.jacobians.CopyFrom(tensor(exp.jacobians))
    if exp.ordinary is not None:
        msg.ordinary.CopyFrom(
            pb.OrdinaryContrast(
                relative_error_vs_model=exp.ordinary.relative_error_vs_model,
                predicts_same_token=exp.ordinary.predicts_same_token,
            )
        )
    return msg


def singular_component_proto(c: SingularComponent) -> pb.SingularComponent:
    return pb.SingularComponent(
        rank=c.rank,
        value=c.value,
        left=tensor(c.left),
        right=tensor(c.right),
        left_tokens=[pb.TokenScore(token_id=t.token_id, text=t.text, score=t.score) for t in c.left_tokens],
        right_tokens=[pb.TokenScore(token_id=t.token_id, text=t.text, score=t.score) for t in c.right_tokens],
    )


def _predicted_proto(p: Any) -> pb.PredictedToken:
    return pb.PredictedToken(token_id=p.token_id, text=p.text, logit=p.logit, probability=p.probability)


def linear_map_proto(spectrum: LinearMapSpectrum) -> pb.LinearMapSpectrum:
    return pb.LinearMapSpectrum(
        components=[singular_component_proto(c) for c in spectrum.components],
        singular_values=tensor(spectrum.singular_values),
        captured_share=list(spectrum.captured_share),
        stable_rank=spectrum.stable_rank,
        term_norm=spectrum.term_norm,
        reconstruction_error=spectrum.reconstruction_error,
    )


_COMPONENT_TO_PB = {"attention": pb.LAYER_COMPONENT_ATTENTION, "mlp": pb.LAYER_COMPONENT_MLP}


def component_proto(c: ComponentContribution) -> pb.ComponentContribution:
    msg = pb.ComponentContribution(
        layer=c.layer,
        component=_COMPONENT_TO_PB.get(c.component, pb.LAYER_COMPONENT_UNSPECIFIED),
        logit=c.logit,
        per_token=[float(v) for v in np.asarray(c.per_token).ravel()],
        constant=c.constant,
        y_norm=c.y_norm,
        y_share=c.y_share,
    )
    if c.spectrum is not None:
        msg.spectrum.CopyFrom(linear_map_proto(c.spectrum))
    return msg


def layer_attributions_proto(summary: LayerAttributions, step: int) -> pb.LayerAttributions:
    """The engine's layers x tokens matrix as a LayerAttributions message for explained step ``step``."""
    return pb.LayerAttributions(
        step=step,
        explained=_predicted_proto(summary.explained),
        input_tokens=list(summary.input_tokens),
        attention=tensor(summary.attention),
        mlp=tensor(summary.mlp),
        per_layer=tensor(summary.per_layer),
        direct=tensor(summary.direct),
        attention_logits=tensor(summary.attention_logits),
        mlp_logits=tensor(summary.mlp_logits),
        logit=summary.logit,
        completeness_error=summary.completeness_error,
        decomposition_error=summary.decomposition_error,
    )


def layer_result_proto(result: LayerResult, step: int) -> pb.LayerResult:
    """One layer's analysis as a LayerResult message for explained step ``step``."""
    msg = pb.LayerResult(
        step=step,
        layer=result.layer,
        attention=component_proto(result.attention),
        mlp=component_proto(result.mlp),
        duration_ms=_ms(result.seconds),
        vjp_count=result.vjp_count,
    )
    if result.up_to_layer is not None:
        msg.up_to_layer.CopyFrom(linear_map_proto(result.up_to_layer))
    if result.layer_alone is not None:
        msg.layer_alone.CopyFrom(linear_map_proto(result.layer_alone))
    return msg


@dataclass
class LayerAnalysis:
    """One explained step's layer analysis, already as protobuf (what Explain, Generate and the CLI return)."""

    attributions: pb.LayerAttributions
    layers: list[pb.LayerResult]
    seconds: float


def run_layer_analysis(
    loaded: Any,
    input_ids: list[int],
    options: ExplainOptions,
    layer_options: LayerOptions,
    step: int,
    *,
    should_stop: Callable[[], bool] | None = None,
    on_message: Callable[[pb.LayerAttributions | pb.LayerResult], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> LayerAnalysis:
    """Run the engine's layer-by-layer analysis and map each event to protobuf as soon as the engine yields it.

    ``on_message`` sees the LayerAttributions first, then each LayerResult in order, so a stream can forward the
    emergence live. Raises ExplanationCancelled when ``should_stop`` turns true (also checked between layers, since
    a layer without Jacobians polls nothing), ValueError for options the engine rejects.
    """
    started = time.perf_counter()
    events = loaded.explainer.explain_layers(
        input_ids, options, layer_options, should_stop=should_stop, on_progress=on_progress
    )
    summary: pb.LayerAttributions | None = None
    layers: list[pb.LayerResult] = []
    for event in events:
        if isinstance(event, LayerAttributions):
            summary = layer_attributions_proto(event, step)
            message: pb.LayerAttributions | pb.LayerResult = summary
        else:
            message = layer_result_proto(event, step)
            layers.append(message)
        if on_message is not None:
            on_message(message)
        if should_stop is not None and should_stop():
            raise ExplanationCancelled("the layer analysis was stopped")
    if summary is None:  # pragma: no cover - the engine always yields the matrix first
        raise RuntimeError("the layer analysis returned no attribution matrix")
    return LayerAnalysis(summary, layers, time.perf_counter() - started)


def token_proto(t: GeneratedToken) -> pb.GeneratedToken:
    return pb.GeneratedToken(index=t.index, token_id=t.token_id, text=t.text, logprob=t.logprob)


# --- request parsing -------------------------------------------------------------------------------------------------


def _invalid(message: str) -> RpcFailure:
    return RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, message)


def encode_input(loaded: Any, message: pb.Input, config: ServerConfig) -> list[int]:
    """The request's input as token ids, validated against the model and the server's limits."""
    kind = message.WhichOneof("kind")
    try:
        if kind == "text":
            ids = encode_text(loaded.tokenizer, message.text)
        elif kind == "token_ids":
            ids = check_token_ids(list(message.token_ids.ids), loaded.vocab_size)
        elif kind == "chat":
            turns = [(m.role, m.content) for m in message.chat.messages]
            ids = encode_chat(loaded.tokenizer, turns, not message.chat.omit_generation_prompt)
        else:
            raise _invalid("input is missing: set exactly one of input.text, input.token_ids or input.chat")
    except InputError as exc:
        raise _invalid(str(exc)) from None
    if len(ids) > config.max_prompt_tokens:
        raise _invalid(
            f"the input has {len(ids)} tokens, above this server's limit of {config.max_prompt_tokens}; shorten it"
        )
    if loaded.max_positions and len(ids) >= loaded.max_positions:
        raise _invalid(
            f"the input has {len(ids)} tokens, which fills the model's context of {loaded.max_positions}; shorten it"
        )
    return ids


def sampling_from_proto(message: pb.SamplingParams | None, config: ServerConfig) -> Sampling:
    if message is None:
        return Sampling(max_new_tokens=min(DEFAULT_MAX_NEW_TOKENS, config.max_new_tokens))
    if message.HasField("max_new_tokens"):
        max_new = message.max_new_tokens
    else:
        max_new = min(DEFAULT_MAX_NEW_TOKENS, config.max_new_tokens)
    sampling = Sampling(
        max_new_tokens=max_new,
        temperature=message.temperature,
        top_p=1.0 if message.top_p == 0.0 else message.top_p,
        top_k=message.top_k,
        seed=message.seed if message.HasField("seed") else None,
        stop_sequences=tuple(message.stop_sequences),
        ignore_eos=message.ignore_eos,
    )
    try:
        return sampling.validate(config.max_new_tokens)
    except InputError as exc:
        raise _invalid(str(exc)) from None


def _check_token(loaded: Any, token_id: int, where: str) -> int:
    if not 0 <= token_id < loaded.vocab_size:
        raise _invalid(f"{where} = {token_id} is not a token id of this model (valid: 0..{loaded.vocab_size - 1})")
    return int(token_id)


def explain_options_from_proto(message: pb.ExplainOptions, loaded: Any, config: ServerConfig) -> ExplainOptions:
    """Map and bound-check ExplainOptions; explained_token_id is kept (Generate overrides it per step)."""
    top_k = message.top_k if message.HasField("top_k") else DEFAULT_TOP_K
    limit = min(config.max_top_k, loaded.hidden_size)
    if top_k > limit:
        raise _invalid(
            f"explain.top_k is {top_k}, above the limit of {limit} (server max_top_k {config.max_top_k}, "
            f"hidden size {loaded.hidden_size}); ask for fewer singular components"
        )
    per_vector = message.tokens_per_vector if message.HasField("tokens_per_vector") else DEFAULT_TOKENS_PER_VECTOR
    if not 1 <= per_vector <= config.max_tokens_per_vector:
        raise _invalid(f"explain.tokens_per_vector must lie in 1..{config.max_tokens_per_vector}, got {per_vector}")
    if len(message.targets) > config.max_attribution_targets:
        raise _invalid(
            f"explain.targets has {len(message.targets)} entries, above the limit of {config.max_attribution_targets}"
        )
    targets = []
    for i, t in enumerate(message.targets):
        token = _check_token(loaded, t.token_id, f"explain.targets[{i}].token_id")
        contrast = None
        if t.HasField("contrast_token_id"):
            contrast = _check_token(loaded, t.contrast_token_id, f"explain.targets[{i}].contrast_token_id")
        targets.append(AttributionTarget(token_id=token, contrast_token_id=contrast))
    precision = _PRECISION_FROM_PB.get(message.precision)
    if precision is None:
        raise _invalid(f"explain.precision {message.precision} is not a known Precision value")
    if precision is Precision.BFLOAT16 and str(loaded.device).startswith("cpu"):
        raise _invalid("explain.precision BFLOAT16 needs an accelerator; this server runs on CPU: use FLOAT32/64")
    gate_mode = _GATE_FROM_PB.get(message.gate_mode)
    if gate_mode is None:
        raise _invalid(f"explain.gate_mode {message.gate_mode} is not a known GateMode value")
    positions = _POSITIONS_FROM_PB.get(message.positions)
    if positions is None:
        raise _invalid(f"explain.positions {message.positions} is not a known PositionSelection value")
    explained = None
    if message.HasField("explained_token_id"):
        explained = _check_token(loaded, message.explained_token_id, "explain.explained_token_id")
    chunk = None
    if message.HasField("vjp_chunk_size"):
        if message.vjp_chunk_size < 1:
            raise _invalid("explain.vjp_chunk_size must be at least 1 (leave it unset to let the server choose)")
        chunk = int(message.vjp_chunk_size)
    return ExplainOptions(
        top_k=int(top_k),
        tokens_per_vector=int(per_vector),
        positions=positions,
        targets=tuple(targets),
        include_jacobians=message.include_jacobians,
        precision=precision,
        ordinary_contrast=message.ordinary_contrast,
        gate_mode=gate_mode,
        explained_token_id=explained,
        vjp_chunk_size=chunk,
    )


def layer_options_from_proto(
    message: pb.ExplainOptions, loaded: Any, config: ServerConfig, *, steps: int = 1
) -> LayerOptions | None:
    """Map and bound-check ExplainOptions.layers (None when absent). ``steps`` is how many explained steps may run
    the analysis, so that the per-request bound on layers with Jacobians covers all of them."""
    if not message.HasField("layers"):
        return None
    m = message.layers
    count = int(loaded.num_layers)
    if m.layers and m.every:
        raise _invalid("explain.layers: set either layers (explicit indices) or every (every k-th layer), not both")
    if m.layers:
        selected = tuple(int(i) for i in m.layers)
        bad = [i for i in selected if i >= count]
        if bad:
            raise _invalid(
                f"explain.layers.layers names layer(s) {bad[:5]}, but {loaded.name} has layers 0..{count - 1}"
            )
        if len(set(selected)) != len(selected):
            raise _invalid("explain.layers.layers names a layer more than once; list each layer once")
        chosen: tuple[int, ...] | None = selected
    elif m.every:
        chosen = tuple(sorted(set(range(0, count, int(m.every))) | {count - 1}))
    else:
        chosen = None
    up_to = m.up_to_layer if m.HasField("up_to_layer") else True
    top_k = m.top_k if m.HasField("top_k") else DEFAULT_LAYER_TOP_K
    limit = min(config.max_top_k, loaded.hidden_size)
    if top_k > limit:
        raise _invalid(
            f"explain.layers.top_k is {top_k}, above the limit of {limit} (server max_top_k {config.max_top_k}, "
            f"hidden size {loaded.hidden_size}); ask for fewer singular components"
        )
    per_vector = m.tokens_per_vector if m.HasField("tokens_per_vector") else DEFAULT_LAYER_TOKENS_PER_VECTOR
    if not 1 <= per_vector <= config.max_tokens_per_vector:
        raise _invalid(
            f"explain.layers.tokens_per_vector must lie in 1..{config.max_tokens_per_vector}, got {per_vector}"
        )
    options = LayerOptions(
        layers=chosen,
        up_to_layer=up_to,
        layer_alone=m.layer_alone,
        component_spectra=m.component_spectra,
        top_k=int(top_k),
        tokens_per_vector=int(per_vector),
    )
    if up_to or m.layer_alone or m.component_spectra:
        analysed = (count if chosen is None else len(chosen)) * steps
        if analysed > config.max_analyzed_layers:
            raise _invalid(
                f"explain.layers asks for Jacobians of {analysed} layers"
                + (f" ({steps} explained steps)" if steps > 1 else "")
                + f", above this server's limit of {config.max_analyzed_layers}; select fewer layers (layers or "
                "every), explain fewer steps, or turn up_to_layer, layer_alone and component_spectra off for the "
                "cheap attribution matrix only"
            )
    return options


@dataclass(frozen=True)
class ExplainPlan:
    """Which generated steps to explain, and how."""

    options: ExplainOptions
    #: Explicit steps (FIRST or LIST), or None for every generated step (ALL).
    steps: tuple[int, ...] | None
    #: Layer-by-layer analysis for every explained step, when ExplainOptions.layers was set.
    layers: LayerOptions | None = None

    def steps_for(self, generated: int) -> list[int]:
        if self.steps is None:
            return list(range(generated))
        return [s for s in self.steps if s < generated]


def explain_plan_from_proto(
    message: pb.ExplainOptions, loaded: Any, sampling: Sampling, config: ServerConfig
) -> ExplainPlan:
    options = explain_options_from_proto(message, loaded, config)
    options = dataclasses.replace(options, explained_token_id=None)  # each step explains its generated token
    mode = message.steps
    if mode in (pb.EXPLAIN_STEPS_UNSPECIFIED, pb.EXPLAIN_STEPS_FIRST):
        return ExplainPlan(options, (0,), layer_options_from_proto(message, loaded, config))
    if mode == pb.EXPLAIN_STEPS_LIST:
        steps = tuple(sorted(set(message.step_indices)))
        if not steps:
            raise _invalid("explain.steps is EXPLAIN_STEPS_LIST but explain.step_indices is empty; list the steps")
        if len(steps) > config.max_explained_steps:
            raise _invalid(
                f"explain.step_indices names {len(steps)} steps, above the limit of {config.max_explained_steps}"
            )
        layers = layer_options_from_proto(message, loaded, config, steps=min(len(steps), sampling.max_new_tokens))
        return ExplainPlan(options, steps, layers)
    if mode == pb.EXPLAIN_STEPS_ALL:
        if sampling.max_new_tokens > config.max_explained_steps:
            raise _invalid(
                f"EXPLAIN_STEPS_ALL with max_new_tokens {sampling.max_new_tokens} could explain more steps than the "
                f"limit of {config.max_explained_steps}; lower max_new_tokens or list the steps (EXPLAIN_STEPS_LIST)"
            )
        layers = layer_options_from_proto(message, loaded, config, steps=sampling.max_new_tokens)
        return ExplainPlan(options, None, layers)
    raise _invalid(f"explain.steps {mode} is not a known ExplainSteps value")


# --- per-call bookkeeping --------------------------------------------------------------------------------------------


@dataclass
class CallRecord:
    """What the access log and the request metrics say about one call."""

    method: str
    request_id: str
    started: float = field(default_factory=time.monotonic)
    model: str = ""
    code: grpc.StatusCode = grpc.StatusCode.OK
    queue_s: float = 0.0
    generation_s: float = 0.0
    explain_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    explained_steps: int = 0
    prompt_text: str | None = None
    error: str = ""

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "request_id": self.request_id,
            "method": self.method,
            "model": self.model,
            "code": self.code.name,
            "total_ms": round(_ms(time.monotonic() - self.started), 1),
            "queue_ms": round(_ms(self.queue_s), 1),
            "generation_ms": round(_ms(self.generation_s), 1),
            "explain_ms": round(_ms(self.explain_s), 1),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "explained_steps": self.explained_steps,
        }
        if self.error:
            out["error"] = self.error
        if self.prompt_text is not None:
            out["prompt"] = self.prompt_text
        return out


class Lifecycle:
    """Whether the server takes new calls, and how many are in flight (what a drain waits for)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._inflight = 0
        self.draining = False

    def enter(self) -> None:
        with self._cond:
            if self.draining:
                raise RpcFailure(
                    grpc.StatusCode.UNAVAILABLE,
                    "the server is shutting down and takes no new requests; retry (another replica will answer)",
                )
            self._inflight += 1

    def leave(self) -> None:
        with self._cond:
            self._inflight -= 1
            self._cond.notify_all()

    def start_draining(self) -> None:
        with self._cond:
            self.draining = True

    @property
    def inflight(self) -> int:
        with self._cond:
            return self._inflight

    def wait_idle(self, timeout: float | None) -> bool:
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._inflight:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            return True


# --- the servicer ----------------------------------------------------------------------------------------------------


@dataclass
class _GenOutcome:
    generation: Generation
    explanations: list[tuple[int, Explanation]]
    #: The layer analysis of each explained step (when ExplainOptions.layers was set), by step.
    layers: dict[int, LayerAnalysis] = field(default_factory=dict)


# ("token", GeneratedToken) | ("explanation", (step, Explanation)) | ("layer", pb.LayerAttributions | pb.LayerResult)
_Event = tuple[str, Any]


class LinlensServicer(pb_grpc.LinlensServiceServicer):
    """Implements linlens.v1.LinlensService on top of a ModelHost and a Scheduler."""

    def __init__(
        self,
        config: ServerConfig,
        host: ModelHost,
        scheduler: Scheduler,
        metrics: Metrics,
        lifecycle: Lifecycle,
    ) -> None:
        self.config = config
        self.host = host
        self.scheduler = scheduler
        self.metrics = metrics
        self.lifecycle = lifecycle

    # -- call wrapper ------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _call(self, method: str, context: grpc.ServicerContext) -> Iterator[CallRecord]:
        """Admission, status mapping, the access-log line and request metrics around one RPC body."""
        metadata = dict(context.invocation_metadata() or ())
        request_id = str(metadata.get("x-request-id") or uuid.uuid4().hex[:16])
        record = CallRecord(method=method, request_id=request_id)
        with contextlib.suppress(Exception):  # the call may already be gone; the id is a courtesy
            context.send_initial_metadata((("x-request-id", request_id),))
        entered = False
        failure: RpcFailure | None = None
        try:
            with self.metrics.inflight(method):
                self.lifecycle.enter()
                entered = True
                yield record
        except RpcFailure as exc:
            failure = exc
        except GeneratorExit:  # a stream whose caller went away is closed by gRPC or the garbage collector
            record.code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            failure = self._unexpected(exc, record)
        finally:
            if entered:
                self.lifecycle.leave()
            if failure is not None:
                record.code, record.error = failure.code, failure.message
            self._finish(record)
        if failure is not None:
            context.abort(failure.code, failure.message)

    def _unexpected(self, exc: BaseException, record: CallRecord) -> RpcFailure:
        if _is_out_of_memory(exc):
            _log.warning("request %s ran out of memory: %s", record.request_id, exc)
            return RpcFailure(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "the server ran out of memory for this request; ask for less (fewer tokens, top_k, positions ALL "
                "or include_jacobians off) or retry later",
            )
        _log.exception("request %s failed", record.request_id)
        return RpcFailure(
            grpc.StatusCode.INTERNAL,
            f"internal error ({type(exc).__name__}); report request id {record.request_id} to the operator",
        )

    def _finish(self, record: CallRecord) -> None:
        seconds = time.monotonic() - record.started
        try:
            self.metrics.observe_request(record.method, record.model or "", record.code.name, seconds)
        except Exception:
            _log.exception("request metrics failed")
        log_request(record.fields())

    def _stop_failure(self, reason: StopReason | None) -> RpcFailure:
        if reason is StopReason.DEADLINE_EXCEEDED:
            return RpcFailure(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "the deadline passed before the work finished; the work was stopped. Allow a longer deadline, or ask "
                "for less (fewer tokens, top_k 0 for attributions only)",
            )
        if reason is StopReason.SHUTDOWN:
            return RpcFailure(grpc.StatusCode.UNAVAILABLE, "the server shut down before the request finished; retry it")
        return RpcFailure(grpc.StatusCode.CANCELLED, "the call was cancelled; its work was stopped")

    # -- running jobs ------------------------------------------------------------------------------------------

    def _token_for(self, context: grpc.ServicerContext) -> CancelToken:
        remaining = context.time_remaining()
        # grpc reports "no deadline" as a huge number of seconds
        return CancelToken.with_timeout(remaining if remaining is not None and remaining < 1e8 else None)

    def _submit(
        self,
        context: grpc.ServicerContext,
        record: CallRecord,
        fn: Callable[[CancelToken], T],
        token: CancelToken,
    ) -> Job[T]:
        try:
            job = self.scheduler.submit(fn, token, label=f"{record.method}:{record.request_id}")
        except QueueFullError as exc:
            raise RpcFailure(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
        except SchedulerClosed:
            raise RpcFailure(
                grpc.StatusCode.UNAVAILABLE, "the server is shutting down and takes no new requests; retry"
            ) from None

        def on_done() -> None:  # runs when the call ends for any reason; only matters if the job is unfinished
            if job.done():
                return
            reason = token.reason
            if reason is None and token.deadline is not None and time.monotonic() >= token.deadline - 0.05:
                reason = StopReason.DEADLINE_EXCEEDED  # gRPC's timer can fire a hair before ours
            self.scheduler.withdraw(job, reason or StopReason.CANCELLED)

        if not context.add_callback(on_done):
            on_done()  # the call had already ended
        return job

    def _await(self, job: Job[T], context: grpc.ServicerContext, record: CallRecord) -> T:
        """Wait for a job's result on the gRPC thread, mapping cancellation and failures to statuses."""
        while True:
            try:
                value = job.result(timeout=_POLL_S)
                break
            except FutureTimeout:
                if not context.is_active() or job.token.should_stop():
                    self.scheduler.withdraw(job, job.token.reason or StopReason.CANCELLED)
            except BaseException as exc:
                record.queue_s = job.queue_wait
                raise self._job_failure(exc, job.token, record) from None
        record.queue_s = job.queue_wait
        return value

    def _job_failure(self, exc: BaseException, token: CancelToken, record: CallRecord) -> RpcFailure:
        if isinstance(exc, RpcFailure):
            return exc
        if isinstance(exc, (JobStopped, GenerationStopped, ExplanationCancelled)):
            if isinstance(exc, GenerationStopped):
                record.completion_tokens = len(exc.tokens)
            reason = getattr(exc, "reason", None)
            return self._stop_failure(reason if isinstance(reason, StopReason) else token.reason)
        if isinstance(exc, (InputError, ValueError)):
            return _invalid(str(exc))
        return self._unexpected(exc, record)

    # -- work --------------------------------------------------------------------------------------------------

    def _generation_work(
        self,
        loaded: Any,
        prompt_ids: list[int],
        sampling: Sampling,
        plan: ExplainPlan | None,
        emit: Callable[[_Event], None] | None,
    ) -> Callable[[CancelToken], _GenOutcome]:
        model_name = loaded.name

        def work(token: CancelToken) -> _GenOutcome:
            gen = generate(
                loaded.model,
                loaded.tokenizer,
                prompt_ids,
                sampling,
                max_positions=loaded.max_positions or None,
                should_stop=token.should_stop,
                stop_reason=lambda: token.reason,
                on_token=(lambda t: emit(("token", t))) if emit is not None else None,
            )
            self.metrics.add_generated_tokens(model_name, len(gen.tokens))
            explanations: list[tuple[int, Explanation]] = []
            layers: dict[int, LayerAnalysis] = {}
            if plan is not None:
                for step in plan.steps_for(len(gen.tokens)):
                    options = dataclasses.replace(plan.options, explained_token_id=gen.tokens[step].token_id)
                    ids = prompt_ids + [t.token_id for t in gen.tokens[:step]]
                    exp = loaded.explainer.explain(ids, options, should_stop=token.should_stop)
                    self._observe_explanation(model_name, exp)
                    explanations.append((step, exp))
                    if emit is not None:
                        emit(("explanation", (step, exp)))
                    if plan.layers is not None:
                        layers[step] = self._layer_work(loaded, ids, options, plan.layers, step, token, emit)
            return _GenOutcome(gen, explanations, layers)

        return work

    def _layer_work(
        self,
        loaded: Any,
        ids: list[int],
        options: ExplainOptions,
        layer_options: LayerOptions,
        step: int,
        token: CancelToken,
        emit: Callable[[_Event], None] | None,
    ) -> LayerAnalysis:
        """One step's layer analysis inside the running job (same cancel token), forwarding each message to a stream."""
        analysis = run_layer_analysis(
            loaded,
            ids,
            options,
            layer_options,
            step,
            should_stop=token.should_stop,
            on_message=(lambda m: emit(("layer", m))) if emit is not None else None,
        )
        self.metrics.observe_explanation_phase(loaded.name, "layers", analysis.seconds)
        return analysis

    def _observe_explanation(self, model: str, exp: Explanation) -> None:
        t = exp.timings
        for phase in ("forward", "jacobian", "attribution", "svd", "decode", "ordinary"):
            seconds = getattr(t, phase)
            if seconds > 0:
                self.metrics.observe_explanation_phase(model, phase, seconds)
        if exp.reconstruction is not None:
            self.metrics.observe_reconstruction_error(model, exp.reconstruction.relative_error_vs_model)

    def _prepare_generation(
        self, request: pb.GenerateRequest | pb.GenerateStreamRequest, record: CallRecord
    ) -> tuple[Any, list[int], Sampling, ExplainPlan | None]:
        slot = self.host.resolve(request.model)
        record.model = slot.name
        loaded = self.host.ready(request.model)
        prompt_ids = encode_input(loaded, request.input, self.config)
        record.prompt_tokens = len(prompt_ids)
        if self.config.log_prompts:
            record.prompt_text = loaded.tokenizer.decode(prompt_ids)
        sampling = sampling_from_proto(request.sampling if request.HasField("sampling") else None, self.config)
        plan = (
            explain_plan_from_proto(request.explain, loaded, sampling, self.config)
            if request.HasField("explain")
            else None
        )
        return loaded, prompt_ids, sampling, plan

    def _usage(self, outcome: _GenOutcome, prompt_tokens: int) -> pb.Usage:
        return pb.Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=len(outcome.generation.tokens),
            explained_steps=len(outcome.explanations),
        )

    def _request_timings(self, outcome: _GenOutcome, record: CallRecord) -> pb.Timings:
        total = EngineTimings()
        for _, exp in outcome.explanations:
            t = exp.timings
            total = EngineTimings(
                forward=total.forward + t.forward,
                jacobian=total.jacobian + t.jacobian,
                attribution=total.attribution + t.attribution,
                svd=total.svd + t.svd,
                decode=total.decode + t.decode,
                ordinary=total.ordinary + t.ordinary,
            )
        record.generation_s = outcome.generation.seconds
        record.explain_s = total.total + sum(a.seconds for a in outcome.layers.values())
        record.completion_tokens = len(outcome.generation.tokens)
        record.explained_steps = len(outcome.explanations)
        return timings_proto(
            total,
            queue_s=record.queue_s,
            generation_s=outcome.generation.seconds,
            total_s=time.monotonic() - record.started,
        )

    def _observe_first_token(self, record: CallRecord, outcome: _GenOutcome) -> None:
        first = outcome.generation.first_token_seconds
        if first is not None:
            self.metrics.observe_time_to_first_token(record.model, record.queue_s + first)

    # -- RPCs --------------------------------------------------------------------------------------------------

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        with self._call("Generate", context) as record:
            loaded, prompt_ids, sampling, plan = self._prepare_generation(request, record)
            token = self._token_for(context)
            job = self._submit(context, record, self._generation_work(loaded, prompt_ids, sampling, plan, None), token)
            outcome = self._await(job, context, record)
            self.metrics.observe_queue_wait(record.model, record.queue_s)
            self._observe_first_token(record, outcome)
            gen = outcome.generation
            return pb.GenerateResponse(
                model=loaded.name,
                text=gen.text,
                tokens=[token_proto(t) for t in gen.tokens],
                finish_reason=_FINISH_TO_PB[gen.finish_reason],
                usage=self._usage(outcome, len(prompt_ids)),
                explanations=[
                    _with_layers(explanation_proto(exp, step), outcome.layers.get(step))
                    for step, exp in outcome.explanations
                ],
                timings=self._request_timings(outcome, record),
                prompt_text=loaded.tokenizer.decode(prompt_ids),
            )
        raise AssertionError("unreachable: _call aborts on failure")  # pragma: no cover

    def GenerateStream(
        self, request: pb.GenerateStreamRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateStreamResponse]:
        with self._call("GenerateStream", context) as record:
            loaded, prompt_ids, sampling, plan = self._prepare_generation(request, record)
            events: queue.SimpleQueue[_Event] = queue.SimpleQueue()
            token = self._token_for(context)
            work = self._generation_work(loaded, prompt_ids, sampling, plan, events.put)
            job = self._submit(context, record, work, token)
            first_token_seen = False
            while True:
                try:
                    kind, payload = events.get(timeout=_POLL_S)
                except queue.Empty:
                    if job.done() and events.empty():
                        break
                    if not context.is_active() or token.should_stop():
                        self.scheduler.withdraw(job, token.reason or StopReason.CANCELLED)
                    continue
                if kind == "token":
                    if not first_token_seen:
                        first_token_seen = True
                        record.queue_s = job.queue_wait
                        self.metrics.observe_time_to_first_token(record.model, time.monotonic() - record.started)
                    yield pb.GenerateStreamResponse(token=token_proto(payload))
                elif kind == "layer":
                    if isinstance(payload, pb.LayerAttributions):
                        yield pb.GenerateStreamResponse(layer_attributions=payload)
                    else:
                        yield pb.GenerateStreamResponse(layer=payload)
                else:
                    step, exp = payload
                    yield pb.GenerateStreamResponse(explanation=explanation_proto(exp, step))
            outcome = self._await(job, context, record)
            self.metrics.observe_queue_wait(record.model, record.queue_s)
            gen = outcome.generation
            done = pb.GenerateDone(
                model=loaded.name,
                text=gen.text,
                finish_reason=_FINISH_TO_PB[gen.finish_reason],
                usage=self._usage(outcome, len(prompt_ids)),
                timings=self._request_timings(outcome, record),
                prompt_text=loaded.tokenizer.decode(prompt_ids),
            )
            yield pb.GenerateStreamResponse(done=done)

    def Explain(self, request: pb.ExplainRequest, context: grpc.ServicerContext) -> pb.ExplainResponse:
        with self._call("Explain", context) as record:
            slot = self.host.resolve(request.model)
            record.model = slot.name
            loaded = self.host.ready(request.model)
            prompt_ids = encode_input(loaded, request.input, self.config)
            record.prompt_tokens = len(prompt_ids)
            if self.config.log_prompts:
                record.prompt_text = loaded.tokenizer.decode(prompt_ids)
            options = explain_options_from_proto(request.options, loaded, self.config)
            layer_options = layer_options_from_proto(request.options, loaded, self.config)
            token = self._token_for(context)

            def work(tok: CancelToken) -> tuple[Explanation, LayerAnalysis | None]:
                exp = loaded.explainer.explain(prompt_ids, options, should_stop=tok.should_stop)
                self._observe_explanation(loaded.name, exp)
                analysis = None
                if layer_options is not None:
                    analysis = self._layer_work(loaded, prompt_ids, options, layer_options, 0, tok, None)
                return exp, analysis

            exp, analysis = self._await(self._submit(context, record, work, token), context, record)
            self.metrics.observe_queue_wait(record.model, record.queue_s)
            record.explain_s = exp.timings.total + (analysis.seconds if analysis is not None else 0.0)
            record.explained_steps = 1
            message = explanation_proto(exp, 0)
            message.timings.queue_ms = _ms(record.queue_s)
            message.timings.total_ms = _ms(time.monotonic() - record.started)
            response = pb.ExplainResponse(
                model=loaded.name, explanation=message, prompt_text=loaded.tokenizer.decode(prompt_ids)
            )
            if analysis is not None:
                response.layer_attributions.CopyFrom(analysis.attributions)
                response.layers.extend(analysis.layers)
            return response
        raise AssertionError("unreachable: _call aborts on failure")  # pragma: no cover

    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsResponse:
        with self._call("ListModels", context):
            return pb.ListModelsResponse(
                models=[model_info(s, s.name == self.host.default_name) for s in self.host.slots.values()],
                default_model=self.host.default_name,
            )
        raise AssertionError("unreachable: _call aborts on failure")  # pragma: no cover

    def GetModel(self, request: pb.GetModelRequest, context: grpc.ServicerContext) -> pb.GetModelResponse:
        with self._call("GetModel", context) as record:
            slot = self.host.resolve(request.name)
            record.model = slot.name
            return pb.GetModelResponse(model=model_info(slot, slot.name == self.host.default_name))
        raise AssertionError("unreachable: _call aborts on failure")  # pragma: no cover


def _with_layers(message: pb.Explanation, analysis: LayerAnalysis | None) -> pb.Explanation:
    """An Explanation message carrying its step's layer analysis (Generate's unary response)."""
    if analysis is not None:
        message.layer_attributions.CopyFrom(analysis.attributions)
        message.layers.extend(analysis.layers)
    return message


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        return isinstance(exc, torch.OutOfMemoryError)
    except (ImportError, AttributeError):  # pragma: no cover - old torch
        return False


__all__ = [
    "SERVICE_NAME",
    "CallRecord",
    "ExplainPlan",
    "LayerAnalysis",
    "Lifecycle",
    "LinlensServicer",
    "ModelHost",
    "ModelSlot",
    "RpcFailure",
    "display_name",
    "encode_input",
    "explain_options_from_proto",
    "explain_plan_from_proto",
    "explanation_proto",
    "layer_attributions_proto",
    "layer_options_from_proto",
    "layer_result_proto",
    "model_info",
    "run_layer_analysis",
    "sampling_from_proto",
    "tensor",
    "timings_proto",
]
