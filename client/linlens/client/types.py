"""The client's request options and result types.

They mirror the engine's ``linlens.engine.results`` dataclasses field for field where the concept is the same (so
code written against a local Explainer reads the same against the service), with three differences forced by the
wire: timings are milliseconds (``Timings.*_ms``), an Explanation knows which generation ``step`` it belongs to, and
the generation itself has result types of its own. Vectors and matrices are read-only numpy arrays in the precision
the explanation ran in. Classes holding arrays compare by identity (``eq=False``): elementwise array comparison has
no single truth value. ``to_jsonable`` turns any result into plain JSON-ready data. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.floating]


class GateMode(str, enum.Enum):
    """Which factor of a gated MLP (SwiGLU, GeGLU) is frozen; both make the network exactly linear."""

    FREEZE_GATE = "freeze_gate"
    FREEZE_UP = "freeze_up"


class Precision(str, enum.Enum):
    """Floating-point type the explanation pass computes in."""

    FLOAT32 = "float32"
    FLOAT64 = "float64"
    #: Accelerators only; the server may reject it.
    BFLOAT16 = "bfloat16"


class PositionSelection(str, enum.Enum):
    """Which input positions get a singular-value decomposition of their Jacobian."""

    LAST = "last"
    ALL = "all"


class FinishReason(str, enum.Enum):
    """Why a generation stopped."""

    UNSPECIFIED = "unspecified"
    LENGTH = "length"
    STOP_SEQUENCE = "stop_sequence"
    EOS = "eos"
    CONTEXT_LENGTH = "context_length"
    CANCELLED = "cancelled"


class HealthStatus(str, enum.Enum):
    """A grpc.health.v1 serving status."""

    UNKNOWN = "UNKNOWN"
    SERVING = "SERVING"
    NOT_SERVING = "NOT_SERVING"
    SERVICE_UNKNOWN = "SERVICE_UNKNOWN"


# ----------------------------------------------------------------------------------------------------------------
# Request side
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation; ``role`` is what the model's chat template knows ("system", "user", ...)."""

    role: str
    content: str


@dataclass(frozen=True)
class AttributionTarget:
    """A direction in logit space to attribute: one token's logit, or the difference of two tokens' logits."""

    token_id: int
    contrast_token_id: int | None = None


