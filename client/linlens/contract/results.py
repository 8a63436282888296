"""What linlens answers: explanations, generations and model descriptions, as frozen dataclasses.

The engine returns these types, the server maps them to protobuf (``linlens.contract.wire``), and the SDK maps the
protobuf back to the very same types, so code written against a local model (``InProcessClient``, the engine's
``Explainer``) reads the same as code written against a server. Vectors and matrices are numpy arrays in the
precision the explanation ran in (read-only when they come off the wire). Durations are milliseconds. Classes holding
arrays compare by identity (``eq=False``): elementwise array comparison has no single truth value. Nothing here
imports torch, nor the reports: they are functions of these results (``linlens.report.to_html(result)``,
``save_html``, ``save_png``), so the arrow goes one way, from the report down to the results.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

import numpy as np
import numpy.typing as npt

from linlens.contract.options import AttributionTarget, ConceptMap, ExplainMethod, GateMode, Precision, SingularSide

FloatArray = npt.NDArray[np.floating]


# ----------------------------------------------------------------------------------------------------------------
# Explanations
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenScore:
    """A vocabulary token with a score (a logit or a cosine, depending on where it appears)."""

    token_id: int
    text: str
    score: float


@dataclass(frozen=True)
class PredictedToken:
    """A next-token candidate with its logit and its probability under the model."""

    token_id: int
    text: str
    #: The raw logit w . y (before any final soft-capping the model applies).
    logit: float
    probability: float


@dataclass(frozen=True)
class Reconstruction:
    """How well y = sum_i J_i x_i (+ c) holds for the Jacobian that was computed."""

    #: ||sum_i J_i x_i + c - y|| / ||y|| with y from the model's own, unmodified forward pass.
    relative_error_vs_model: float
    #: The same against the detached pass's own output: a pure numerical-exactness check.
    relative_error_vs_detached: float
    #: max_v |W (sum_i J_i x_i + c) - W y|_v over the whole vocabulary, W the LM head.
    max_abs_logit_error: float
    #: Whether argmax W (sum_i J_i x_i + c) is the explained model's top token.
    predicts_same_token: bool
    linear_token_id: int


@dataclass(frozen=True, eq=False)
class Attribution:
    """Exact split of a logit (or logit difference) over input tokens: sum(per_token) + constant == total."""

    target: AttributionTarget
    label: str
    #: a_i = w . J_i x_i for every input position i.
    per_token: FloatArray
    #: w . c, the part of the logit that comes from bias terms (0 for bias-free models).
    constant: float
    #: w . y from the model's own forward pass.
    total: float
    #: |sum(per_token) + constant - total| / |total|.
    completeness_error: float


@dataclass(frozen=True, eq=False)
class SingularComponent:
    """One singular triple (s, u, v) of a linear map, signs chosen so that u points along the mapped output."""

    #: 1 for the largest singular value.
    rank: int
    value: float
    left: FloatArray
    right: FloatArray
    #: u decoded through the LM head: the tokens whose logits u raises most.
    left_tokens: tuple[TokenScore, ...]
    #: v decoded to the input-embedding rows nearest by cosine (or logit-lens style for layer-alone maps).
    right_tokens: tuple[TokenScore, ...]
    #: ||A v - s u|| / s and ||A^T u - s v|| / s from fresh products: the triplet's certificate.
    residual_left: float = 0.0
    residual_right: float = 0.0


@dataclass(frozen=True, eq=False)
class PositionSpectrum:
    """The singular-value picture of one input position's Jacobian J_i."""

    position: int
    token_id: int
    token_text: str
    components: tuple[SingularComponent, ...]
    #: All singular values of J_i (descending), to plot the spectrum's decay.
    singular_values: FloatArray
    #: captured_share[k-1] = ||U_k^T J_i x_i||^2 / ||J_i x_i||^2: the share of this token's term in y that the
    #: rank-k truncation of J_i keeps, for k = 1..top_k.
    captured_share: tuple[float, ...]
    #: ||J_i||_F^2 / ||J_i||_2^2: the paper's "extremely low-dimensional" claim, as one number.
    stable_rank: float
    #: ||J_i x_i||: how much this token's term contributes to y in norm.
    term_norm: float
    #: Whether ``singular_values`` lists all of them (full method) or the top_k only (matrix-free).
    singular_values_complete: bool = True
    #: One standard error of ``stable_rank``: 0 when exact; matrix-free, ||J_i||_F^2 is a Hutchinson estimate.
    stable_rank_error: float = 0.0