@dataclass(frozen=True)
class LayerAnalysisOptions:
    """Look inside the model, layer by layer (``ExplainOptions(layers=...)``).

    The layers x tokens attribution matrix always covers every layer and is cheap (one batched VJP with a seed per
    attention and MLP block). Per selected layer, ``up_to_layer`` / ``layer_alone`` cost hidden_size VJPs (shared),
    ``component_spectra`` 2 x hidden_size: select few layers when you ask for those on a CPU.
    """

    #: "all" or explicit 0-based layer indices (results come in this order).
    layers: Literal["all"] | Sequence[int] = "all"
    #: Every k-th layer instead (0, k, 2k, ... plus the last layer); only with ``layers="all"``.
    every: int | None = None
    #: Residual stream after each selected layer as a map of the input embeddings, decoded logit-lens style.
    up_to_layer: bool = True
    #: Each selected layer's own map of its input.
    layer_alone: bool = False
    #: Spectra of each selected layer's attention and MLP blocks (their logit shares come regardless).
    component_spectra: bool = False
    #: Singular components per map; server default 3.
    top_k: int | None = None
    #: Tokens each singular vector is decoded to; server default 8.
    tokens_per_vector: int | None = None

    def __post_init__(self) -> None:
        layers: object = self.layers
        if isinstance(layers, str):
            if layers != "all":
                raise ValueError(f"layers must be 'all' or a sequence of layer indices, not {layers!r}")
        elif isinstance(layers, Sequence):
            indices = tuple(int(i) for i in layers)
            if any(i < 0 for i in indices):
                raise ValueError(f"layer indices must be >= 0, got {indices}")
            if not indices:
                raise ValueError("layers is empty: name at least one layer, or use 'all'")
            object.__setattr__(self, "layers", indices)
        else:
            raise TypeError(f"layers must be 'all' or a sequence of layer indices, not {type(layers).__name__}")
        if self.every is not None:
            if self.every < 1:
                raise ValueError(f"every must be >= 1, got {self.every}")
            if self.layers != "all":
                raise ValueError("give either explicit layers or every, not both")
        for name in ("top_k", "tokens_per_vector"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")

    @classmethod
    def parse(cls, spec: str, **kwargs: Any) -> LayerAnalysisOptions:
        """From the CLI's spelling: "all", "every:K" or comma-separated indices such as "0,5,10"."""
        text = spec.strip()
        if text == "all":
            return cls(**kwargs)
        if text.startswith("every:"):
            try:
                every = int(text.removeprefix("every:"))
            except ValueError:
                raise ValueError(f"--layers {spec!r}: every:K needs an integer K") from None
            return cls(every=every, **kwargs)
        try:
            indices = tuple(int(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise ValueError(f"--layers {spec!r}: use all, every:K or comma-separated layer indices") from None
        return cls(layers=indices, **kwargs)


#: Which generation steps to explain: "first" (step 0), "all", or explicit step indices (0 = first token).
StepSelection: TypeAlias = Literal["first", "all"] | Sequence[int]
#: What ``ExplainOptions.targets`` accepts per entry: a target, a bare token id, or (token_id, contrast_token_id).
TargetLike: TypeAlias = AttributionTarget | int | tuple[int, int]


@dataclass(frozen=True)
class ExplainOptions:
    """What an explanation computes. ``None`` fields leave the choice to the server (whose defaults are noted).

    ``targets`` accepts AttributionTarget, a bare token id, or a (token_id, contrast_token_id) pair; ``steps``
    accepts "first", "all" or any sequence of step indices. Both are normalised to tuples.
    """

    #: Generation steps to explain (Generate only; Explain always explains its single prediction). Normalised to
    #: "first", "all" or a tuple of ints.
    steps: StepSelection = "first"
    #: Singular components per selected position; server default 3. 0 computes attributions only (fast).
    top_k: int | None = None
    #: Tokens each singular vector is decoded to; server default 8.
    tokens_per_vector: int | None = None
    positions: PositionSelection = PositionSelection.LAST
    #: Extra attribution targets besides the explained token (normalised to a tuple of AttributionTarget).
    targets: Sequence[TargetLike] = ()
    #: Return the (n, d, d) Jacobians themselves (large).
    include_jacobians: bool = False
    precision: Precision = Precision.FLOAT32
    #: Also report how badly the ordinary (not detached) Jacobian reconstructs y.
    ordinary_contrast: bool = False
    gate_mode: GateMode = GateMode.FREEZE_GATE
    #: Explain only: the token to explain instead of the top prediction.
    explained_token_id: int | None = None
    #: Vector-Jacobian products per batch; None lets the server bound memory.
    vjp_chunk_size: int | None = None
    #: Layer-by-layer analysis of every explained step; None (the default) skips it.
    layers: LayerAnalysisOptions | None = None

    def __post_init__(self) -> None:
        if self.layers is not None and not isinstance(self.layers, LayerAnalysisOptions):
            raise TypeError(f"layers must be LayerAnalysisOptions or None, not {type(self.layers).__name__}")
        steps: object = self.steps
        if isinstance(steps, str):
            if steps not in ("first", "all"):
                raise ValueError(f"steps must be 'first', 'all' or a sequence of step indices, not {steps!r}")
        elif isinstance(steps, Sequence):
            indices = tuple(int(i) for i in steps)
            if any(i < 0 for i in indices):
                raise ValueError(f"step indices must be >= 0, got {indices}")
            object.__setattr__(self, "steps", indices)
        else:
            raise TypeError(f"steps must be 'first', 'all' or a sequence of step indices, not {type(steps).__name__}")
        normalised: list[AttributionTarget] = []
        raw_targets: object = self.targets
        if not isinstance(raw_targets, Sequence):
            raise TypeError("targets must be a sequence")
        for target in raw_targets:
            if isinstance(target, AttributionTarget):
                normalised.append(target)
            elif isinstance(target, int):
                normalised.append(AttributionTarget(target))
            elif isinstance(target, Sequence) and len(target) == 2:
                normalised.append(AttributionTarget(int(target[0]), int(target[1])))
            else:
                raise TypeError(f"cannot use {target!r} as an attribution target")
        object.__setattr__(self, "targets", tuple(normalised))
        object.__setattr__(self, "positions", PositionSelection(self.positions))
        object.__setattr__(self, "precision", Precision(self.precision))
        object.__setattr__(self, "gate_mode", GateMode(self.gate_mode))
        for name in ("top_k", "tokens_per_vector", "vjp_chunk_size"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")

    @property
    def attribution_targets(self) -> tuple[AttributionTarget, ...]:
        """``targets`` as AttributionTarget objects (what __post_init__ normalised them to)."""
        return tuple(t if isinstance(t, AttributionTarget) else AttributionTarget(*_pair(t)) for t in self.targets)


def _pair(target: int | tuple[int, int]) -> tuple[int, int | None]:
    return (target, None) if isinstance(target, int) else (int(target[0]), int(target[1]))


# ----------------------------------------------------------------------------------------------------------------
# Explanation results (mirroring linlens.engine.results)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenScore:
    """A vocabulary token with a score (a logit or a cosine, depending on where it appears)."""

    token_id: int
    text: str
    score: float


@dataclass(frozen=True)
class PredictedToken:
    """A next-token candidate: its raw logit w . y and its probability under the model."""

    token_id: int
    text: str
    logit: float
    probability: float


@dataclass(frozen=True)
class Reconstruction:
    """How well y = sum_i J_i x_i + c holds for the Jacobian the server computed."""

    relative_error_vs_model: float
    relative_error_vs_detached: float
    max_abs_logit_error: float
    predicts_same_token: bool
    linear_token_id: int


@dataclass(frozen=True, eq=False)
class Attribution:
    """Exact split of a logit (or logit difference) over input tokens: sum(per_token) + constant == total."""

    target: AttributionTarget
    label: str
    per_token: FloatArray
    constant: float
    total: float
    completeness_error: float


@dataclass(frozen=True, eq=False)
class SingularComponent:
    """One singular triple (s, u, v) of J_i; u decoded through the LM head, v to the nearest input embeddings."""

    rank: int
    value: float
    left: FloatArray
    right: FloatArray
    left_tokens: tuple[TokenScore, ...]
    right_tokens: tuple[TokenScore, ...]


@dataclass(frozen=True, eq=False)
class PositionSpectrum:
    """The singular-value picture of one input position's Jacobian J_i."""

    position: int
    token_id: int
    token_text: str
    components: tuple[SingularComponent, ...]
    singular_values: FloatArray
    captured_share: tuple[float, ...]
    stable_rank: float
    term_norm: float


@dataclass(frozen=True)
class OrdinaryContrast:
    """The ordinary (not detached) Jacobian's reconstruction, for contrast."""

    relative_error_vs_model: float
    predicts_same_token: bool


@dataclass(frozen=True)
class Timings:
    """Milliseconds per phase; phases that did not run are 0. ``total_ms`` is wall-clock, queueing included."""

    queue_ms: float = 0.0
    generation_ms: float = 0.0
    forward_ms: float = 0.0
    jacobian_ms: float = 0.0
    attribution_ms: float = 0.0
    svd_ms: float = 0.0
    decode_ms: float = 0.0
    ordinary_ms: float = 0.0
    total_ms: float = 0.0


@dataclass(frozen=True, eq=False)
class LinearMapSpectrum:
    """The singular-value picture of one exact linear map (a layer's or a block's), and how well it reproduces the
    model's real output (``reconstruction_error``; NaN where not claimed)."""

    components: tuple[SingularComponent, ...]
    singular_values: FloatArray
    captured_share: tuple[float, ...]
    stable_rank: float
    term_norm: float
    reconstruction_error: float


@dataclass(frozen=True, eq=False)
class ComponentContribution:
    """What one attention or MLP block adds to the residual stream, as an exact share of y and of the logit."""

    layer: int
    #: "attention" or "mlp".
    component: str
    #: Its exact share of the explained logit.
    logit: float
    #: That share split over the input tokens (sums to ``logit - constant``).
    per_token: FloatArray
    constant: float
    y_norm: float
    y_share: float
    #: The block's own linear map; None unless component_spectra was requested.
    spectrum: LinearMapSpectrum | None = None


@dataclass(frozen=True, eq=False)
class LayerAttributions:
    """The layers x tokens attribution matrix of the explained logit, for explained step ``step``.

    ``per_layer[l, i]`` (= ``attention[l, i] + mlp[l, i]``) is the exact contribution of input token i through layer
    l to the logit; ``per_layer.sum() + direct.sum()`` plus any bias constants equals ``logit``.
    """

    step: int
    explained: PredictedToken
    input_tokens: tuple[str, ...]
    attention: FloatArray
    mlp: FloatArray
    per_layer: FloatArray
    direct: FloatArray
    attention_logits: FloatArray
    mlp_logits: FloatArray
    logit: float
    completeness_error: float
    decomposition_error: float


@dataclass(frozen=True, eq=False)
class LayerResult:
    """Everything computed for one selected layer of explained step ``step``."""

    step: int
    layer: int
    up_to_layer: LinearMapSpectrum | None
    layer_alone: LinearMapSpectrum | None
    attention: ComponentContribution
    mlp: ComponentContribution
    duration_ms: float = 0.0
    vjp_count: int = 0


@dataclass(frozen=True, eq=False)
class Explanation:
    """The explanation of one next-token prediction (generation step ``step``)."""

    step: int
    input_ids: tuple[int, ...]
    input_tokens: tuple[str, ...]
    predicted: PredictedToken
    explained: PredictedToken
    y: FloatArray
    constant: FloatArray
    has_bias: bool
    reconstruction: Reconstruction | None
    attributions: tuple[Attribution, ...]
    spectra: tuple[PositionSpectrum, ...]
    truncated_relative_error: tuple[float, ...]
    jacobians: FloatArray | None
    ordinary: OrdinaryContrast | None
    precision: Precision
    gate_mode: GateMode
    timings: Timings = field(default_factory=Timings)
    vjp_count: int = 0
    #: The layers x tokens matrix when ExplainOptions.layers was set.
    layer_attributions: LayerAttributions | None = None
    #: One result per selected layer when ExplainOptions.layers was set, in the requested order.
    layers: tuple[LayerResult, ...] = ()


# ----------------------------------------------------------------------------------------------------------------
# Generation results
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GeneratedToken:
    """One generated token; ``logprob`` is its natural-log probability under the model (temperature 1)."""

    index: int
    token_id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class Usage:
    """Token counts of one request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    explained_steps: int = 0


@dataclass(frozen=True)
class Generation:
    """A finished generation: the continuation (not the prompt), its tokens and any explanations."""

    model: str
    text: str
    tokens: tuple[GeneratedToken, ...]
    finish_reason: FinishReason
    usage: Usage
    explanations: tuple[Explanation, ...]
    timings: Timings
    #: The input as the model saw it, after chat templating.
    prompt_text: str


@dataclass(frozen=True)
class GenerationDone:
    """The last event of a stream: the summary of the finished generation."""

    model: str
    text: str
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    prompt_text: str


#: What ``generate_stream`` yields: tokens as they are generated, explanations as they are computed, each layer's
#: analysis as it is computed (ExplainOptions.layers: the LayerAttributions matrix, then one LayerResult per layer),
#: then done.
StreamEvent: TypeAlias = GeneratedToken | Explanation | LayerAttributions | LayerResult | GenerationDone


@dataclass(frozen=True)
class ExplainResult:
    """The answer of ``explain``: the explanation plus which model served it and the rendered input."""

    model: str
    prompt_text: str
    explanation: Explanation

    @property
    def layer_attributions(self) -> LayerAttributions | None:
        """The layers x tokens matrix (ExplainOptions.layers), also at ``explanation.layer_attributions``."""
        return self.explanation.layer_attributions

    @property
    def layers(self) -> tuple[LayerResult, ...]:
        """One result per selected layer (ExplainOptions.layers), also at ``explanation.layers``."""
        return self.explanation.layers


@dataclass(frozen=True)
class ModelInfo:
    """A model the server can serve. When ``loaded`` is False only name, source and is_default are meaningful."""

    name: str
    family: str
    architecture: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    dtype: str
    device: str
    load_seconds: float
    max_positions: int
    source: str
    is_default: bool
    loaded: bool


def to_jsonable(value: Any) -> Any:
    """Plain data (dicts, lists, str, int, float, bool, None) for any result: arrays become nested lists and enums
    their string values, so ``json.dumps(to_jsonable(result))`` works for a CLI or a log."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


def collect_stream(events: Iterable[StreamEvent]) -> Generation:
    """Assemble the events of ``generate_stream`` into the Generation that ``generate`` would have returned.

    Layer events are attached to the explanation of their step. Raises ValueError when the stream ended without its
    GenerationDone event (it was cut short).
    """
    tokens: list[GeneratedToken] = []
    explanations: list[Explanation] = []
    matrices: dict[int, LayerAttributions] = {}
    layers: dict[int, list[LayerResult]] = {}
    done: GenerationDone | None = None
    for event in events:
        if isinstance(event, GeneratedToken):
            tokens.append(event)
        elif isinstance(event, Explanation):
            explanations.append(event)
        elif isinstance(event, LayerAttributions):
            matrices[event.step] = event
        elif isinstance(event, LayerResult):
            layers.setdefault(event.step, []).append(event)
        else:
            done = event
    if done is None:
        raise ValueError("the stream ended without a GenerationDone event")
    explanations = [
        dataclasses.replace(
            e,
            layer_attributions=matrices.get(e.step, e.layer_attributions),
            layers=tuple(layers.get(e.step, e.layers)),
        )
        for e in explanations
    ]
    return Generation(
        model=done.model,
        text=done.text,
        tokens=tuple(tokens),
        finish_reason=done.finish_reason,
        usage=done.usage,
        explanations=tuple(sorted(explanations, key=lambda e: e.step)),
        timings=done.timings,
        prompt_text=done.prompt_text,
    )