@dataclass(frozen=True)
class OrdinaryContrast:
    """The ordinary (not detached) Jacobian, for contrast: it does not reconstruct y."""

    relative_error_vs_model: float
    predicts_same_token: bool


#: The explanation phases a Timings records, as named in metrics (``phase`` label) and in Timings' ``<phase>_ms``.
EXPLANATION_PHASES: tuple[str, ...] = (
    "forward",
    "jacobian",
    "attribution",
    "svd",
    "decode",
    "ordinary",
    "layers",
    "reconstruction",
)


@dataclass(frozen=True)
class Timings:
    """Milliseconds per phase; phases that did not run are 0.

    For one explanation, ``total_ms`` is the sum of its phases; for a request, the wall-clock time from arrival to
    the answer, queueing included.
    """

    queue_ms: float = 0.0
    generation_ms: float = 0.0
    forward_ms: float = 0.0
    jacobian_ms: float = 0.0
    attribution_ms: float = 0.0
    svd_ms: float = 0.0
    decode_ms: float = 0.0
    ordinary_ms: float = 0.0
    total_ms: float = 0.0
    layers_ms: float = 0.0
    reconstruction_ms: float = 0.0

    def phases_ms(self) -> dict[str, float]:
        """The explanation phases that ran, by name (see EXPLANATION_PHASES)."""
        spent = {phase: float(getattr(self, f"{phase}_ms")) for phase in EXPLANATION_PHASES}
        return {phase: ms for phase, ms in spent.items() if ms > 0}

    def __add__(self, other: Timings) -> Timings:
        return Timings(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)})


@dataclass(frozen=True, eq=False)
class LinearMapSpectrum:
    """The singular-value picture of one exact linear map z -> out (a layer's or a block's), and how well that map
    reproduces the model's real output (``reconstruction_error``; NaN where not claimed)."""

    components: tuple[SingularComponent, ...]
    singular_values: FloatArray
    captured_share: tuple[float, ...]
    stable_rank: float
    term_norm: float
    #: ||sum_j M_j z_j - out|| / ||out|| over every input position j (for affine maps, the constant included).
    reconstruction_error: float
    #: Whether ``singular_values`` lists all of them (full method) or the top_k only (matrix-free).
    singular_values_complete: bool = True
    #: One standard error of ``stable_rank`` (0 when exact).
    stable_rank_error: float = 0.0


@dataclass(frozen=True, eq=False)
class ComponentContribution:
    """What one attention or MLP block adds to the residual stream, as an exact part of y and of the logit."""

    layer: int
    component: Literal["attention", "mlp"]
    #: Its exact share of the explained token's logit: w . (g * term), g the final norm's frozen scale.
    logit: float
    #: That share split over input tokens (sums to ``logit - constant``).
    per_token: FloatArray
    #: The part of ``logit`` that comes from bias terms (0 for bias-free models).
    constant: float
    #: ||g * term||: the size of its contribution to y.
    y_norm: float
    #: (g * term) . y / ||y||^2: the share of y along y that this block writes.
    y_share: float
    #: The block's own linear map of the input embeddings; None unless component_spectra was requested.
    spectrum: LinearMapSpectrum | None = None


@dataclass(frozen=True, eq=False)
class LayerAttributions:
    """The layers x tokens attribution matrix of the explained logit, for explained step ``step``.

    ``per_layer[l, i]`` (= ``attention[l, i] + mlp[l, i]``) is the exact contribution of input token i through layer
    l to the logit; ``per_layer.sum() + direct.sum()`` plus the bias constants (each block's ``constant`` and this
    ``constant``) equals ``logit``.
    """

    explained: PredictedToken
    input_tokens: tuple[str, ...]
    attention: FloatArray
    mlp: FloatArray
    per_layer: FloatArray
    #: The embeddings' direct path (only the last token's embedding reaches y without passing a block).
    direct: FloatArray
    #: Per-layer totals (bias constants included).
    attention_logits: FloatArray
    mlp_logits: FloatArray
    #: The explained logit w . y from the model's own forward pass.
    logit: float
    #: |direct.sum() + attention_logits.sum() + mlp_logits.sum() - w . y| / |w . y|, y from the detached pass.
    completeness_error: float
    #: ||final norm(h_0 + sum of all block terms) - y|| / ||y|| (h_0 what enters the first layer, the final norm
    #: frozen): the residual decomposition of y is exact.
    decomposition_error: float
    step: int = 0
    #: The part of the logit outside every block that is constant: learned position embeddings on the direct path
    #: and the final norm's bias (GPT-2, GPT-NeoX); 0 for the other families. direct.sum() + constant +
    #: attention_logits.sum() + mlp_logits.sum() is the logit.
    constant: float = 0.0


@dataclass(frozen=True, eq=False)
class LayerResult:
    """Everything computed for one selected layer of explained step ``step``."""

    layer: int
    #: The residual stream after this layer (last position) as a map of the input embeddings, decoded logit-lens
    #: style; its reconstruction error covers every input position.
    up_to_layer: LinearMapSpectrum | None
    #: This layer's output (last position) as a map of its own input; reconstruction over all positions.
    layer_alone: LinearMapSpectrum | None
    attention: ComponentContribution
    mlp: ComponentContribution
    duration_ms: float = 0.0
    vjp_count: int = 0
    step: int = 0


@dataclass(frozen=True, eq=False)
class Explanation:
    """The explanation of one next-token prediction (generation step ``step``; 0 for Explain)."""

    input_ids: tuple[int, ...]
    input_tokens: tuple[str, ...]
    #: The model's own top prediction (argmax of its logits).
    predicted: PredictedToken
    #: The token that was explained (the generated token, the requested one, or the prediction).
    explained: PredictedToken
    #: The output embedding y: final hidden state, last position, after the final norm, before the LM head.
    y: FloatArray
    #: The affine constant c of y = sum_i J_i x_i + c (all zeros for bias-free models).
    constant: FloatArray
    has_bias: bool
    #: y = J x + c from one Jacobian-vector product (None only from servers before 0.2.0 without a full Jacobian).
    reconstruction: Reconstruction | None
    #: attributions[0] is the explained token; then one per ExplainOptions.targets entry.
    attributions: tuple[Attribution, ...]
    spectra: tuple[PositionSpectrum, ...]
    #: ||sum_i J_i^(k) x_i + c - y|| / ||y|| for k = 1..top_k (rank-k truncation of every J_i at once).
    truncated_relative_error: tuple[float, ...]
    #: (n, d, d) when ExplainOptions.include_jacobians, else None. jacobians[i] = dy/dx_i.
    jacobians: FloatArray | None
    ordinary: OrdinaryContrast | None
    precision: Precision
    gate_mode: GateMode
    timings: Timings = field(default_factory=Timings)
    #: Number of vector-Jacobian products this explanation needed.
    vjp_count: int = 0
    step: int = 0
    #: The layers x tokens matrix when ExplainOptions.layers was set.
    layer_attributions: LayerAttributions | None = None
    #: One result per selected layer when ExplainOptions.layers was set, in the requested order.
    layers: tuple[LayerResult, ...] = ()
    #: The method that computed the singular triplets (None when none were computed).
    method: ExplainMethod | None = None
    #: Number of Jacobian-vector products this explanation needed.
    jvp_count: int = 0
    #: The top_k triplets of the whole-prompt map [J_1 ... J_n] (ExplainOptions.prompt_spectrum): right vectors are
    #: (n, d) arrays; right tokens decode the position that holds most of each.
    prompt_spectrum: LinearMapSpectrum | None = None


# ----------------------------------------------------------------------------------------------------------------
# Generations
# ----------------------------------------------------------------------------------------------------------------


class FinishReason(str, enum.Enum):
    """Why a generation stopped."""

    UNSPECIFIED = "unspecified"
    LENGTH = "length"
    STOP_SEQUENCE = "stop_sequence"
    EOS = "eos"
    CONTEXT_LENGTH = "context_length"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class GeneratedToken:
    """One generated token."""

    index: int
    token_id: int
    #: The text this token adds to the generation (incremental decoding: the pieces concatenate to the text).
    text: str
    #: Natural-log probability under the model's own distribution (temperature 1, no truncation).
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
    #: The seed a sampled generation used, so that it can be repeated; None for greedy decoding.
    seed: int | None = None

    def done(self) -> GenerationDone:
        """The summary event a stream of this generation ends with (its fields are this generation's of that name)."""
        return GenerationDone(**{f.name: getattr(self, f.name) for f in dataclasses.fields(GenerationDone)})


@dataclass(frozen=True)
class GenerationDone:
    """The last event of a stream: the summary of the finished generation."""

    model: str
    text: str
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    prompt_text: str
    seed: int | None = None


@dataclass(frozen=True)
class ExplanationProgress:
    """How far an explanation has got: products done out of those planned for a phase ("jacobian", "spectra",
    "layers"; matrix-free totals are estimates, raised if the work needs more)."""

    phase: str
    done: int
    total: int
    step: int = 0


#: What a generation stream yields: tokens as they are generated, explanations as they are computed, each layer's
#: analysis as it is computed (ExplainOptions.layers: the LayerAttributions matrix, then one LayerResult per layer),
#: progress while an explanation runs, then done.
StreamEvent: TypeAlias = (
    GeneratedToken | Explanation | LayerAttributions | LayerResult | ExplanationProgress | GenerationDone
)


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


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


class ModelState(str, enum.Enum):
    """Where a configured model is in its life."""

    UNSPECIFIED = "unspecified"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class ModelInfo:
    """A model the server can serve. Until ``state`` is READY only name, source, is_default, state and
    state_detail are meaningful."""

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
    state: ModelState = ModelState.UNSPECIFIED
    #: While loading: what the loader is doing; after a failure: why it failed.
    state_detail: str = ""


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ConceptVector:
    """A concept vector: one singular vector of a concept prompt's detached map, with what it decodes to.

    Pass ``vector`` back as ``Steering(vector=...)`` to steer with it without computing it again.
    """

    model: str
    #: Unit-norm, hidden_size float32 values.
    vector: FloatArray
    singular_value: float
    #: Decoded as the explanation decodes it: left vectors through the LM head (score: logit; after the final norm's
    #: frozen scale for a LAYER map), right vectors to the nearest input embeddings (score: cosine).
    tokens: tuple[TokenScore, ...]
    map: ConceptMap
    #: The layer of a LAYER map; None for the OUTPUT map.
    layer: int | None
    rank: int
    side: SingularSide
    #: The concept prompt as the model read it (decoded tokens).
    prompt_text: str = ""


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


__all__ = [
    "EXPLANATION_PHASES",
    "Attribution",
    "ComponentContribution",
    "ConceptVector",
    "ExplainResult",
    "Explanation",
    "ExplanationProgress",
    "FinishReason",
    "FloatArray",
    "GeneratedToken",
    "Generation",
    "GenerationDone",
    "LayerAttributions",
    "LayerResult",
    "LinearMapSpectrum",
    "ModelInfo",
    "ModelState",
    "OrdinaryContrast",
    "PositionSpectrum",
    "PredictedToken",
    "Reconstruction",
    "SingularComponent",
    "StreamEvent",
    "Timings",
    "TokenScore",
    "Usage",
    "to_jsonable",
]
